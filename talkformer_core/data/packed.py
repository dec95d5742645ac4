"""Packed shards: a preprocessed shard small enough to carry to another machine, losslessly.

A shard's crops are raw uint8 (three clips of 5-8 s at 256 px: 96 MiB; zlib gets 77 MiB). Packed,
each crop is a lossless WebP image (identical pixels; 32 MiB for the same clips) and the other
arrays are stored compressed. The use: preprocess here (mediapipe, PyAV), train on a GPU machine
without them. ``unpack_shard`` restores the exact shard ``data.preprocess`` wrote.

    python -m talkformer_core.data.packed pack SHARD.npz PACKED.npz
    python -m talkformer_core.data.packed unpack PACKED.npz SHARD.npz
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import InputError
from .dataset import load_shard

PACKED_KEYS = ("crops_encoded", "crops_offsets", "crops_shape")
_WEBP_LOSSLESS = 101  # OpenCV: a WebP quality above 100 selects lossless


def encode_images(images: np.ndarray, name: str = "crops") -> dict[str, np.ndarray]:
    """(T, H, W, 3) uint8 RGB -> {name_encoded, name_offsets, name_shape}: lossless WebP bytes."""
    import cv2

    blobs = []
    for c in images:
        ok, buf = cv2.imencode(".webp", np.ascontiguousarray(c[..., ::-1]), [cv2.IMWRITE_WEBP_QUALITY, _WEBP_LOSSLESS])
        if not ok:
            raise InputError("this OpenCV build cannot write WebP images")
        blobs.append(buf.reshape(-1))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    data = np.concatenate(blobs).astype(np.uint8) if blobs else np.zeros(0, np.uint8)
    return {f"{name}_encoded": data, f"{name}_offsets": offsets, f"{name}_shape": np.array(images.shape, np.int64)}


def decode_images(arrays: dict[str, np.ndarray], name: str = "crops", source: str = "packed file") -> np.ndarray:
    """The inverse of ``encode_images`` (checked against the stored shape)."""
    import cv2

    keys = [f"{name}_{k}" for k in ("encoded", "offsets", "shape")]
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise InputError(f"{source}: missing {missing}; expected the output of "
                         "python -m talkformer_core.data.packed pack")
    enc, off, shape = arrays[keys[0]], arrays[keys[1]], tuple(int(v) for v in arrays[keys[2]])
    out = np.empty(shape, np.uint8)
    for t in range(shape[0]):
        img = cv2.imdecode(enc[off[t]:off[t + 1]], cv2.IMREAD_COLOR)
        if img is None or img.shape != shape[1:]:
            raise InputError(f"{source}: {name} image {t} could not be decoded (this OpenCV build may lack WebP)")
        out[t] = img[..., ::-1]
    return out


def pack_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Shard arrays -> packed arrays (crops as lossless WebP bytes, concatenated, with offsets)."""
    out = {k: v for k, v in arrays.items() if k != "crops"}
    out.update(encode_images(arrays["crops"], "crops"))
    return out


def unpack_arrays(packed: dict[str, np.ndarray], source: str = "packed shard") -> dict[str, np.ndarray]:
    """Packed arrays -> the shard's arrays (crops decoded, checked against the stored shape)."""
    if not all(k in packed for k in PACKED_KEYS):
        raise InputError(f"{source}: not a packed shard (missing {[k for k in PACKED_KEYS if k not in packed]}); "
                         "expected the output of python -m talkformer_core.data.packed pack")
    out = {k: v for k, v in packed.items() if k not in PACKED_KEYS}
    out["crops"] = decode_images(packed, "crops", source)
    return out


def pack_shard(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    arrays = load_shard(src)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}.npz")
    np.savez_compressed(tmp, **pack_arrays(arrays))
    os.replace(tmp, dst)
    return dst


def unpack_shard(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    from .preprocess import save_shard

    try:
        with np.load(src, allow_pickle=False) as z:
            packed = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"{src}: unreadable packed shard ({e})") from e
    return save_shard(Path(dst), unpack_arrays(packed, str(src)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m talkformer_core.data.packed", description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("pack", "unpack"))
    ap.add_argument("src")
    ap.add_argument("dst")
    a = ap.parse_args(argv)
    try:
        p = (pack_shard if a.mode == "pack" else unpack_shard)(a.src, a.dst)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {p} ({p.stat().st_size / 2 ** 20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

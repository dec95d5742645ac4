"""Preprocessing CLI: videos -> one training shard (.npz) per clip.

    python -m talkformer_core.data.preprocess --inputs DIR_OR_FILES... --out SHARD_DIR --preset small \
        [--crop-size N] [--shard i/N] [--workers K]

Per clip (all arrays indexed by the 25 fps frame t = 0..T-1):

    crops           (T, S, S, 3) uint8   face crops at the config's image_size S (face.track boxes)
    points478_px    (T, 478, 2)  float32 mediapipe points, frame pixels (NaN where not found)
    points131_px    (T, 131, 2)  float32 FULL_131 order, frame px, missing frames interpolated
    points131_crop  (T, 131, 2)  float32 crop frame [0, 1]
    points131_box   (T, 131, 2)  float32 box frame [0, 1] (IP-LAP's per-frame landmark box)
    crop_boxes      (T, 3)       float64 (x0, y0, size) px
    landmark_boxes  (T, 4)       float64 (x1, y1, x2, y2) px, IP-LAP's landmark box (topology.landmark_box)
    found           (T,)         bool    mediapipe found the face in that frame
    mels            (T, 80, 16)  float16 mel windows (audio.audio_windows)
    source, fps, frame_size (H, W), num_frames: metadata

Frames without a face keep interpolated points/boxes (the crop stays usable as a reference) but
``found`` False: the dataset never uses them as targets. Files are written atomically (temporary
name, then ``os.replace``); a clip whose shard exists is skipped (resumable). Rejected clips
(no audio, no face in too many frames, too short) are listed with the reason in ``rejected.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import PRESET_NAMES, TalkFormerConfig, preset

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv"}
FPS = 25.0
SHARD_VERSION = 1


@dataclass
class PreprocessOptions:
    crop_size: int
    min_frames: int  # clips shorter than this are rejected ("too short")
    min_found: float = 0.5  # fraction of frames with a face below which a clip is rejected
    mel_dtype: str = "float16"


def options_for(cfg: TalkFormerConfig, crop_size: int | None = None, margin: int = 10,
                min_found: float = 0.5) -> PreprocessOptions:
    """Crop size from the config (or the override); minimum length L + N + margin frames, so a
    window of L frames still leaves frames outside it for the reference and the N landmark sets."""
    m = cfg.model
    return PreprocessOptions(crop_size=int(crop_size or m.image_size),
                             min_frames=m.sequence_length + m.num_reference_landmarks + margin,
                             min_found=min_found)


def list_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded (recursively) to their video files; sorted, deduplicated."""
    from ..errors import InputError

    out: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in VIDEO_SUFFIXES and q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"{p}: no such file or folder; expected videos or folders of videos")
    seen, uniq = set(), []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            uniq.append(p)
    return uniq


def shard_name(path: Path) -> str:
    """Stable output name: the stem plus a short hash of the absolute path (stems may repeat)."""
    h = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{path.stem}-{h}.npz"


def take_shard(items: list[Path], shard: str | None) -> list[Path]:
    """``i/N``: every N-th input starting at i (0-based)."""
    if not shard:
        return items
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard {shard!r}: expected i/N with 0 <= i < N") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {shard!r}: expected i/N with 0 <= i < N")
    return items[i::n]


class Rejected(Exception):
    """A clip that cannot be a training clip; ``reason`` is one of no_audio/no_face/too_short/unreadable."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def process_clip(path: Path, opts: PreprocessOptions) -> dict[str, np.ndarray]:
    """One video -> the shard arrays (see the module docstring). Raises Rejected."""
    from ..audio import load_audio
    from ..errors import AudioError, InputError
    from ..face.landmarks import LandmarkDetector
    from ..video import iter_frames, probe_video

    try:
        info = probe_video(path)
    except InputError as e:
        raise Rejected("unreadable", str(e)) from None
    if not info.has_audio:
        raise Rejected("no_audio", f"{path} has no audio stream")
    try:
        wav = load_audio(path)
    except AudioError as e:
        raise Rejected("no_audio", str(e)) from None
    if info.frames_at(FPS) < opts.min_frames:  # cheap check before detection
        raise Rejected("too_short", f"{info.frames_at(FPS)} frames at 25 fps < {opts.min_frames}")

    # pass 1: landmarks (streamed)
    with LandmarkDetector() as det:
        lms = det.detect_sequence(iter_frames(path, FPS))
    T = len(lms)
    if T < opts.min_frames:
        raise Rejected("too_short", f"{T} frames at 25 fps < {opts.min_frames}")
    frac = float(lms.found.mean())
    if frac < opts.min_found:
        raise Rejected("no_face", f"a face in {lms.found.sum()} of {T} frames (< {opts.min_found:.0%})")
    return assemble_clip(lms, lambda: iter_frames(path, FPS, max_frames=T), wav, opts.crop_size, str(path))


def assemble_clip(lms, frames_fn, wav: np.ndarray, crop_size: int, source: str,
                  fps: float = FPS) -> dict[str, np.ndarray]:
    """Landmarks of a clip (face.landmarks.FaceLandmarks) + a callable giving its frames again +
    its 16 kHz audio -> the shard arrays. Shared by ``process_clip`` and callers that already hold
    frames and exact landmarks (synthetic data: ``FaceLandmarks`` built from the truth)."""
    from ..audio import audio_windows
    from ..errors import FaceError
    from ..face import topology
    from ..face.track import build_track, crop_frame

    T = len(lms)
    try:
        track = build_track(lms, crop_size=min(max(crop_size, 64), 512))
    except FaceError as e:
        raise Rejected("no_face", str(e)) from None
    # crops (streamed); crop_frame takes any size, the track's crop_size is only its default
    S = crop_size
    crops = np.empty((T, S, S, 3), np.uint8)
    n = 0
    for t, frame in enumerate(frames_fn()):
        if t >= T:
            break
        crops[t] = crop_frame(frame, track.boxes[t], S)
        n += 1
    if n < T:
        raise Rejected("unreadable", f"second decoding pass gave {n} frames, the first {T}")

    H, W = lms.size
    p131 = track.points131_filled.astype(np.float64)  # (T, 131, 2) px
    lboxes = np.array([topology.landmark_box(p, W, H) for p in p131], np.float64)  # (T, 4)
    _, mels = audio_windows(wav, num_frames=T, fps=fps)  # (T, 80, 16)
    return {
        "crops": crops,
        "points478_px": np.asarray(lms.points478, np.float32),
        "points131_px": p131.astype(np.float32),
        "points131_crop": topology.px_to_crop(p131, track.boxes).astype(np.float32),
        "points131_box": topology.normalize(p131, lboxes).astype(np.float32),
        "crop_boxes": track.boxes.astype(np.float64),
        "landmark_boxes": lboxes,
        "found": np.asarray(lms.found, bool),
        "mels": mels.astype(np.float16),
        "source": np.array(source),
        "fps": np.array(fps),
        "frame_size": np.array([H, W], np.int64),
        "num_frames": np.array(T, np.int64),
        "version": np.array(SHARD_VERSION, np.int64),
    }


def shard_from_synthetic(clip, crop_size: int, source: str = "synthetic") -> dict[str, np.ndarray]:
    """A shard straight from a ``data.synthetic.SyntheticClip`` with its TRUE landmarks (no
    video encode, no mediapipe): exact truth for tests and the learning test."""
    from ..face.landmarks import FaceLandmarks
    from ..face.topology import FULL_131

    p478 = np.asarray(clip.points478, np.float32)
    lms = FaceLandmarks(points478=p478, points131=np.ascontiguousarray(p478[:, list(FULL_131)]),
                        found=np.ones(len(p478), bool), size=tuple(clip.frames.shape[1:3]))
    return assemble_clip(lms, lambda: iter(clip.frames), clip.audio, crop_size, source, clip.fps)


def save_shard(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """np.savez (uncompressed: fast to load) under a temporary name, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _work(args: tuple[Path, Path, PreprocessOptions]) -> tuple[str, str, str]:
    """-> (source, status 'done'|'rejected', reason/detail)."""
    src, out, opts = args
    try:
        save_shard(out, process_clip(src, opts))
        return str(src), "done", ""
    except Rejected as e:
        return str(src), "rejected", f"{e.reason}|{e.detail}"


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def preprocess(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, cfg: TalkFormerConfig | str = "small",
               crop_size: int | None = None, shard: str | None = None, workers: int = 1,
               progress: bool = True, min_found: float = 0.5) -> dict[str, Any]:
    """Python API of the CLI. Returns {"done": [...], "skipped": [...], "rejected": {src: {reason, detail}}}."""
    from tqdm import tqdm

    cfg = preset(cfg) if isinstance(cfg, str) else cfg
    opts = options_for(cfg, crop_size, min_found=min_found)
    out = Path(out)
    from ..paths import check_output_dir

    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    items = take_shard(list_inputs(inputs), shard)
    todo, skipped = [], []
    for p in items:
        dst = out / shard_name(p)
        (skipped if dst.exists() else todo).append(p)
    result: dict[str, Any] = {"done": [], "skipped": [str(p) for p in skipped], "rejected": {}}
    jobs = [(p, out / shard_name(p), opts) for p in todo]
    bar = tqdm(total=len(jobs), desc="preprocess", unit="clip", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            results = []
            for r in pool.imap_unordered(_work, jobs):
                results.append(r)
                bar.update(1)
    else:
        results = []
        for j in jobs:
            results.append(_work(j))
            bar.update(1)
    bar.close()
    for src, status, why in results:
        if status == "done":
            result["done"].append(src)
        else:
            reason, detail = why.split("|", 1)
            result["rejected"][src] = {"reason": reason, "detail": detail}
    # rejected.json accumulates over runs and shards (a later success removes an entry)
    rj = out / "rejected.json"
    old = json.loads(rj.read_text()) if rj.exists() else {}
    old.update(result["rejected"])
    for src in result["done"]:
        old.pop(src, None)
    _write_json_atomic(rj, old)
    return result


def build_parser() -> argparse.ArgumentParser:
    from ..clitools import parser

    ap = parser("data.preprocess", "Videos -> training shards (one .npz per clip; resumable).")
    ap.add_argument("--inputs", nargs="+", required=True, help="video files and/or folders of videos")
    ap.add_argument("--out", required=True, help="shard folder")
    ap.add_argument("--preset", default="small", choices=PRESET_NAMES,
                    help="config preset (the same list as train and finetune): sets the crop size")
    ap.add_argument("--crop-size", type=int, default=None, help="override the config's image_size")
    ap.add_argument("--shard", default=None, help="i/N: process every N-th input starting at i (default: all)")
    ap.add_argument("--workers", type=int, default=1, help="processes (each runs its own mediapipe)")
    ap.add_argument("--min-found", type=float, default=0.5,
                    help="reject clips with a face in a smaller fraction of their frames")
    return ap


def main(argv: list[str] | None = None) -> int:
    from ..clitools import run

    a = build_parser().parse_args(argv)
    return run(lambda: _main(a), on_interrupt=f"interrupted: the finished shards are in {a.out}; run again "
                                              "to continue (finished clips are skipped)")


def _main(a: argparse.Namespace) -> int:
    res = preprocess(a.inputs, a.out, a.preset, a.crop_size, a.shard, a.workers, min_found=a.min_found)
    print(f"done {len(res['done'])}, skipped (already there) {len(res['skipped'])}, "
          f"rejected {len(res['rejected'])}")
    by_reason: dict[str, int] = {}
    for src, r in res["rejected"].items():
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
        print(f"  rejected {src}: {r['reason']} ({r['detail']})")
    if by_reason:
        print("rejected by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items())))
    print(f"rejections also in {Path(a.out) / 'rejected.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

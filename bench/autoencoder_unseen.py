"""Does a person autoencoder keep a closed mouth closed on frames it never saw? Side by side in one run.

For a clip's shard (as ``finetune --holdout 0.4`` wrote it) and one or more autoencoder checkpoints of
it (``CKPT.work/ae/last.safetensors``, or a person checkpoint), mediapipe reads the mouth opening
(inner-lip gap over the nose length, ``talkformer_core.eval.dubbing``) of the round trip
decode(encode(crop)), its lower face pasted into the crop as the generated faces are, on:

- ``training frames, closed``: the 8 training frames ([0, 0.6)) the tracker finds most closed;
- ``held-out frames, closed``: the 8 most closed of [0.6, 1.0), never trained on;
- ``closed, moved onto the template``: the closed training frames moved by the similarity taking
  their eyes, brows and nose onto those of the template frames ([0.8, 1.0)), lower face pasted into
  the template (what a closed mouth on the dubbed video's poses looks like), 16 frames.

Medians and maxima, against the same frames without the round trip (docs/dubbing.md, "The
autoencoder on frames it never saw").

    python bench/autoencoder_unseen.py --shard SHARD.npz --autoencoders AE1.safetensors [AE2 ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HOLDOUT = 0.4


def closed_sets(h, split) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (crops to round-trip (n, S, S, 3), the crops their lower faces are pasted into)}."""
    import cv2

    from talkformer_core.eval import dubbing as D

    S = h.crops.shape[1]
    op = D.mouth_opening(h.analysis.track.points131_filled.astype(np.float64))
    tr, te = split.train, split.template
    held = np.concatenate([split.audio, te])
    closed, held_closed = tr[np.argsort(op[tr])[:8]], held[np.argsort(op[held])[:8]]
    P = h.points_crop.astype(np.float64) * S
    tm, src = np.resize(te, 16), np.resize(closed, 16)
    moved = []
    for i, j in zip(tm, src):
        moved.append(cv2.warpAffine(h.crops[j], D.upper_face_similarity(P[j], P[i]), (S, S),
                                    flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE))
    return {"training frames, closed": (h.crops[closed], h.crops[closed]),
            "held-out frames, closed": (h.crops[held_closed], h.crops[held_closed]),
            "closed, moved onto the template": (np.stack(moved), h.crops[tm])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shard", type=Path, required=True)
    ap.add_argument("--autoencoders", type=Path, nargs="+", required=True)
    a = ap.parse_args(argv)
    import torch

    from talkformer_core.eval import dubbing as D
    from talkformer_core.face.blend import lower_face_mask
    from talkformer_core.finetune.dubbing import points478
    from talkformer_core.finetune.holdout import load_holdout, paste_lower_face
    from talkformer_core.models.autoencoder import AutoencoderKL
    from talkformer_core.models.checkpoint import checkpoint_config, load_model_state, read_checkpoint
    from talkformer_core.pixels import to_pixels, to_signed

    torch.set_num_threads(1)
    h = load_holdout(a.shard, HOLDOUT)
    split = D.split_clip(len(h.crops), h.analysis.found, 1 - HOLDOUT, 1 - HOLDOUT / 2)
    mask = lower_face_mask(h.crops.shape[1])
    aes = []
    for p in a.autoencoders:
        tensors, meta = read_checkpoint(p)
        ae = AutoencoderKL(checkpoint_config(meta, p).model.autoencoder).eval()
        load_model_state(ae, tensors, "autoencoder", source=p)
        aes.append(ae)

    def cell(crops: np.ndarray) -> str:
        o = D.mouth_opening(points478(crops))
        return f"{np.nanmedian(o):.3f} / {np.nanmax(o):.3f}"

    print("| closed mouths, opening median / max | as they are | " + " | ".join(str(p) for p in a.autoencoders) + " |")
    print("|---|---|" + "---|" * len(aes))
    for name, (crops, into) in closed_sets(h, split).items():
        row = [cell(paste_lower_face(crops, into, mask))]
        for ae in aes:
            with torch.no_grad():
                x = to_signed(torch.from_numpy(crops)).permute(0, 3, 1, 2)
                rec = to_pixels(ae.decode_latent(ae.encode_latent(x))).permute(0, 2, 3, 1).numpy()
            row.append(cell(paste_lower_face(rec, into, mask)))
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

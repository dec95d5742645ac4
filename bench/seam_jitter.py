"""Temp-Att parallel chains: lip-landmark jitter across segment seams vs inside segments.

    python bench/seam_jitter.py --checkpoint PERSON.safetensors --shard OUT.work/shards_64/CLIP.npz \
        [--segment 20] [--overlap 5] [--out seams.json]

Generates the clip's frames (driven by the detected landmarks, so only stage 2 varies) with the
serial Temp-Att chain and with parallel chains (sampling.FaceSampler; overlap cross-faded, and
the warm-up-only variant), detects the lips with mediapipe at 256 px, and measures per frame the
lip points' second difference |p[t+1] - 2 p[t] + p[t-1]| (px at 256; smooth motion cancels, a
jump does not). Reported: its mean at the frames around each seam (the overlap and the first
frame after it) and elsewhere, for each run; the serial chain at the same frames is the control
(the clip's own motion there). Also the same second difference of the lower half's pixels
(grey levels; no detector needed, for models whose faces mediapipe does not find). The checkpoint
must have temporal attention (ModelConfig).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def second_difference(points: np.ndarray) -> np.ndarray:
    """(T, P, 2) -> (T,) mean over points of |p[t+1] - 2 p[t] + p[t-1]| (NaN at both ends / misses)."""
    d = np.full(len(points), np.nan)
    if len(points) >= 3:
        acc = points[2:] - 2 * points[1:-1] + points[:-2]
        d[1:-1] = np.linalg.norm(acc, axis=-1).mean(-1)
    return d


def seam_frames(segs: list[tuple[int, int]], overlap: int) -> np.ndarray:
    """Frames whose second difference touches a seam: each later chain's overlap and one frame
    either side of it."""
    idx = set()
    for a, _ in segs[1:]:
        idx.update(range(a - 1, a + overlap + 1))
    return np.array(sorted(idx), dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--shard", required=True)
    ap.add_argument("--segment", type=int, default=20)
    ap.add_argument("--overlap", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--frames", type=int, default=0, help="first N found frames (0: all)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from talkformer_core import sampling as S
    from talkformer_core.face import topology
    from talkformer_core.finetune.dubbing import points478
    from talkformer_core.finetune.holdout import load_holdout, reference_frame
    from talkformer_core.pipeline import encode_reference, load_model

    model = load_model(a.checkpoint, "cpu")
    if not model.config.model.temporal_attention:
        print(f"{a.checkpoint}: no temporal attention in its config; parallel chains do not apply")
        return 2
    h = load_holdout(a.shard, 0.0)
    idx = h.train_idx if a.frames <= 0 else h.train_idx[:a.frames]
    crops, lms = h.crops[idx], h.points_crop[idx]
    ref = encode_reference(model, h.crops[reference_frame(h)])
    lips = [topology.FULL_131[i] for i in topology.LIP_POS]  # mediapipe indices of the 40 lip points
    L = model.sequence_length
    runs = {"serial": dict(batch_size=L, segment=len(idx) + L),
            "parallel_crossfade": dict(batch_size=len(idx), segment=a.segment, overlap=a.overlap),
            "parallel_warmup": dict(batch_size=len(idx), segment=a.segment, overlap=a.overlap, crossfade=False)}
    fs = S.FaceSampler(model, ref, steps=a.steps, sampler=a.sampler, **runs["parallel_crossfade"])
    segs = fs.segments(len(idx))
    seams = seam_frames(segs, a.overlap)
    inside = np.setdiff1d(np.arange(1, len(idx) - 1), seams)
    res = {"checkpoint": a.checkpoint, "frames": int(len(idx)), "segments": segs, "seam_frames": seams.tolist(),
           "runs": {}}
    for name, kw in runs.items():
        gen = S.FaceSampler(model, ref, steps=a.steps, sampler=a.sampler, **kw)(crops, lms)
        pts = points478(gen)[:, lips]  # (T, 40, 2) px at 256
        d = second_difference(pts)
        S_ = gen.shape[1]
        pix = second_difference(gen[:, S_ // 2:].reshape(len(gen), -1, 1).astype(np.float64))  # lower half
        row = {"detected": float(np.mean(~np.isnan(pts).any(axis=(1, 2))))}
        for key, v in (("lip", d), ("pixel", pix)):
            with np.errstate(all="ignore"):
                row[f"{key}_seam"] = float(np.nanmean(v[seams])) if np.isfinite(v[seams]).any() else None
                row[f"{key}_inside"] = float(np.nanmean(v[inside])) if np.isfinite(v[inside]).any() else None
            if row[f"{key}_seam"] is not None and row[f"{key}_inside"]:
                row[f"{key}_ratio"] = row[f"{key}_seam"] / row[f"{key}_inside"]
        res["runs"][name] = row
        print(f"{name:20} {row}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

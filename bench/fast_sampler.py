"""Fewest sampler steps at the quality of the paper's 200 DDIM steps, on a trained person model.

    python bench/fast_sampler.py --checkpoint PERSON.safetensors --shard OUT.work/shards_64/CLIP.npz \
        [--holdout 0.2] [--out fast_sampler.json]

The checkpoint's own clip (the shard ``finetune`` wrote): its last ``--holdout`` part (frames the
model did not train on), driven by the detected landmarks (so only stage 2's sampler differs
between rows), pasted into the true crops like the pipeline does (finetune.holdout.generate). Per row:
lower-face PSNR and LMD against the true frames (finetune.holdout.score: PSNR on the crop's lower half,
LMD by mediapipe at 256 px), and PSNR against the 200-step DDIM output itself. The chosen default
is the fewest DPM-Solver++(2M) steps whose PSNR is >= 98 % and LMD <= 102 % of 200-step DDIM's,
and every larger step count's too (``choose``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = [("ddim", 200), ("ddim", 50), ("ddim", 25), ("dpmpp_2m", 25), ("dpmpp_2m", 20), ("dpmpp_2m", 15),
        ("dpmpp_2m", 12), ("dpmpp_2m", 10), ("dpmpp_2m", 8), ("dpmpp_2m", 6), ("dpmpp_2m", 5)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def choose(rows: list[dict], tol: float = 0.02) -> dict | None:
    """The fewest-step dpmpp_2m row within ``tol`` of the ddim-200 row on PSNR and LMD, with every
    dpmpp_2m row of more steps within it too (one lucky row below a failing one is noise: LMD over
    a few dozen frames moves by a few % between neighbouring step counts)."""
    ref = next(r for r in rows if r["sampler"] == "ddim" and r["steps"] == 200)

    def ok(r: dict) -> bool:
        return r["psnr"] >= (1 - tol) * ref["psnr"] and r["lmd"] <= (1 + tol) * ref["lmd"]

    dpm = sorted((r for r in rows if r["sampler"] == "dpmpp_2m"), key=lambda r: r["steps"])
    for i, r in enumerate(dpm):
        if all(ok(x) for x in dpm[i:]):
            return r
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--shard", required=True, help="the clip's shard (.npz) from finetune's work directory")
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from talkformer_core.finetune.holdout import generate, load_holdout, score
    from talkformer_core.pipeline import load_model

    h = load_holdout(a.shard, a.holdout)
    model = load_model(a.checkpoint, "cpu")
    truth = h.crops[h.test_idx]
    rows, ref_out = [], None
    for sampler, steps in ROWS:
        t0 = time.perf_counter()
        gen = generate(model, h, audio_driven=False, steps=steps, sampler=sampler, seed=a.seed)
        secs = time.perf_counter() - t0
        s = score(gen, truth)
        ref_out = gen if ref_out is None else ref_out
        rows.append({"sampler": sampler, "steps": steps, "psnr": s["psnr"], "lmd": s["lmd"], "ssim": s["ssim"],
                     "psnr_vs_ddim200": psnr(gen, ref_out), "seconds": secs})
        r = rows[-1]
        print(f"{sampler:9} {steps:4d}  PSNR {r['psnr']:.2f} dB  LMD {r['lmd']:.3f}  "
              f"vs DDIM-200 {r['psnr_vs_ddim200']:.1f} dB  ({secs:.1f} s)", flush=True)
    best = choose(rows)
    res = {"checkpoint": str(a.checkpoint), "shard": str(a.shard), "test_frames": int(len(h.test_idx)),
           "rows": rows, "choice": best}
    print("choice:", "none within 2 %" if best is None else f"dpmpp_2m {best['steps']} steps")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

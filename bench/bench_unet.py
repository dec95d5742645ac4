"""U-Net speed on CPU: per-step time with and without the step-invariant caches, achieved GFLOP/s
against this machine's matmul GFLOP/s (measured in the same run), paper-preset size and FLOPs.

    python bench/bench_unet.py [--presets tiny small] [--frames 8] [--repeats 5] [--threads N]

Scenario: one sampling step for a batch of N frames (clips of L frames, one reference latent per
clip). "uncached" passes the raw landmarks and reference latent at every step
(the appearance encoder and every K/V are recomputed); "cached" passes LandmarkCache and
ReferenceCache made once (their one-time cost is printed separately). FLOPs are counted with
torch.utils.flop_counter.FlopCounterMode on the meta device (shapes only; on CPU tensors the
fused attention kernel is not counted), 1 multiply-add = 2 FLOPs. A 3x3 convolution counts its
direct FLOPs; oneDNN may run it with fewer (Winograd), so "of matmul" can exceed 100 %.
On a shared machine pass --threads 1: with 2 threads and other jobs running, every small op waits
for a descheduled OpenMP thread (measured here: a 1310x32x32 matmul took 22 ms vs 0.1 ms).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from talkformer_core.config import preset  # noqa: E402
from talkformer_core.models.appearance import AppearanceEncoder  # noqa: E402
from talkformer_core.models.model import parameter_counts  # noqa: E402
from talkformer_core.models.unet import TalkFormerUNet  # noqa: E402


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timeit(lambda: a @ b, repeats)
    return 2 * n ** 3 / t / 1e9


def build(cfg, device=None):
    with torch.device(device or "cpu"):
        app = AppearanceEncoder(cfg)
        unet = TalkFormerUNet(cfg, appearance=app)
    return app.eval(), unet.eval()


def inputs(cfg, N, device=None, B_ref=1):
    s, C = cfg.latent_size, cfg.latent_channels
    with torch.device(device or "cpu"):
        return (torch.randn(N, C, s, s), torch.full((N,), 500), torch.rand(N, 131, 2), torch.randn(B_ref, C, s, s))


@torch.no_grad()
def count_flops(cfg, N, L) -> dict[str, float]:
    """FLOPs of one cached step, one uncached step and the one-time cache preparation (meta device)."""
    app, unet = build(cfg, "meta")
    z, t, lm, zr = inputs(cfg, N, "meta", B_ref=N // L)
    out = {}
    with FlopCounterMode(display=False) as fc:
        lc, rc = unet.prepare_landmarks(lm), unet.prepare_reference(zr)
    out["prepare"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        unet(z, t, lc, rc, num_frames=L)
    out["cached"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        unet(z, t, lm, zr, num_frames=L)
    out["uncached"] = fc.get_total_flops()
    return out


@torch.no_grad()
def bench(name: str, frames: int, repeats: int, peak: float) -> None:
    cfg = preset(name).model
    L = cfg.sequence_length if frames % cfg.sequence_length == 0 else 1
    torch.manual_seed(0)
    app, unet = build(cfg)
    z, t, lm, zr = inputs(cfg, frames, B_ref=frames // L)  # one reference per clip
    t_prep = timeit(lambda: (unet.prepare_landmarks(lm), unet.prepare_reference(zr)), repeats)
    lc, rc = unet.prepare_landmarks(lm), unet.prepare_reference(zr)
    t_unc = timeit(lambda: unet(z, t, lm, zr, num_frames=L), repeats)
    t_cac = timeit(lambda: unet(z, t, lc, rc, num_frames=L), repeats)
    fl = count_flops(cfg, frames, L)
    print(f"| {name} | {frames} x {cfg.latent_size}x{cfg.latent_size} | {t_unc * 1e3:.1f} | {t_cac * 1e3:.1f} | "
          f"{t_unc / t_cac:.2f} | {t_prep * 1e3:.1f} | {fl['uncached'] / fl['cached']:.2f} | "
          f"{fl['cached'] / t_cac / 1e9:.1f} | {fl['cached'] / t_cac / 1e9 / peak:.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--frames", type=int, default=10, help="frames denoised together (N = B * L)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f}")

    print("\n## Parameters per module\n")
    print("| preset | autoencoder | landmark | appearance | unet | (TalkFormer part) | trainable | total |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("tiny", "small", "paper"):
        c = parameter_counts(name)
        print(f"| {name} | " + " | ".join(f"{c[k] / 1e6:.2f} M" for k in
              ("autoencoder", "landmark", "appearance", "unet", "unet.talkformer", "trainable", "total")) + " |")

    peak = matmul_gflops()
    print(f"\n## Per-step time on CPU (matmul 2048^3 fp32: {peak:.1f} GFLOP/s, same run)\n")
    print("| preset | frames | uncached ms | cached ms | ratio | cache build ms | FLOP ratio | cached GFLOP/s | of matmul |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.presets:
        bench(name, args.frames, args.repeats, peak)

    cfg = preset("paper").model
    fl = count_flops(cfg, 1, 1)
    print(f"\n## Paper preset ({cfg.latent_size}x{cfg.latent_size}x{cfg.latent_channels} latent)\n")
    c = parameter_counts("paper")
    print(f"U-Net {c['unet'] / 1e6:.1f} M + appearance encoder {c['appearance'] / 1e6:.1f} M parameters; "
          f"per frame per step: {fl['cached'] / 1e9:.1f} GFLOP cached, {fl['uncached'] / 1e9:.1f} GFLOP uncached; "
          f"cache build {fl['prepare'] / 1e9:.1f} GFLOP once per reference + frame.")


if __name__ == "__main__":
    main()

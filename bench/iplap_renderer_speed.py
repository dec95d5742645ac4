"""Forward time per frame of the IP-LAP renderer on this machine (N = 25 references, 128x128).

    /work/venv/bin/python bench/iplap_renderer_speed.py [--refs 25] [--repeats 3] [--iplap-dir DIR]

With --iplap-dir (or IPLAP_DIR), IP-LAP's own Renderer runs side by side on the same weights and
inputs (its VGG loss stood in for, see tests/fixtures/iplap/make_fixture_renderer.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from talkformer_core.models.iplap_renderer import IPLAPRenderer  # noqa: E402


def _fixture():
    spec = importlib.util.spec_from_file_location("mfr", ROOT / "tests/fixtures/iplap/make_fixture_renderer.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refs", type=int, default=25)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iplap-dir", default=os.environ.get("IPLAP_DIR"))
    args = ap.parse_args()
    fx = _fixture()
    x = fx.renderer_inputs(args.batch, args.refs, seed=0)
    ours = IPLAPRenderer().eval()
    ours.load_state_dict(fx.fill_deterministic(ours.state_dict()))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, B={args.batch}, N={args.refs}")
    rows = []
    with torch.inference_mode():
        for chunk in (1, 5, 25):
            ours.ref_chunk = chunk
            ours(**x)  # warm-up
            rows.append((f"ours (ref_chunk={chunk})", _time(lambda: ours(**x), args.repeats) / args.batch))
        if args.iplap_dir:
            theirs = fx.iplap_renderer(args.iplap_dir)
            theirs(**x)
            rows.append(("IP-LAP Renderer", _time(lambda: theirs(**x), args.repeats) / args.batch))
    for name, t in rows:
        print(f"{name:28s} {t:7.2f} s/frame  ({1 / t:.3f} frames/s)")


if __name__ == "__main__":
    main()

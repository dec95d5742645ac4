#!/usr/bin/env python3
"""Frames per second of the IP-LAP path (docs/iplap.md): pipeline.lipsync on a synthetic clip with a
random-weight IP-LAP checkpoint (the networks' cost does not depend on the weights).

    python bench/bench_iplap.py [--seconds 1] [--references 25 5] [--device cpu] [--json out.json]

Reports, per renderer reference count N: the whole run (analysis + rendering + encoding) in output
frames per second, and the renderer alone in seconds per frame. The machine's load average is
printed beside the numbers, since other work on the same cores slows them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_checkpoint(d: Path) -> Path:
    import torch

    from talkformer_core.config import LandmarkConfig
    from talkformer_core.convert import convert_iplap
    from talkformer_core.models.iplap_renderer import IPLAPRenderer
    from talkformer_core.models.landmark_completion import LandmarkCompletion

    torch.manual_seed(0)
    lg, rd = LandmarkCompletion(LandmarkConfig()), IPLAPRenderer()
    torch.save({"state_dict": lg.state_dict(), "optimizer": {}, "global_step": 0, "global_epoch": 0}, d / "lg.pth")
    torch.save({"state_dict": rd.state_dict(), "optimizer": {}, "global_step": 0, "global_epoch": 0}, d / "rd.pth")
    return convert_iplap(d / "lg.pth", d / "iplap.safetensors", d / "rd.pth")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="output length (the clip is 2 s)")
    ap.add_argument("--references", type=int, nargs="+", default=[25, 5])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import torch

    from talkformer_core import iplap_pipeline as ip
    from talkformer_core import pipeline
    from talkformer_core.data import synthetic

    results = {"device": a.device, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ckpt = make_checkpoint(d)
        clip = synthetic.make_clip(synthetic.load_photo("astronaut"), seed=0, duration=2.0, frame_size=256)
        video = synthetic.write_clip(clip, d / "clip.mp4")
        audio = (clip.audio[: int(16000 * a.seconds)], 16000)
        model = pipeline.load_model(ckpt, device=a.device, dtype="fp32")
        for n in a.references:
            render_s = []
            orig = ip.render

            def timed(*args, **kw):
                t0 = time.perf_counter()
                out = orig(*args, **kw)
                render_s.append((time.perf_counter() - t0) / len(args[1]))
                return out

            ip.render = timed
            try:
                load0 = os.getloadavg()[0]
                t0 = time.perf_counter()
                res = pipeline.lipsync(video, audio, model, d / f"out_{n}.mp4",
                                       pipeline.SyncOptions(iplap_references=n, batch_size=1))
                wall = time.perf_counter() - t0
            finally:
                ip.render = orig
            row = {"references": n, "frames": res.num_frames, "seconds": round(wall, 2),
                   "fps": round(res.num_frames / wall, 4),
                   "renderer_s_per_frame": round(sum(render_s) / len(render_s), 3),
                   "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)]}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

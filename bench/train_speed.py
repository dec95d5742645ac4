"""Training steps per second on this machine (CPU by default) for the tiny and small presets.

    python bench/train_speed.py [--steps 3] [--device cpu] [--presets tiny small]

Synthetic shards at each preset's crop size (exact-truth landmarks, no video), an untrained
autoencoder, the real training loop (train.train); the first step is excluded as warm-up.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batch-size", type=int, default=None, help="clips of L frames per step (default: preset's)")
    a = ap.parse_args()
    import torch

    from talkformer_core.config import preset
    from talkformer_core.data import synthetic
    from talkformer_core.data.preprocess import save_shard, shard_from_synthetic
    from talkformer_core.models.autoencoder import AutoencoderKL
    from talkformer_core.models.checkpoint import save_checkpoint
    from talkformer_core.train import train

    clip = synthetic.make_clip(synthetic.load_photo("astronaut"), seed=0, duration=2.0, frame_size=256)
    print(f"torch threads {torch.get_num_threads()}, device {a.device}")
    for name in a.presets:
        cfg = preset(name)
        bs = a.batch_size or cfg.train.batch_size
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            save_shard(d / "sh" / "c.npz", shard_from_synthetic(clip, cfg.model.image_size))
            ae = save_checkpoint(d / "ae.safetensors", {"autoencoder": AutoencoderKL(cfg.model.autoencoder)}, cfg)
            times = []
            cb = lambda step, total, vals: times.append(time.perf_counter())  # noqa: E731
            train(cfg, stage="talkformer", data=d / "sh", out=d / "run", steps=a.steps + 1, batch_size=bs,
                  autoencoder=ae, device=a.device, progress=False, callback=cb)
            dt = (times[-1] - times[0]) / (len(times) - 1)
            L = cfg.model.sequence_length
            print(f"{name:6s} crop {cfg.model.image_size:3d}, batch {bs} clips x L={L}: {1 / dt:.3f} steps/s "
                  f"({dt:.2f} s/step, {bs * L / dt:.1f} frames/s)")


if __name__ == "__main__":
    main()

"""python -m talkformer_core.train --stage autoencoder|talkformer --data SHARDS --preset P --out RUN [...]

One process, or several through torchrun (DDP):
    torchrun --nproc_per_node 4 -m talkformer_core.train --stage talkformer ...
"""
from __future__ import annotations

import argparse
import json
import sys

from ..config import PRESET_NAMES, preset
from .loop import train
from .options import STAGES


def build_parser() -> argparse.ArgumentParser:
    from ..clitools import parser

    ap = parser("train", "Train one stage (autoencoder or talkformer) on preprocessed shards; "
                         "one process or torchrun (DDP).")
    ap.add_argument("--stage", choices=STAGES, required=True,
                    help="autoencoder: the first stage (L1 + KL); talkformer: the joint loss (eq. 6), autoencoder frozen")
    ap.add_argument("--data", required=True, help="shard folder from python -m talkformer_core.data.preprocess")
    ap.add_argument("--preset", default="small", choices=PRESET_NAMES,
                    help="model and training preset (config.PRESET_NAMES, the list finetune offers; auto: cpu64 "
                         "on a CPU, gpu256 on a GPU; tiny: tests)")
    ap.add_argument("--config", default=None, help="a config JSON file instead of --preset")
    ap.add_argument("--out", required=True, help="run folder (checkpoint, state, logs, previews)")
    ap.add_argument("--crop-size", type=int, default=None, help="override the config's image_size")
    ap.add_argument("--autoencoder", default=None, help="our autoencoder checkpoint (stage talkformer)")
    ap.add_argument("--vae", default=None, help="an SD-style VAE .safetensors (stage talkformer)")
    ap.add_argument("--init-landmarks", default=None,
                    help="start the landmark completion module from this checkpoint (e.g. converted IP-LAP weights)")
    ap.add_argument("--lpips", default=None, help="LPIPS weights for a perceptual term (stage autoencoder)")
    ap.add_argument("--steps", type=int, default=1000, help="optimiser steps in all (a resumed run counts from 0)")
    ap.add_argument("--batch-size", type=int, default=None, help="per process and micro-batch (default: the config's)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimiser step")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the config's for the stage)")
    ap.add_argument("--no-end-to-end", action="store_true", help="w/o End2End ablation (U-Net fed ground truth)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last checkpoint (bit-exact, also after Ctrl-C)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="recompute ResBlocks and TalkFormer blocks in the backward pass (less memory)")
    ap.add_argument("--ema", action="store_true", help="keep an EMA of the weights (stored as ema.* in the checkpoint)")
    ap.add_argument("--preview-every", type=int, default=0, help="steps between preview images (0: none)")
    ap.add_argument("--preview-steps", type=int, default=10, help="DDIM steps of the preview sample")
    ap.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end and on Ctrl-C)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, batches, noise and dropout")
    ap.add_argument("--frames", type=float, nargs=2, default=(0.0, 1.0), metavar=("START", "END"),
                    help="fractions of every clip to train on (hold out the rest)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="stop cleanly (checkpoint written) after this much wall clock (default: no limit)")
    return ap


def main(argv: list[str] | None = None) -> int:
    from ..clitools import run

    a = build_parser().parse_args(argv)
    return run(lambda: _main(a), on_interrupt=f"interrupted: {a.out} holds the checkpoint of the last finished "
                                              "step; continue with --resume")


def _main(a: argparse.Namespace) -> int:
    from ..paths import check_output_dir

    check_output_dir(a.out)
    if a.config:
        from pathlib import Path

        from ..config import TalkFormerConfig
        from ..errors import InputError

        if not Path(a.config).is_file():
            raise InputError(f"--config {a.config}: no such file; expected a config JSON")
        with open(a.config) as f:
            cfg = TalkFormerConfig.from_json(f.read())
    else:
        cfg = preset(a.preset, a.device)
    if a.crop_size:
        cfg.model.image_size = cfg.model.autoencoder.resolution = a.crop_size
    if a.no_end_to_end:
        cfg.train.end_to_end = False
    res = train(cfg, stage=a.stage, data=a.data, out=a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                grad_accum=a.grad_accum, autoencoder=a.autoencoder, vae=a.vae, init_landmarks=a.init_landmarks,
                lpips=a.lpips, resume=a.resume, device=a.device, bf16=a.bf16,
                grad_checkpointing=a.grad_checkpointing, ema=a.ema, preview_every=a.preview_every,
                preview_steps=a.preview_steps, save_every=a.save_every, seed=a.seed, frames=tuple(a.frames),
                num_workers=a.workers, budget_minutes=a.budget_minutes)
    summary = {k: v for k, v in res.metrics.items() if not isinstance(v, list)}
    summary["last_loss"] = res.metrics["loss"][-1] if res.metrics["loss"] else None
    print(json.dumps({"checkpoint": str(res.checkpoint), **summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

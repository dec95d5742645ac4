"""What one training run is asked to do besides the model config: ``train``'s options, one place
for their defaults and their meaning (the CLI's flags map onto them)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

STAGES = ("autoencoder", "talkformer")


@dataclass
class TrainOptions:
    stage: str  # one of STAGES
    data: str | Path  # shard folder (python -m talkformer_core.data.preprocess)
    out: str | Path  # run folder: checkpoint, training state, logs, previews
    steps: int  # optimiser steps in all (a resumed run counts from 0)
    batch_size: int | None = None  # per process and micro-batch (global: x world x grad_accum); None: the config's
    lr: float | None = None  # None: the config's for the stage
    grad_accum: int = 1  # micro-batches accumulated per optimiser step
    autoencoder: str | Path | None = None  # stage talkformer: our autoencoder checkpoint, frozen
    vae: str | Path | None = None  # stage talkformer: an SD-style VAE .safetensors instead, frozen
    init_landmarks: str | Path | None = None  # start the landmark completion module from this checkpoint
    lpips: str | Path | None = None  # stage autoencoder: LPIPS weights for a perceptual term
    resume: bool = False  # continue the run in ``out`` (bit-exact, also after Ctrl-C)
    device: str | None = None  # None: CUDA if available, else the CPU (torchrun: one GPU per local rank)
    bf16: bool = False  # autocast to bfloat16 (CUDA, or a CPU that asks for it)
    grad_checkpointing: bool = False  # recompute ResBlocks and TalkFormer blocks in the backward pass
    ema: bool = False  # keep an EMA of the weights (ema.* in the checkpoint)
    preview_every: int = 0  # steps between preview images (0: none)
    preview_steps: int = 10  # DDIM steps of the preview sample
    save_every: int = 0  # steps between checkpoints (0: at the end and on an interrupt)
    seed: int = 0  # of the weights, batches, noise and dropout
    frames: tuple[float, float] = (0.0, 1.0)  # fractions of every clip to train on
    num_workers: int = 0  # DataLoader workers
    # stop cleanly (checkpoint written) when this much wall clock has run out; None: no limit
    budget_minutes: float | None = None
    # callback(step, steps, metrics) after every optimiser step (rank 0); raising from it stops
    # training after a checkpoint is written (an interrupt), and the exception propagates
    callback: Callable[[int, int, dict[str, float]], None] | None = None
    progress: bool = True  # a tqdm bar
    log_every: int = 1  # steps between CSV / TensorBoard rows
    # stage talkformer: encode every training frame with the frozen autoencoder once (LatentCache)
    # instead of three encodes per frame per step; None: when the cache fits in LATENT_CACHE_MAX_BYTES
    cache_latents: bool | None = None
    channels_last: bool | None = None  # NHWC weights, cuDNN's tensor-core layout for bf16 convs; None: on CUDA

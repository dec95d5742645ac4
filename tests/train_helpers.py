"""Shared by tests/test_dataset.py, test_train*.py: small synthetic shards with exact truth."""
from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=None)
def synthetic_clip(seed: int, duration: float = 1.6, frame_size: int = 96):
    from talkformer_core.data import synthetic

    return synthetic.make_clip(synthetic.load_photo("astronaut"), seed=seed, duration=duration,
                               frame_size=frame_size)


def write_shards(folder: Path, crop_size: int = 32, seeds=(0, 1), duration: float = 1.6,
                 frame_size: int = 96) -> Path:
    from talkformer_core.data.preprocess import save_shard, shard_from_synthetic

    folder.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        clip = synthetic_clip(s, duration, frame_size)
        save_shard(folder / f"syn{s:03d}.npz", shard_from_synthetic(clip, crop_size, f"synthetic seed {s}"))
    return folder


def tiny_config(**train_kw):
    from talkformer_core.config import tiny

    cfg = tiny()
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


def write_autoencoder(path: Path, cfg) -> Path:
    """An (untrained) autoencoder checkpoint with a fixed seed: the frozen first stage of tests."""
    import torch

    from talkformer_core.models.autoencoder import AutoencoderKL
    from talkformer_core.models.checkpoint import save_checkpoint

    torch.manual_seed(123)
    ae = AutoencoderKL(cfg.model.autoencoder)
    return save_checkpoint(path, {"autoencoder": ae}, cfg)

"""Shared by tests/test_pipeline.py, test_sync_cli.py, test_provenance.py, test_iplap_pipeline.py and
bench/frame_hashes.py: a tiny random-weight checkpoint, random-weight IP-LAP networks saved in IP-LAP's
training format, and synthetic talking clips (scikit-image's astronaut) written as mp4."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


@functools.lru_cache(maxsize=None)
def synthetic_clip(seed: int = 0, duration: float = 2.0, frame_size: int = 256):
    from talkformer_core.data import synthetic

    return synthetic.make_clip(synthetic.load_photo("astronaut"), seed=seed, duration=duration,
                               frame_size=frame_size)


def write_video(path: Path, frames, audio: np.ndarray | None = None, crf: int = 12) -> Path:
    from talkformer_core.video import VideoWriter

    with VideoWriter(path, 25.0, audio=audio, audio_rate=16000, crf=crf) as w:
        for f in frames:
            w.write(f)
    return path


def write_wav(path: Path, audio: np.ndarray, rate: int = 16000) -> Path:
    import soundfile as sf

    sf.write(str(path), np.asarray(audio, np.float32), rate)
    return path


def tiny_model(seed: int = 0):
    import torch

    from talkformer_core.config import tiny
    from talkformer_core.models.model import TalkFormer

    torch.manual_seed(seed)
    cfg = tiny()
    return cfg, TalkFormer(cfg)


def save_tiny_checkpoint(path: Path, seed: int = 0, external_vae: Path | None = None, **cfg_changes) -> Path:
    """A random-weight tiny checkpoint (models.checkpoint.save_checkpoint). With ``external_vae`` the
    autoencoder goes to that file and the checkpoint names it by hash."""
    from safetensors.torch import save_file

    from talkformer_core.models.checkpoint import external_vae_spec, save_checkpoint

    cfg, m = tiny_model(seed)
    modules = {"autoencoder": m.autoencoder, "landmark": m.landmark, "appearance": m.appearance, "unet": m.unet}
    ext = None
    if external_vae is not None:
        save_file({k: v.contiguous() for k, v in m.autoencoder.state_dict().items()}, str(external_vae))
        ext = external_vae_spec(external_vae, cfg.model.autoencoder)
    return save_checkpoint(path, modules, cfg, external_vae=ext)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def outside_mask(shape_hw, boxes, margin: int = 2) -> np.ndarray:
    """(H, W) bool: True outside every square box (x0, y0, side) widened by ``margin`` px (16 = one
    h264 macroblock, for frames compared after encoding)."""
    h, w = shape_hw
    m = np.ones((h, w), bool)
    g = margin
    for x0, y0, s in boxes:
        m[max(int(np.floor(y0)) - g, 0):int(np.ceil(y0 + s)) + g, max(int(np.floor(x0)) - g, 0):int(np.ceil(x0 + s)) + g] = False
    return m


def iplap_nets():
    """IP-LAP's landmark generator and renderer (their layouts), random weights, seed 0, with the
    BatchNorm statistics moved away from their defaults so loading them is checked."""
    import torch

    from talkformer_core.config import LandmarkConfig
    from talkformer_core.models.iplap_renderer import IPLAPRenderer
    from talkformer_core.models.landmark_completion import LandmarkCompletion

    torch.manual_seed(0)
    lg, rd = LandmarkCompletion(LandmarkConfig()), IPLAPRenderer()  # LandmarkConfig(): IP-LAP's layout
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in (lg, rd):
            for k, v in m.state_dict().items():
                if k.endswith("running_mean"):
                    v.copy_(0.1 * torch.randn(v.shape, generator=g))
                elif k.endswith("running_var"):
                    v.copy_(0.5 + torch.rand(v.shape, generator=g))
    return lg.eval(), rd.eval()


def iplap_training_format(sd: dict, prefix: str = "") -> dict:
    """IP-LAP's torch.save of {state_dict, optimizer, global_step, global_epoch} (train_*.py)."""
    return {"state_dict": {prefix + k: v for k, v in sd.items()}, "optimizer": {"state": {}, "param_groups": []},
            "global_step": 100, "global_epoch": 2}

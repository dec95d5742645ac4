"""A stage's starting weights read from files: our autoencoder checkpoint (stage talkformer's
frozen first stage) and a landmark completion module (e.g. IP-LAP's, converted)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..config import TalkFormerConfig
from ..errors import CheckpointError


def load_autoencoder_file(path: str | Path, cfg: TalkFormerConfig) -> tuple[dict[str, Tensor], Any]:
    """Our autoencoder checkpoint (autoencoder.* tensors + config with its scale factor)."""
    from ..models.checkpoint import checkpoint_config, read_checkpoint

    tensors, meta = read_checkpoint(path)
    ae_cfg = checkpoint_config(meta, path).model.autoencoder
    if not any(k.startswith("autoencoder.") for k in tensors):
        raise CheckpointError(f"{path}: holds no autoencoder.* tensors; expected a checkpoint of the "
                              "autoencoder stage (or give an SD VAE with --vae)")
    return tensors, ae_cfg


def init_landmarks_from(model: nn.Module, path: str | Path) -> None:
    """Start the completion module from an IP-LAP checkpoint converted by
    ``talkformer_core.convert`` (kind "iplap", tensors under ``landmark.``) or any of ours."""
    from ..models.checkpoint import load_model_state, read_checkpoint

    tensors, meta = read_checkpoint(path)
    if not any(k.startswith("landmark.") for k in tensors):
        raise CheckpointError(f"{path}: has no landmark.* tensors; expected a checkpoint made by "
                              "`python -m talkformer_core.convert iplap` (kind 'iplap') or a TalkFormer checkpoint")
    load_model_state(model.landmark, tensors, "landmark", source=path)

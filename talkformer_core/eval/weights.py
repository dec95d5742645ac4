"""Reading users' metric-network weight files (LPIPS, FID Inception, SyncNet) safely.

Pickle files (.pth, .pt, .model) are read only with ``torch.load(weights_only=True,
map_location="cpu")`` (never a full unpickle); a file it refuses gets a CheckpointError naming it.
``.safetensors`` files are read with safetensors. Nothing is ever downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import CheckpointError


def load_state_dict_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A weight file -> flat ``{name: tensor}``. ``what`` names the expected content in errors."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: {what} weight file not found")
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(p), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({e}); expected {what}") from e
    else:
        try:
            sd = torch.load(str(p), weights_only=True, map_location="cpu")
        except Exception as e:  # UnpicklingError, RuntimeError (not a zip / legacy file), EOFError ...
            raise CheckpointError(
                f"{p}: torch.load(weights_only=True) refused this file: {e.__class__.__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}. Expected {what} saved as a plain state "
                f"dict of tensors (pickled whole modules are not loaded, on purpose)"
            ) from e
    for key in ("state_dict", "model", "net"):  # common wrappers {"state_dict": {...}}
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{p}: expected {what} as a state dict of tensors, got {type(sd).__name__}")
    return {str(k): v for k, v in sd.items()}


def load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], path: str | Path, what: str,
              ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Copy ``sd`` into ``module`` strictly: every parameter and buffer present with its shape.

    ``num_batches_tracked`` may be absent (files saved by old torch versions); keys starting
    with ``ignore_prefixes`` (e.g. a classifier head the metric does not use) are dropped.
    """
    own = module.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore_prefixes)}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: not {what}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{path}: not {what}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
            )
    module.load_state_dict(sd, strict=False)

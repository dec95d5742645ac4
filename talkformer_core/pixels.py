"""Pixel conventions the model shares, each written once: the autoencoder's [-1, 1] range and the
masked face of stage 2.

    to_signed(x)        pixel values 0..255 -> float in [-1, 1]       x / 127.5 - 1
    to_pixels(x)        float in [-1, 1] -> uint8 0..255              clamp, (x + 1) * 127.5, round
    mask_lower_face(x)  face crops (..., H, W) in [-1, 1] -> a copy with rows [H//2:] set to -1
                        (black): the masked face whose latent upper half is the known context in
                        training and sampling alike (TalkFormer.encode_masked, the dataset's
                        ``masked``, the sampler's fused encoder pass; IP-LAP's renderer too, in
                        its [0, 1] range)

Each takes a numpy array or a torch tensor and returns the same kind; shapes are kept (the
channel axis is wherever the caller has it, except for mask_lower_face, whose last two axes are
H and W). Torch is imported only for tensors.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "dim")


def to_signed(x: Any, dtype: Any = None) -> Any:
    """Pixel values 0..255 (uint8, or floats) -> float in [-1, 1]; ``dtype`` the float type
    (default float32; for a tensor a torch dtype, the division then runs in it)."""
    if _is_tensor(x):
        import torch

        return x.to(torch.float32 if dtype is None else dtype) / 127.5 - 1.0
    return np.asarray(x, dtype=np.float32 if dtype is None else dtype) / 127.5 - 1.0


def to_pixels(x: Any, as_uint8: bool = True) -> Any:
    """Float in [-1, 1] -> pixel values 0..255: clamped to [-1, 1], then (x + 1) * 127.5, rounded to
    uint8 (``as_uint8`` False: left as floats, unrounded)."""
    if _is_tensor(x):
        import torch

        y = (x.float().clamp(-1, 1) + 1.0) * 127.5
        return y.round().to(torch.uint8) if as_uint8 else y
    y = (np.clip(x, -1.0, 1.0) + 1.0) * 127.5
    return np.round(y).astype(np.uint8) if as_uint8 else y


def mask_lower_face(crops: Any, black: float = -1.0) -> Any:
    """Face crops (..., H, W) -> a copy with the lower half, rows [H//2:], set to ``black``: -1 in
    our [-1, 1] range; 0 for IP-LAP's renderer, whose images are in [0, 1]."""
    masked = crops.clone() if _is_tensor(crops) else np.array(crops, copy=True)
    masked[..., crops.shape[-2] // 2:, :] = black
    return masked

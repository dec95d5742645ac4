"""Diffusion: the noise schedule, the lower-half training loss (eq. 1) and the samplers.

Knows nothing of the U-Net: the model is any ``model_fn(x_t (B, C, h, w), t (B,) long) -> eps``.
"""
from .losses import ldm_loss, lower_half_mask, upper_half_mask
from .samplers import SAMPLERS, get_sampler, sample_ddim, sample_ddpm, sample_dpmpp_2m
from .schedule import SPACINGS, NoiseSchedule, make_betas

__all__ = [
    "NoiseSchedule", "make_betas", "SPACINGS",
    "ldm_loss", "lower_half_mask", "upper_half_mask",
    "SAMPLERS", "get_sampler", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m",
]

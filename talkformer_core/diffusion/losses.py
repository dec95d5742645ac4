"""L_ldm, the paper's eq. 1, under the U-Net contract of docs/architecture.md.

    L_ldm = E_{z_0, eps, t} || eps - eps_theta(z_t, t, ...) ||^2   over the LOWER half of the latent

z_0 = E(ground-truth face) (B, C, h, w); the context c = E(masked face). The network input z_t is
c's upper half (rows [:h//2], clean, un-noised: the known context) stacked on the forward-noised
lower half of z_0 (rows [h//2:]). The loss is the mean over the lower half's elements only: the
upper half has no target. Why the context comes from E(masked face) and not E(ground truth) in
training too: the ground truth's upper rows leak mouth information through the encoder's receptive
field, which the model would learn to read and not find at inference.

The model is any callable ``model_fn(z_t (B, C, h, w), t (B,) long) -> eps (B, C, h, w)``;
landmarks, references and caches are closed over by the caller.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import InputError
from .schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lower_half_mask(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1, h, w) bool, True on rows [h // 2:] (the generated lower half)."""
    mask = torch.zeros(1, 1, h, w, dtype=torch.bool, device=device)
    mask[:, :, h // 2:, :] = True
    return mask


def upper_half_mask(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1, h, w) bool, True on rows [:h // 2] (the known context): the samplers' ``known_mask``."""
    return ~lower_half_mask(h, w, device)


def ldm_loss(model_fn: ModelFn, z0: torch.Tensor, context: torch.Tensor, schedule: NoiseSchedule,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None,
             valid: torch.Tensor | None = None,
             weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Epsilon-MSE on the lower half (eq. 1). Returns (scalar loss, info).

    z0, context: (B, C, h, w). t: (B,) long in [0, T) or None (uniform, from ``generator``).
    noise: (B, C, h, w) or None (standard normal from ``generator``); only its lower half is used.
    ``generator`` must live on z0's device. info holds (detached) ``t``, ``noise``, ``z_t``,
    ``eps_pred`` and ``loss_per_sample`` (B,) for logging the loss against t.
    ``valid``: optional (B, 1, 1, w) or (B, 1, h, w) bool, latent cells that have a target (a shift
    augmentation's filled-in border columns do not); the loss is the mean over valid lower-half cells.
    ``weight``: optional (B, 1, h, w) float >= 0, each cell's weight in that mean (a weighted mean:
    the loss keeps eq. 1's scale; with ``valid`` the two multiply).
    """
    if z0.dim() != 4:
        raise InputError(f"ldm_loss: expected z0 of shape (B, C, h, w), got {tuple(z0.shape)}")
    if context.shape != z0.shape:
        raise InputError(f"ldm_loss: context (E(masked face)) shape {tuple(context.shape)} != "
                         f"z0 (E(ground truth)) shape {tuple(z0.shape)}")
    B, C, h, w = z0.shape
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (B,), generator=generator, device=z0.device)
    if noise is None:
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    elif noise.shape != z0.shape:
        raise InputError(f"ldm_loss: noise shape {tuple(noise.shape)} != z0 shape {tuple(z0.shape)}")
    t = t.to(z0.device)

    lower = lower_half_mask(h, w, z0.device)  # (1, 1, h, w)
    # clean context above, noised ground truth below; torch.where keeps the context bit-exact
    z_t = torch.where(lower, schedule.q_sample(z0, t, noise), context)  # (B, C, h, w)
    eps_pred = model_fn(z_t, t)
    if eps_pred.shape != z0.shape:
        raise InputError(f"ldm_loss: model_fn returned shape {tuple(eps_pred.shape)}, expected "
                         f"{tuple(z0.shape)} (epsilon for z_t)")
    err = (eps_pred.float() - noise.float())[:, :, h // 2:, :] ** 2  # (B, C, h - h//2, w)
    if weight is not None:  # a weighted mean: the branch below serves both, as a float mask
        valid = weight if valid is None else weight * valid
    if valid is None:
        loss_per_sample = err.mean(dim=(1, 2, 3))  # (B,)
        loss = err.mean()  # mean over the lower half's elements (equal-size samples: = mean of per-sample)
    else:
        wgt = valid.expand(B, 1, h, w)[:, :, h // 2:, :].to(err.dtype)  # (B, 1, h - h//2, w)
        n = wgt.sum(dim=(1, 2, 3)).clamp_min(1.0) * C  # (B,)
        loss_per_sample = (err * wgt).sum(dim=(1, 2, 3)) / n
        loss = (err * wgt).sum() / n.sum()
    info = {"t": t.detach(), "noise": noise.detach(), "z_t": z_t.detach(),
            "eps_pred": eps_pred.detach(), "loss_per_sample": loss_per_sample.detach()}
    return loss, info

"""Samplers: plain functions with ONE signature (k-diffusion style), on the discrete schedule.

    sample_X(model_fn, noise, schedule, num_steps, *, known=None, known_mask=None, eta=0.0,
             callback=None, generator=None, spacing=None) -> x0   # (B, C, h, w)

- ``model_fn(x_t (B, C, h, w), t (B,) long) -> eps (B, C, h, w)``: any epsilon predictor. The
  samplers never see the network; landmarks, references and the step-invariant caches are closed
  over by the caller.
- ``noise`` (B, C, h, w): the starting x_T, standard normal. The state is kept in its dtype and
  device (pass float32; the step coefficients are float64 Python numbers).
- ``known`` (B, C, h, w) with ``known_mask`` (1 or B, 1, h, w) bool, True where known: that region
  is set EXACTLY (``torch.where``, bit-identical) to ``known`` in the start state, after every step
  and in the output. For TalkFormer, known = E(masked face), known_mask = upper half. The known
  region is NOT re-noised to the current noise level (as RePaint would): the U-Net was trained with
  a clean upper half at every t (losses.ldm_loss), so a clean upper half is the only
  input it knows. The known region of eps / x0 is never used for the unknown region, since every
  update below is elementwise.
- ``eta``: stochasticity. ddim: DDIM's eta (0 deterministic, 1 = DDPM ancestral); dpmpp_2m: 0 is
  DPM-Solver++(2M), > 0 its SDE variant; ddpm: unused (always ancestral).
- ``callback(step_index, num_steps, x, x0_pred)`` after every step (step_index 0..num_steps-1; x is
  the new state, x0_pred the step's data prediction, both with the known region set). Progress
  bars hook here; to INTERRUPT, raise from the callback: the exception propagates out of the
  sampler unchanged and nothing else needs cleaning up (ComfyUI's
  ``comfy.model_management.throw_exception_if_processing_interrupted`` raises exactly this way).
- ``generator``: a torch.Generator on noise's device for the stochastic samplers' fresh noise.
- ``spacing``: which timesteps to visit, see ``NoiseSchedule.timesteps``; None picks the sampler's
  own: "uniform" for ddim and ddpm (DDIM's; the paper's 200 DDIM steps), "logsnr" for dpmpp_2m.
- The last step goes to a = 1 (clean data), so every sampler returns the model's x0 prediction
  made at the lowest visited timestep.

Maths: DDIM (Song et al. 2021, eq. 12), DDPM posterior (Ho et al. 2020, eq. 6-7; guided-diffusion
``q_posterior_mean_variance`` on respaced steps), DPM-Solver++(2M) and its SDE variant (Lu et al.
2022, Alg. 2; k-diffusion ``sample_dpmpp_2m`` / ``sample_dpmpp_2m_sde`` written in the VP
variables). Note that Euler and Euler-ancestral in k-diffusion's sigma space, on these same
discrete sigmas, are algebraically DDIM with eta = 0 and eta = 1, so they are not repeated here.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..errors import InputError
from .schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


# -- shared plumbing ------------------------------------------------------------------------------
def _check_known(noise: torch.Tensor, known: Optional[torch.Tensor],
                 known_mask: Optional[torch.Tensor]) -> None:
    if noise.dim() != 4:
        raise InputError(f"sampler: expected noise of shape (B, C, h, w), got {tuple(noise.shape)}")
    if (known is None) != (known_mask is None):
        raise InputError("sampler: give both known (B, C, h, w) and known_mask (1 or B, 1, h, w) or neither")
    if known is None:
        return
    if known.shape != noise.shape:
        raise InputError(f"sampler: known shape {tuple(known.shape)} != noise shape {tuple(noise.shape)}")
    B, _, h, w = noise.shape
    if (known_mask.dtype != torch.bool or known_mask.dim() != 4 or known_mask.shape[0] not in (1, B)
            or known_mask.shape[1] != 1 or tuple(known_mask.shape[2:]) != (h, w)):
        raise InputError(f"sampler: expected known_mask bool of shape (1 or {B}, 1, {h}, {w}), got "
                         f"{known_mask.dtype} {tuple(known_mask.shape)}")


def _fix(x: torch.Tensor, known: Optional[torch.Tensor], known_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The known region set bit-exactly to ``known``."""
    return x if known is None else torch.where(known_mask, known, x)


class _Stepper:
    """Per-sampler setup: the visited timesteps with their a_t, and the model call."""

    def __init__(self, model_fn: ModelFn, noise: torch.Tensor, schedule: NoiseSchedule, num_steps: int,
                 known, known_mask, spacing: str):
        _check_known(noise, known, known_mask)
        self.model_fn, self.schedule = model_fn, schedule
        self.known = None if known is None else known.to(noise.device, noise.dtype)
        self.known_mask = None if known_mask is None else known_mask.to(noise.device)
        self.ts = schedule.timesteps(num_steps, spacing).tolist()  # descending ints
        ac = schedule.alphas_cumprod.cpu()
        self.a = [float(ac[t]) for t in self.ts]  # a_t of each visited step
        self.a_next = self.a[1:] + [1.0]  # the step i goes to a_next[i]; the last goes to clean data

    def eps_x0(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Model epsilon and the x0 prediction at step i (x0's known region fixed)."""
        B = x.shape[0]
        t = torch.full((B,), self.ts[i], dtype=torch.long, device=x.device)
        eps = self.model_fn(x, t)
        if eps.shape != x.shape:
            raise InputError(f"sampler: model_fn returned shape {tuple(eps.shape)}, expected {tuple(x.shape)}")
        eps = eps.to(x.dtype)
        a = self.a[i]
        x0 = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
        return eps, self.fix(x0)

    def fix(self, x: torch.Tensor) -> torch.Tensor:
        return _fix(x, self.known, self.known_mask)


def _randn(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# -- samplers -------------------------------------------------------------------------------------
@torch.no_grad()
def sample_ddim(model_fn: ModelFn, noise: torch.Tensor, schedule: NoiseSchedule, num_steps: int, *,
                known: Optional[torch.Tensor] = None, known_mask: Optional[torch.Tensor] = None,
                eta: float = 0.0, callback: Optional[Callback] = None,
                generator: Optional[torch.Generator] = None, spacing: Optional[str] = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) with any eta; eta = 0 is deterministic. The paper: 200 steps.

    x_prev = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z,  s = eta sqrt((1-a')/(1-a)) sqrt(1 - a/a').
    """
    st = _Stepper(model_fn, noise, schedule, num_steps, known, known_mask, spacing or "uniform")
    x = st.fix(noise)  # (B, C, h, w)
    for i in range(len(st.ts)):
        eps, x0 = st.eps_x0(x, i)
        a, a_prev = st.a[i], st.a_next[i]
        s = eta * math.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - s * s, 0.0)) * eps
        if s > 0:
            x = x + s * _randn(x, generator)
        x = st.fix(x)  # at the last step a' = 1, s = 0: x is x0 exactly
        if callback is not None:
            callback(i, len(st.ts), x, x0)
    return x


@torch.no_grad()
def sample_ddpm(model_fn: ModelFn, noise: torch.Tensor, schedule: NoiseSchedule, num_steps: int, *,
                known: Optional[torch.Tensor] = None, known_mask: Optional[torch.Tensor] = None,
                eta: float = 0.0, callback: Optional[Callback] = None,
                generator: Optional[torch.Generator] = None, spacing: Optional[str] = None) -> torch.Tensor:
    """Ancestral DDPM: sample the posterior q(x_prev | x_t, x0_pred) (Ho et al. eq. 6-7) on the
    respaced steps (improved-diffusion's respacing: beta' = 1 - a/a'). ``eta`` is unused. Written in
    the posterior-mean form as an independent check: it equals DDIM with eta = 1 (tests)."""
    st = _Stepper(model_fn, noise, schedule, num_steps, known, known_mask, spacing or "uniform")
    x = st.fix(noise)
    for i in range(len(st.ts)):
        _, x0 = st.eps_x0(x, i)
        a, a_prev = st.a[i], st.a_next[i]
        beta = 1.0 - a / a_prev  # the respaced step's beta
        c0 = math.sqrt(a_prev) * beta / (1.0 - a)  # posterior mean coefficient of x0
        ct = math.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a)  # ... of x_t
        var = beta * (1.0 - a_prev) / (1.0 - a)  # posterior variance (beta tilde); 0 at the end
        x = c0 * x0 + ct * x
        if var > 0:
            x = x + math.sqrt(var) * _randn(x, generator)
        x = st.fix(x)
        if callback is not None:
            callback(i, len(st.ts), x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model_fn: ModelFn, noise: torch.Tensor, schedule: NoiseSchedule, num_steps: int, *,
                    known: Optional[torch.Tensor] = None, known_mask: Optional[torch.Tensor] = None,
                    eta: float = 0.0, callback: Optional[Callback] = None,
                    generator: Optional[torch.Generator] = None, spacing: Optional[str] = None) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep in the data prediction (Lu et al. 2022, Alg. 2).

    With alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha / sigma), h = lambda' - lambda:
      x' = (sigma'/sigma) e^{-eta h} x + alpha' (1 - e^{-(1+eta) h}) D + sigma' sqrt(1 - e^{-2 eta h}) z
    with D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h (first step: D = x0). eta > 0 is the SDE
    variant (k-diffusion ``sample_dpmpp_2m_sde``, midpoint). The last step (to a = 1) returns x0.
    """
    st = _Stepper(model_fn, noise, schedule, num_steps, known, known_mask, spacing or "logsnr")
    x = st.fix(noise)
    x0_old, h_old = None, None
    for i in range(len(st.ts)):
        _, x0 = st.eps_x0(x, i)
        a, a_next = st.a[i], st.a_next[i]
        if a_next >= 1.0:  # to clean data: lambda' = inf, the update is x0 itself
            x = x0
        else:
            lam = 0.5 * math.log(a / (1.0 - a))
            lam_next = 0.5 * math.log(a_next / (1.0 - a_next))
            h = lam_next - lam
            d = x0 if x0_old is None else x0 + (x0 - x0_old) * (h / (2.0 * h_old))
            ratio = math.sqrt((1.0 - a_next) / (1.0 - a)) * math.exp(-eta * h)
            x = ratio * x + math.sqrt(a_next) * (-math.expm1(-(1.0 + eta) * h)) * d
            if eta > 0:
                x = x + math.sqrt(1.0 - a_next) * math.sqrt(-math.expm1(-2.0 * eta * h)) * _randn(x, generator)
            x0_old, h_old = x0, h
        x = st.fix(x)
        if callback is not None:
            callback(i, len(st.ts), x, x0)
    return x


Sampler = Callable[..., torch.Tensor]
SAMPLERS: dict[str, Sampler] = {
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddpm": sample_ddpm,
}


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise InputError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}") from None

"""The discrete T = 1000 noise schedule (DDPM, Ho et al. 2020; LDM's "linear" betas).

Notation (guided-diffusion / diffusers): for a timestep index t in [0, T),
``a_t = alphas_cumprod[t] = prod_{s <= t} (1 - beta_s)`` and the forward process is

    x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * eps,   eps ~ N(0, I)          (DDPM eq. 4)

The k-diffusion ("VE") view of the same process is x_t / sqrt(a_t) = x_0 + sigma_t * eps with
``sigma_t = sqrt((1 - a_t) / a_t)``; the DPM-Solver samplers use log-SNR
``lambda_t = -log(sigma_t)``.

Tables are float64 (the cumulative product loses ~1e-5 relative in float32 at t = 999); the
``extract`` helper hands out per-sample coefficients in the caller's dtype and device. The
schedule knows nothing of any network.
"""
from __future__ import annotations

import math
import operator

import torch

from ..config import DiffusionConfig
from ..errors import InputError

SPACINGS = ("uniform", "leading", "trailing", "logsnr")


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """(T,) float64 betas. "linear" is LDM's ``make_beta_schedule("linear")``:
    linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2 (what diffusers calls "scaled_linear")."""
    T = int(cfg.num_timesteps)
    if T < 1:
        raise InputError(f"DiffusionConfig.num_timesteps: expected >= 1, got {cfg.num_timesteps}")
    if cfg.beta_schedule == "linear":
        return torch.linspace(math.sqrt(cfg.beta_start), math.sqrt(cfg.beta_end), T,
                              dtype=torch.float64) ** 2
    raise InputError(f"DiffusionConfig.beta_schedule: expected 'linear' (LDM), got {cfg.beta_schedule!r}")


class NoiseSchedule:
    """Forward process, its inversions and sampler step subsequences on one discrete schedule.

    ``device`` is where the float64 tables live (default CPU); ``extract`` moves/casts on demand
    (and caches per device), so one schedule serves any device and dtype.
    """

    def __init__(self, cfg: DiffusionConfig | None = None, device: torch.device | str | None = None):
        self.cfg = cfg if cfg is not None else DiffusionConfig()
        self.num_timesteps = int(self.cfg.num_timesteps)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "mps":  # MPS has no float64: keep the master tables on the CPU
            device = torch.device("cpu")
        self.device = device
        f64 = dict(dtype=torch.float64, device=device)
        self.betas = make_betas(self.cfg).to(**f64)  # (T,)
        self.alphas = 1.0 - self.betas  # (T,)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,) a_t
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()  # (T,)
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()  # (T,)
        self.sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # (T,) k-diffusion
        self.log_snr = -torch.log(self.sigmas)  # (T,) lambda_t = log(sqrt(a) / sqrt(1 - a)), decreasing
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    # -- per-sample coefficients -------------------------------------------------------------
    def extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at timesteps t (B,) as (B, 1, ..., 1) in ``like``'s dtype and device."""
        t = self._check_t(t, like)
        key = (name, like.device)
        table = self._cache.get(key)
        if table is None:
            table = getattr(self, name)
            # float64 wherever the device has it; the cast to like.dtype happens after indexing
            table = table.to(like.device, torch.float32 if like.device.type == "mps" else torch.float64)
            self._cache[key] = table
        out = table[t.to(like.device)].to(like.dtype)  # (B,)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def _check_t(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.full((like.shape[0],), int(t), dtype=torch.long)
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise InputError("NoiseSchedule: timesteps must be integer indices in [0, T); got "
                                 f"non-integer float values {t.flatten()[:4].tolist()}")
            t = t.long()
        if t.dim() != 1 or t.shape[0] not in (1, like.shape[0]):
            raise InputError(f"NoiseSchedule: expected timesteps of shape ({like.shape[0]},), "
                             f"got {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise InputError(f"NoiseSchedule: timesteps must lie in [0, {self.num_timesteps}); got "
                             f"min {int(t.min())}, max {int(t.max())}")
        return t

    # -- forward process and its inversions ----------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (DDPM eq. 4). x0, noise (B, ...); t (B,)."""
        if noise.shape != x0.shape:
            raise InputError(f"q_sample: noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        return (self.extract("sqrt_alphas_cumprod", t, x0) * x0
                + self.extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t): inverts q_sample given the noise."""
        return ((x_t - self.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * eps)
                / self.extract("sqrt_alphas_cumprod", t, x_t))

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)."""
        return ((x_t - self.extract("sqrt_alphas_cumprod", t, x_t) * x0)
                / self.extract("sqrt_one_minus_alphas_cumprod", t, x_t))

    # -- sampler step subsequences -------------------------------------------------------------
    def timesteps(self, num_steps: int, spacing: str = "uniform") -> torch.Tensor:
        """(num_steps,) long CPU tensor of timestep indices, DESCENDING (the order of sampling).

        spacing:
          "uniform"  (default) floor(i * T / S), i = 0..S-1: DDIM's own ``skip_type="uniform"``
                     (Song et al., ``range(0, T, T // S)`` when S divides T), generalised so that
                     every S in [1, T] gives exactly S distinct steps. It ends at t = 0, so the
                     final x0 prediction is made at the lowest noise level (sigma_0 = 0.039; a
                     posterior mean there still lacks sigma_0^2 / (s^2 + sigma_0^2) of the
                     variance of width-s data: 1.6% at s = 0.3, 0.15% at s = 1).
          "leading"  LDM's ``make_ddim_timesteps``: i * (T // S) + 1 (the paper's DDIMSampler;
                     [1, 6, ..., 996] for S = 200). The last prediction is made at t = 1. When S
                     does not divide T the top T mod S timesteps are never visited.
          "trailing" round(T - i * T / S) - 1: starts at t = T - 1 (diffusers "trailing"); for very
                     few steps it starts closest to pure noise, but its last step is at T / S - 1,
                     so the final x0 prediction is a blurrier posterior mean.
          "logsnr"   the integer timesteps nearest to S points uniform in lambda_t between t = T - 1
                     and t = 0 (DPM-Solver's "logSNR" skip type), made distinct. It puts many more
                     steps at low noise than "uniform" (t = 0..8 take 8 of 50 steps): the second-order
                     DPM-Solver++ needs steps of similar size in lambda, and with "uniform" its last
                     step is 4.2x longer than the one before (DPM++ 2M at 50 steps: variance
                     of a N(0.7, 0.3^2) toy +17% with "uniform", -1.3% with "logsnr").
        The samplers step from each listed timestep to the next and from the last one to a = 1
        (clean data), returning the model's x0 prediction there.
        """
        T = self.num_timesteps
        try:
            S = operator.index(num_steps)  # ints, numpy ints; not floats or bools
        except TypeError:
            S = None
        if S is None or isinstance(num_steps, bool) or not 1 <= S <= T:
            raise InputError(f"num_steps: expected an integer in [1, {T}], got {num_steps!r}")
        i = torch.arange(S, dtype=torch.float64)
        if spacing == "uniform":
            ts = torch.floor(i * T / S)
        elif spacing == "leading":
            ts = i * (T // S) + (1 if S < T else 0)  # S = T: no room for LDM's +1 offset
        elif spacing == "trailing":
            ts = torch.round(T - i * T / S) - 1
        elif spacing == "logsnr":
            lam = self.log_snr.cpu()  # (T,) decreasing in t
            targets = torch.linspace(float(lam[0]), float(lam[-1]), S, dtype=torch.float64)  # t ascending
            nearest = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()  # (S,)
            out, prev = [], -1
            for k, n in enumerate(nearest):  # strictly increasing, leaving room for the steps above
                prev = min(max(n, prev + 1), T - S + k)
                out.append(prev)
            ts = torch.tensor(out, dtype=torch.float64)
        else:
            raise InputError(f"spacing: expected one of {list(SPACINGS)}, got {spacing!r}")
        return torch.sort(ts.long(), descending=True).values

    def __repr__(self) -> str:
        c = self.cfg
        return (f"NoiseSchedule(T={self.num_timesteps}, {c.beta_schedule}, beta {c.beta_start}..{c.beta_end}, "
                f"device={self.device})")

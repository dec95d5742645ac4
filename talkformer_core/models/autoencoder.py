"""LDM-style KL autoencoder (the frozen first stage of the latent diffusion model, paper §III-C).

Our own implementation with exactly the state-dict layout of latent-diffusion's ``AutoencoderKL``
(``ldm/models/autoencoder.py``, Encoder/Decoder in ``ldm/modules/diffusionmodules/model.py``), so a
user's Stable Diffusion VAE (f8, 4 latent channels, scale 0.18215) or LDM's KL-f4 (the paper's 64x64x3
latent at 256x256) loads unchanged; ``ae_layouts.json`` beside this file lists both layouts.

    x (B, 3, H, W) in [-1, 1] --encoder--> (B, 2 z, h, w) --quant_conv--> (mean, logvar) (B, 2C, h, w)
    z ~ N(mean, exp(logvar))  (B, C, h, w);  latent = scale_factor * z  (LDM: 1 / std of the latents)
    z --post_quant_conv--> (B, z, h, w) --decoder--> (B, 3, H, W)

with h = H / f, f = 2 ** (len(ch_mult) - 1).

Differences from LDM that do not touch the weights: the mid-block ("vanilla") attention runs
through ``F.scaled_dot_product_attention``; GroupNorm uses 32 groups as LDM does, except that a
channel count not divisible by 32 (tiny test configs only) uses gcd(32, C) groups; a VAE file whose
attention q/k/v/proj_out weights are stored 2-D (C, C) (some converted SD VAEs) is read as
(C, C, 1, 1) (by checkpoint.read_vae_file / normalize_vae_state_dict, which also hash the external VAE).
"""
from __future__ import annotations

import math
import os
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AutoencoderConfig
from ..errors import CheckpointError
from .checkpoint import normalize_vae_state_dict, read_vae_file

def kl_f4_config(scale_factor: float = 1.0) -> AutoencoderConfig:
    """latent-diffusion's KL-f4 (64x64x3 latent at 256x256), the paper's first stage.

    Its scale factor is not published with the weights: give 1 / std of your training latents.
    """
    return AutoencoderConfig(in_channels=3, out_ch=3, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2,
                             attn_resolutions=(), dropout=0.0, resolution=256, z_channels=3, embed_dim=3,
                             double_z=True, scale_factor=scale_factor)


# ----------------------------------------------------------------------------------------------
# Building blocks (LDM model.py: Normalize, ResnetBlock, AttnBlock, Downsample, Upsample)

def group_norm(channels: int) -> nn.GroupNorm:
    # LDM: GroupNorm(32, C, eps=1e-6). gcd fallback so tiny test widths (e.g. 16) still build;
    # parameter names and shapes do not depend on the group count.
    groups = 32 if channels % 32 == 0 else math.gcd(32, channels)
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)  # LDM's default (conv_shortcut=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (LDM "vanilla" attention)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head of width C; SDPA's default scale C^-0.5 is LDM's
        q, k, v = (p(h).reshape(B, 1, C, H * W).transpose(-1, -2) for p in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    m = nn.Module()
    m.block = nn.ModuleList(blocks)
    m.attn = nn.ModuleList(attns)
    return m


def _mid(ch: int, dropout: float) -> nn.Module:
    m = nn.Module()
    m.block_1 = ResnetBlock(ch, ch, dropout)
    m.attn_1 = AttnBlock(ch)
    m.block_2 = ResnetBlock(ch, ch, dropout)
    return m


class Encoder(nn.Module):
    """Image (B, in, H, W) -> moments (B, 2 z_channels, H/f, W/f) (or z_channels if not double_z)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        mult = tuple(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        res, ch_in = cfg.resolution, cfg.ch
        self.down = nn.ModuleList()
        for i, m in enumerate(mult):
            ch_out = cfg.ch * m
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch_in, ch_out, cfg.dropout))
                ch_in = ch_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(ch_in))
            level = _level(blocks, attns)
            if i != len(mult) - 1:
                level.downsample = Downsample(ch_in)
                res //= 2
            self.down.append(level)
        self.mid = _mid(ch_in, cfg.dropout)
        self.norm_out = group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2z, h, w)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h f, w f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        mult = tuple(cfg.ch_mult)
        ch_in = cfg.ch * mult[-1]
        res = cfg.resolution // 2 ** (len(mult) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, ch_in, 3, padding=1)
        self.mid = _mid(ch_in, cfg.dropout)
        levels: list[nn.Module] = []
        for i in reversed(range(len(mult))):  # built deepest first, stored shallowest first (LDM)
            ch_out = cfg.ch * mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch_in, ch_out, cfg.dropout))
                ch_in = ch_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(ch_in))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(ch_in)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, H, W)


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(exp(logvar))) over (B, C, h, w) (LDM distributions.py)."""

    def __init__(self, moments: torch.Tensor):  # (B, 2C, h, w)
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as LDM: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over (C, h, w): (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        if not cfg.double_z:
            raise ValueError("AutoencoderKL needs double_z=True (the encoder predicts mean and logvar)")
        self.config = cfg
        self.scale_factor = float(cfg.scale_factor)  # a plain float: not part of the state dict
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:  # x (B, 3, H, W) in [-1, 1]
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # z (B, C, h, w) unscaled -> (B, 3, H, W)
        return self.decoder(self.post_quant_conv(z))

    def encode_latent(self, x: torch.Tensor, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The diffusion model's latent: scale_factor * (posterior mean, or a sample). (B, C, h, w)"""
        post = self.encode(x)
        z = post.sample(generator) if sample else post.mode()
        return self.scale_factor * z

    def decode_latent(self, z_scaled: torch.Tensor) -> torch.Tensor:
        return self.decode(z_scaled / self.scale_factor)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Training: (reconstruction (B, 3, H, W), posterior)."""
        post = self.encode(x)
        z = post.sample(generator) if sample_posterior else post.mode()
        return self.decode(z), post

    def load_ldm_state_dict(self, sd: Mapping[str, torch.Tensor], strict: bool = True,
                            source: str | os.PathLike | None = None) -> None:
        """Load weights in LDM's key layout (bare, or under ``first_stage_model.``; LDM's
        ``loss.*`` keys are ignored). Every missing / unexpected / wrong-shape key is named."""
        sd = normalize_vae_state_dict(sd, source)
        expected = self.state_dict()
        problems = []
        for k, v in expected.items():
            if k not in sd:
                if strict:
                    problems.append(f"{k}: missing (expected shape {tuple(v.shape)})")
            elif tuple(sd[k].shape) != tuple(v.shape):
                problems.append(f"{k}: file has {tuple(sd[k].shape)}, this config expects {tuple(v.shape)}")
        if strict:
            problems += [f"{k}: unexpected key (shape {tuple(sd[k].shape)})" for k in sd if k not in expected]
        if problems:
            c = self.config
            raise CheckpointError(
                f"{source or 'state dict'}: does not fit an LDM autoencoder with embed_dim {c.embed_dim}, "
                f"downsampling {c.downsample}, ch {c.ch}, ch_mult {tuple(c.ch_mult)}, num_res_blocks "
                f"{c.num_res_blocks}, attn_resolutions {tuple(c.attn_resolutions)} ({len(problems)} "
                f"problem(s)):\n  " + "\n  ".join(problems))
        self.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=strict)

    @classmethod
    def from_file(cls, path: str | os.PathLike, cfg: AutoencoderConfig, *, strict: bool = True,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "AutoencoderKL":
        """Build from a .safetensors VAE (LDM layout), or a full SD/LDM checkpoint whose first stage
        is under ``first_stage_model.*``. Pickle files (.ckpt/.pt/.pth) are refused."""
        model = cls(cfg)
        model.load_ldm_state_dict(read_vae_file(path), strict=strict, source=path)
        return model.to(device=device, dtype=dtype).eval()


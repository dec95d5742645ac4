"""Appearance encoder (paper §III-C-2): features of the clean reference latent z_r at every U-Net scale.

An encoder-only U-Net of residual blocks, no self-attention and NO timestep input (z_r is clean,
so its features do not depend on the diffusion step and are computed once per reference).
Channel widths are the U-Net encoder's, so feats[i] has the U-Net hidden's shape at scale i+1:

    z_r (B, C, h, w) -> conv_in -> per scale i = 1..I: num_res_blocks x ResBlock -> feats[i-1]
    (the last ResBlock's output, (B, mult_i * mc, h / 2^(i-1), w / 2^(i-1))), then Downsample

The same feature serves the encoder and the decoder TalkFormer blocks of a scale; the middle
block uses the deepest (docs/architecture.md).

complete_reference_encoder=True ("+ CompleteRef", Table III): a full U-Net-shaped reference
network, encoder + middle (ResBlock, ResBlock) + decoder residual path with skips, still
timestep-free and attention-free. Our choice: encoder blocks read its encoder features, the middle
block its middle output, and the decoder blocks at scale i the output of its last decoder
ResBlock at scale i (the mirror of the position they sit at). Its decoder stops at scale 2 (scale
1 has no TalkFormer block, so a scale-1 decoder would be unused weights); decoder[0] is the
scale-1 encoder feature, only to keep the list full.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .unet import AppearanceFeatures, Downsample, Level, ResBlock, Upsample

__all__ = ["AppearanceEncoder", "AppearanceFeatures"]


class AppearanceEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        u = cfg.unet
        self.complete = cfg.complete_reference_encoder
        mc, I = u.model_channels, len(u.channel_mult)
        self.conv_in = nn.Conv2d(cfg.latent_channels, mc, 3, padding=1)
        self.encoder = nn.ModuleList()
        ch, skip_chs = mc, [mc]
        for i, mult in enumerate(u.channel_mult):
            level = Level()
            for _ in range(u.num_res_blocks):
                level.res.append(ResBlock(ch, mult * mc, None, u.dropout))
                ch = mult * mc
                skip_chs.append(ch)
            if i + 1 < I:
                level.resample = Downsample(ch)
                skip_chs.append(ch)
            self.encoder.append(level)
        if self.complete:
            self.mid = nn.ModuleList([ResBlock(ch, ch, None, u.dropout), ResBlock(ch, ch, None, u.dropout)])
            self.decoder = nn.ModuleList()
            for i in reversed(range(1, I)):  # scales I..2
                level, mult = Level(), u.channel_mult[i]
                for _ in range(u.num_res_blocks + 1):
                    level.res.append(ResBlock(ch + skip_chs.pop(), mult * mc, None, u.dropout))
                    ch = mult * mc
                if i > 1:  # no upsample after scale 2: nothing reads scale 1
                    level.resample = Upsample(ch)
                self.decoder.append(level)

    def features(self, z_r: Tensor) -> AppearanceFeatures:
        """z_r (B, C, h, w) -> AppearanceFeatures (encoder / middle / decoder lists, index 0 = scale 1)."""
        x = self.conv_in(z_r)  # (B, mc, h, w)
        skips, enc = [x], []
        for level in self.encoder:
            for res in level.res:
                x = res(x)
                skips.append(x)
            enc.append(x)  # the last residual block's output at this scale
            if level.resample is not None:
                x = level.resample(x)
                skips.append(x)
        if not self.complete:
            return AppearanceFeatures.from_list(enc)
        for res in self.mid:
            x = res(x)
        middle, dec = x, []
        for level in self.decoder:
            for res in level.res:
                x = res(torch.cat([x, skips.pop()], dim=1))
            dec.append(x)
            if level.resample is not None:
                x = level.resample(x)
        return AppearanceFeatures(enc, middle, [enc[0]] + dec[::-1])

    def forward(self, z_r: Tensor) -> list[Tensor]:
        """z_r (B, C, h, w) -> feats[i] for scales i = 1..I (the encoder features)."""
        return self.features(z_r).encoder

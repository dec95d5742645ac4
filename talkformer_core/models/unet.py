"""The denoising U-Net with TalkFormer blocks (paper §III-C; docs/architecture.md "The U-Net contract").

Structure follows latent-diffusion's ``openaimodel.UNetModel`` (ResBlocks with a timestep
embedding; encoder / middle / decoder with skip connections), written out plainly:

    z_t (N, C, h, w) -> conv_in -> encoder: per scale i = 1..I, num_res_blocks x [ResBlock (+TF)],
    then Downsample (not after the last) -> middle: ResBlock, TF, ResBlock -> decoder: per scale
    i = I..1, (num_res_blocks + 1) x [concat skip, ResBlock (+TF)], then Upsample (not after
    scale 1) -> GroupNorm, SiLU, conv_out -> epsilon (N, C, h, w)

TF = TalkFormerBlock, present at scales 2..I only (where LDM has attention); scale 1 (the full
latent resolution) has residual blocks only. The input is z_t alone (no mask channel); with
r_align=False the reference latent z_r is concatenated on channels (in_channels = 2C).

Batches: N = B * L frames, clip-major (frame n belongs to clip n // L). Landmarks are per frame
(N, 131, 2). The reference is one latent per clip, broadcast over its frames: B_ref = B, or
B_ref = 1 (one reference for every frame of the batch, e.g. one video), or B_ref = N. Attention
folds the frames that share a reference into one query sequence, so R-Align K/V are never copied.

Step-invariant caches (nothing in them depends on the diffusion step): ``prepare_reference`` runs
the appearance encoder and every R-Align block's K/V once per reference; ``prepare_landmarks``
every M-Align block's K/V once per frame; ``prepare_motion`` the Temp-Att motion K/V once per
clip. ``forward`` takes raw inputs or caches; both go through the same code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import InputError
from ..face.topology import JAW_POS, LIP_POS
from .talkformer import (KV, NUM_LANDMARKS, LandmarkEmbedding, LandmarkMLP, TalkFormerBlock,
                         group_norm, zero_module)


# ----------------------------------------------------------------------------------------------
# LDM building blocks

def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """LDM's sinusoidal timestep embedding [cos | sin]. t (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


class ResBlock(nn.Module):
    """LDM openaimodel.ResBlock (use_scale_shift_norm=False): skip(x) + out(in(x) + emb).

    emb_channels=None gives the timestep-free variant of the appearance encoder.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_channels: int | None, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = (nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_ch))
                           if emb_channels is not None else None)
        self.out_layers = nn.Sequential(group_norm(out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.in_layers(x)  # (N, out, H, W)
        if self.emb_layers is not None:
            h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (LDM conv_resample=True). (N, C, H, W) -> (N, C, H/2, W/2)"""

    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv. (N, C, H, W) -> (N, C, 2H, 2W)"""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One scale of an encoder or decoder: residual blocks, their TalkFormer blocks, a resampler."""

    def __init__(self):
        super().__init__()
        self.res = nn.ModuleList()
        self.tf = nn.ModuleList()  # empty at scale 1 and in the appearance encoder
        self.resample: nn.Module | None = None


def heads_for(channels: int, head_channels: int) -> int:
    return max(1, channels // head_channels)


# ----------------------------------------------------------------------------------------------
# appearance features and caches

@dataclass
class AppearanceFeatures:
    """Appearance-encoder outputs, index 0 = scale 1 (full latent resolution).

    encoder[i]: the output of the last residual block at scale i+1 (shape of the U-Net hidden
    there); middle: the feature for the middle block; decoder[i]: the feature for the decoder
    blocks at scale i+1. Encoder-only appearance encoder (paper default): middle = encoder[-1]
    (the deepest), decoder = encoder (the same tensors). complete_reference_encoder: the reference
    U-Net's own middle output and decoder features.
    """

    encoder: list[Tensor]
    middle: Tensor
    decoder: list[Tensor]

    @classmethod
    def from_list(cls, feats: list[Tensor]) -> "AppearanceFeatures":
        return cls(list(feats), feats[-1], list(feats))

    def for_block(self, part: str, scale: int) -> Tensor:
        if part == "middle":
            return self.middle
        return (self.encoder if part == "encoder" else self.decoder)[scale - 1]


# UNetConfig.landmark_map's channels: point positions in FULL_131 order (face.topology)
MAP_GROUPS: tuple[tuple[int, ...], ...] = (JAW_POS, LIP_POS[:20], LIP_POS[20:])  # jaw, outer lip, inner lip
# UNetConfig.landmark_fill's polygons: the outer and the inner lip contours (each in contour order)
FILL_GROUPS: tuple[tuple[int, ...], ...] = (LIP_POS[:20], LIP_POS[20:])


def polygon_coverage(poly: Tensor, h: int, w: int, sub: int) -> Tensor:
    """(N, P, 2) closed polygons in [0, 1] -> (N, h, w): the share of each cell inside the polygon,
    from sub x sub samples per cell (even-odd rule). Piecewise constant in the points: no gradient."""
    n = poly.shape[0]
    ys = (torch.arange(h * sub, device=poly.device, dtype=poly.dtype) + 0.5) / (h * sub)
    xs = (torch.arange(w * sub, device=poly.device, dtype=poly.dtype) + 0.5) / (w * sub)
    qy, qx = ys[:, None].expand(-1, w * sub).reshape(-1), xs[None, :].expand(h * sub, -1).reshape(-1)  # (M,)
    a, b = poly.detach(), poly.detach().roll(-1, dims=1)  # edges a -> b, (N, P, 2)
    ay, by = a[..., 1, None], b[..., 1, None]  # (N, P, 1)
    straddles = (ay > qy) != (by > qy)  # (N, P, M)
    t = (qy - ay) / torch.where(by == ay, torch.ones_like(by), by - ay)
    x_cross = a[..., 0, None] + t * (b[..., 0, None] - a[..., 0, None])
    inside = ((straddles & (qx < x_cross)).sum(dim=1) % 2).to(poly.dtype)  # (N, M)
    return inside.view(n, h, sub, w, sub).mean(dim=(2, 4))


def landmark_map(points: Tensor, h: int, w: int, sigma: float = 0.5, fill: bool = False) -> Tensor:
    """(N, 131, 2) crop-frame [0, 1] -> (N, 3, h, w): per group (jaw, outer lip, inner lip) the max over
    its points of a Gaussian dot, sigma in latent cells, at the cell centres ((j + 0.5) / w).
    ``fill``: (N, 5, h, w), then the outer- and inner-lip polygons' cell coverage (4 x 4 samples per
    cell up to a 16-cell latent, fewer above: ``polygon_coverage``)."""
    ys = (torch.arange(h, device=points.device, dtype=points.dtype) + 0.5)  # cell centres, in cells
    xs = (torch.arange(w, device=points.device, dtype=points.dtype) + 0.5)
    out = []
    for g in MAP_GROUPS:
        p = points[:, list(g)]  # (N, P, 2)
        dx = p[..., 0, None] * w - xs  # (N, P, w)
        dy = p[..., 1, None] * h - ys  # (N, P, h)
        d2 = dy[..., :, None] ** 2 + dx[..., None, :] ** 2  # (N, P, h, w)
        out.append(torch.exp(-d2 / (2 * sigma * sigma)).amax(dim=1))
    if fill:
        sub = max(1, min(4, 64 // max(h, w)))
        out += [polygon_coverage(points[:, list(g)], h, w, sub) for g in FILL_GROUPS]
    return torch.stack(out, dim=1)


@dataclass
class LandmarkCache:
    """Per TalkFormer block: M-Align K, V (N, heads, 131, d), or the (N, C) additive vector of the
    w/o-M-Align variant. Valid for the N frames it was made from, at every diffusion step."""

    per_block: list[Union[KV, Tensor]]
    batch: int
    map: Tensor | None = None  # (N, 3 or 5, h, w) UNetConfig.landmark_map, drawn once like the K/V


@dataclass
class ReferenceCache:
    """Per TalkFormer block: R-Align K, V (B_ref, heads, HW, d) (None for w/o R-Align), plus, for
    w/o R-Align, conv_in's contribution of the concatenated z_r (B_ref, model_channels, h, w).
    Valid for every step and every batch of frames that B_ref divides."""

    per_block: list[KV | None]
    batch: int
    input_bias: Tensor | None = None


@dataclass
class MotionCache:
    """Per TalkFormer block: Temp-Att K, V of the M motion frames (B*HW, heads, M, d); B clips."""

    per_block: list[KV | None]
    num_clips: int
    num_motion: int = field(default=2)


# ----------------------------------------------------------------------------------------------

class TalkFormerUNet(nn.Module):
    """epsilon_theta(z_t, t, landmarks, reference[, motion]) (paper eq. 1)."""

    def __init__(self, cfg: ModelConfig, appearance: nn.Module | None = None):
        super().__init__()
        u = cfg.unet
        if len(u.channel_mult) < 2:
            raise ValueError(f"unet.channel_mult={u.channel_mult}: need >= 2 scales (TalkFormer is at 2..I)")
        self.cfg = cfg
        self.latent_channels = C = cfg.latent_channels
        self.num_scales = I = len(u.channel_mult)
        self.m_align, self.r_align, self.temporal = cfg.m_align, cfg.r_align, cfg.temporal_attention
        mc = u.model_channels
        emb_ch = 4 * mc
        # the appearance encoder is a sibling in TalkFormer (state-dict key "appearance.*"); kept
        # here unregistered so that z_r can be passed straight to prepare_reference / forward. Any
        # module with ``features(z_r) -> AppearanceFeatures`` (appearance.AppearanceEncoder, which is
        # built from this module's blocks: it imports us, so we do not name its type)
        self.__dict__["appearance"] = appearance

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.landmark_embed = (LandmarkEmbedding(u.landmark_dim, u.position_features) if cfg.m_align
                               else LandmarkMLP(u.landmark_dim))
        self.conv_in = nn.Conv2d(C if cfg.r_align else 2 * C, mc, 3, padding=1)
        # zero-initialised like every other conditioning path: at init the output ignores the landmarks
        self.landmark_map_in = (zero_module(nn.Conv2d(len(MAP_GROUPS) + (len(FILL_GROUPS) if u.landmark_fill else 0),
                                                       mc, 3, padding=1)) if u.landmark_map
                                else None)
        if not cfg.r_align:  # z_r's half of conv_in starts at zero: output independent of z_r at init
            with torch.no_grad():
                self.conv_in.weight[:, C:].zero_()

        def tf(ch: int, part: str, scale: int) -> TalkFormerBlock:
            return TalkFormerBlock(ch, heads_for(ch, u.head_channels), u.landmark_dim, m_align=cfg.m_align,
                                   r_align=cfg.r_align, temporal=cfg.temporal_attention,
                                   num_motion=u.num_motion_frames, part=part, scale=scale,
                                   position_features=u.position_features)

        # encoder
        self.encoder = nn.ModuleList()
        ch, skip_chs = mc, [mc]
        for i, mult in enumerate(u.channel_mult):
            scale, level = i + 1, Level()
            for _ in range(u.num_res_blocks):
                level.res.append(ResBlock(ch, mult * mc, emb_ch, u.dropout))
                ch = mult * mc
                if scale >= 2:
                    level.tf.append(tf(ch, "encoder", scale))
                skip_chs.append(ch)
            if scale < I:
                level.resample = Downsample(ch)
                skip_chs.append(ch)
            self.encoder.append(level)
        # middle (scale I)
        self.mid_res1 = ResBlock(ch, ch, emb_ch, u.dropout)
        self.mid_tf = tf(ch, "middle", I)
        self.mid_res2 = ResBlock(ch, ch, emb_ch, u.dropout)
        # decoder, deepest scale first
        self.decoder = nn.ModuleList()
        for i in reversed(range(I)):
            scale, level, mult = i + 1, Level(), u.channel_mult[i]
            for _ in range(u.num_res_blocks + 1):
                level.res.append(ResBlock(ch + skip_chs.pop(), mult * mc, emb_ch, u.dropout))
                ch = mult * mc
                if scale >= 2:
                    level.tf.append(tf(ch, "decoder", scale))
            if scale > 1:
                level.resample = Upsample(ch)
            self.decoder.append(level)
        # LDM zero-initialises this conv; we do not: with it zero, no gradient would reach the
        # TalkFormer output convs in the first optimiser step (the end-to-end gradient of eq. 6).
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, C, 3, padding=1))

        # every TalkFormer block in forward order; the caches are lists in this order
        self.blocks: list[TalkFormerBlock] = [m for m in self.modules() if isinstance(m, TalkFormerBlock)]
        for i, b in enumerate(self.blocks):
            b.index = i

    # ------------------------------------------------------------------ step-invariant caches
    def prepare_landmarks(self, landmarks: Tensor) -> LandmarkCache:
        """landmarks (N, 131, 2), crop frame [0, 1] -> every M-Align block's K/V, once per frame."""
        if not (isinstance(landmarks, Tensor) and landmarks.ndim == 3 and landmarks.shape[1:] == (NUM_LANDMARKS, 2)):
            got = tuple(landmarks.shape) if isinstance(landmarks, Tensor) else type(landmarks).__name__
            raise InputError(f"TalkFormerUNet landmarks: expected a tensor (N, {NUM_LANDMARKS}, 2) in the crop "
                             f"frame, got {got}")
        emb = self.landmark_embed(landmarks.to(self.conv_in.weight.dtype))  # (N, 131, D) or (N, D)
        s = self.cfg.latent_size
        lmap = (landmark_map(landmarks, s, s, fill=self.cfg.unet.landmark_fill)
                if self.landmark_map_in is not None else None)  # (N, 3 or 5, s, s)
        return LandmarkCache([b.m_align.kv(emb) for b in self.blocks], landmarks.shape[0], lmap)

    def prepare_reference(self, reference: "Tensor | AppearanceFeatures | list[Tensor]") -> ReferenceCache:
        """The reference latent z_r (B_ref, C, h, w), or its appearance features -> ReferenceCache.

        Runs the appearance encoder (if given z_r) and every R-Align block's K/V, once per reference.
        w/o R-Align: z_r must be the latent; its conv_in contribution is cached instead.
        """
        if not self.r_align:
            if not isinstance(reference, Tensor) or reference.ndim != 4 or reference.shape[1] != self.latent_channels:
                raise InputError("TalkFormerUNet reference (r_align=False): expected the reference latent z_r "
                                 f"(B_ref, {self.latent_channels}, h, w)")
            C = self.latent_channels
            bias = F.conv2d(reference.to(self.conv_in.weight.dtype), self.conv_in.weight[:, C:], padding=1)
            return ReferenceCache([None] * len(self.blocks), reference.shape[0], input_bias=bias)
        feats = self._features(reference, "reference")
        return ReferenceCache([b.r_align.kv(feats.for_block(b.part, b.scale)) for b in self.blocks],
                              feats.encoder[0].shape[0])

    def prepare_motion(self, motion: Tensor, num_clips: int | None = None) -> MotionCache | None:
        """Latents of the M frames generated just before each clip (B, M, C, h, w) -> MotionCache.

        None when the model has no temporal attention (motion frames are then ignored).
        """
        if not self.temporal:
            return None
        if not isinstance(motion, Tensor) or motion.ndim != 5 or motion.shape[2] != self.latent_channels:
            got = tuple(motion.shape) if isinstance(motion, Tensor) else type(motion).__name__
            raise InputError(f"TalkFormerUNet motion: expected motion-frame latents (B, M, {self.latent_channels}, "
                             f"h, w), got {got}")
        B, M = motion.shape[:2]
        feats = self._features(motion.flatten(0, 1), "motion")  # (B*M, ...) clip-major
        per_block = [b.temporal.kv(feats.for_block(b.part, b.scale), B) for b in self.blocks]
        return MotionCache(per_block, B, M)

    def _features(self, x, what: str) -> AppearanceFeatures:
        if isinstance(x, AppearanceFeatures):
            return x
        if isinstance(x, (list, tuple)):
            if self.cfg.complete_reference_encoder:
                raise InputError(f"TalkFormerUNet {what}: complete_reference_encoder needs AppearanceFeatures "
                                 "(encoder, middle, decoder), not a list of encoder features")
            return AppearanceFeatures.from_list(list(x))
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != self.latent_channels:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"TalkFormerUNet {what}: expected a latent (B, {self.latent_channels}, h, w) or "
                             f"appearance features, got {got}")
        if self.appearance is None:
            raise InputError(f"TalkFormerUNet {what}: got a latent but this U-Net has no appearance encoder; "
                             "build it with TalkFormerUNet(cfg, appearance=...) or pass appearance features")
        return self.appearance.features(x.to(self.conv_in.weight.dtype))

    # ------------------------------------------------------------------ forward
    def forward(self, z_t: Tensor, t: Tensor | int | float,
                landmarks: Tensor | LandmarkCache,
                reference: Tensor | AppearanceFeatures | list[Tensor] | ReferenceCache,
                motion: Tensor | MotionCache | None = None, num_frames: int = 1) -> Tensor:
        """z_t (N, C, h, w), t (N,) or scalar, N = B * num_frames clip-major -> epsilon (N, C, h, w).

        landmarks: (N, 131, 2) crop frame, or a LandmarkCache of N frames.
        reference: z_r (B_ref, C, h, w) with B_ref in {1, B, N}, appearance features, or a ReferenceCache.
        motion: latents (B, M, C, h, w) of the frames generated before each clip, a MotionCache, or
        None (first clip: Temp-Att over the L frames only). Ignored without temporal attention.
        """
        N, C, h, w = z_t.shape
        if C != self.latent_channels:
            raise InputError(f"TalkFormerUNet z_t: expected {self.latent_channels} channels, got shape {tuple(z_t.shape)}")
        f = 2 ** (self.num_scales - 1)
        if h % f or w % f:
            raise InputError(f"TalkFormerUNet z_t: latent side must be divisible by {f}, got {h}x{w}")
        if num_frames < 1 or N % num_frames:
            raise InputError(f"TalkFormerUNet: batch of {N} frames is not a whole number of clips of {num_frames}")
        lm = landmarks if isinstance(landmarks, LandmarkCache) else self.prepare_landmarks(landmarks)
        ref = reference if isinstance(reference, ReferenceCache) else self.prepare_reference(reference)
        mo = motion if motion is None or isinstance(motion, MotionCache) else self.prepare_motion(motion)
        if not self.temporal:
            mo = None
        if lm.batch != N:
            raise InputError(f"TalkFormerUNet landmarks: {lm.batch} landmark sets for {N} frames")
        if N % ref.batch:
            raise InputError(f"TalkFormerUNet reference: {ref.batch} references cannot be shared evenly by "
                             f"{N} frames (expected 1, the number of clips {N // num_frames}, or {N})")
        if mo is not None and mo.num_clips != N // num_frames:
            raise InputError(f"TalkFormerUNet motion: {mo.num_clips} clips of motion frames for "
                             f"{N // num_frames} clips of {num_frames} frames")

        t = torch.as_tensor(t, device=z_t.device)
        t = t.expand(N) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.conv_in.out_channels).to(z_t.dtype))  # (N, 4mc)

        def tf(block: TalkFormerBlock, x: Tensor) -> Tensor:
            i = block.index
            return block(x, lm.per_block[i], ref.per_block[i], None if mo is None else mo.per_block[i], num_frames)

        if self.r_align:
            x = self.conv_in(z_t)  # (N, mc, h, w)
        else:  # conv_in over [z_t | z_r]; z_r's part is the cached input_bias, broadcast per clip
            x = F.conv2d(z_t, self.conv_in.weight[:, :C], self.conv_in.bias, padding=1)
            x = (x.unflatten(0, (ref.batch, N // ref.batch)) + ref.input_bias[:, None]).flatten(0, 1)
        if self.landmark_map_in is not None:
            if lm.map is None or lm.map.shape[-2:] != (h, w):
                raise InputError(f"TalkFormerUNet: this U-Net reads a {h}x{w} landmark map; its LandmarkCache must "
                                 f"come from this U-Net's prepare_landmarks at the config's latent size")
            x = x + self.landmark_map_in(lm.map.to(x.dtype))  # (N, mc, h, w)
        skips = [x]
        for level in self.encoder:
            for j, res in enumerate(level.res):
                x = res(x, emb)
                if len(level.tf):
                    x = tf(level.tf[j], x)
                skips.append(x)
            if level.resample is not None:
                x = level.resample(x)  # (N, ch, H/2, W/2)
                skips.append(x)
        x = self.mid_res2(tf(self.mid_tf, self.mid_res1(x, emb)), emb)
        for level in self.decoder:
            for j, res in enumerate(level.res):
                x = res(torch.cat([x, skips.pop()], dim=1), emb)
                if len(level.tf):
                    x = tf(level.tf[j], x)
            if level.resample is not None:
                x = level.resample(x)  # (N, ch, 2H, 2W)
        return self.out(x)  # (N, C, h, w)

    def hidden_shapes(self, latent_size: int | None = None) -> list[tuple[int, int, int]]:
        """(channels, H, W) of the hidden at each scale 1..I (what the appearance features match)."""
        s = latent_size or self.cfg.latent_size
        mc = self.cfg.unet.model_channels
        return [(m * mc, s >> i, s >> i) for i, m in enumerate(self.cfg.unet.channel_mult)]

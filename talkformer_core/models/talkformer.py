"""TalkFormer blocks (paper §III-C-1/-3): M-Align (eq. 3), R-Align (eq. 4-5), Temp-Att.

A TalkFormerBlock = M-Align -> R-Align -> optional Temp-Att. It sits after each residual block at
U-Net scales 2..I, where latent-diffusion has its attention blocks (docs/architecture.md).

Every sub-layer ends in a ZERO-initialised projection added residually, so at initialisation the
block is the identity and the U-Net output does not depend on landmarks, reference or motion frames.

Each attention layer splits into a step-invariant half and a per-step half so the U-Net can cache
what does not depend on the diffusion step: ``kv(...)`` turns the condition (landmark embedding,
appearance feature, motion feature) into keys/values once; ``forward(x, kv)`` does the per-step
queries and attention. All attention goes through ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_LANDMARKS = 131  # len(face.topology.FULL_131): IP-LAP's full-face landmark set

KV = tuple[Tensor, Tensor]  # keys, values: (B, heads, S, head_dim)


def group_norm(channels: int) -> nn.GroupNorm:
    """LDM's GroupNorm32 (32 groups), falling back to fewer groups for narrow layers."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter (LDM ``zero_module``): the layer starts as 'add nothing'."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def to_heads(x: Tensor, heads: int) -> Tensor:
    """(B, S, C) -> (B, heads, S, C // heads)"""
    B, S, C = x.shape
    return x.reshape(B, S, heads, C // heads).transpose(1, 2)


def from_heads(x: Tensor) -> Tensor:
    """(B, heads, S, d) -> (B, S, heads * d)"""
    B, h, S, d = x.shape
    return x.transpose(1, 2).reshape(B, S, h * d)


def tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, HW, C)"""
    return x.flatten(2).transpose(1, 2)


def untokens(x: Tensor, h: int, w: int) -> Tensor:
    """(B, HW, C) -> (B, C, H, W)"""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def attend_grouped(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Cross-attention of N frames' queries against B_kv key/value sets, N % B_kv == 0.

    q: (N, S, C) tokens; k, v: (B_kv, heads, S_kv, d). Frame n uses set n // (N // B_kv): one
    reference per clip serves its consecutive frames, one landmark set per frame (B_kv = N).
    Frames sharing a set are folded into one longer query sequence, which is exact (queries are
    independent in attention) and never expands or copies K/V.
    Returns (N, S, C).
    """
    N, S, C = q.shape
    B_kv = k.shape[0]
    if N % B_kv:
        raise ValueError(f"attention: {N} query frames cannot share {B_kv} key/value sets evenly")
    G = N // B_kv
    qh = q.reshape(B_kv, G * S, heads, C // heads).transpose(1, 2)  # (B_kv, heads, G*S, d)
    out = F.scaled_dot_product_attention(qh, k, v)  # (B_kv, heads, G*S, d)
    return out.transpose(1, 2).reshape(N, S, C)


SDPA_MAX_BATCH = 32768  # CUDA attention kernels put the batch on a grid axis capped at 65535


def sdpa_batched(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """F.scaled_dot_product_attention over a batch of many short sequences (Temp-Att: one per clip
    and latent position, B*HW of them), in pieces of at most SDPA_MAX_BATCH (exact: the batch
    entries are independent)."""
    if q.shape[0] <= SDPA_MAX_BATCH:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(q[i:i + SDPA_MAX_BATCH], k[i:i + SDPA_MAX_BATCH],
                                                     v[i:i + SDPA_MAX_BATCH])
                      for i in range(0, q.shape[0], SDPA_MAX_BATCH)])


def sinusoid(positions: Tensor, dim: int) -> Tensor:
    """Transformer sinusoidal encoding. positions (S,) -> (S, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    ang = positions.float()[:, None] * freqs[None]  # (S, half)
    enc = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    return F.pad(enc, (0, dim - 2 * half))


# ----------------------------------------------------------------------------------------------
# landmark embeddings (shared by all blocks of a U-Net; each block projects them to its own K/V)

POSITION_FREQUENCIES = 6  # Fourier features sin/cos(2^k pi p), k < 6, of x and y: 24 numbers


def fourier_features(p: Tensor, n: int = POSITION_FREQUENCIES) -> Tensor:
    """(..., 2) positions in [0, 1] -> (..., 4n) sin/cos of 2^k pi x and 2^k pi y, k = 0..n-1."""
    f = (2.0 ** torch.arange(n, device=p.device, dtype=p.dtype)) * math.pi  # (n,)
    a = p[..., None] * f  # (..., 2, n)
    return torch.cat([a.sin(), a.cos()], dim=-1).flatten(-2)  # (..., 4n)


def grid_positions(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(h*w, 2) crop-frame (x, y) in [0, 1] of the centres of an h x w feature map's cells, row-major."""
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(h * w, 2)


class LandmarkEmbedding(nn.Module):
    """Eq. 3's landmark embedding: a 1-D conv over the 131 points plus a learned per-point embedding.

    (B, 131, 2) crop-frame coordinates in [0, 1] -> (B, 131, D) tokens. The 1-D conv (kernel 3)
    mixes neighbours in FULL_131 order (contour-ordered edges); the per-point embedding lets
    attention tell points apart where coordinates alone would not (e.g. a closed mouth).
    """

    def __init__(self, dim: int, position_features: bool = False):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(2, dim, 1), nn.SiLU(),
            nn.Conv1d(dim, dim, 3, padding=1), nn.SiLU(),
            nn.Conv1d(dim, dim, 1),
        )
        self.point = nn.Parameter(torch.randn(NUM_LANDMARKS, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        # UNetConfig.position_features: the coordinates' Fourier features, the same map as the queries'
        self.position = nn.Linear(4 * POSITION_FREQUENCIES, dim) if position_features else None

    def forward(self, landmarks: Tensor) -> Tensor:
        x = (landmarks * 2 - 1).transpose(1, 2).contiguous()  # (B, 2, 131) in [-1, 1]; mkldnn conv1d is ~100x slower on strided input
        h = self.conv(x).transpose(1, 2)  # (B, 131, D)
        if self.position is not None:
            h = h + self.position(fourier_features(landmarks))  # (B, 131, D)
        return self.norm(h + self.point)  # (B, 131, D)


class LandmarkMLP(nn.Module):
    """w/o M-Align (paper §IV-D): one MLP embedding of all 262 coordinates. (B, 131, 2) -> (B, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * NUM_LANDMARKS, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, landmarks: Tensor) -> Tensor:
        return self.mlp((landmarks * 2 - 1).flatten(1))  # (B, D)


# ----------------------------------------------------------------------------------------------
# the three attention layers

class MAlign(nn.Module):
    """M-Align (eq. 3): hidden features attend to the 131 landmark embeddings.

    Q = MLP(GroupNorm(h)) over HW tokens; K, V = linear maps of the landmark embedding;
    h + ZeroConv1x1(softmax(QK^T / sqrt(d)) V).
    """

    def __init__(self, channels: int, heads: int, landmark_dim: int, position_features: bool = False):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.to_q = nn.Sequential(nn.Linear(channels, channels), nn.GELU(), nn.Linear(channels, channels))
        self.to_k = nn.Linear(landmark_dim, channels, bias=False)
        self.to_v = nn.Linear(landmark_dim, channels, bias=False)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))
        # UNetConfig.position_features: each query token's own crop-frame position, added to its input
        self.position = nn.Linear(4 * POSITION_FREQUENCIES, channels) if position_features else None

    def kv(self, emb: Tensor) -> KV:
        """emb (N, 131, D) -> K, V (N, heads, 131, d); once per frame, reused at every step."""
        return to_heads(self.to_k(emb), self.heads), to_heads(self.to_v(emb), self.heads)

    def forward(self, x: Tensor, kv: KV) -> Tensor:
        N, C, H, W = x.shape
        q_in = tokens(self.norm(x))  # (N, HW, C)
        if self.position is not None:
            q_in = q_in + self.position(fourier_features(grid_positions(H, W, x.device, q_in.dtype)))  # + (HW, C)
        q = self.to_q(q_in)  # (N, HW, C)
        a = attend_grouped(q, kv[0], kv[1], self.heads)  # (N, HW, C)
        return x + self.proj_out(untokens(a, H, W))


class LandmarkAdd(nn.Module):
    """w/o M-Align: the MLP landmark embedding projected to C and added at all positions."""

    def __init__(self, channels: int, landmark_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(landmark_dim, channels)))

    def kv(self, emb: Tensor) -> Tensor:
        """emb (N, D) -> (N, C): the per-frame additive vector (the 'cache' of this variant)."""
        return self.proj(emb)

    def forward(self, x: Tensor, add: Tensor) -> Tensor:
        return x + add[:, :, None, None]


class RAlign(nn.Module):
    """R-Align, implicit warping (eq. 4-5): hidden features attend to the reference appearance feature.

    Q = linear(GroupNorm(h)) from the M-Align output; K, V = linear(GroupNorm(F_a^i)) of the same
    scale's appearance feature; S = QK^T is HW x HW; h + ZeroConv1x1(softmax(S / sqrt(d)) V).
    """

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.norm_ref = group_norm(channels)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def kv(self, feat: Tensor) -> KV:
        """F_a^i (B_ref, C, H, W) -> K, V (B_ref, heads, HW, d); once per reference."""
        f = tokens(self.norm_ref(feat))  # (B_ref, HW, C)
        return to_heads(self.to_k(f), self.heads), to_heads(self.to_v(f), self.heads)

    def forward(self, x: Tensor, kv: KV) -> Tensor:
        N, C, H, W = x.shape
        q = self.to_q(tokens(self.norm(x)))  # (N, HW, C)
        a = attend_grouped(q, kv[0], kv[1], self.heads)  # (N, HW, C): frames of a clip share K/V
        return x + self.proj_out(untokens(a, H, W))


class SelfAttention2d(nn.Module):
    """w/o R-Align (paper §IV-D): a plain spatial self-attention layer in R-Align's place."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, kv: None = None) -> Tensor:
        N, C, H, W = x.shape
        q, k, v = self.qkv(tokens(self.norm(x))).chunk(3, dim=-1)  # 3 x (N, HW, C)
        a = F.scaled_dot_product_attention(*(to_heads(t, self.heads) for t in (q, k, v)))
        return x + self.proj_out(untokens(from_heads(a), H, W))


class TemporalAttention(nn.Module):
    """Temp-Att ("Ours + TempAttn"): self-attention along time at every spatial position.

    The sequence is [M motion frames | L current frames]; the motion frames are the same-scale
    appearance features of the M (= 2) frames generated just before this clip (as Hallo does).
    Queries come only from the L current frames, since only their outputs are kept; keys/values
    from all M + L. Sinusoidal time positions put the current frames at M..M+L-1 whether or not
    motion frames are given (first clip of a video: none, attention over the L frames only).
    """

    def __init__(self, channels: int, heads: int, num_motion: int):
        super().__init__()
        self.heads = heads
        self.num_motion = num_motion
        self.norm = group_norm(channels)
        self.norm_motion = group_norm(channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def _pos(self, start: int, n: int, x: Tensor) -> Tensor:
        return sinusoid(torch.arange(start, start + n, device=x.device), x.shape[-1]).to(x.dtype)

    def kv(self, feat: Tensor, num_clips: int) -> KV:
        """Motion features (B*M, C, H, W), clip-major -> K, V (B*HW, heads, M, d); once per clip."""
        BM, C, H, W = feat.shape
        M = BM // num_clips
        m = self.norm_motion(feat).reshape(num_clips, M, C, H * W).permute(0, 3, 1, 2)  # (B, HW, M, C)
        m = m.reshape(num_clips * H * W, M, C)
        m = m + self._pos(self.num_motion - M, M, m)  # the M frames just before position num_motion
        return to_heads(self.to_k(m), self.heads), to_heads(self.to_v(m), self.heads)

    def forward(self, x: Tensor, num_frames: int, motion: KV | None = None) -> Tensor:
        N, C, H, W = x.shape
        L, B = num_frames, N // num_frames
        h = self.norm(x).reshape(B, L, C, H * W).permute(0, 3, 1, 2).reshape(B * H * W, L, C)
        h = h + self._pos(self.num_motion, L, h)  # (B*HW, L, C)
        q = to_heads(self.to_q(h), self.heads)  # (B*HW, heads, L, d)
        k = to_heads(self.to_k(h), self.heads)
        v = to_heads(self.to_v(h), self.heads)
        if motion is not None:
            k = torch.cat([motion[0], k], dim=2)  # (B*HW, heads, M+L, d)
            v = torch.cat([motion[1], v], dim=2)
        a = self.proj_out(from_heads(sdpa_batched(q, k, v)))  # (B*HW, L, C)
        a = a.reshape(B, H * W, L, C).permute(0, 2, 3, 1).reshape(N, C, H, W)
        return x + a


# ----------------------------------------------------------------------------------------------

class TalkFormerBlock(nn.Module):
    """M-Align -> R-Align -> optional Temp-Att, at one place of the U-Net.

    ``part`` ('encoder' | 'middle' | 'decoder') and ``scale`` (2..I) say which appearance feature
    this block's R-Align reads (docs/architecture.md). Ablations swap sub-layers (paper §IV-D):
    m_align=False -> LandmarkAdd; r_align=False -> SelfAttention2d.
    """

    def __init__(self, channels: int, heads: int, landmark_dim: int, *, m_align: bool = True,
                 r_align: bool = True, temporal: bool = False, num_motion: int = 2,
                 part: str = "encoder", scale: int = 2, position_features: bool = False):
        super().__init__()
        self.part, self.scale = part, scale
        self.m_align = (MAlign(channels, heads, landmark_dim, position_features) if m_align
                        else LandmarkAdd(channels, landmark_dim))
        self.r_align = RAlign(channels, heads) if r_align else SelfAttention2d(channels, heads)
        self.temporal = TemporalAttention(channels, heads, num_motion) if temporal else None

    def forward(self, x: Tensor, landmark: KV | Tensor, reference: KV | None, motion: KV | None = None,
                num_frames: int = 1) -> Tensor:
        x = self.m_align(x, landmark)  # (N, C, H, W)
        x = self.r_align(x, reference)
        if self.temporal is not None:
            x = self.temporal(x, num_frames, motion)
        return x

"""Augmentations of stage talkformer for one-clip training (docs/dubbing.md).

The turn augmentation (TrainConfig.turn_augment): the lower face moved sideways against the upper
face, as a head turn moves the mouth and chin against the eyes.

A person model trains on seconds of one clip, and the template frames a user dubs may point the head
where no training frame did: held out, face_5's mouth sits 2.4 px (at 64 px) beyond every training
frame's, and there the renderer drew the same closed landmarks half-open (docs/dubbing.md, "Frame by
frame on face_5"). The whole-window shift (``steps.shift_columns``) moves the whole face; this moves
the mouth against the eyes.

The warp is a horizontal shear of the crop's lower half: row y (in crop fractions) moves by
``s * ramp(y)`` with ramp 0 above the mask line (y = 0.5: the masked context, whose lower half is
blank, is unchanged) rising linearly to 1 at y = 0.65 (the lips' centre sits at 0.64-0.67 in the
three real clips' crops) and 1 below, so lips, jaw and chin move together. The landmarks move with
the same ramp. The shifts are whole pixels of the crop at the lips, a few levels at most, so the
frozen autoencoder's latents of every level can be cached once (``LatentCache``).

The yaw augmentation (TrainConfig.yaw_augment): the inner face (eyes, nose, mouth) moved sideways
against the face's outline, in the upper and lower halves alike, as turning the head about its
vertical axis moves them: held out, face_5's eyes sit 2.5 px, nose tip 4.3 px and lips 2.7 px right
of the training frames' means while the outline at the ears stays put (docs/dubbing.md). Column x
(crop fractions) moves by ``s * yaw_profile(x)``, a cosine bump that is 1 at the crop's centre and 0
from YAW_HALF_WIDTH away (the face oval's edges sit at 0.2 and 0.8 of the crop); the landmarks move
with the same field. Context and target are warped together, so each level caches both latents.

The autoencoder warp (TrainConfig.autoencoder_warp): each autoencoder training crop moved by a
random similarity (shift, scale, rotation), its landmarks with it. The autoencoder of a person model
sees a few seconds of crops on one pixel grid, and the frames a user dubs sit a pixel or two and a
degree or two off it: there its round trip drew a real closed mouth, moved onto a held-out
template's pose, half open (docs/dubbing.md, "The autoencoder on frames it never saw").

The context noise (TrainConfig.context_noise): the known context latent of each window plus
Gaussian noise of a std drawn per window in [0, context_noise]. Sampling keeps the context clean:
training on blurred views of the few contexts it has keeps the renderer from keying the mouth on
the exact upper face (it memorises seconds of one face) and pushes it onto the landmarks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

YAW_HALF_WIDTH = 0.3  # the yaw bump's half width, crop fractions (1 at 0.5, 0 beyond 0.2 and 0.8)
RAMP = (0.5, 0.65)  # crop-fraction rows where the shear goes from 0 to its full shift
MAX_LEVELS = 9  # cached latents per frame at most (gpu256 at 0.08 would otherwise need 41)


def turn_levels(turn_augment: float, size: int) -> list[float]:
    """The shifts (fractions of the crop width) a window draws from: whole pixels of a ``size`` px
    crop up to ``turn_augment`` * size either way, at most MAX_LEVELS of them, 0 included."""
    k = int(round(float(turn_augment) * size))
    if k <= 0:
        return [0.0]
    step = max(1, math.ceil(2 * k / (MAX_LEVELS - 1)))
    px = list(range(-(k // step) * step, k + 1, step))
    return [p / size for p in px]


def ramp(y: Tensor) -> Tensor:
    """Share of the full shift at crop-fraction rows ``y`` (any shape): 0 above RAMP[0], 1 below RAMP[1]."""
    a, b = RAMP
    return ((y - a) / (b - a)).clamp(0.0, 1.0)


def turn_lower_face(images: Tensor, s: Tensor) -> Tensor:
    """Images (N, C, S, S) -> the same with row y's content moved right by s * ramp(y) * S px;
    ``s`` (N,) fractions of the width (+ = right). Bilinear, edge columns repeated."""
    N, _, H, W = images.shape
    dev, dt = images.device, images.dtype
    ys = (torch.arange(H, device=dev, dtype=dt) + 0.5) / H  # row centres
    xs = (torch.arange(W, device=dev, dtype=dt) + 0.5) / W
    src_x = xs[None, None, :] - s.to(dt)[:, None, None] * ramp(ys)[None, :, None]  # (N, H, W)
    gx = src_x * 2 - 1  # align_corners=False: -1 and 1 are the outer edges of the edge pixels
    gy = (ys * 2 - 1)[None, :, None].expand(N, H, W)
    grid = torch.stack([gx, gy], -1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def turn_landmarks(points: Tensor, s: Tensor) -> Tensor:
    """Crop-frame landmarks (N, P, 2) in [0, 1] moved as ``turn_lower_face`` moves their pixels."""
    dx = s.to(points.dtype)[:, None] * ramp(points[..., 1].detach())  # (N, P)
    return torch.stack([points[..., 0] + dx, points[..., 1]], -1)


def yaw_profile(x: Tensor) -> Tensor:
    """Share of the full yaw shift at crop-fraction columns ``x`` (any shape): a cosine bump, 1 at 0.5."""
    u = ((x - 0.5) / YAW_HALF_WIDTH).clamp(-1.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * u))


def yaw_landmarks(points: Tensor, s: Tensor) -> Tensor:
    """Crop-frame landmarks (N, P, 2) in [0, 1]: x moved to x + s * yaw_profile(x); ``s`` (N,)."""
    dx = s.to(points.dtype)[:, None] * yaw_profile(points[..., 0].detach())  # (N, P)
    return torch.stack([points[..., 0] + dx, points[..., 1]], -1)


def yaw_face(images: Tensor, s: Tensor) -> Tensor:
    """Images (N, C, S, S) -> the same with column x's content moved to x + s * yaw_profile(x) (the
    pixels move as ``yaw_landmarks`` moves points); ``s`` (N,) fractions of the width. The source
    column of each output column solves x_src + s * w(x_src) = x by fixed-point iteration (a
    contraction: |s| * max w' < 1 for |s| < 0.19). Bilinear, edge columns repeated."""
    N, _, H, W = images.shape
    dev, dt = images.device, images.dtype
    xs = (torch.arange(W, device=dev, dtype=dt) + 0.5) / W  # column centres
    sv = s.to(dt)[:, None]  # (N, 1)
    src = xs[None].expand(N, W)
    for _ in range(8):
        src = xs[None] - sv * yaw_profile(src)  # (N, W)
    ys = (torch.arange(H, device=dev, dtype=dt) + 0.5) / H
    gx = (src * 2 - 1)[:, None, :].expand(N, H, W)
    gy = (ys * 2 - 1)[None, :, None].expand(N, H, W)
    return F.grid_sample(images, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border",
                         align_corners=False)


def similarity_thetas(n: int, amount: float, generator: torch.Generator) -> Tensor:
    """(n, 2, 3) random similarities for ``F.affine_grid`` (output -> input, normalised coordinates):
    per crop a shift of up to ``amount`` of the crop on each axis, a scale in [1 - amount, 1 + amount]
    and a rotation of up to ``amount`` radians, uniform."""
    u = torch.rand((n, 4), generator=generator, device=generator.device) * 2 - 1  # (n, 4) in [-1, 1]
    a = float(amount)
    scale, ang = 1.0 + a * u[:, 0], a * u[:, 1]
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    # normalised coordinates span 2 per crop width: a shift of f crops is 2 f
    tx, ty = 2 * a * u[:, 2], 2 * a * u[:, 3]
    return torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)


def warp_images(images: Tensor, theta: Tensor) -> Tensor:
    """Images (N, C, S, S) resampled through ``theta`` (N, 2, 3) (``similarity_thetas``). Bilinear,
    edge pixels repeated."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def warp_points(points: Tensor, theta: Tensor) -> Tensor:
    """Crop-frame points (N, P, 2) in [0, 1] moved as ``warp_images`` moves their pixels: theta maps an
    output pixel to its source, so a point goes through theta's inverse."""
    A, b = theta[:, :, :2].to(points.dtype), theta[:, :, 2].to(points.dtype)  # (N, 2, 2), (N, 2)
    p = points * 2 - 1
    out = torch.linalg.solve(A, (p - b[:, None]).transpose(1, 2)).transpose(1, 2)
    return (out + 1) / 2


def noise_context(ctx: Tensor, scale: float, num_frames: int, generator: torch.Generator) -> Tensor:
    """Context latents (B*L, C, h, w), windows of ``num_frames`` = L frames -> ctx + sigma * eps with one
    sigma ~ U(0, scale) per window (its frames share it, as they share a diffusion time) and eps ~ N(0, I)
    per cell, both from ``generator``."""
    n = ctx.shape[0] // num_frames
    sigma = torch.rand((n,), generator=generator, device=generator.device) * float(scale)  # (B,)
    eps = torch.randn(ctx.shape, generator=generator, device=generator.device)  # (B*L, C, h, w)
    sigma = sigma.repeat_interleave(num_frames).to(ctx.device, ctx.dtype)[:, None, None, None]
    return ctx + sigma * eps.to(ctx.device, ctx.dtype)


__all__ = ["RAMP", "MAX_LEVELS", "turn_levels", "ramp", "turn_lower_face", "turn_landmarks", "noise_context",
           "YAW_HALF_WIDTH", "yaw_profile", "yaw_face", "yaw_landmarks"]

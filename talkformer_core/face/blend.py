"""Paste a generated face crop back into its frame through a feathered lower-face mask.

The alpha is a Gaussian-blurred face mask, as in IP-LAP, which blurs a 68-point contour
mask (21x21, sigma 11; inference_single.py:126-156); our generated region is the lower half of the
square crop (the latent rows [h // 2:]), so the mask is that half, feathered on every side and
exactly zero on the crop's border and on its upper half, so the pasted region has no seam.
Only the box's pixels are touched; pixels outside it come back bit-identical.
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from ..errors import InputError
from .track import FaceTrack, crop_transform


def default_feather(size: int) -> int:
    """Feather width in crop pixels when none is given: a tenth of the crop side."""
    return max(1, size // 10)


def lower_face_mask(size: int, feather: int | None = None) -> np.ndarray:
    """(size, size) float32 alpha in [0, 1]: 1 on the lower half of the crop, Gaussian ramps of
    ``feather`` px inside its edges; 0 on the upper half and on the crop border.

    feather 0 gives a hard mask: exactly 1 on rows [size // 2:], 0 above.
    """
    f = default_feather(size) if feather is None else int(feather)
    if f < 0 or 2 * f >= size // 2:
        raise InputError(f"feather {f}: expected 0 <= feather < {size // 4} for a {size}px crop")
    mask = np.zeros((size, size), np.float32)
    if f == 0:
        mask[size // 2 :] = 1.0
        return mask
    r = (f + 1) // 2  # kernel radius; the ramp spans 2r + 1 >= f px
    # inset the hard rectangle by r + 1 from the crop border (and r from the midline) so the blur,
    # truncated at r px, leaves the border and the upper half at exactly 0
    mask[size // 2 + r : size - r - 1, r + 1 : size - r - 1] = 1.0
    sigma = (2 * r + 1) / 6.0  # kernel truncated at 3 sigma
    return cv2.GaussianBlur(mask, (2 * r + 1, 2 * r + 1), sigma, borderType=cv2.BORDER_CONSTANT)


def _box_region(box: Any, frame_hw: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Integer frame region (x0, y0, x1, y1) covered by the crop box, clipped to the frame."""
    x0, y0, s = (float(v) for v in box[:3])
    h, w = frame_hw
    rx0, ry0 = max(math.floor(x0), 0), max(math.floor(y0), 0)
    rx1, ry1 = min(math.ceil(x0 + s), w), min(math.ceil(y0 + s), h)
    if rx1 <= rx0 or ry1 <= ry0:
        return None
    return rx0, ry0, rx1, ry1


def paste_back(
    frame: np.ndarray,
    crop: np.ndarray,
    box: Any,
    mask: np.ndarray | None = None,
    feather: int | None = None,
    interpolation: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """frame (H, W, 3) uint8, crop (S, S, 3) uint8 taken with ``box`` = (x0, y0, side) -> new frame.

    The crop and its alpha (``mask`` (S, S) in [0, 1], default ``lower_face_mask(S, feather)``)
    are warped back by the inverse of ``crop_transform`` onto the box's pixels and blended:
    out = frame * (1 - a) + crop * a. Where a = 0 (outside the box, the upper half, the border)
    the frame's pixels come back unchanged.
    """
    size = crop.shape[0]
    if crop.shape[:2] != (size, size) or crop.ndim != 3:
        raise InputError(f"paste_back: expected a square (S, S, 3) crop, got {crop.shape}")
    if mask is None:
        mask = lower_face_mask(size, feather)
    elif mask.shape != (size, size):
        raise InputError(f"paste_back: mask shape {mask.shape} does not match the {size}px crop")
    out = frame.copy()
    region = _box_region(box, frame.shape[:2])
    if region is None:
        return out
    rx0, ry0, rx1, ry1 = region
    m, _ = crop_transform(box, size)  # frame px -> crop px
    m = m.copy()
    m[:, 2] += m[:, :2] @ np.array([rx0, ry0], dtype=np.float64)  # region px -> crop px
    dsize = (rx1 - rx0, ry1 - ry0)
    face = cv2.warpAffine(
        crop, m, dsize, flags=interpolation | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
    )
    alpha = cv2.warpAffine(  # linear: an alpha must stay inside [0, 1]
        mask.astype(np.float32), m, dsize, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )
    a = alpha[..., None]  # (h, w, 1)
    roi = out[ry0:ry1, rx0:rx1].astype(np.float32)
    blended = roi * (1.0 - a) + face.astype(np.float32) * a
    out[ry0:ry1, rx0:rx1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def paste_back_tracked(
    frame: np.ndarray,
    crop: np.ndarray,
    track: FaceTrack,
    t: int,
    mask: np.ndarray | None = None,
    feather: int | None = None,
) -> np.ndarray:
    """``paste_back`` at frame t of a track; a frame without a face (found False) passes through."""
    if not bool(track.found[t]):
        return frame.copy()
    return paste_back(frame, crop, track.boxes[t], mask=mask, feather=feather)

"""Face track: per-frame square crop boxes from the face landmarks, smoothed over time.

Box per frame (pixels of the full frame), (x0, y0, size), square, from the 74 *pose* points
(upper face oval, brows, nose, eyes), never from the jaw or lips: a box that followed the jaw
would zoom and shift with the template's speech, and in training its position would tell the
model how open the ground-truth mouth is (the leak the U-Net's masked upper half guards against).
  - L = max(w, 1.6 h) of the pose points' bbox (``face_scale``: stable under yaw and pitch);
  - centre x = the pose bbox's centre; centre y = the pose bbox's centre + center_y * L
    (center_y = 0.2), so the mouth and jaw fall in the crop's lower half (generated) and the eyes
    in its upper half (known context). Measured on the three real clips with the defaults:
    lip points at y >= 0.52 of the crop, chin <= 0.94, eyes <= 0.39;
  - size = scale * L, scale 1.6 (the face is about 0.6 of the crop wide).
Smoothing, so that a still head gives a still crop:
  1. missing frames (found False): centre and size linearly interpolated from the nearest found
     frames on either side; frames before the first / after the last found one copy it;
  2. a zero-phase Gaussian over time (sigma ``smooth`` = 4 frames, 0.16 s at 25 fps, on the
     centre; 3x that on the size, which should hardly change at all);
  3. a dead zone: the box moves only by the part of a change larger than ``deadzone`` (a
     fraction of the median size), run forwards and backwards and averaged so it adds no lag;
     where the smoothed motion stays inside the dead zone the box is exactly constant.
Crops are taken with one affine warp (``crop_transform``); pixel centres sit at +0.5, so a point
at continuous pixel coordinate x maps to crop coordinate (x - x0) / size * crop_size, the same
map as ``topology.px_to_crop`` (times crop_size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from ..errors import FaceError, InputError
from . import topology
from .landmarks import FaceLandmarks

CROP_SIZE_RANGE = (64, 512)


@dataclass
class FaceTrack:
    """Smoothed square crop boxes of one face over a frame sequence."""

    boxes: np.ndarray  # (T, 3) float64 (x0, y0, size) px, smoothed
    found: np.ndarray  # (T,) bool
    points131: np.ndarray  # (T, 131, 2) float32 px, NaN where not found
    points131_filled: np.ndarray  # (T, 131, 2) float32 px, missing frames interpolated
    frame_size: tuple[int, int]  # (H, W)
    crop_size: int
    raw_boxes: np.ndarray | None = None  # (T, 3) before smoothing (gaps filled); boxes if not given

    def __post_init__(self) -> None:
        if self.raw_boxes is None:
            self.raw_boxes = self.boxes.copy()

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def num_missing(self) -> int:
        return int((~self.found).sum())

    def crop(self, frame: np.ndarray, t: int) -> np.ndarray:
        """Frame t's crop, (crop_size, crop_size, 3) uint8."""
        return crop_frame(frame, self.boxes[t], self.crop_size)

    def points_crop(self, t: int | slice | None = None, filled: bool = True) -> np.ndarray:
        """The 131 points in the crop frame [0, 1], (..., 131, 2)."""
        pts = self.points131_filled if filled else self.points131
        sel = slice(None) if t is None else t
        return topology.px_to_crop(pts[sel].astype(np.float64), self.boxes[sel]).astype(np.float32)

    def save(self, path: str | Path) -> None:
        np.savez_compressed(
            path,
            boxes=self.boxes,
            raw_boxes=self.raw_boxes,
            found=self.found,
            points131=self.points131,
            points131_filled=self.points131_filled,
            frame_size=np.asarray(self.frame_size, dtype=np.int64),
            crop_size=np.asarray(self.crop_size, dtype=np.int64),
        )

    @classmethod
    def load(cls, path: str | Path) -> "FaceTrack":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(
                    boxes=z["boxes"],
                    found=z["found"].astype(bool),
                    points131=z["points131"],
                    points131_filled=z["points131_filled"],
                    frame_size=(int(z["frame_size"][0]), int(z["frame_size"][1])),
                    crop_size=int(z["crop_size"]),
                    raw_boxes=z["raw_boxes"],
                )
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{path}: expected a face track .npz written by FaceTrack.save ({e})") from e


def face_scale(points131: np.ndarray) -> np.ndarray:
    """(..., 131, 2) -> (...) face size L from the 74 pose points: max(w, 1.6 h) of their bbox.

    The pose points (upper face oval, brows, nose, eyes) do not move with speech. Their bbox
    width shrinks with yaw and its height with pitch; 1.6 h is about 0.8 w on a frontal face, so
    the width rules unless the head turns by more than about 35 degrees.
    """
    pose = points131[..., list(topology.POSE_POS), :]
    wh = pose.max(axis=-2) - pose.min(axis=-2)  # (..., 2)
    return np.maximum(wh[..., 0], 1.6 * wh[..., 1])


def raw_boxes_from_points(points131: np.ndarray, scale: float = 1.6, center_y: float = 0.2) -> np.ndarray:
    """(T, 131, 2) px -> (T, 3) unsmoothed boxes (x0, y0, size); NaN rows where points are NaN.

    Centre = centre of the pose points' bbox, moved down by ``center_y`` * L; size = scale * L.
    """
    pose = points131[:, list(topology.POSE_POS), :].astype(np.float64)  # (T, 74, 2)
    lo, hi = pose.min(axis=1), pose.max(axis=1)  # (T, 2)
    big = face_scale(points131.astype(np.float64))  # (T,)
    size = scale * big
    cx = (lo[:, 0] + hi[:, 0]) / 2
    cy = (lo[:, 1] + hi[:, 1]) / 2 + center_y * big
    return np.stack([cx - size / 2, cy - size / 2, size], axis=1)


def interpolate_missing(values: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Linear interpolation over time of rows where ``found`` is False; edges copy the nearest.

    values (T, ...) -> same shape, float64.
    """
    v = np.asarray(values, dtype=np.float64)
    if found.all():
        return v.copy()
    idx = np.flatnonzero(found)
    if idx.size == 0:
        raise FaceError("no frame has a face: nothing to interpolate from")
    t = np.arange(v.shape[0])
    flat = v.reshape(v.shape[0], -1)
    out = np.empty_like(flat)
    for j in range(flat.shape[1]):  # np.interp holds the end values outside [idx[0], idx[-1]]
        out[:, j] = np.interp(t, idx, flat[idx, j])
    return out.reshape(v.shape)


def _deadzone(x: np.ndarray, dz: float) -> np.ndarray:
    """Move by the part of each change beyond ``dz`` (vector norm over the last axis); forward only."""
    y = np.empty_like(x)
    y[0] = x[0]
    for t in range(1, x.shape[0]):
        d = x[t] - y[t - 1]
        n = float(np.linalg.norm(d))
        y[t] = y[t - 1] + (d * ((n - dz) / n) if n > dz else 0.0)
    return y


def smooth_boxes(boxes: np.ndarray, smooth: float = 4.0, deadzone: float = 0.004) -> np.ndarray:
    """(T, 3) boxes without NaN -> smoothed (T, 3): Gaussian on centre/size, then a zero-lag dead zone."""
    c = boxes[:, :2] + boxes[:, 2:3] / 2  # (T, 2) centres
    s = boxes[:, 2:3].copy()  # (T, 1)
    if smooth > 0 and len(boxes) > 1:
        c = gaussian_filter1d(c, smooth, axis=0, mode="nearest")
        s = gaussian_filter1d(s, 3 * smooth, axis=0, mode="nearest")
    if deadzone > 0 and len(boxes) > 1:
        dz = deadzone * float(np.median(s))
        # forward and backward passes lag in opposite directions: their mean does not
        c = (_deadzone(c, dz) + _deadzone(c[::-1], dz)[::-1]) / 2
        s = (_deadzone(s, dz) + _deadzone(s[::-1], dz)[::-1]) / 2
    return np.concatenate([c - s / 2, s], axis=1)


def build_track(
    face_landmarks: FaceLandmarks,
    crop_size: int = 256,
    scale: float = 1.6,
    smooth: float = 4.0,
    deadzone: float = 0.004,
    center_y: float = 0.2,
) -> FaceTrack:
    """FaceLandmarks -> FaceTrack (see the module docstring for the box rule and the smoothing).

    crop_size: 64..512; smooth: Gaussian sigma in frames (0 = off); deadzone: fraction of the size.
    Raises FaceError when no frame has a face.
    """
    if not CROP_SIZE_RANGE[0] <= crop_size <= CROP_SIZE_RANGE[1]:
        raise InputError(f"crop_size {crop_size}: expected {CROP_SIZE_RANGE[0]}..{CROP_SIZE_RANGE[1]}")
    found = np.asarray(face_landmarks.found, dtype=bool)
    if not found.any():
        raise FaceError(f"no face found in any of the {len(found)} frames")
    p131 = np.asarray(face_landmarks.points131, dtype=np.float32)
    raw = raw_boxes_from_points(p131, scale=scale, center_y=center_y)  # (T, 3), NaN if missing
    # interpolate centre and size (not corners) so a gap interpolates the quantities we smooth
    cs = np.concatenate([raw[:, :2] + raw[:, 2:3] / 2, raw[:, 2:3]], axis=1)
    cs = interpolate_missing(cs, found)
    filled_raw = np.concatenate([cs[:, :2] - cs[:, 2:3] / 2, cs[:, 2:3]], axis=1)
    boxes = smooth_boxes(filled_raw, smooth=smooth, deadzone=deadzone)
    filled = interpolate_missing(p131, found).astype(np.float32)
    return FaceTrack(
        boxes=boxes,
        found=found,
        points131=p131,
        points131_filled=filled,
        frame_size=tuple(face_landmarks.size),
        crop_size=int(crop_size),
        raw_boxes=filled_raw,
    )


def crop_transform(box: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    """2x3 affine frame px -> crop px for ``cv2.warpAffine``, and its inverse (crop -> frame).

    Pixel centres at +0.5: crop pixel u covers frame coordinates x0 + (u + 0.5) * s / size.
    """
    x0, y0, s = (float(v) for v in box[:3])
    k = size / s
    m = np.array([[k, 0.0, (0.5 - x0) * k - 0.5], [0.0, k, (0.5 - y0) * k - 0.5]])
    inv = np.array([[1 / k, 0.0, x0 + 0.5 / k - 0.5], [0.0, 1 / k, y0 + 0.5 / k - 0.5]])
    return m, inv


def _antialias_sigma(k: float) -> float:
    """Gaussian pre-blur (source px) before shrinking by ``k`` < 1, so the crop does not alias."""
    return 0.5 * math.sqrt(1.0 / (k * k) - 1.0) if k < 1.0 else 0.0


def crop_frame(frame: np.ndarray, box: Any, size: int, interpolation: int = cv2.INTER_CUBIC) -> np.ndarray:
    """The square crop ``box`` = (x0, y0, side) of ``frame`` resampled to (size, size, 3) uint8.

    Boxes may leave the frame: the border is replicated. When shrinking (side > size) the box's
    region is first blurred with the Gaussian that keeps the crop from aliasing.
    """
    x0, y0, s = (float(v) for v in box[:3])
    k = size / s
    sigma = _antialias_sigma(k)
    m, _ = crop_transform((x0, y0, s), size)
    if sigma < 0.3:  # too small to matter: one warp of the whole frame
        return cv2.warpAffine(frame, m, (size, size), flags=interpolation, borderMode=cv2.BORDER_REPLICATE)
    # integer region around the box with room for the blur and the cubic kernel, replicated
    # where it leaves the frame (the same pixels BORDER_REPLICATE would give)
    h, w = frame.shape[:2]
    pad = int(math.ceil(3 * sigma)) + 3
    ax0, ay0 = math.floor(x0) - pad, math.floor(y0) - pad
    ax1, ay1 = math.ceil(x0 + s) + pad, math.ceil(y0 + s) + pad
    ys = np.clip(np.arange(ay0, ay1), 0, h - 1)
    xs = np.clip(np.arange(ax0, ax1), 0, w - 1)
    region = frame[ys[:, None], xs[None, :]]  # (ay1 - ay0, ax1 - ax0, 3)
    region = cv2.GaussianBlur(region, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    m = m.copy()
    m[:, 2] += m[:, :2] @ np.array([ax0, ay0], dtype=np.float64)  # region px -> crop px
    return cv2.warpAffine(region, m, (size, size), flags=interpolation, borderMode=cv2.BORDER_REPLICATE)


def crop_jitter(boxes: np.ndarray) -> float:
    """Std in px of the frame-to-frame centre differences, pooled over x and y."""
    c = boxes[:, :2] + boxes[:, 2:3] / 2
    d = np.diff(c, axis=0)  # (T-1, 2)
    return float(np.sqrt(d.var(axis=0).mean())) if len(d) else 0.0

"""Preview drawing: landmarks, crop boxes, sketches (for preview videos and ComfyUI preview nodes).

Everything takes and returns RGB uint8 (H, W, 3) images; inputs are never modified in place.
"""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from . import topology
from .track import FaceTrack

Color = tuple[int, int, int]
POSE_COLOR: Color = (80, 220, 80)
JAW_COLOR: Color = (80, 160, 255)
LIP_COLOR: Color = (255, 80, 80)
BOX_COLOR: Color = (255, 220, 0)
SKETCH_COLOR: Color = (224, 224, 224)  # IP-LAP's sketch colour (mediapipe DrawingSpec default)

_SHIFT = 4  # cv2 sub-pixel drawing: coordinates * 16


def _fixed(v: float) -> int:
    return int(round(v * (1 << _SHIFT)))


def draw_landmarks(
    frame: np.ndarray, points: np.ndarray, color: Color = POSE_COLOR, radius: int = 2
) -> np.ndarray:
    """Dots at (K, 2) pixel points (x, y); NaN points are skipped."""
    out = frame.copy()
    for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2):
        if np.isfinite(x) and np.isfinite(y):
            cv2.circle(out, (_fixed(x), _fixed(y)), radius << _SHIFT, color, -1, cv2.LINE_AA, _SHIFT)
    return out


def draw_points131(frame: np.ndarray, p131: np.ndarray, radius: int = 2) -> np.ndarray:
    """The 131 points coloured by part: pose green, jaw orange, lips red."""
    p = np.asarray(p131)
    out = draw_landmarks(frame, p[list(topology.POSE_POS)], POSE_COLOR, radius)
    out = draw_landmarks(out, p[list(topology.JAW_POS)], JAW_COLOR, radius)
    return draw_landmarks(out, p[list(topology.LIP_POS)], LIP_COLOR, radius)


def draw_box(frame: np.ndarray, box: Sequence[float], color: Color = BOX_COLOR, thickness: int = 2) -> np.ndarray:
    """A crop box (x0, y0, size) or a landmark box (x1, y1, x2, y2), by its length."""
    out = frame.copy()
    if len(box) == 3:
        x0, y0, s = (float(v) for v in box)
        x1, y1 = x0 + s, y0 + s
    else:
        x0, y0, x1, y1 = (float(v) for v in box)
    cv2.rectangle(out, (_fixed(x0), _fixed(y0)), (_fixed(x1), _fixed(y1)), color, thickness, cv2.LINE_AA, _SHIFT)
    return out


def draw_sketch_edges(
    frame: np.ndarray, p131: np.ndarray, color: Color = SKETCH_COLOR, thickness: int = 1
) -> np.ndarray:
    """IP-LAP's 125 sketch edges over a (131, 2) pixel point set (edges with a NaN end skipped)."""
    out = frame.copy()
    p = np.asarray(p131, dtype=np.float64)
    for a, b in topology.SKETCH_EDGES_131:
        if np.all(np.isfinite(p[[a, b]])):
            pa = (_fixed(p[a, 0]), _fixed(p[a, 1]))
            pb = (_fixed(p[b, 0]), _fixed(p[b, 1]))
            cv2.line(out, pa, pb, color, thickness, cv2.LINE_AA, _SHIFT)
    return out


def draw_track_frame(frame: np.ndarray, track: FaceTrack, t: int, radius: int = 2) -> np.ndarray:
    """Frame t with its crop box, the box's mid line (generated half below) and the 131 points.

    Frames without a face get the interpolated box in grey and no points.
    """
    box = track.boxes[t]
    found = bool(track.found[t])
    color: Color = BOX_COLOR if found else (128, 128, 128)
    out = draw_box(frame, box, color)
    x0, y0, s = (float(v) for v in box)
    cv2.line(out, (_fixed(x0), _fixed(y0 + s / 2)), (_fixed(x0 + s), _fixed(y0 + s / 2)), color, 1, cv2.LINE_AA, _SHIFT)
    if found:
        out = draw_points131(out, track.points131[t], radius)
    return out


def draw_track_crop(crop: np.ndarray, track: FaceTrack, t: int, radius: int = 1) -> np.ndarray:
    """The crop of frame t with the 131 points in crop pixels and the mid line."""
    size = crop.shape[0]
    out = crop.copy()
    cv2.line(out, (0, size // 2), (size - 1, size // 2), BOX_COLOR, 1)
    if bool(track.found[t]):
        out = draw_points131(out, track.points_crop(t) * size, radius)
    return out


def side_by_side(*images: Any) -> np.ndarray:
    """Images of any heights next to each other, each scaled to the first one's height."""
    h = images[0].shape[0]
    parts = [im if im.shape[0] == h else cv2.resize(im, (round(im.shape[1] * h / im.shape[0]), h)) for im in images]
    return np.concatenate(parts, axis=1)

"""The 131-point face topology of IP-LAP / the paper, as pure data and array math.

Imports neither mediapipe nor cv2 nor torch: ``models/`` depends on this module alone. Every
function works on numpy arrays and torch tensors alike through plain arithmetic and indexing,
so torch inputs stay differentiable.

Index lists are mediapipe FaceMesh (``refine_landmarks=True``, 478 points) vertex ids, copied
once from IP-LAP's code (Weizhi-Zhong/IP_LAP commit 9b9dc03). The paper says
41 lip / 16 jaw points but publishes no lists; we use IP-LAP's 40 / 17 (same 57 and 131 totals).

Coordinate frames (docs/architecture.md):
  pixels    -- the full video frame, (x, y) in pixels;
  box frame -- [0, 1] inside IP-LAP's per-frame landmark box (``landmark_box``, ``normalize``);
  crop frame-- [0, 1] inside the square face crop of the face track, box = (x0, y0, size).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

FULL_131: tuple[int, ...] = (  # IP-LAP inference_single.py:46-55 (`full_131_order`)
    162, 127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397,
    288, 361, 323, 454, 356, 389, 70, 63, 105, 66, 107, 55, 65, 52, 53, 46, 336, 296, 334, 293, 300,
    276, 283, 282, 295, 285, 168, 6, 197, 195, 5, 48, 115, 220, 45, 4, 275, 440, 344, 278, 33, 246,
    161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7, 362, 398, 384, 385, 386,
    387, 388, 466, 263, 249, 390, 373, 374, 380, 381, 382, 61, 185, 40, 39, 37, 0, 267, 269, 270,
    409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146, 78, 191, 80, 81, 82, 13, 312, 311, 310, 415,
    308, 324, 318, 402, 317, 14, 87, 178, 88, 95,
)
POSE_74: tuple[int, ...] = (  # positions 0-3 and 21-90 of FULL_131, in that order (`pose_74`)
    162, 127, 234, 93, 323, 454, 356, 389, 70, 63, 105, 66, 107, 55, 65, 52, 53, 46, 336, 296, 334,
    293, 300, 276, 283, 282, 295, 285, 168, 6, 197, 195, 5, 48, 115, 220, 45, 4, 275, 440, 344, 278,
    33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7, 362, 398, 384, 385,
    386, 387, 388, 466, 263, 249, 390, 373, 374, 380, 381, 382,
)
JAW_17: tuple[int, ...] = (  # positions 4-20 (`jaw_17`)
    132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361,
)
LIPS_40: tuple[int, ...] = (  # positions 91-130: outer lip 20, then inner lip 20 (`lips_40`)
    61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146, 78,
    191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95,
)
# IP-LAP inference_single.py:58-94 (`sketch_edges`): mediapipe connection sets, no irises;
# face_oval is a 24-edge subset of mediapipe's FACE_OVAL, nose a 13-edge set.
SKETCH_EDGE_GROUPS: dict[str, tuple[tuple[int, int], ...]] = {
    "lips": (
        (0, 267), (13, 312), (14, 317), (17, 314), (37, 0), (39, 37), (40, 39), (61, 146),
        (61, 185), (78, 95), (78, 191), (80, 81), (81, 82), (82, 13), (84, 17), (87, 14), (88, 178),
        (91, 181), (95, 88), (146, 91), (178, 87), (181, 84), (185, 40), (191, 80), (267, 269),
        (269, 270), (270, 409), (310, 415), (311, 310), (312, 311), (314, 405), (317, 402),
        (318, 324), (321, 375), (324, 308), (375, 291), (402, 318), (405, 321), (409, 291),
        (415, 308),
    ),
    "left_eye": (
        (249, 390), (263, 249), (263, 466), (373, 374), (374, 380), (380, 381), (381, 382),
        (382, 362), (384, 398), (385, 384), (386, 385), (387, 386), (388, 387), (390, 373),
        (398, 362), (466, 388),
    ),
    "right_eye": (
        (7, 163), (33, 7), (33, 246), (144, 145), (145, 153), (153, 154), (154, 155), (155, 133),
        (157, 173), (158, 157), (159, 158), (160, 159), (161, 160), (163, 144), (173, 133),
        (246, 161),
    ),
    "left_eyebrow": (
        (276, 283), (282, 295), (283, 282), (293, 334), (295, 285), (296, 336), (300, 293),
        (334, 296),
    ),
    "right_eyebrow": (
        (46, 53), (52, 65), (53, 52), (63, 105), (65, 55), (66, 107), (70, 63), (105, 66),
    ),
    "face_oval": (
        (58, 132), (93, 234), (127, 162), (132, 93), (136, 172), (148, 176), (149, 150), (150, 136),
        (152, 148), (172, 58), (176, 149), (234, 127), (288, 397), (323, 361), (356, 454),
        (361, 288), (365, 379), (377, 152), (378, 400), (379, 378), (389, 356), (397, 365),
        (400, 377), (454, 323),
    ),
    "nose": (
        (4, 45), (4, 275), (5, 4), (6, 197), (45, 220), (115, 48), (168, 6), (195, 5), (197, 195),
        (220, 115), (275, 440), (344, 278), (440, 344),
    ),
}
SKETCH_EDGES: tuple[tuple[int, int], ...] = tuple(e for g in SKETCH_EDGE_GROUPS.values() for e in g)

# ---- positions within FULL_131 -------------------------------------------------------------
_POS = {m: p for p, m in enumerate(FULL_131)}
POSE_POS: tuple[int, ...] = tuple(_POS[m] for m in POSE_74)  # 0-3, 21-90
JAW_POS: tuple[int, ...] = tuple(_POS[m] for m in JAW_17)  # 4-20
LIP_POS: tuple[int, ...] = tuple(_POS[m] for m in LIPS_40)  # 91-130
CONTENT_POS: tuple[int, ...] = JAW_POS + LIP_POS  # IP-LAP "content" 57 = jaw then lips
# IP-LAP's network order cat(pose 74, content 57) (inference_single.py:96-98, 471-472):
# points131[..., NETWORK_ORDER, :] is what the Landmark_generator and its sketches see.
NETWORK_ORDER: tuple[int, ...] = POSE_POS + CONTENT_POS
# Sketch edges as pairs of positions in FULL_131 (for drawing a 131-point set).
SKETCH_EDGES_131: tuple[tuple[int, int], ...] = tuple((_POS[a], _POS[b]) for a, b in SKETCH_EDGES)
# Lip openness pair (inference_single.py:35, 264-268): upper and lower lip midpoints.
LIP_OPENNESS_PAIR: tuple[int, int] = (0, 17)

Box = Sequence[float]  # (x1, y1, x2, y2) landmark box or (x0, y0, size) crop box


def _take(points: Any, idx: Sequence[int]) -> Any:
    """points[..., idx, :] for numpy or torch (torch advanced indexing keeps the graph)."""
    return points[..., list(idx), :]


def _cat(parts: list[Any], axis: int) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=axis)
    import torch

    return torch.cat(parts, dim=axis)


def _as_like(value: Any, like: Any) -> Any:
    """A box given as tuple/list/array as the same kind (numpy / torch, dtype, device) as ``like``."""
    if isinstance(like, np.ndarray):
        dtype = like.dtype if np.issubdtype(like.dtype, np.floating) else np.float64
        return np.asarray(value, dtype=dtype)
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=like.dtype, device=like.device)


def split(p131: Any) -> tuple[Any, Any, Any]:
    """(..., 131, 2) -> pose (..., 74, 2), jaw (..., 17, 2), lips (..., 40, 2)."""
    if p131.shape[-2] != 131:
        raise ValueError(f"split expects (..., 131, 2) landmarks, got shape {tuple(p131.shape)}")
    return _take(p131, POSE_POS), _take(p131, JAW_POS), _take(p131, LIP_POS)


# Inverse permutation of POSE_POS + JAW_POS + LIP_POS (= NETWORK_ORDER) back to FULL_131 order.
_MERGE_INV: tuple[int, ...] = tuple(int(i) for i in np.argsort(np.asarray(NETWORK_ORDER)))


def merge(pose: Any, jaw: Any, lips: Any) -> Any:
    """Inverse of ``split``: pose (..., 74, 2), jaw (..., 17, 2), lips (..., 40, 2) -> (..., 131, 2)."""
    cat = _cat([pose, jaw, lips], axis=-2)  # (..., 131, 2) in NETWORK_ORDER
    return _take(cat, _MERGE_INV)


def to_network_order(p131: Any) -> Any:
    """(..., 131, 2) in FULL_131 order -> IP-LAP's cat(pose, content) order."""
    return _take(p131, NETWORK_ORDER)


def from_network_order(p_net: Any) -> Any:
    """Inverse of ``to_network_order``."""
    return _take(p_net, _MERGE_INV)


def select_131(p478: Any) -> Any:
    """(..., 478, C) mediapipe points -> (..., 131, C) in FULL_131 order."""
    if p478.shape[-2] != 478:
        raise ValueError(f"select_131 expects (..., 478, C) landmarks, got shape {tuple(p478.shape)}")
    return _take(p478, FULL_131)


def landmark_box(p131_px: Any, width: int, height: int, margin: float = 25) -> tuple[int, int, int, int]:
    """IP-LAP's per-frame landmark box (inference_single.py:270-291) as int pixels (x1, y1, x2, y2).

    The box over the 131 points (pixels, (131, 2)), widened by ``margin`` px on each side, clipped
    to the image, truncated to int. IP-LAP computes it in mediapipe's [0, 1] image coordinates
    (x_min - 25 / w, ...) * w, which is the same up to float rounding.
    """
    p = np.asarray(p131_px, dtype=np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(p)):
        raise ValueError("landmark_box needs finite landmarks (a frame without a face has none)")
    x_min, y_min = p.min(axis=0)
    x_max, y_max = p.max(axis=0)
    x1 = int(max(x_min - margin, 0.0))
    x2 = int(min(x_max + margin, float(width)))
    y1 = int(max(y_min - margin, 0.0))
    y2 = int(min(y_max + margin, float(height)))
    return x1, y1, x2, y2


LANDMARK_BOX_MODES = ("stable", "per_frame")
# Points rigid with the skull, for stage 1's box: the outer and inner eye corners and the nose
# (bridge, tip, alar points). Not the face-oval pose points (162, 127, 234, 93, 323, 454, 356, 389):
# mediapipe's mesh moves them with the jaw (their y relative to the eyes correlates 0.35-0.47 with
# the mouth opening on the real clips); not the brows (raised while talking) nor the eyelids (blinks).
EYE_CORNERS: tuple[int, int, int, int] = (33, 133, 362, 263)
NOSE_LENGTH: tuple[int, int, int] = (168, 48, 278)  # nasion to the midpoint of the alar points
RIGID: tuple[int, ...] = EYE_CORNERS + (168, 6, 197, 195, 5, 4, 48, 278)
UPPER_FACE: tuple[int, ...] = tuple(m for m in POSE_74 if m not in (162, 127, 234, 93, 323, 454, 356, 389))


def nose_length(points: Any) -> Any:
    """(..., K, 2), K = 131 (FULL_131) or 478 -> (...): nasion to the alar midpoint, a vertical face
    length that head yaw leaves alone and that no mouth movement changes."""
    k = points.shape[-2]
    n0, n1, n2 = NOSE_LENGTH if k == 478 else (_POS[m] for m in NOSE_LENGTH)
    d = points[..., n0, :] - 0.5 * (points[..., n1, :] + points[..., n2, :])
    return (d[..., 0] ** 2 + d[..., 1] ** 2) ** 0.5


def stable_landmark_boxes(p131_px: Any, width: int, height: int, valid: Any = None,
                          margin: float = 25) -> np.ndarray:
    """Landmark boxes that do not follow the jaw: (T, 131, 2) px -> (T, 4) float (x1, y1, x2, y2).

    IP-LAP's box (``landmark_box``) spans all 131 points, chin included: when the mouth opens the
    box grows, every pose point's box-frame y moves with it (the pose input then carries the mouth)
    and the predicted lips are mapped back through a box that follows the template's jaw
    (docs/design.md, "Stage 1 on new audio"). Here each frame's box is placed and sized by
    ``RIGID`` points only: centre = their mean, x unit = the outer eye corners' distance, y unit =
    ``nose_length``; its edges sit at per-clip constants in those units: the medians, over the
    ``valid`` frames with the most closed mouths (lowest 20 % of the inner-lip gap), of where IP-LAP's
    box edges (before the margin) were. A closed-mouth frame's box is IP-LAP's box (so weights
    trained with it still fit); from frame to frame it moves only with the skull; and the constants
    do not depend on how much the clip's mouth opens (medians over all frames made a template that
    talks more get a taller box, and every mouth mapped through it 3 % larger). ``margin`` px as ``landmark_box`` on a frame of the clip's median nose length, scaled
    with the nose elsewhere, so a box-frame shape maps to the same shape in units of the nose on
    every frame (a fixed pixel margin would make a mouth's size depend on the face's distance);
    clipped to the image.
    """
    p = np.asarray(p131_px, dtype=np.float64)
    if p.ndim != 3 or p.shape[1:] != (131, 2):
        raise ValueError(f"stable_landmark_boxes expects (T, 131, 2) landmarks, got shape {p.shape}")
    ok = np.all(np.isfinite(p), axis=(1, 2))
    if valid is not None:
        ok &= np.asarray(valid, bool).reshape(-1)
    if not ok.any():
        raise ValueError("stable_landmark_boxes needs at least one frame with finite landmarks")
    centre = p[:, [_POS[m] for m in RIGID]].mean(axis=1)  # (T, 2)
    eye = p[:, _POS[EYE_CORNERS[0]]] - p[:, _POS[EYE_CORNERS[3]]]
    unit = np.stack([np.hypot(eye[:, 0], eye[:, 1]), nose_length(p)], axis=1)  # (T, 2)
    unit = np.maximum(unit, 1e-6)
    gap = np.hypot(*(p[:, _POS[13]] - p[:, _POS[14]]).T) / unit[:, 1]
    closed = ok & (gap <= np.quantile(gap[ok], 0.2))
    r_lo = np.median(((p.min(axis=1) - centre) / unit)[closed], axis=0)  # (2,) IP-LAP's box edges
    r_hi = np.median(((p.max(axis=1) - centre) / unit)[closed], axis=0)
    m = margin * unit[:, 1:] / np.median(unit[ok, 1])  # (T, 1)
    lo = centre + r_lo * unit - m
    hi = centre + r_hi * unit + m
    box = np.concatenate([np.maximum(lo, 0.0), np.minimum(hi, [float(width), float(height)])], axis=1)
    return np.nan_to_num(box, nan=0.0)


def _box_xyxy(box: Any, like: Any) -> tuple[Any, Any, Any, Any]:
    """Split a (..., 4) box into (..., 1) columns that broadcast over (..., K)."""
    b = _as_like(box, like)
    return b[..., 0, None], b[..., 1, None], b[..., 2, None], b[..., 3, None]


def _stack_xy(x: Any, y: Any) -> Any:
    if isinstance(x, np.ndarray):
        return np.stack([x, y], axis=-1)
    import torch

    return torch.stack([x, y], dim=-1)


def normalize(points_px: Any, box: Any) -> Any:
    """Pixels -> box frame: ((x - x1) / (x2 - x1), (y - y1) / (y2 - y1)) (inference_single.py:309-320).

    points (..., K, 2); box (x1, y1, x2, y2) or (..., 4) broadcasting with the leading axes.
    """
    x1, y1, x2, y2 = _box_xyxy(box, points_px)
    return _stack_xy((points_px[..., 0] - x1) / (x2 - x1), (points_px[..., 1] - y1) / (y2 - y1))


def denormalize(points_box: Any, box: Any) -> Any:
    """Inverse of ``normalize``: box frame [0, 1] -> pixels."""
    x1, y1, x2, y2 = _box_xyxy(box, points_box)
    return _stack_xy(x1 + points_box[..., 0] * (x2 - x1), y1 + points_box[..., 1] * (y2 - y1))


def _crop_xys(crop_box: Any, like: Any) -> tuple[Any, Any, Any]:
    c = _as_like(crop_box, like)
    return c[..., 0, None], c[..., 1, None], c[..., 2, None]


def px_to_crop(points_px: Any, crop_box: Any) -> Any:
    """Pixels -> crop frame [0, 1]; crop_box (x0, y0, size) or (..., 3)."""
    x0, y0, s = _crop_xys(crop_box, points_px)
    return _stack_xy((points_px[..., 0] - x0) / s, (points_px[..., 1] - y0) / s)


def crop_to_px(points_crop: Any, crop_box: Any) -> Any:
    """Inverse of ``px_to_crop``."""
    x0, y0, s = _crop_xys(crop_box, points_crop)
    return _stack_xy(x0 + points_crop[..., 0] * s, y0 + points_crop[..., 1] * s)


def box_to_crop(points_box01: Any, box: Any, crop_box: Any) -> Any:
    """Box frame (completion module, IP-LAP) -> crop frame (M-Align); an affine map per frame.

    points (..., K, 2); box (x1, y1, x2, y2) or (..., 4); crop_box (x0, y0, size) or (..., 3).
    Plain arithmetic, so a torch input keeps its gradient (the end-to-end gradient of eq. 6).
    """
    return px_to_crop(denormalize(points_box01, box), crop_box)


def crop_to_box(points_crop01: Any, box: Any, crop_box: Any) -> Any:
    """Inverse of ``box_to_crop``: crop frame -> box frame."""
    return normalize(crop_to_px(points_crop01, crop_box), box)


def lip_openness(points: Any, size: tuple[int, int] | None = None) -> Any:
    """Distance between mediapipe points 0 and 17 (inference_single.py:264-268); (..., K, 2) -> (...).

    K = 478 (mediapipe order) or 131 (FULL_131 order). With ``size`` = (H, W) the pixel distance
    is measured in mediapipe's [0, 1] image coordinates as IP-LAP does (x / W, y / H), which
    matters for the ranking only in non-square frames.
    """
    k = points.shape[-2]
    if k == 478:
        a, b = LIP_OPENNESS_PAIR
    elif k == 131:
        a, b = _POS[LIP_OPENNESS_PAIR[0]], _POS[LIP_OPENNESS_PAIR[1]]
    else:
        raise ValueError(f"lip_openness expects 478 or 131 points, got {k}")
    d = points[..., a, :] - points[..., b, :]  # (..., 2)
    dx, dy = d[..., 0], d[..., 1]
    if size is not None:
        dx, dy = dx / size[1], dy / size[0]
    return (dx * dx + dy * dy) ** 0.5


def pick_spread(values: Any, n: int) -> np.ndarray:
    """Indices of ``n`` frames spread over the range of ``values`` (IP-LAP reference choice).

    Frames sorted ascending by value (stable, as Python's ``sorted``); the ones at ranks int(v)
    for v in linspace(0, L - 1, n) (inference_single.py:342-351). Non-finite values (frames
    without a face) are never picked: L counts the finite ones. Ranks use float32 linspace as
    ``torch.linspace`` does, so the choice matches IP-LAP's exactly.
    """
    v = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    v = v.reshape(-1)
    valid = np.flatnonzero(np.isfinite(v))
    if valid.size == 0:
        raise ValueError("pick_spread: no finite values to rank")
    order = valid[np.argsort(v[valid], kind="stable")]  # frame ids, ascending by value
    import torch  # float32 linspace exactly as IP-LAP's torch.linspace

    ranks = [int(r) for r in torch.linspace(0, order.size - 1, steps=n).tolist()]
    return order[np.asarray(ranks, dtype=np.int64)]

"""IP-LAP's input conventions for its renderer: what the network receives, exactly (no network code).

Source: Weizhi-Zhong/IP_LAP commit 9b9dc03, ``inference_single.py`` (cited as ``inf:LINE``) and
``draw_landmark.py`` (``dl:LINE``). The networks are ``models.iplap_renderer.IPLAPRenderer`` and
``models.landmark_completion.LandmarkGenerator``; the index lists live in ``face.topology``.

Per rendered frame IP-LAP gives its renderer (inf:477-502):
  - ``crop_face``: the frame's landmark-box crop resized to 128x128, BGR, / 255 (the renderer
    itself zeroes the lower half);
  - ``draw_sketch`` of the 5 window frames (detected pose 74 + predicted content 57) and of the
    25 references (detected 131 points), all in the box frame [0, 1] of their own frame;
  - the middle frame's 16-step mel window.
References: 25 frames spread over the range of lip openness (``select_references``), fixed for the
whole video. Each step takes 5 consecutive frames and renders the middle one (``window``).

Our images are RGB uint8 (docs/architecture.md); the BGR flip happens here, nowhere else.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import cv2
import numpy as np

from .face import topology

IMG_SIZE = 128  # inf:29
N_REF_IMAGES = 25  # inf:26, references of the renderer
N_REF_LANDMARKS = 15  # inf:27, references of the landmark generator
WINDOW = 5  # inf:28, frames per step; the middle one is rendered
SKETCH_COLOR = 224.0  # mediapipe DrawingSpec default colour (224, 224, 224), inf:33, dl:13
SKETCH_THICKNESS = 1  # DrawingSpec(thickness=1), inf:33

SKETCH_EDGES = topology.SKETCH_EDGES  # 125 (mediapipe id, mediapipe id) pairs, inf:58-94
FULL_131 = topology.FULL_131  # mediapipe ids in IP-LAP's full-131 order, inf:46-55
NETWORK_ORDER = topology.NETWORK_ORDER  # positions of FULL_131: pose 74 then content 57, inf:96-98


# ---------------------------------------------------------------------------------------------
# Sketch (inf:477-485, dl:29-45, dl:152-180)
# ---------------------------------------------------------------------------------------------


def sketch_canvas_size(crop_h: int, crop_w: int) -> tuple[int, int]:
    """(H, W) of the canvas IP-LAP draws on: the crop scaled so its short side is 128 (inf:480)."""
    s = min(crop_h, crop_w)
    return int(crop_h * IMG_SIZE / s), int(crop_w * IMG_SIZE / s)


def _inside01(v: float) -> bool:
    # dl:35-37: v in [0, 1], where "== 1" is math.isclose (relative tolerance 1e-9) and "== 0" exact.
    return (v > 0 or math.isclose(0, v)) and (v < 1 or math.isclose(1, v))


def sketch_pixels(
    points_box01: Any, canvas_h: int, canvas_w: int, order: Literal["full131", "network"] = "full131"
) -> dict[int, tuple[int, int]]:
    """mediapipe id -> (x, y) canvas pixel of every point inside [0, 1]^2 (dl:29-45, 163-171).

    Points are read as float32, as IP-LAP's come from float32 tensors; x * W is then computed in
    float64 (numpy promotes a float32 scalar times a Python int) and floored, capped at W - 1.
    """
    pts = np.asarray(_to_numpy(points_box01), dtype=np.float32).reshape(-1, 2)
    if pts.shape[0] != 131:
        raise ValueError(f"draw_sketch expects 131 points (..., 2), got {pts.shape[0]}")
    if order == "full131":
        ids = FULL_131
    elif order == "network":
        ids = tuple(FULL_131[p] for p in NETWORK_ORDER)
    else:
        raise ValueError(f"order must be 'full131' or 'network', got {order!r}")
    out: dict[int, tuple[int, int]] = {}
    for mp_id, (x, y) in zip(ids, pts):
        if _inside01(float(x)) and _inside01(float(y)):
            out[mp_id] = (min(math.floor(float(x) * canvas_w), canvas_w - 1),
                          min(math.floor(float(y) * canvas_h), canvas_h - 1))
    return out


def draw_sketch(
    points_box01: Any, crop_h: int, crop_w: int, order: Literal["full131", "network"] = "full131"
) -> np.ndarray:
    """IP-LAP's landmark sketch of one frame: float32 (3, 128, 128) in [0, 224/255].

    points_box01: (131, 2) (x, y) in the box frame [0, 1] of a crop of ``crop_h`` x ``crop_w``
    pixels; ``order`` says how the rows are ordered: "full131" = ``topology.FULL_131`` (ours),
    "network" = pose 74 then content 57 (IP-LAP's network order). Only the mediapipe id of each
    row matters to the drawing.

    As inf:477-485: a black float64 canvas of ``sketch_canvas_size``; each of the 125 edges whose
    two ends are both inside [0, 1] drawn with ``cv2.line`` (colour 224, thickness 1, 8-connected),
    no dots; ``cv2.resize`` to 128x128 (bilinear) in float64; / 255; float32. IP-LAP's canvas has
    three equal channels (grey), so the BGR order is moot; one is drawn and repeated.
    (IP-LAP divides the reference sketches in float64 and the target ones in float32, inf:412, 488;
    the two differ by at most one float32 ulp. Here: float64, then float32.)
    """
    h, w = sketch_canvas_size(crop_h, crop_w)
    canvas = np.zeros((h, w), dtype=np.float64)
    px = sketch_pixels(points_box01, h, w, order)
    for a, b in SKETCH_EDGES:
        if a in px and b in px:
            cv2.line(canvas, px[a], px[b], SKETCH_COLOR, SKETCH_THICKNESS)
    small = cv2.resize(canvas, (IMG_SIZE, IMG_SIZE))  # INTER_LINEAR, as inf:484
    grey = (small / 255.0).astype(np.float32)
    return np.repeat(grey[None], 3, axis=0)  # (3, 128, 128)


def draw_sketches(points_box01: Any, crop_sizes: Sequence[tuple[int, int]],
                  order: Literal["full131", "network"] = "full131") -> np.ndarray:
    """(T, 131, 2) points and T crop sizes (h, w) -> (T, 3, 128, 128) float32."""
    pts = _to_numpy(points_box01)
    if len(pts) != len(crop_sizes):
        raise ValueError(f"draw_sketches: {len(pts)} point sets but {len(crop_sizes)} crop sizes")
    return np.stack([draw_sketch(p, h, w, order) for p, (h, w) in zip(pts, crop_sizes)])


# ---------------------------------------------------------------------------------------------
# Face crop (inf:270-295, 414-415, 493)
# ---------------------------------------------------------------------------------------------


def crop_face(frame_rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The landmark-box crop of one frame as IP-LAP feeds it: float32 (3, 128, 128), BGR, / 255.

    frame_rgb: uint8 (H, W, 3) RGB; box: int pixels (x1, y1, x2, y2) from ``topology.landmark_box``.
    IP-LAP slices ``frame[y1:y2, x1:x2]`` of its BGR frame and ``cv2.resize``s it (bilinear, uint8)
    to 128x128, then / 255 (inf:295, 414-415, 493).
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    crop = frame_rgb[y1:y2, x1:x2, ::-1]  # RGB -> BGR
    if crop.shape[0] < 1 or crop.shape[1] < 1:
        raise ValueError(f"crop_face: empty box {box} for a frame of {frame_rgb.shape[1]}x{frame_rgb.shape[0]}")
    small = cv2.resize(np.ascontiguousarray(crop), (IMG_SIZE, IMG_SIZE))  # (128, 128, 3) uint8
    return (small / 255.0).astype(np.float32).transpose(2, 0, 1).copy()


def face_to_rgb_uint8(generated_bgr01: Any) -> np.ndarray:
    """Renderer output (3, 128, 128) BGR in [0, 1] -> uint8 (128, 128, 3) RGB, truncating as inf:502."""
    x = np.asarray(_to_numpy(generated_bgr01), dtype=np.float32)
    return np.ascontiguousarray((x.transpose(1, 2, 0) * 255).astype(np.uint8)[..., ::-1])


# ---------------------------------------------------------------------------------------------
# References and windows
# ---------------------------------------------------------------------------------------------


def select_references(openness: Any, n: int = N_REF_IMAGES) -> np.ndarray:
    """Frame indices of the n references: frames ranked by lip openness ascending (stable), the
    ones at ranks int(v), v in torch.linspace(0, L - 1, n) (inf:342-351, 374). ``openness`` per
    frame from ``topology.lip_openness(points, size=(H, W))``; non-finite (no face) never picked."""
    return topology.pick_spread(openness, n)


def pingpong_sequence(n_template: int, length: int) -> list[int]:
    """IP-LAP's template frame order for ``length`` steps (inf:426-431): forward then backward,
    repeated, each end frame twice (0..L-1, L-1..0, 0..L-1, ...). Truncated to ``length``."""
    if n_template < 1:
        raise ValueError("pingpong_sequence needs at least one template frame")
    cycle = list(range(n_template)) + list(range(n_template - 1, -1, -1))
    reps = length // len(cycle) + 1
    return (cycle * reps)[:length]


def window(t: int, length: int) -> list[int]:
    """Positions of the 5 frames whose sketches condition the rendering of position t: t-2 .. t+2.

    IP-LAP renders position t from the window starting at t - 2 (inf:434-445) and writes the first
    result three times, i.e. it renders no window for t = 0, 1 (inf:513-515); past the end it reads
    its ping-ponged sequence further. Here positions are clamped to [0, length - 1] so every
    position has a window; inside the sequence this is IP-LAP's window exactly.
    """
    return [min(max(p, 0), length - 1) for p in range(t - WINDOW // 2, t + WINDOW // 2 + 1)]


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)

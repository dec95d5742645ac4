"""Face front end: 131-point topology, mediapipe landmarks, face track, blending, preview drawing.

``topology`` is pure data + math and is imported eagerly (``models`` depends on it alone). The
other submodules need cv2 (and ``landmarks`` mediapipe when a detector opens), so their names
are re-exported lazily: ``from talkformer_core.face import build_track`` imports ``track`` then.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import topology
from .topology import (
    CONTENT_POS,
    FULL_131,
    JAW_17,
    JAW_POS,
    LIP_POS,
    LIPS_40,
    NETWORK_ORDER,
    POSE_74,
    POSE_POS,
    SKETCH_EDGES,
    SKETCH_EDGE_GROUPS,
    box_to_crop,
    crop_to_box,
    denormalize,
    landmark_box,
    lip_openness,
    merge,
    normalize,
    pick_spread,
    select_131,
    split,
)

_LAZY = {
    "landmarks": ("FaceLandmarks", "LandmarkDetector", "detect_image", "detect_video"),
    "track": (
        "FaceTrack",
        "build_track",
        "crop_frame",
        "crop_transform",
        "crop_jitter",
        "interpolate_missing",
        "smooth_boxes",
    ),
    "blend": ("lower_face_mask", "paste_back", "paste_back_tracked"),
    "draw": ("draw_landmarks", "draw_points131", "draw_box", "draw_sketch_edges", "draw_track_frame", "draw_track_crop"),
}
_NAME_TO_MODULE = {name: mod for mod, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    mod = _NAME_TO_MODULE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAME_TO_MODULE) | set(_LAZY))


__all__ = [
    "topology", "CONTENT_POS", "FULL_131", "JAW_17", "JAW_POS", "LIP_POS", "LIPS_40", "NETWORK_ORDER", "POSE_74",
    "POSE_POS", "SKETCH_EDGES", "SKETCH_EDGE_GROUPS",
    "box_to_crop", "crop_to_box", "denormalize", "landmark_box", "lip_openness", "merge", "normalize",
    "pick_spread", "select_131", "split",
] + list(_NAME_TO_MODULE)

"""CSIM (dlib ResNet): cosine similarity of dlib's 128-d face-recognition embeddings.

Not ArcFace (the paper's CSIM network is not public in a form we can ship); labelled
"CSIM (dlib ResNet)" wherever shown. Uses packages ``dlib-bin`` and ``face_recognition_models``
(data files, offline). The latter's ``__init__`` imports pkg_resources, so its ``models/`` folder
is located with importlib without importing it.
Per frame: the face rectangle (given by the caller, the same for both images) -> dlib's 5-point
shape predictor -> aligned 150x150 chip -> ResNet descriptor, as face_recognition does.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import InputError

RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE5_FILE = "shape_predictor_5_face_landmarks.dat"


def find_models_dir(models_dir: str | Path | None = None) -> Path:
    """The folder holding the two dlib model files. InputError saying what is missing otherwise."""
    if models_dir is None:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise InputError("CSIM needs the package face_recognition_models (pip install face_recognition_models)")
        models_dir = Path(list(spec.submodule_search_locations)[0]) / "models"
    d = Path(models_dir)
    for f in (RESNET_FILE, SHAPE5_FILE):
        if not (d / f).is_file():
            raise InputError(f"{d / f}: dlib model file not found (expected in face_recognition_models/models)")
    return d


def csim_unavailable_reason(models_dir: str | Path | None = None) -> str | None:
    """None when CSIM can run, else why not (for the report)."""
    if importlib.util.find_spec("dlib") is None:
        return "dlib is not installed (pip install dlib-bin)"
    try:
        find_models_dir(models_dir)
    except InputError as e:
        return str(e)
    return None


class DlibFaceEmbedder:
    """dlib shape_predictor_5 + face_recognition_model_v1 -> 128-d descriptors."""

    def __init__(self, models_dir: str | Path | None = None, num_jitters: int = 0):
        import dlib

        d = find_models_dir(models_dir)
        self._dlib = dlib
        self.shape = dlib.shape_predictor(str(d / SHAPE5_FILE))
        self.resnet = dlib.face_recognition_model_v1(str(d / RESNET_FILE))
        self.num_jitters = num_jitters

    def embed(self, image_rgb: np.ndarray, rect: tuple[float, float, float, float]) -> np.ndarray:
        """uint8 (H, W, 3) RGB and a face rectangle (x1, y1, x2, y2) px -> float64 (128,)."""
        img = np.ascontiguousarray(image_rgb, dtype=np.uint8)
        r = self._dlib.rectangle(int(round(rect[0])), int(round(rect[1])), int(round(rect[2])), int(round(rect[3])))
        shape = self.shape(img, r)
        return np.asarray(self.resnet.compute_face_descriptor(img, shape, self.num_jitters), dtype=np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))

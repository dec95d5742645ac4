"""Mediapipe FaceMesh landmarks (478 points, ``refine_landmarks=True``) over frames and images.

Video runs FaceMesh in tracking mode (``static_image_mode=False``: detection once, then the mesh
follows the face), with room for several faces; which face is kept is an input (``face_index``).
IP-LAP ran FaceMesh per image (inference_single.py:254-255); its weights do not depend on that.
mediapipe is imported only when a detector is opened, so importing this module is cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import FaceError, InputError
from .topology import FULL_131

NUM_POINTS = 478


@dataclass
class FaceLandmarks:
    """Landmarks of one tracked face over a frame sequence (pixels of the full frame).

    Frames where no face was found hold NaN and ``found`` False.
    """

    points478: np.ndarray  # (T, 478, 2) float32, (x, y) px
    points131: np.ndarray  # (T, 131, 2) float32, FULL_131 order
    found: np.ndarray  # (T,) bool
    size: tuple[int, int]  # (H, W) of the frames
    num_faces: np.ndarray | None = None  # (T,) int: faces mediapipe found in each frame (any index)

    def __len__(self) -> int:
        return int(self.found.shape[0])

    @property
    def num_missing(self) -> int:
        return int((~self.found).sum())


def _bbox(p: np.ndarray) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) over (K, >=2) points."""
    return float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())


def _area(b: tuple[float, float, float, float]) -> float:
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def _check_frame(frame: Any, source: str) -> np.ndarray:
    a = np.asarray(frame)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise InputError(f"{source}: expected an RGB uint8 image (H, W, 3), got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def face_index_or_none(face_index: int | None) -> int | None:
    """The one meaning of a face index everywhere (CLIs, nodes, API): None or -1 = the largest face,
    K >= 0 = the K-th largest (0 = the largest). -> None (largest) or K."""
    if face_index is None:
        return None
    k = int(face_index)
    if k == -1:
        return None
    if k < 0:
        raise InputError(f"face index {k}: expected -1 (the largest face) or K >= 0 (the K-th largest, "
                         "counting from 0 = the largest)")
    return k


class LandmarkDetector:
    """Context manager over ``mediapipe.solutions.face_mesh.FaceMesh``.

    face_index: None or -1 keeps the largest face (landmark bbox area); K >= 0 picks that index in
    the largest-first order (0 = the largest). ``static_image_mode`` False (default) is tracking
    mode for video.
    """

    def __init__(
        self,
        max_num_faces: int = 4,
        face_index: int | None = None,
        min_detection_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
        static_image_mode: bool = False,
    ) -> None:
        face_index = face_index_or_none(face_index)
        if face_index is not None and face_index >= max_num_faces:
            raise InputError(f"face index {face_index}: this detector looks for at most {max_num_faces} faces "
                             f"(indices 0..{max_num_faces - 1}, -1 = the largest)")
        self.max_num_faces = max_num_faces
        self.face_index = face_index
        self.min_detection_confidence = min_detection_confidence
        self.min_tracking_confidence = min_tracking_confidence
        self.static_image_mode = static_image_mode
        self._mesh: Any = None
        self._prev_bbox: tuple[float, float, float, float] | None = None

    # ---- lifetime ---------------------------------------------------------------------------
    def open(self) -> "LandmarkDetector":
        if self._mesh is None:
            import mediapipe as mp  # heavy: only here

            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=self.static_image_mode,
                max_num_faces=self.max_num_faces,
                refine_landmarks=True,
                min_detection_confidence=self.min_detection_confidence,
                min_tracking_confidence=self.min_tracking_confidence,
            )
        return self

    def close(self) -> None:
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None
        self._prev_bbox = None

    def __enter__(self) -> "LandmarkDetector":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- detection --------------------------------------------------------------------------
    def detect_all(self, frame_rgb: np.ndarray) -> list[np.ndarray]:
        """All faces in one frame, largest first: a list of (478, 3) float32 px arrays (z scaled by W)."""
        frame = _check_frame(frame_rgb, "frame")
        self.open()
        h, w = frame.shape[:2]
        result = self._mesh.process(frame)
        faces: list[np.ndarray] = []
        for lm in result.multi_face_landmarks or []:
            p = np.array([(q.x, q.y, q.z) for q in lm.landmark], dtype=np.float32)  # (478, 3) in [0, 1]
            p *= np.array([w, h, w], dtype=np.float32)  # mediapipe's z shares x's scale
            faces.append(p)
        faces.sort(key=lambda p: -_area(_bbox(p)))
        return faces

    def _choose(self, faces: list[np.ndarray], follow: bool) -> np.ndarray | None:
        if not faces:
            return None
        # In a sequence, keep following the face chosen before (bbox overlap) so that two faces of
        # similar size do not swap from frame to frame; the size rule decides at the start and
        # whenever the followed face is lost.
        if follow and self._prev_bbox is not None and len(faces) > 1:
            ious = [_iou(_bbox(p), self._prev_bbox) for p in faces]
            best = int(np.argmax(ious))
            if ious[best] > 0.3:
                return faces[best]
        k = 0 if self.face_index is None else self.face_index
        return faces[k] if k < len(faces) else None

    def detect(self, frame_rgb: np.ndarray) -> tuple[np.ndarray, bool]:
        """One frame -> (p478 (478, 3) float32 px with z, found). NaN where not found.

        Chooses by size rank alone (no memory of earlier frames).
        """
        p = self._choose(self.detect_all(frame_rgb), follow=False)
        if p is None:
            return np.full((NUM_POINTS, 3), np.nan, dtype=np.float32), False
        return p, True

    def detect_sequence(
        self, frames: Iterable[np.ndarray], progress: Callable[[int], None] | None = None
    ) -> FaceLandmarks:
        """Frames (iterable of (H, W, 3) uint8 RGB, streamed) -> FaceLandmarks.

        ``progress(n)`` is called with the number of frames done after each frame.
        """
        self._prev_bbox = None
        pts: list[np.ndarray] = []
        found: list[bool] = []
        counts: list[int] = []
        size: tuple[int, int] | None = None
        for i, frame in enumerate(frames):
            frame = _check_frame(frame, f"frame {i}")
            if size is None:
                size = (int(frame.shape[0]), int(frame.shape[1]))
            elif frame.shape[:2] != size:
                raise InputError(f"frame {i}: size {frame.shape[:2]} differs from the first frame's {size}")
            faces = self.detect_all(frame)
            counts.append(len(faces))
            p = self._choose(faces, follow=True)
            if p is None:
                pts.append(np.full((NUM_POINTS, 2), np.nan, dtype=np.float32))
                found.append(False)
            else:
                pts.append(p[:, :2])
                found.append(True)
                self._prev_bbox = _bbox(p)
            if progress is not None:
                progress(i + 1)
        if size is None:
            raise InputError("detect_sequence: no frames")
        p478 = np.stack(pts).astype(np.float32)  # (T, 478, 2)
        return FaceLandmarks(
            points478=p478,
            points131=np.ascontiguousarray(p478[:, list(FULL_131), :]),
            found=np.asarray(found, dtype=bool),
            size=size,
            num_faces=np.asarray(counts, dtype=np.int64),
        )


def detect_image(
    image_rgb: np.ndarray,
    *,
    face_index: int | None = None,
    max_num_faces: int = 4,
    min_detection_confidence: float = 0.5,
    require_face: bool = False,
    source: str = "image",
) -> tuple[np.ndarray, bool]:
    """One still image (static-mode FaceMesh) -> (p478 (478, 3) px, found).

    With ``require_face`` an image without a face raises FaceError naming ``source``; otherwise it
    passes through as NaN points and found False.
    """
    image = _check_frame(image_rgb, source)
    with LandmarkDetector(
        max_num_faces=max_num_faces,
        face_index=face_index,
        min_detection_confidence=min_detection_confidence,
        static_image_mode=True,
    ) as det:
        faces = det.detect_all(image)
        p = det._choose(faces, follow=False)
    found = p is not None
    if require_face and not found:
        face_index = face_index_or_none(face_index)
        if face_index is not None and faces:
            raise FaceError(f"{source}: face index {face_index}: only {len(faces)} face(s) found in this image "
                            f"(indices 0..{len(faces) - 1}, -1 = the largest)")
        which = "a face" if face_index is None else f"face #{face_index} (largest first)"
        raise FaceError(
            f"{source}: expected {which}, but mediapipe FaceMesh found {len(faces)} face(s) "
            f"in this {image.shape[1]}x{image.shape[0]} image"
        )
    if p is None:
        p = np.full((NUM_POINTS, 3), np.nan, dtype=np.float32)
    return p, found


def detect_video(
    frames: Iterable[np.ndarray],
    *,
    face_index: int | None = None,
    max_num_faces: int = 4,
    min_detection_confidence: float = 0.5,
    progress: Callable[[int], None] | None = None,
) -> FaceLandmarks:
    """Convenience: a tracking-mode detector over a frame sequence."""
    with LandmarkDetector(max_num_faces, face_index, min_detection_confidence) as det:
        return det.detect_sequence(frames, progress=progress)

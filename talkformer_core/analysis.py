"""Stage 0 of the pipeline: the template's face, per frame, with no pixels kept (``FaceAnalysis``),
and the choices made from it: the R-Align reference frame and the reference landmark sets.

    analyze_frames           frames -> FaceAnalysis: mediapipe landmarks, found flags, smoothed crop
                             boxes (face.track), IP-LAP landmark boxes, lip openness, frontalness
    choose_reference_frame   the most open and most frontal mouth (the R-Align reference image)
    reference_landmark_sets  N full-face landmark sets spread over lip openness (IP-LAP ranks)
    image_reference_crop     a still of the person -> the reference crop, instead of a template frame
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from .errors import FaceError, InputError
from .face import topology

MIN_TRACK_CROP = 64  # face.track.build_track's lower bound on crop_size (tiny configs crop 32 px)


@dataclass
class FaceAnalysis:
    """Everything the pipeline needs about the template's face, per template frame (no pixels)."""

    track: Any  # face.track.FaceTrack (boxes (T, 3) smoothed square crop boxes px, found, points)
    landmark_boxes: np.ndarray  # (T, 4) int IP-LAP landmark boxes (x1, y1, x2, y2) px, from filled points
    openness: np.ndarray  # (T,) lip openness (IP-LAP's measure, normalised image coords); NaN if no face
    frontalness: np.ndarray  # (T,) in [0, 1], 1 = frontal; NaN if no face
    crop_size: int
    # (T, 4) float px: stage 1's jaw-blind boxes (topology.stable_landmark_boxes over the found frames)
    stable_boxes: np.ndarray | None = None

    @property
    def found(self) -> np.ndarray:
        return self.track.found

    @property
    def boxes(self) -> np.ndarray:
        return self.track.boxes

    @property
    def num_frames(self) -> int:
        return len(self.track)

    @property
    def num_missing(self) -> int:
        return self.track.num_missing

    @property
    def frame_size(self) -> tuple[int, int]:
        return tuple(self.track.frame_size)

    def stage1_boxes(self, box: str = "stable") -> np.ndarray:
        """(T, 4) px boxes of stage 1's box frame: ``box`` "stable" (``stable_boxes``) or
        "per_frame" (IP-LAP's ``landmark_boxes``); ModelConfig.landmark_box names it."""
        if box == "per_frame":
            return self.landmark_boxes
        if box != "stable":
            raise InputError(f"landmark box {box!r}: expected one of {topology.LANDMARK_BOX_MODES}")
        if self.stable_boxes is None:
            h, w = self.frame_size
            self.stable_boxes = topology.stable_landmark_boxes(self.track.points131_filled, w, h, valid=self.found)
        return self.stable_boxes

    def points_box(self, t: Any = slice(None), box: str = "per_frame") -> np.ndarray:
        """The detected (gap-filled) 131 points of template frames ``t`` in their box frame, (..., 131, 2)
        (IP-LAP's per-frame box by default; ``box="stable"`` stage 1's jaw-blind one)."""
        pts = self.track.points131_filled[t].astype(np.float64)
        return topology.normalize(pts, self.stage1_boxes(box)[t].astype(np.float64)).astype(np.float32)


def frontalness(points131: np.ndarray) -> np.ndarray:
    """(..., 131, 2) px -> (...) in [0, 1]: how frontal the face is, from 2-D points alone.

    Yaw: where the nose tip (mediapipe 4) sits between the cheek contour points 234 and 454
    (0.5 when frontal); roll: the tilt of the line through the outer eye corners 33 and 263.
    frontalness = (1 - 2 |r - 0.5|) * cos(roll), clipped to [0, 1].
    """
    pos = {m: i for i, m in enumerate(topology.FULL_131)}
    p = np.asarray(points131, dtype=np.float64)
    nose, right, left = p[..., pos[4], :], p[..., pos[234], :], p[..., pos[454], :]
    span = left[..., 0] - right[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (nose[..., 0] - right[..., 0]) / span
        eye = p[..., pos[263], :] - p[..., pos[33], :]
        cos_roll = np.abs(eye[..., 0]) / np.hypot(eye[..., 0], eye[..., 1])
    return np.clip((1.0 - 2.0 * np.abs(r - 0.5)) * cos_roll, 0.0, 1.0)


def analyze_landmarks(face_landmarks: Any, crop_size: int) -> FaceAnalysis:
    """face.landmarks.FaceLandmarks -> FaceAnalysis (FaceError when no frame has a face)."""
    from .face.track import build_track

    track = build_track(face_landmarks, crop_size=max(int(crop_size), MIN_TRACK_CROP))
    if track.crop_size != crop_size:  # the track's boxes do not depend on the crop size
        track = dataclasses.replace(track, crop_size=int(crop_size))
    h, w = track.frame_size
    filled = track.points131_filled
    lboxes = np.array([topology.landmark_box(p, w, h) for p in filled], dtype=np.int64).reshape(-1, 4)
    raw = track.points131  # NaN where not found
    openness = np.asarray(topology.lip_openness(raw.astype(np.float64), size=(h, w)), dtype=np.float64)
    front = frontalness(raw)
    openness[~track.found] = np.nan
    front[~track.found] = np.nan
    return FaceAnalysis(track, lboxes, openness, front, int(crop_size))


def analyze_frames(frames: Iterable[np.ndarray], crop_size: int, face_index: int | None = None,
                   progress: Callable[[int], None] | None = None, source: str = "video") -> FaceAnalysis:
    """Frames (any iterable of uint8 (H, W, 3) RGB, streamed) -> FaceAnalysis.

    mediapipe FaceMesh in tracking mode; ``face_index`` None or -1 tracks the largest face, K >= 0
    the K-th largest (0 = the largest). Frames without a face get found False (their boxes and
    points are interpolated; the pipeline passes them through unchanged). FaceError naming
    ``source`` if no frame has the face; with K given and fewer faces, it says how many were found.
    """
    from .face.landmarks import LandmarkDetector, face_index_or_none

    face_index = face_index_or_none(face_index)
    max_faces = max(4, (face_index or 0) + 1)
    with LandmarkDetector(max_num_faces=max_faces, face_index=face_index) as det:
        lm = det.detect_sequence(frames, progress=progress)
    if not lm.found.any() and face_index is not None and lm.num_faces is not None and lm.num_faces.max() > 0:
        n = int(lm.num_faces.max())
        raise FaceError(f"face index {face_index}: only {n} face{'s' if n > 1 else ''} found in the {len(lm)} "
                        f"frame(s) of {source} (indices 0..{n - 1}, -1 = the largest)")
    if not lm.found.any():
        which = "a face" if face_index is None else f"face #{face_index} (largest first)"
        raise FaceError(f"{source}: expected {which}, but mediapipe FaceMesh found none in any of its "
                        f"{len(lm)} frame(s)")
    return analyze_landmarks(lm, crop_size)


def choose_reference_frame(analysis: FaceAnalysis, override: int | None = None) -> int:
    """The template frame whose crop is the R-Align reference: the most open and most frontal mouth.

    Score = (openness / max openness) * frontalness over frames with a face (open lips show the
    teeth and inner mouth the generator copies; a frontal face aligns best with every frame).
    ``override`` (e.g. --reference-frame) is checked and returned.
    """
    n = analysis.num_frames
    if override is not None:
        if not 0 <= int(override) < n:
            raise InputError(f"reference frame {override}: expected 0 <= frame < {n} (template frames at 25 fps)")
        if not analysis.found[int(override)]:
            raise FaceError(f"reference frame {override}: no face was found in that template frame")
        return int(override)
    o = analysis.openness
    top = np.nanmax(o)
    score = (o / top if top > 0 else np.ones_like(o)) * analysis.frontalness
    score = np.where(analysis.found, np.nan_to_num(score, nan=-1.0), -np.inf)
    return int(np.argmax(score))


def reference_landmark_sets(analysis: FaceAnalysis, n: int, box: str = "per_frame") -> np.ndarray:
    """N reference full-face landmark sets (N, 131, 2), each in its own box frame (``box`` as
    ``FaceAnalysis.points_box``), from frames spread over the range of lip openness (IP-LAP
    inference_single.py:342-351, ``pick_spread``)."""
    idx = topology.pick_spread(analysis.openness, n)
    return analysis.points_box(idx, box)


def image_reference_crop(image: np.ndarray, size: int, source: str = "reference image") -> np.ndarray:
    """A still of the person (H, W, 3) uint8 -> its face crop (size, size, 3), the R-Align reference
    in place of a template frame: the box is the face track's rule (face.track.raw_boxes_from_points
    on the 131 points) on the largest face. FaceError naming ``source`` when it shows no face."""
    from .face.landmarks import detect_image
    from .face.topology import select_131
    from .face.track import crop_frame, raw_boxes_from_points

    p478, _ = detect_image(image, require_face=True, source=source)
    box = raw_boxes_from_points(select_131(p478[:, :2])[None])[0]  # (x0, y0, side)
    return crop_frame(image, box, size)

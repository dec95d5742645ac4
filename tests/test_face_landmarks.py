"""mediapipe FaceMesh landmarks on a real photo (skimage astronaut) and on the shared real clips."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from talkformer_core.errors import FaceError, InputError
from talkformer_core.face import topology as T
from talkformer_core.face.landmarks import FaceLandmarks, LandmarkDetector, detect_image

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
CLIPS = ["sadtalker_WDA_KatieHill_000.mp4", "videoretalking_face_4.mp4", "videoretalking_face_5.mp4"]
EYES = [33, 133, 159, 145, 362, 263, 386, 374]
LIPS = list(T.LIPS_40)


def read_frames(path: Path, n: int) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        out = []
        for frame in c.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()  # (512, 512, 3) uint8, a real face


def test_astronaut_one_face(astronaut):
    with LandmarkDetector(max_num_faces=4) as det:
        faces = det.detect_all(astronaut)
    assert len(faces) == 1
    p, found = detect_image(astronaut, require_face=True)
    assert found and p.shape == (478, 3) and p.dtype == np.float32
    xy = p[:, :2]
    assert np.all((xy >= 0) & (xy < 512))
    # lips below the eyes, and the face where it is in the photo (left half, upper half)
    assert xy[LIPS, 1].min() > xy[EYES, 1].max()
    assert 150 < xy[:, 0].mean() < 300 and 60 < xy[:, 1].mean() < 200
    # the 131 points cover the face: box of a plausible size
    x1, y1, x2, y2 = T.landmark_box(T.select_131(xy), 512, 512)
    assert 100 < x2 - x1 < 250 and 100 < y2 - y1 < 250


def _no_face_images():
    blank = np.zeros((240, 320, 3), np.uint8)
    brick = skimage.data.brick()  # grayscale texture, no face
    return [("blank", blank), ("brick", np.repeat(brick[..., None], 3, axis=2))]


@pytest.mark.parametrize("name,img", _no_face_images())
def test_no_face_passes_through_or_raises(name, img):
    p, found = detect_image(img, source=f"{name}.png")
    assert not found and np.isnan(p).all()
    with pytest.raises(FaceError, match=f"{name}.png"):
        detect_image(img, require_face=True, source=f"{name}.png")


def test_bad_frame_type():
    with pytest.raises(InputError):
        detect_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(InputError):
        detect_image(np.zeros((10, 10, 3), np.float32))


def test_several_faces_largest_or_index(astronaut):
    face = astronaut[20:260, 110:350]  # (240, 240): the face with some margin
    small = cv2.resize(face, (150, 150), interpolation=cv2.INTER_AREA)
    canvas = np.full((260, 420, 3), 127, np.uint8)
    canvas[10:250, 10:250] = face  # large face on the left
    canvas[55:205, 260:410] = small  # smaller face on the right
    with LandmarkDetector(max_num_faces=4) as det:
        faces = det.detect_all(canvas)
    assert len(faces) == 2
    p0, f0 = detect_image(canvas)
    p1, f1 = detect_image(canvas, face_index=1)
    assert f0 and f1
    assert p0[:, 0].mean() < 255 < p1[:, 0].mean()  # largest = left, index 1 = right
    w0 = np.ptp(p0[:, 0])
    w1 = np.ptp(p1[:, 0])
    assert 1.35 < w0 / w1 < 1.85  # scale ratio 240 / 150
    # the same choice in tracking mode over a sequence
    with LandmarkDetector(face_index=1) as det:
        fl = det.detect_sequence([canvas] * 3)
    assert fl.found.all() and np.all(fl.points478[..., 0].mean(axis=1) > 255)
    # asking for a third face that is not there: not found, or FaceError on request
    p2, f2 = detect_image(canvas, face_index=2)
    assert not f2
    with pytest.raises(FaceError, match="canvas"):
        detect_image(canvas, face_index=2, require_face=True, source="canvas")


def test_sequence_with_missing_frames(astronaut):
    frames = [astronaut] * 3 + [np.zeros_like(astronaut)] * 2 + [astronaut] * 2
    progress = []
    with LandmarkDetector() as det:
        fl = det.detect_sequence(frames, progress=progress.append)
    assert isinstance(fl, FaceLandmarks) and len(fl) == 7 and fl.size == (512, 512)
    assert fl.found.tolist() == [True, True, True, False, False, True, True]
    assert fl.num_missing == 2 and progress == list(range(1, 8))
    assert np.isnan(fl.points478[3:5]).all() and np.isfinite(fl.points478[fl.found]).all()
    assert fl.points478.shape == (7, 478, 2) and fl.points131.shape == (7, 131, 2)
    np.testing.assert_array_equal(fl.points131, fl.points478[:, list(T.FULL_131)])
    with pytest.raises(InputError, match="frame 1"):
        with LandmarkDetector() as det:
            det.detect_sequence([astronaut, astronaut[:256]])


@pytest.mark.skipif(not MEDIA.exists(), reason="../shared/media absent")
@pytest.mark.parametrize("clip", CLIPS)
def test_real_clips_every_frame_found(clip):
    frames = read_frames(MEDIA / clip, 50)
    assert len(frames) == 50
    with LandmarkDetector() as det:
        fl = det.detect_sequence(frames)
    h, w = fl.size
    assert fl.found.all()
    xy = fl.points478
    assert np.all((xy[..., 0] > -5) & (xy[..., 0] < w + 5) & (xy[..., 1] > -5) & (xy[..., 1] < h + 5))
    assert np.all(xy[:, LIPS, 1].min(axis=1) > xy[:, EYES, 1].max(axis=1))

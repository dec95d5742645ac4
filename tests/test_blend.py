"""Blending: the feathered lower-face mask and paste-back identity on real frames."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from talkformer_core.errors import InputError
from talkformer_core.face.blend import lower_face_mask, paste_back
from talkformer_core.face.landmarks import LandmarkDetector, detect_image
from talkformer_core.face.track import build_track, crop_frame

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
CLIPS = ["sadtalker_WDA_KatieHill_000.mp4", "videoretalking_face_4.mp4", "videoretalking_face_5.mp4"]
needs_media = pytest.mark.skipif(not MEDIA.exists(), reason="../shared/media absent")


@pytest.mark.parametrize("size,feather", [(64, 6), (128, 12), (256, 25), (256, 1)])
def test_lower_face_mask(size, feather):
    m = lower_face_mask(size, feather)
    assert m.shape == (size, size) and m.dtype == np.float32
    assert m.min() >= 0 and m.max() <= 1 + 1e-6
    assert np.all(m[: size // 2] == 0)  # upper half: the known context, never pasted
    assert m[0].max() == 0 and m[-1].max() == 0 and m[:, 0].max() == 0 and m[:, -1].max() == 0
    g = feather + 2  # ramp plus the one-pixel zero border
    inner = m[size // 2 + g : size - g, g : size - g]
    assert inner.size > 0 and np.allclose(inner, 1, atol=1e-6)
    col = m[:, size // 2]
    top = col[: size * 3 // 4]
    assert np.all(np.diff(top) >= -1e-6)  # rises into the lower half
    ramp = np.count_nonzero((top > 0.01) & (top < 0.99))
    assert max(feather // 2, 1) <= ramp <= feather + 2  # the ramp has about the feather's width


def test_lower_face_mask_hard_and_invalid():
    m = lower_face_mask(128, 0)
    assert np.all(m[64:] == 1) and np.all(m[:64] == 0)
    with pytest.raises(InputError):
        lower_face_mask(128, 40)
    with pytest.raises(InputError):
        lower_face_mask(128, -1)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _box_slices(box, shape):
    x0, y0, s = box
    return (slice(max(int(np.floor(y0)), 0), min(int(np.ceil(y0 + s)), shape[0])),
            slice(max(int(np.floor(x0)), 0), min(int(np.ceil(x0 + s)), shape[1])))


def _first_frame_and_box(clip: str, crop_size: int):
    import av

    with av.open(str(MEDIA / clip)) as c:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(10), c.decode(video=0))]
    with LandmarkDetector() as det:
        fl = det.detect_sequence(frames)
    return frames[0], build_track(fl, crop_size=crop_size).boxes[0]


def _check_identity(frame, box, size, min_psnr):
    out = paste_back(frame, crop_frame(frame, box, size), box)
    ys, xs = _box_slices(box, frame.shape)
    outside = np.ones(frame.shape[:2], bool)
    outside[ys, xs] = False
    np.testing.assert_array_equal(out[outside], frame[outside])  # bit-identical outside the box
    x0, y0, s = box
    upper = (slice(max(int(y0), 0), max(int(y0 + 0.45 * s), 0)), xs)
    np.testing.assert_array_equal(out[upper], frame[upper])  # and on the box's upper half
    psnr = _psnr(out[ys, xs], frame[ys, xs])
    assert psnr > min_psnr, psnr
    return psnr


@needs_media
@pytest.mark.parametrize("clip", CLIPS)
def test_paste_back_identity_native_256(clip):
    frame, box = _first_frame_and_box(clip, 256)
    psnr = _check_identity(frame, box, 256, 40.0)
    print(f"{clip}: paste-back identity at 256, box side {box[2]:.0f} px: {psnr:.1f} dB")


@needs_media
@pytest.mark.parametrize("size", [128, 256])
def test_paste_back_identity_face_at_crop_resolution(size):
    """The crop holds the face at the frame's own resolution (a frame where the box side equals
    the crop size): paste-back of the unchanged crop reproduces the face region above 40 dB.
    (At 128 on the 512-px clips the crop keeps a third of the face's resolution, 34-39 dB: that
    is the resampling, not the geometry.)"""
    frame, box = _first_frame_and_box(CLIPS[2], size)
    f = size / box[2]
    small = cv2.resize(frame, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    psnr = _check_identity(small, tuple(b * f for b in box), size, 40.0)
    print(f"identity at {size}, face at crop resolution: {psnr:.1f} dB")


def test_paste_back_changes_only_lower_face():
    img = skimage.data.astronaut()
    p, _ = detect_image(img, require_face=True)
    from talkformer_core.face.landmarks import FaceLandmarks
    from talkformer_core.face import topology as T

    fl = FaceLandmarks(p[None, :, :2], p[None, list(T.FULL_131), :2], np.ones(1, bool), (512, 512))
    box = build_track(fl).boxes[0]
    green = np.zeros((128, 128, 3), np.uint8)
    green[..., 1] = 255
    out = paste_back(img, green, box, feather=12)
    changed = np.any(out != img, axis=-1)
    ys, xs = np.nonzero(changed)
    x0, y0, s = box
    assert ys.min() >= y0 + s / 2 - 1 and ys.max() <= y0 + s + 1
    assert xs.min() >= x0 - 1 and xs.max() <= x0 + s + 1
    # the mouth is covered: the centre of the box's lower half is fully green
    cy, cx = int(y0 + 0.75 * s), int(x0 + 0.5 * s)
    assert tuple(out[cy, cx]) == (0, 255, 0)
    # a box partly outside the frame works and leaves the rest alone
    out2 = paste_back(img, green, (400.0, 400.0, 200.0))
    assert np.any(out2 != img) and np.array_equal(out2[:400], img[:400])
    with pytest.raises(InputError):
        paste_back(img, green[:, :100], box)
    with pytest.raises(InputError):
        paste_back(img, green, box, mask=np.ones((64, 64), np.float32))

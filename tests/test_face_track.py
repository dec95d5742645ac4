"""Face track: crop boxes, smoothing (jitter on real clips), missing frames, crop geometry, npz."""
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from talkformer_core.errors import FaceError, InputError
from talkformer_core.face import topology as T
from talkformer_core.face.blend import paste_back_tracked
from talkformer_core.face.landmarks import FaceLandmarks, LandmarkDetector
from talkformer_core.face.track import (
    FaceTrack,
    build_track,
    crop_frame,
    crop_jitter,
    crop_transform,
    interpolate_missing,
)

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
CLIPS = ["sadtalker_WDA_KatieHill_000.mp4", "videoretalking_face_4.mp4", "videoretalking_face_5.mp4"]
EYES = [T.FULL_131.index(i) for i in (33, 133, 159, 145, 362, 263, 386, 374)]
needs_media = pytest.mark.skipif(not MEDIA.exists(), reason="../shared/media absent")


def read_frames(path: Path, n: int | None = None) -> list[np.ndarray]:
    import av

    out = []
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if n is not None and len(out) == n:
                break
    return out


@pytest.fixture(scope="module")
def clip_landmarks() -> dict[str, FaceLandmarks]:
    if not MEDIA.exists():
        pytest.skip("../shared/media absent")
    out = {}
    for clip in CLIPS:
        with LandmarkDetector() as det:
            out[clip] = det.detect_sequence(read_frames(MEDIA / clip))
    return out


@needs_media
@pytest.mark.parametrize("clip", CLIPS)
def test_crop_jitter_reduced_on_real_clip(clip_landmarks, clip):
    fl = clip_landmarks[clip]
    track = build_track(fl, crop_size=256)
    raw, smooth = crop_jitter(track.raw_boxes), crop_jitter(track.boxes)
    print(f"{clip}: centre jitter raw {raw:.2f} px, smoothed {smooth:.2f} px ({raw / smooth:.2f}x)")
    # these clips hold real head motion (up to ~30 px in a second), which smoothing must keep;
    # what it removes is the frame-to-frame landmark noise
    assert raw / smooth > 1.6
    # the size hardly moves: it must not breathe with speech
    assert np.diff(track.boxes[:, 2]).std() < 0.2 * np.diff(track.raw_boxes[:, 2]).std()
    # mouth in the lower half, eyes in the upper half, the face inside the crop, every frame
    pc = track.points_crop()
    assert pc[:, list(T.LIP_POS), 1].min() > 0.5
    assert pc[:, EYES, 1].max() < 0.5
    assert pc.min() > 0.05 and pc.max() < 0.97
    # the smoothed box stays close to the raw one (no lag, no drift)
    err = np.abs(track.boxes - track.raw_boxes)
    assert np.median(err[:, :2]) < 0.02 * np.median(track.boxes[:, 2])


def test_still_head_gives_still_crop():
    rng = np.random.default_rng(0)
    img = skimage.data.astronaut()
    frames = [np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8) for _ in range(30)]
    with LandmarkDetector() as det:
        fl = det.detect_sequence(frames)
    assert fl.found.all()
    track = build_track(fl)
    raw, smooth = crop_jitter(track.raw_boxes), crop_jitter(track.boxes)
    print(f"still head: raw jitter {raw:.3f} px, smoothed {smooth:.4f} px")
    assert raw > 0.05  # the noise moves the landmarks...
    assert smooth < 0.1 * raw  # ...the dead zone holds the crop
    centre = track.boxes[:, :2] + track.boxes[:, 2:] / 2
    assert np.ptp(centre, axis=0).max() < 0.3
    assert np.ptp(track.boxes[:, 2]) < 0.01 * track.boxes[0, 2]


def _blank_out(fl: FaceLandmarks, idx) -> FaceLandmarks:
    p478 = fl.points478.copy()
    found = fl.found.copy()
    p478[idx] = np.nan
    found[idx] = False
    return FaceLandmarks(p478, p478[:, list(T.FULL_131)], found, fl.size)


@needs_media
def test_missing_frames_interpolated_and_passed_through(clip_landmarks):
    clip = CLIPS[2]
    frames = read_frames(MEDIA / clip, 50)
    frames[20:25] = [np.zeros_like(frames[0])] * 5  # black frames: really no face there
    frames[:3] = [np.zeros_like(frames[0])] * 3
    with LandmarkDetector() as det:
        fl = det.detect_sequence(frames)
    assert fl.found.tolist() == [False] * 3 + [True] * 17 + [False] * 5 + [True] * 25
    track = build_track(fl, crop_size=128)
    assert track.num_missing == 8 and np.isfinite(track.boxes).all()
    assert np.isnan(track.points131[20:25]).all() and np.isfinite(track.points131_filled).all()
    # raw centre / size in the gap: linear between frames 19 and 25
    cs = np.concatenate([track.raw_boxes[:, :2] + track.raw_boxes[:, 2:] / 2, track.raw_boxes[:, 2:]], 1)
    for t in range(20, 25):
        w = (t - 19) / 6
        np.testing.assert_allclose(cs[t], (1 - w) * cs[19] + w * cs[25], rtol=1e-9)
    np.testing.assert_allclose(cs[:3], np.repeat(cs[3:4], 3, axis=0))  # leading gap: nearest
    # frames without a face pass through unchanged even with a crop pasted
    junk = np.full((128, 128, 3), 255, np.uint8)
    for t in (0, 22):
        np.testing.assert_array_equal(paste_back_tracked(frames[t], junk, track, t), frames[t])
    assert not np.array_equal(paste_back_tracked(frames[30], junk, track, 30), frames[30])


def test_interpolate_missing_and_all_missing():
    v = np.array([[np.nan], [1.0], [np.nan], [np.nan], [4.0], [np.nan]])
    found = np.isfinite(v[:, 0])
    np.testing.assert_allclose(interpolate_missing(v, found)[:, 0], [1, 1, 2, 3, 4, 4])
    fl = FaceLandmarks(np.full((4, 478, 2), np.nan, np.float32), np.full((4, 131, 2), np.nan, np.float32),
                       np.zeros(4, bool), (100, 100))
    with pytest.raises(FaceError):
        build_track(fl)


def _synthetic_landmarks(t: int = 6) -> FaceLandmarks:
    """A fixed real-proportioned face (the astronaut's landmarks) translated a little per frame."""
    from talkformer_core.face.landmarks import detect_image

    rng = np.random.default_rng(0)

    p, found = detect_image(skimage.data.astronaut(), require_face=True)
    p478 = np.stack([p[:, :2] + rng.normal(0, 1, 2) for _ in range(t)]).astype(np.float32)
    return FaceLandmarks(p478, p478[:, list(T.FULL_131)], np.ones(t, bool), (512, 512))


def test_crop_geometry_marker():
    """A bright dot at a known sub-pixel frame position lands where px_to_crop puts it."""
    h, w = 400, 600
    for box, size in [((100.3, 50.7, 240.0), 256), ((100.3, 50.7, 240.0), 64), ((-30.5, 300.2, 150.0), 128)]:
        x, y = box[0] + 0.37 * box[2], box[1] + 0.61 * box[2]
        yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
        blob = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 4.0**2))
        frame = np.repeat((blob * 255).round().astype(np.uint8)[..., None], 3, axis=2)
        crop = crop_frame(frame, box, size).astype(np.float64)[..., 0]
        cy, cx = np.mgrid[0:size, 0:size] + 0.5
        wgt = crop * (crop > 0.2 * crop.max())
        got = np.array([(wgt * cx).sum(), (wgt * cy).sum()]) / wgt.sum() / size
        want = T.px_to_crop(np.array([[x, y]]), box)[0]
        np.testing.assert_allclose(got, want, atol=0.6 / size + 0.002)
    m, inv = crop_transform((10.0, 20.0, 200.0), 128)
    full = lambda a: np.vstack([a, [0, 0, 1]])  # noqa: E731
    np.testing.assert_allclose(full(m) @ full(inv), np.eye(3), atol=1e-12)


def test_crop_outside_frame_replicates_border():
    frame = np.zeros((100, 100, 3), np.uint8)
    frame[:, :50] = 200
    crop = crop_frame(frame, (-100.0, -50.0, 200.0), 64)  # mostly outside: left part replicated
    assert crop[:, :16].min() == 200 and crop[:, -8:].max() == 0


def test_track_points_crop_save_load(tmp_path):
    fl = _synthetic_landmarks()
    track = build_track(fl, crop_size=96)
    pc = track.points_crop()
    assert pc.shape == (6, 131, 2)
    np.testing.assert_allclose(pc[2], (track.points131[2] - track.boxes[2, :2]) / track.boxes[2, 2], rtol=1e-5)
    path = tmp_path / "track.npz"
    track.save(path)
    back = FaceTrack.load(path)
    for name in ("boxes", "raw_boxes", "found", "points131", "points131_filled"):
        np.testing.assert_array_equal(getattr(back, name), getattr(track, name))
    assert back.frame_size == (512, 512) and back.crop_size == 96 and len(back) == 6
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="bad.npz"):
        FaceTrack.load(tmp_path / "bad.npz")
    with pytest.raises(InputError):
        build_track(fl, crop_size=32)


def test_draw_preview():
    from talkformer_core.face.draw import draw_box, draw_landmarks, draw_sketch_edges, draw_track_crop, draw_track_frame

    fl = _synthetic_landmarks(2)
    track = build_track(fl, crop_size=128)
    frame = np.zeros((512, 512, 3), np.uint8)
    out = draw_track_frame(frame, track, 0)
    assert out.shape == frame.shape and frame.max() == 0  # input untouched
    ys, xs = np.nonzero(out.any(axis=-1))
    x0, y0, s = track.boxes[0]
    assert xs.min() >= x0 - 3 and xs.max() <= x0 + s + 3 and ys.min() >= y0 - 3 and ys.max() <= y0 + s + 3
    # every one of the 131 points is drawn: the pixel at each point is lit
    p = np.round(track.points131[0] - 0.5).astype(int)
    assert out[p[:, 1], p[:, 0]].any(axis=-1).all()
    crop = draw_track_crop(track.crop(frame, 0), track, 0)
    assert crop.shape == (128, 128, 3) and crop[64].any()
    # NaN points are skipped; edges with a missing end are skipped
    pts = track.points131[0].copy()
    pts[:10] = np.nan
    assert draw_landmarks(frame, pts).any() and draw_sketch_edges(frame, pts).any()
    assert draw_box(frame, (10, 10, 50, 60)).any()
    track.found[1] = False
    grey = draw_track_frame(frame, track, 1)
    lit = grey[grey.any(axis=-1)]
    assert lit.size and np.all(lit == lit[:, :1])  # grey (anti-aliased) box only, no coloured points

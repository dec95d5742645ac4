"""Synthetic talking data: determinism, exact truth, the piecewise-affine warp."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def photo():
    from talkformer_core.data import synthetic

    return synthetic.face_square(synthetic.load_photo("astronaut"), 96)


def test_warp_identity_and_point_transport(photo):
    from talkformer_core.data import synthetic

    p0 = synthetic.detect_photo_landmarks(photo)
    w = synthetic.FaceWarper(photo, p0)
    same = w.warp(p0)
    # the rest shape maps every pixel onto itself (bilinear at integer positions: exact up to rounding)
    assert np.abs(same.astype(int) - photo.astype(int)).max() <= 1
    # a pure translation of the lower lip moves its pixels by that translation
    p = synthetic.deform_points(p0, 0.9, 0.0)
    out = w.warp(p)
    assert not np.array_equal(out, photo)
    # the pixel under a moved lip point comes from the rest position of that point
    for k in (14, 17, 84, 314):
        x, y = p[k]
        xs, ys = p0[k]
        a = out[int(round(y)), int(round(x))].astype(int)
        b = photo[int(round(ys)), int(round(xs))].astype(int)
        assert np.abs(a - b).max() < 40  # same area of the lip (rounding to whole pixels)


def test_clip_is_deterministic_and_truthful(photo):
    from talkformer_core.data import synthetic

    a = synthetic.make_clip(photo, seed=3, duration=0.6, frame_size=None)
    b = synthetic.make_clip(photo, seed=3, duration=0.6, frame_size=None)
    c = synthetic.make_clip(photo, seed=4, duration=0.6, frame_size=None)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio)
    assert not np.array_equal(a.audio, c.audio)
    T = len(a.frames)
    assert T == 15 and a.points478.shape == (T, 478, 2) and len(a.audio) == int(0.6 * 16000)
    # the true inner-lip gap grows with the requested opening
    assert np.corrcoef(a.opening, a.opening_px)[0, 1] > 0.95 or np.ptp(a.opening) < 0.05

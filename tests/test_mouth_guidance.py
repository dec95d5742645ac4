"""Mouth guidance (sampling.MouthGuidance): classifier-free guidance with stage 1's average mouth
as the unconditional input. The neutral shape, where it is placed, the guided epsilon, what a scale
of 0 or a target equal to the neutral mouth leaves alone, and the checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from talkformer_core import pipeline as P
from talkformer_core import sampling as S
from talkformer_core.errors import InputError
from talkformer_core.face import topology
from test_sampling import inputs, loaded

CONTENT = list(topology.CONTENT_POS)


def live(temporal: bool) -> P.LoadedModel:
    """test_sampling's tiny model with random weights in its zero-initialised projections: at init
    M-Align adds exactly zero, so the landmarks would change nothing and these tests could not fail."""
    m = loaded(temporal)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in m.model.unet.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def test_neutral_mouth_is_the_mean_shape_about_its_centroid():
    rng = np.random.default_rng(0)
    shape = rng.uniform(-0.1, 0.1, (57, 2))
    pts = rng.uniform(0.2, 0.8, (6, 131, 2))
    for t in range(6):  # the same jaw and lips, moved about and opened by a per-frame amount
        pts[t, CONTENT] = shape * (1 + 0.1 * t) + rng.uniform(0.3, 0.7, 2)
    pts[2] = np.nan  # a frame without a face is skipped
    n = S.neutral_mouth(pts)
    assert n.shape == (57, 2) and n.dtype == np.float32
    assert np.allclose(n.mean(0), 0, atol=1e-7)  # about its own centroid
    scales = np.array([1 + 0.1 * t for t in (0, 1, 3, 4, 5)])
    assert np.allclose(n, (shape - shape.mean(0)) * scales.mean(), atol=1e-6)
    with pytest.raises(InputError, match="no frame of the template"):
        S.neutral_mouth(np.full((3, 131, 2), np.nan))
    with pytest.raises(InputError, match=r"\(T, 131, 2\)"):
        S.neutral_mouth(np.zeros((3, 68, 2)))


def test_neutral_landmarks_keep_the_pose_and_the_mouth_centroid():
    _, lms = inputs(5)
    neutral = torch.as_tensor(S.neutral_mouth(inputs(9, seed=3)[1]))
    lm = torch.as_tensor(lms)
    out = S.neutral_landmarks(lm, neutral)
    pose = [i for i in range(131) if i not in set(CONTENT)]
    assert torch.equal(out[:, pose], lm[:, pose])  # the frame's pose, untouched
    assert torch.allclose(out[:, CONTENT].mean(1), lm[:, CONTENT].mean(1), atol=1e-6)  # placed on its centroid
    assert torch.allclose(out[:, CONTENT] - out[:, CONTENT].mean(1, keepdim=True), neutral.expand(5, -1, -1),
                          atol=1e-6)
    assert torch.equal(lm, torch.as_tensor(lms))  # the input is not modified


def test_guided_epsilon_is_the_classifier_free_extrapolation():
    m = live(False)
    crops, lms = inputs(3)
    tf = m.model
    ref = P.encode_reference(m, crops[0])
    g = S.make_guidance(m, 1.5, S.neutral_mouth(inputs(7, seed=4)[1]))
    lm = torch.as_tensor(lms)
    lc, lcn = S._landmark_caches(m, lm, g)
    x = torch.randn(3, m.config.model.latent_channels, m.config.model.latent_size, m.config.model.latent_size,
                    generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 500)
    eps_c = tf.unet(x, t, lc, ref).float()
    eps_n = tf.unet(x, t, tf.prepare_landmarks(S.neutral_landmarks(lm, g.neutral)), ref).float()
    guided = S._model_fn(m, lc, ref, lc_neutral=lcn, guidance=g)(x, t)
    assert torch.allclose(guided, eps_c + 1.5 * (eps_c - eps_n), atol=1e-5)
    assert (eps_c - eps_n).abs().max() > 1e-4  # the two conditions differ: the test can fail
    assert torch.equal(S._model_fn(m, lc, ref)(x, t), eps_c)  # unguided: one pass, the plain epsilon


@pytest.mark.parametrize("temporal", [False, True])
def test_guidance_off_or_at_the_neutral_mouth_changes_nothing(temporal):
    m = live(temporal)
    crops, lms = inputs(6)
    ref = P.encode_reference(m, crops[0])
    kw = dict(steps=3, sampler="ddim", seed=0)
    plain = P.sample_faces(m, crops, lms, ref, **kw)
    neutral = S.neutral_mouth(inputs(8, seed=5)[1])
    assert np.array_equal(plain, P.sample_faces(m, crops, lms, ref, mouth_guidance=0.0, neutral_mouth=neutral, **kw))
    guided = P.sample_faces(m, crops, lms, ref, mouth_guidance=2.0, neutral_mouth=neutral, **kw)
    assert np.abs(guided.astype(int) - plain.astype(int)).max() > 0  # guidance redraws the mouth
    # a target whose jaw and lips are the neutral mouth already: nothing to amplify
    at_neutral = S.neutral_landmarks(torch.as_tensor(lms), torch.as_tensor(neutral)).numpy()
    a = P.sample_faces(m, crops, at_neutral, ref, **kw)
    b = P.sample_faces(m, crops, at_neutral, ref, mouth_guidance=2.0, neutral_mouth=neutral, **kw)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_guidance_scale_and_neutral_are_checked():
    m = loaded(False)
    crops, lms = inputs(2)
    assert S.mouth_guidance_of(m) == 0.0 and S.make_guidance(m, None, None) is None
    m.config.model.diffusion.mouth_guidance = 1.5  # the model's own scale is the default
    assert S.mouth_guidance_of(m) == 1.5 and S.mouth_guidance_of(m, 0.5) == 0.5
    with pytest.raises(InputError, match="needs the neutral mouth"):
        S.FaceSampler(m, None)
    assert S.FaceSampler(m, None, mouth_guidance=0.0).guidance is None
    g = S.FaceSampler(m, None, neutral_mouth=np.zeros((57, 2), np.float32)).guidance
    assert g is not None and g.scale == 1.5
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="mouth guidance"):
            S.mouth_guidance_of(m, bad)
    with pytest.raises(InputError, match=r"expected finite \(57, 2\)"):
        S.FaceSampler(m, None, neutral_mouth=np.zeros((20, 2), np.float32))
    with pytest.raises(InputError, match="mouth guidance -2"):
        P.sample_faces(m, crops, lms, None, mouth_guidance=-2.0)

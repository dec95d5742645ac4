"""The dubbing protocol (eval.dubbing) on exact truth, and stage 1 of person models on new audio:
the mouth model fitted on one synthetic clip follows synthetic speech it never heard on another
clip's frames, not those frames' own mouths, and closes the mouth on silence."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_helpers import synthetic_clip  # noqa: E402

from talkformer_core.eval import dubbing as D  # noqa: E402
from talkformer_core.face import topology  # noqa: E402


def _similar(p: np.ndarray, scale: float, deg: float, shift: tuple[float, float]) -> np.ndarray:
    a = np.deg2rad(deg)
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return scale * p @ R.T + np.asarray(shift)


@pytest.fixture(scope="module")
def clips():
    # A: the person's own speech (training frames); B: the template; C: new speech and its truth
    return {k: synthetic_clip(seed, dur, 256) for k, seed, dur in (("A", 3, 8.0), ("B", 5, 3.0), ("C", 11, 3.0))}


def test_opening_metric_on_exact_truth(clips):
    c = clips["A"]
    o = D.mouth_opening(c.points478)
    # the synthetic mouth opening is what the metric measures: correlation ~1 with the truth
    assert D.pearson(o, c.opening) > 0.98
    assert D.pearson(o, c.opening_px) > 0.99
    # the same from the 131-point selection, and invariant to a similarity of the whole face
    np.testing.assert_allclose(D.mouth_opening(topology.select_131(c.points478)), o)
    np.testing.assert_allclose(D.mouth_opening(_similar(c.points478.astype(np.float64), 0.7, 12.0, (30.0, -8.0))),
                               o, rtol=1e-6)
    t = D.mouth_opening(clips["B"].points478)
    n = len(t)
    s = D.dubbing_scores(o[:n], o[:n], t)
    assert s["corr_audio"] == pytest.approx(1.0)
    # a mouth that copies the template correlates 1 with it and only by chance with the audio
    s = D.dubbing_scores(t, o[:n], t)
    assert s["corr_template"] == pytest.approx(1.0) and s["corr_template_given_audio"] == pytest.approx(1.0)


def test_split_clip_parts():
    sp = D.split_clip(200)
    assert (sp.train.min(), sp.train.max(), len(sp.train)) == (0, 119, 120)
    assert (sp.audio[0], sp.audio[-1], sp.template[0], sp.template[-1]) == (120, 159, 160, 199)
    found = np.ones(200, bool)
    found[[5, 125, 170]] = False
    sp = D.split_clip(200, found)
    assert 5 not in sp.train and len(sp.train) == 119
    assert len(sp.audio) == len(sp.template) == 38  # frames 125 and 170 drop their pairs
    assert 125 not in sp.audio and 170 not in sp.template and 130 not in sp.template  # 130 pairs 170
    with pytest.raises(ValueError):
        D.split_clip(8)


def test_loudness_model_recovers_a_linear_relation():
    rng = np.random.default_rng(0)
    x = rng.normal(-2.0, 0.6, 300)
    m = D.LoudnessModel.fit(x, 0.3 * x + 0.1)
    assert m.a == pytest.approx(0.3) and m.b == pytest.approx(0.1)
    y = 0.3 * x + 0.1 + rng.normal(0, 0.05, 300)
    m = D.LoudnessModel.fit(np.r_[x, np.nan], np.r_[y, 1.0])  # a NaN frame is ignored
    assert abs(m.a - 0.3) < 0.02 and abs(m.b - 0.1) < 0.05
    np.testing.assert_allclose(m.predict([0.0, 1.0]), [m.b, m.a + m.b])
    # the per-frame loudness is the mel window's mean
    mels = rng.normal(size=(4, 80, 16))
    np.testing.assert_allclose(D.frame_loudness(mels), mels.reshape(4, -1).mean(1))


def test_lip_shape_error_ignores_pose_and_sees_the_lips(clips):
    p = topology.select_131(clips["A"].points478[:20]).astype(np.float64)
    moved = _similar(p, 1.3, -9.0, (14.0, 5.0))
    np.testing.assert_allclose(D.lip_shape_error(moved, p), 0.0, atol=1e-9)
    lips_down = moved.copy()
    lips_down[:, list(topology.LIP_POS), 1] += 2.0 * 1.3
    err = D.lip_shape_error(lips_down, p)
    nose = topology.nose_length(p)
    np.testing.assert_allclose(err, 2.0 / nose, rtol=1e-6)


def test_upper_face_similarity_recovers_the_head_move_whatever_the_mouth_does(clips):
    p = clips["A"].points478[0].astype(np.float64)
    q = _similar(p, 0.8, 20.0, (-6.0, 11.0))
    a = np.deg2rad(20.0)
    want = np.array([[0.8 * np.cos(a), -0.8 * np.sin(a), -6.0], [0.8 * np.sin(a), 0.8 * np.cos(a), 11.0]])
    q[list(topology.LIPS_40) + list(topology.JAW_17), 1] += 9.0  # the mouth opens: not a head move
    for src, dst in ((p, q), (topology.select_131(p), topology.select_131(q))):
        np.testing.assert_allclose(D.upper_face_similarity(src, dst), want, atol=1e-9)


def test_closed_range_reads_the_truly_closed_frames_with_the_noisy_ruler():
    """A noisy ruler on exact truth: the closed range is the largest reading among the frames whose
    true opening is in its lowest 10 %, so every truly closed frame is within it, where the 10 %
    quantile of the readings themselves leaves a fifth of them out."""
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.0, 1.0, 400)
    measured = np.abs(truth + rng.normal(0.0, 0.05, truth.size))
    closed = truth <= np.quantile(truth, 0.1)
    measured[np.flatnonzero(~closed)[0]] = np.nan  # a frame without a face
    r = D.closed_range(measured, truth)
    assert r == measured[closed].max()
    assert (measured[closed] > D.closed_threshold(measured)).mean() > 0.2
    with pytest.raises(ValueError):
        D.closed_range([np.nan], [0.0])


def test_lag_correlations_find_a_known_lead():
    rng = np.random.default_rng(0)
    truth = np.convolve(rng.standard_normal(80), np.ones(3) / 3, mode="same")
    lead = np.roll(truth, -2)  # pred[t] = truth[t + 2]: two frames early
    r = D.lag_correlations(lead[:-2], truth[:-2], 4)
    assert sorted(r) == list(range(-4, 5))
    assert max(r, key=lambda k: r[k]) == 2 and r[2] == pytest.approx(1.0)
    r0 = D.lag_correlations(truth, truth, 3)
    assert max(r0, key=lambda k: r0[k]) == 0 and r0[1] < 0.999
    assert D.lag_correlations(truth[:5], truth[:5], 3)[3] is None  # too few frames left
    with pytest.raises(ValueError, match="one length"):
        D.lag_correlations(truth, truth[:-1])


def test_partial_correlation_and_linear_leak():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=400)
    template = 0.6 * truth + rng.normal(size=400)
    follows_audio = truth + 0.1 * rng.normal(size=400)
    assert D.pearson(follows_audio, template) > 0.4  # chance alignment of the two series ...
    assert abs(D.partial_corr(follows_audio, template, truth)) < 0.15  # ... which the partial removes
    assert abs(D.template_weight(follows_audio, truth, template)) < 0.05  # ... and the weight
    # a small leak on a close follower: the partial reads it large, the weight at its size
    small_leak = truth + 0.1 * rng.normal(size=400) + 0.05 * (template - template.mean()) / template.std()
    assert D.partial_corr(small_leak, template, truth) > 0.3
    assert 0.02 < D.template_weight(small_leak, truth, template) < 0.08
    # a copy of the template: weight 1 (in stds of the output, the audio held fixed)
    assert D.template_weight(template, truth, template) == pytest.approx(1.0)
    assert D.template_weight(np.ones(400), truth, template) is None  # a constant output: no fit
    pose = rng.normal(size=(400, 6, 2))
    leaky = pose.copy()
    leaky[:, 0, 1] += 2.0 * truth
    assert abs(D.linear_leak(pose, truth)) < 0.3
    assert D.linear_leak(leaky, truth) > 0.7


def _analysis(clip):
    from talkformer_core.face.landmarks import FaceLandmarks
    from talkformer_core.pipeline import analyze_landmarks

    p = np.asarray(clip.points478, np.float32)
    lms = FaceLandmarks(points478=p, points131=np.ascontiguousarray(p[:, list(topology.FULL_131)]),
                        found=np.ones(len(p), bool), size=tuple(clip.frames.shape[1:3]))
    return analyze_landmarks(lms, 64)


def test_mouth_model_follows_new_speech_on_another_clips_frames(clips, tmp_path):
    """Stage 1 of a person model (finetune: stable box + mouth model) fitted on clip A, driven by clip
    C's speech on clip B's frames: its opening follows C's true opening and not B's, and 2 s of
    silence keep it in A's closed range (lowest 10 % of A's frames)."""
    from talkformer_core.data.preprocess import save_shard, shard_from_synthetic
    from talkformer_core.config import person_config
    from talkformer_core.finetune.run import mouth_training_data
    from talkformer_core.models.landmark_completion import LandmarkCompletion
    from talkformer_core.pipeline import (AudioFeatures, LoadedModel, audio_features, complete_landmarks,
                                          landmarks_to_crop)

    shard = save_shard(tmp_path / "a.npz", shard_from_synthetic(clips["A"], 64))
    cfg = person_config(64)
    assert cfg.model.landmark.mouth_model and cfg.model.landmark_box == "stable"
    torch.manual_seed(0)
    net = LandmarkCompletion(cfg.model.landmark).eval()
    mels, content = mouth_training_data(shard, (0.0, 1.0))
    assert mels.shape == (200, 80, 16) and content.shape == (200, 57, 2)
    net.mouth.fit(mels, content)
    model = LoadedModel("talkformer", cfg, types.SimpleNamespace(landmark=net), None, torch.device("cpu"),
                        torch.float32)
    b = _analysis(clips["B"])
    new = audio_features((clips["C"].audio, 16000))
    n = min(b.num_frames, new.num_frames)
    idx = np.arange(n)
    refs = np.zeros((cfg.model.num_reference_landmarks, 131, 2), np.float32)  # unused by the mouth model
    pred = landmarks_to_crop(b, complete_landmarks(model, b, new, idx, references=refs), idx, model)
    o = D.mouth_opening(pred)
    truth = D.mouth_opening(clips["C"].points478[:n])
    tmpl = D.mouth_opening(clips["B"].points478[:n])
    s = D.dubbing_scores(o, truth, tmpl)
    loud = D.LoudnessModel.fit(D.frame_loudness(mels), D.mouth_opening(clips["A"].points478))
    base = D.pearson(loud.predict(D.frame_loudness(new.windows[:n])), truth)
    assert s["corr_audio"] > 0.75, s
    assert s["corr_audio"] > base - 0.05, (s, base)
    assert abs(s["corr_template_given_audio"]) < 0.3, s
    # silence closes the mouth
    sil = audio_features(np.zeros(32000, np.float32))
    idx = np.resize(np.arange(b.num_frames), sil.num_frames)
    quiet = landmarks_to_crop(b, complete_landmarks(model, b, sil, idx, references=refs), idx, model)
    closed = D.closed_threshold(D.mouth_opening(clips["A"].points478))
    assert D.mouth_opening(quiet).max() <= closed
    # mouth guidance's neutral mouth: the mouth model's mean is its training frames' mean, and placed on
    # B's frames it opens between the silent mouth and the widest one stage 1 drew for the speech
    from talkformer_core.pipeline import stage1_neutral_mouth
    from talkformer_core.sampling import neutral_landmarks

    assert np.allclose(net.mouth.mean_content(), content.mean(0), atol=1e-5)
    neutral = stage1_neutral_mouth(model, b)
    assert neutral.shape == (57, 2) and np.allclose(neutral.mean(0), 0, atol=1e-6)
    o_n = D.mouth_opening(neutral_landmarks(torch.as_tensor(pred), torch.as_tensor(neutral)).numpy())
    assert D.mouth_opening(quiet).max() < o_n.min() and o_n.max() < o.max(), (o_n, o.max())
    # an unfitted mouth model leaves stage 1 to the transformer
    net2 = LandmarkCompletion(cfg.model.landmark).eval()
    m2 = LoadedModel("talkformer", cfg, types.SimpleNamespace(landmark=net2), None, torch.device("cpu"), torch.float32)
    out2 = complete_landmarks(m2, b, AudioFeatures(new.windows[:10], 10, 25.0), np.arange(10), references=refs)
    assert np.isfinite(out2).all() and not net2.mouth.is_fitted


def test_fit_mouth_model_writes_live_and_ema_copies(clips, tmp_path):
    from pipeline_helpers import tiny_model

    from talkformer_core.data.preprocess import save_shard, shard_from_synthetic
    from talkformer_core.finetune.run import fit_mouth_model
    from talkformer_core.models.checkpoint import save_checkpoint
    from talkformer_core.models.model import TalkFormer
    from talkformer_core.pipeline import load_model

    cfg, _ = tiny_model(0)
    cfg.model.landmark.mouth_model = True
    m = TalkFormer(cfg)
    mods = {"autoencoder": m.autoencoder, "landmark": m.landmark, "appearance": m.appearance, "unet": m.unet}
    ema = {f"landmark.{k}": v.clone() for k, v in m.landmark.state_dict().items()}
    ck = save_checkpoint(tmp_path / "m.safetensors", {**mods, "ema": ema}, cfg)
    shard = save_shard(tmp_path / "a.npz", shard_from_synthetic(clips["A"], 32))
    lam = fit_mouth_model(ck, shard, (0.0, 0.6))
    assert all(np.isfinite(lam))
    for use_ema in (False, True):
        lm = load_model(ck, use_ema=use_ema).landmark
        assert lm.mouth.is_fitted
        assert float(lm.mouth.open_range[1]) > float(lm.mouth.open_range[0]) > 0

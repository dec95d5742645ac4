"""The lip-sync pipeline: stage functions and the streaming orchestrator (tiny random-weight model,
synthetic astronaut clips)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline_helpers import (outside_mask, psnr, save_tiny_checkpoint, synthetic_clip, write_video,
                              write_wav)
from talkformer_core import pipeline as P
from talkformer_core.errors import AudioError, FaceError, InputError
from talkformer_core.face import topology
from talkformer_core.video import iter_frames, match_length_indices, read_audio_track

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    clip = synthetic_clip(0, 2.0, 256)  # 50 frames
    video = write_video(d / "clip.mp4", clip.frames, clip.audio)
    audio3 = write_wav(d / "a3.wav", np.concatenate([clip.audio, clip.audio[:16000]]))  # 3 s -> 75 frames
    ckpt = save_tiny_checkpoint(d / "tiny.safetensors")
    model = P.load_model(ckpt, device="cpu")
    frames = list(iter_frames(video))
    analysis = P.analyze_frames(frames, model.crop_size, source=str(video))
    return dict(dir=d, clip=clip, video=video, audio3=audio3, ckpt=ckpt, model=model, frames=frames,
                analysis=analysis)


def test_analysis_follows_the_mouth_and_picks_references(env):
    a, clip = env["analysis"], env["clip"]
    assert a.num_frames == 50 and a.found.all() and a.num_missing == 0
    assert a.boxes.shape == (50, 3) and a.landmark_boxes.shape == (50, 4)
    # measured lip openness follows the synthetic truth
    assert np.corrcoef(a.openness, clip.opening)[0, 1] > 0.8
    assert np.all((a.frontalness > 0.5) & (a.frontalness <= 1.0))
    ref = P.choose_reference_frame(a)
    assert a.openness[ref] >= np.quantile(a.openness, 0.75)  # an open mouth
    assert P.choose_reference_frame(a, 7) == 7
    with pytest.raises(InputError, match="reference frame 50"):
        P.choose_reference_frame(a, 50)
    refs = P.reference_landmark_sets(a, 5)
    assert refs.shape == (5, 131, 2)
    idx = topology.pick_spread(a.openness, 5)
    np.testing.assert_array_equal(refs, a.points_box(idx))
    assert a.openness[idx[0]] == np.min(a.openness) and a.openness[idx[-1]] == np.max(a.openness)
    # box frame: every point inside [0, 1] of its own IP-LAP landmark box
    assert refs.min() > 0 and refs.max() < 1


def test_audio_features(env):
    f = P.audio_features(env["audio3"])
    assert f.num_frames == 75 and f.windows.shape == (75, 80, 16) and f.waveform.shape == (1, 48000)
    wav = f.waveform[0]
    g = P.audio_features((np.stack([wav, wav]), 16000))  # stereo in memory: same windows
    np.testing.assert_allclose(g.windows, f.windows, atol=1e-5)
    assert P.audio_features(env["audio3"], num_frames=10).windows.shape == (10, 80, 16)
    empty = write_wav(env["dir"] / "empty.wav", np.zeros(0, np.float32))
    with pytest.raises(AudioError, match="empty.wav"):
        P.audio_features(empty)


def test_complete_landmarks_windows(env):
    model, a = env["model"], env["analysis"]
    aud = P.audio_features(env["audio3"])
    plan = match_length_indices(a.num_frames, 13, "pingpong")
    out = P.complete_landmarks(model, a, aud, plan)
    assert out.shape == (13, 131, 2) and np.isfinite(out).all()
    pose = list(topology.POSE_POS)
    box = model.config.model.landmark_box  # stage 1's box frame (the stable one by default)
    np.testing.assert_array_equal(out[:, pose], a.points_box(plan, box)[:, pose])  # pose copied through
    # non-overlapping windows of L = 5: the first two windows do not depend on what follows
    first10 = P.complete_landmarks(model, a, aud, plan[:10])
    np.testing.assert_allclose(first10, out[:10], atol=1e-6)
    # the audio drives the lips: silence gives different lips than speech
    silent = P.AudioFeatures(np.full_like(aud.windows, -4.0), aud.num_frames, 25.0)
    quiet = P.complete_landmarks(model, a, silent, plan)
    assert np.abs(quiet[:, list(topology.LIP_POS)] - out[:, list(topology.LIP_POS)]).max() > 1e-4
    crop = P.landmarks_to_crop(a, out, plan)
    assert crop.shape == (13, 131, 2)
    np.testing.assert_allclose(crop[:, pose], a.track.points_crop(plan)[:, pose], atol=1e-4)  # box -> crop


def test_anchor_mouth_x_moves_predicted_mouth_onto_the_template_lips(env):
    """ModelConfig.anchor_mouth_x: the predicted jaw and lips slide sideways (one dx per frame) so the
    lips' mean x is the template frame's detected one; shapes, heights and the pose are untouched."""
    model, a = env["model"], env["analysis"]
    aud = P.audio_features(env["audio3"])
    plan = match_length_indices(a.num_frames, 13, "pingpong")
    lips, content, pose = list(topology.LIP_POS), list(topology.CONTENT_POS), list(topology.POSE_POS)
    plain = P.complete_landmarks(model, a, aud, plan)
    model.config.model.anchor_mouth_x = True
    try:
        anchored = P.complete_landmarks(model, a, aud, plan)
    finally:
        model.config.model.anchor_mouth_x = False
    np.testing.assert_allclose(anchored[:, lips, 0].mean(1),
                               a.points_box(plan, model.config.model.landmark_box)[:, lips, 0].mean(1), atol=1e-5)
    dx = anchored[:, content, 0] - plain[:, content, 0]  # (T, 57): one shift per frame
    np.testing.assert_allclose(dx, np.repeat(dx[:, :1], len(content), 1), atol=1e-5)
    assert np.abs(dx).max() > 1e-4  # the tiny model's mouth was not already there
    np.testing.assert_array_equal(anchored[..., 1], plain[..., 1])
    np.testing.assert_array_equal(anchored[:, pose], plain[:, pose])


def test_sample_faces_shared_noise_and_determinism(env):
    model, a, frames = env["model"], env["analysis"], env["frames"]
    from talkformer_core.face.track import crop_frame

    S = model.crop_size
    crop = crop_frame(frames[3], a.boxes[3], S)
    crops = np.stack([crop, crop, crop_frame(frames[9], a.boxes[9], S)])
    lm = a.track.points_crop([3, 3, 9])
    ref = P.encode_reference(model, crop)
    out = P.sample_faces(model, crops, lm, ref, steps=3, seed=1)
    assert out.shape == (3, S, S, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], out[1])  # one noise for every frame: same input, same face
    np.testing.assert_array_equal(out, P.sample_faces(model, crops, lm, ref, steps=3, seed=1))
    split = P.sample_faces(model, crops, lm, ref, steps=3, seed=1, batch_size=1)
    assert np.abs(split.astype(int) - out.astype(int)).max() <= 1
    other = P.sample_faces(model, crops, lm, ref, steps=3, seed=2)
    assert np.abs(other.astype(int) - out.astype(int)).max() > 0
    stopped = []

    def stop(i, n):
        stopped.append((i, n))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        P.sample_faces(model, crops, lm, ref, steps=3, callback=stop)
    assert stopped == [(0, 3)]


def test_blend_faces_touches_only_the_face_box(env):
    frames, a = env["frames"][:4], env["analysis"]
    S = env["model"].crop_size
    gen = np.random.default_rng(0).integers(0, 256, (4, S, S, 3), dtype=np.uint8)
    found = np.array([True, False, True, True])
    out = P.blend_faces(frames, gen, a.boxes[:4], found)
    for i in range(4):
        m = outside_mask(frames[i].shape[:2], [a.boxes[i]])
        np.testing.assert_array_equal(out[i][m], frames[i][m])  # bit-identical outside the box
        if found[i]:
            assert np.abs(out[i].astype(int) - frames[i].astype(int)).max() > 50
    np.testing.assert_array_equal(out[1], frames[1])  # no face: unchanged


def test_lipsync_end_to_end(env):
    out = env["dir"] / "out.mp4"
    seen = []
    r = P.lipsync(env["video"], env["audio3"], env["model"], out,
                  P.SyncOptions(steps=2, watermark=False, chunk_size=16, crf=12),  # crf 12: the template's own
                  callback=lambda d, n, p: seen.append((d, n, None if p is None else p.shape)))
    assert r.num_frames == 75 and r.template_frames == 50 and r.num_faceless == 0
    got = list(iter_frames(out))
    assert len(got) == 75  # = the audio's length at 25 fps (pingpong over 50 template frames)
    wav, sr = read_audio_track(out)
    assert abs(wav.shape[1] / sr - 3.0) < 0.05
    assert seen[-1][:2] == (75, 75) and (16, 75, (32, 32, 3)) in seen
    plan = match_length_indices(50, 75, "pingpong")
    a = env["analysis"]
    for k in (0, 30, 49, 50, 74):  # forward and backward (ping-pong) runs
        t = plan[k]
        m = outside_mask(got[k].shape[:2], [a.boxes[t]], margin=16)
        assert psnr(got[k][m], env["frames"][t][m]) > 40
        assert psnr(got[k], env["frames"][t]) < 60  # the face did change
    from talkformer_core.detect import read_tags

    assert "TalkFormer" in read_tags(out)["comment"]


def test_lipsync_length_modes_and_single_image(env):
    d = env["dir"]
    r = P.lipsync(env["video"], env["audio3"], env["model"], d / "trim.mp4",
                  P.SyncOptions(steps=1, watermark=False, length_mode="trim"))
    assert r.num_frames == 50 and len(list(iter_frames(d / "trim.mp4"))) == 50
    img = env["frames"][5]
    one_s = write_wav(d / "a1.wav", env["clip"].audio[:16000])
    r = P.lipsync(img, one_s, env["model"], d / "img.mp4", P.SyncOptions(steps=1, watermark=False, crf=12))
    assert r.num_frames == 25 and r.template_frames == 1
    got = list(iter_frames(d / "img.mp4"))
    assert len(got) == 25
    m = outside_mask(img.shape[:2], [env["analysis"].boxes[5]], margin=24)
    assert psnr(got[10][m], img[m]) > 40


def test_faceless_frames_pass_through(env, tmp_path):
    frames = [f.copy() for f in env["frames"][:30]]
    blank = np.full_like(frames[0], 128)
    blank[::8] = 60  # some texture, no face
    for i in range(10, 16):
        frames[i] = blank
    video = write_video(tmp_path / "gap.mp4", frames, crf=12)
    out = tmp_path / "out.mp4"
    with pytest.warns(UserWarning, match="no face in 6 of 30"):
        r = P.lipsync(video, (env["clip"].audio[: 16000 * 30 // 25], 16000), env["model"], out,
                      P.SyncOptions(steps=1, watermark=False, crf=12))
    assert r.num_faceless == 6 and r.num_frames == 30
    src = list(iter_frames(video))
    got = list(iter_frames(out))
    for i in range(10, 16):
        assert psnr(got[i], src[i]) > 40
    # no face anywhere: a clear error naming the file, before any sampling
    novid = write_video(tmp_path / "noface.mp4", [blank] * 5)
    with pytest.raises(FaceError, match="noface.mp4"):
        P.lipsync(novid, env["audio3"], env["model"], tmp_path / "x.mp4", P.SyncOptions(watermark=False))
    assert not (tmp_path / "x.mp4").exists()


def test_callback_stops_the_run_without_output(env, tmp_path):
    out = tmp_path / "stopped.mp4"

    def cb(done, total, preview):
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        P.lipsync(env["video"], env["audio3"], env["model"], out, P.SyncOptions(steps=1, watermark=False,
                                                                                chunk_size=8), callback=cb)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file


def test_load_model_errors(env, tmp_path):
    from talkformer_core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="nope.safetensors"):
        P.load_model(tmp_path / "nope.safetensors")
    with pytest.raises(InputError, match="dtype"):
        P.load_model(env["ckpt"], dtype="int8")


_MEMORY_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {root!r})
    from talkformer_core import pipeline as P
    def rss(key):
        for line in open('/proc/self/status'):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    model = P.load_model({ckpt!r})
    base = rss('VmRSS')
    P.lipsync({video!r}, {audio!r}, model, {out!r}, P.SyncOptions(steps=1, watermark=False, chunk_size=16))
    print(base, rss('VmHWM'))
""")


# glibc's per-thread arenas and its self-raising mmap threshold keep freed frame buffers as RSS:
# measured here, 4 s against 16 s grew 112 MB apart with the defaults and 8-14 MB with these, the
# pipeline's code unchanged. With them the peak counts what the pipeline holds, not what malloc caches.
_LIVE_MEMORY_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_length(env, tmp_path):
    """4 s and 16 s of 512x512 video: holding the 16 s clip's frames would add ~300 MB."""
    clip = synthetic_clip(3, 4.0, 512)
    frames = list(clip.frames)
    long = frames + frames[::-1] + frames + frames[::-1]
    v4 = write_video(tmp_path / "v4.mp4", frames, crf=23)
    v16 = write_video(tmp_path / "v16.mp4", long, crf=23)
    a4 = write_wav(tmp_path / "a4.wav", clip.audio)
    a16 = write_wav(tmp_path / "a16.wav", np.tile(clip.audio, 4))
    peaks = []
    for v, a in ((v4, a4), (v16, a16)):
        code = _MEMORY_SCRIPT.format(root=str(ROOT), ckpt=str(env["ckpt"]), video=str(v), audio=str(a),
                                     out=str(tmp_path / "o.mp4"))
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                             env={**os.environ, **_LIVE_MEMORY_MALLOC})
        assert res.returncode == 0, res.stderr[-2000:]
        base, peak = map(int, res.stdout.split()[-2:])
        peaks.append((base, peak))
    (b4, p4), (b16, p16) = peaks
    assert p16 / p4 < 1.2, peaks
    assert (p16 - b16) < (p4 - b4) + 100 * 2 ** 20, peaks  # growth well under the 300 MB of frames

"""The IP-LAP renderer path (docs/iplap.md): IP-LAP-layout networks with random weights, saved in
IP-LAP's training format, converted, loaded by kind, run through pipeline.lipsync, the sync CLI and
the Complete Landmarks node on a synthetic talking clip; the renderer's input builders checked
against IP-LAP's conventions directly (inference_single.py, commit 9b9dc03).

The renderer costs seconds per frame on a CPU, so the end-to-end runs use short audio (4-6 output
frames) and 1-2 reference frames (--iplap-references).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from talkformer_core import iplap, iplap_pipeline as ip, pipeline
from talkformer_core.errors import CheckpointError, InputError
from talkformer_core.face import topology

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_helpers import iplap_nets, iplap_training_format  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SR = 16000


# ---------------------------------------------------------------------------------------------
# fixtures: a random-weight IP-LAP checkpoint (via IP-LAP's training format and convert_iplap),
# a 1 s synthetic clip at 256 px, its analysis

@pytest.fixture(scope="module")
def nets():
    return iplap_nets()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, nets):
    from talkformer_core.convert import convert_iplap

    d = tmp_path_factory.mktemp("iplap")
    lg, rd = nets
    torch.save(iplap_training_format(lg.state_dict()), d / "landmarkgenerator_checkpoint.pth")
    torch.save(iplap_training_format(rd.state_dict(), "module."), d / "renderer_checkpoint.pth")  # DataParallel
    full = convert_iplap(d / "landmarkgenerator_checkpoint.pth", d / "iplap.safetensors", d / "renderer_checkpoint.pth")
    lm_only = convert_iplap(d / "landmarkgenerator_checkpoint.pth", d / "iplap_lm.safetensors")
    return full, lm_only


@pytest.fixture(scope="module")
def model(ckpt):
    return pipeline.load_model(ckpt[0], device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from talkformer_core.data import synthetic

    c = synthetic.make_clip(synthetic.load_photo("astronaut"), seed=3, duration=1.0, frame_size=256)
    path = synthetic.write_clip(c, tmp_path_factory.mktemp("clip") / "clip.mp4")
    return c, path


@pytest.fixture(scope="module")
def analysis(clip):
    return pipeline.analyze_frames(clip[0].frames, ip.CROP_SIZE, source="clip")


def _audio(clip, frames: int):
    return clip.audio[: int(SR * frames / 25)], SR


# ---------------------------------------------------------------------------------------------
# loading

def test_loads_by_kind_with_the_converted_weights(ckpt, model, nets):
    lg, rd = nets
    assert model.kind == "iplap" and model.crop_size == 128
    assert model.sequence_length == 5 and model.num_references == 15  # IP-LAP's T and Nl
    for ours, theirs in ((model.model.landmark, lg), (model.model.renderer, rd)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert list(a) == list(b)
        assert all(torch.equal(a[k], b[k]) for k in a)  # through torch.save + convert, bit-exact
    only = pipeline.load_model(ckpt[1])
    assert only.model.renderer is None and only.model.landmark is not None


def test_landmark_only_checkpoint_fails_before_long_work(ckpt, clip, tmp_path):
    with pytest.raises(CheckpointError, match="--renderer"):
        pipeline.lipsync(clip[1], _audio(clip[0], 5), ckpt[1], tmp_path / "o.mp4")  # 5 frames: the shortest audio taken
    assert not (tmp_path / "o.mp4").exists()


def test_diffusion_stages_refuse_an_iplap_model_clearly(model):
    crop = np.zeros((128, 128, 3), np.uint8)
    with pytest.raises(InputError, match="no diffusion stage"):
        pipeline.encode_reference(model, crop)
    with pytest.raises(InputError, match="no diffusion stage"):
        pipeline.sample_faces(model, crop[None], np.zeros((1, 131, 2), np.float32), None, steps=1)


# ---------------------------------------------------------------------------------------------
# input builders: IP-LAP's conventions

def test_mel_index_is_iplaps_chunk(clip):
    from talkformer_core.audio import audio_windows

    mel, windows = audio_windows(clip[0].audio, 25)
    assert [ip.mel_index(p, 25) for p in range(5)] == [2, 2, 2, 3, 4]
    assert ip.mel_index(40, 25) == 24
    # IP-LAP: frame p hears chunk max(0, p - 2) = mel[:, s:s + 16], s = int(c * 80 / 25) (inf:238-245, 443)
    for p in (0, 1, 2, 7, 20):
        c = max(0, p - 2)
        s = int(c * 80.0 / 25)
        np.testing.assert_array_equal(windows[ip.mel_index(p, len(windows))], mel[:, s:s + 16])


def test_references_ranked_by_openness_cropped_bgr_and_sketched(clip, analysis):
    frames = clip[0].frames
    refs = ip.build_references(analysis, lambda t: frames[t], 7)
    # ranks: IP-LAP's linspace over frames sorted by lip openness (inf:342-351, 374)
    order = np.argsort(analysis.openness, kind="stable")
    want = order[[int(v) for v in torch.linspace(0, len(order) - 1, 7).tolist()]]
    np.testing.assert_array_equal(refs.frames, want)
    assert np.all(np.diff(analysis.openness[refs.frames]) >= 0)
    assert refs.images.shape == refs.sketches.shape == (7, 3, 128, 128)
    assert refs.images.dtype == refs.sketches.dtype == np.float32
    t = int(refs.frames[3])
    x1, y1, x2, y2 = analysis.landmark_boxes[t]
    # the landmark box (not our square crop), BGR, uint8 resize then / 255 (inf:295, 414-415)
    bgr = cv2.resize(np.ascontiguousarray(frames[t][y1:y2, x1:x2, ::-1]), (128, 128))
    np.testing.assert_array_equal(refs.images[3], (bgr / 255.0).astype(np.float32).transpose(2, 0, 1))
    crop = frames[t][y1:y2, x1:x2].astype(np.float64) / 255.0
    blue, red = crop[..., 2].mean(), crop[..., 0].mean()
    assert abs(blue - red) > 0.02
    assert abs(refs.images[3][0].mean() - blue) < 0.01  # channel 0 is blue (BGR), not red
    # sketches: the detected 131 points in the box frame on an (h, w) canvas with short side 128
    sk = iplap.draw_sketch(analysis.points_box(t), y2 - y1, x2 - x1)
    np.testing.assert_array_equal(refs.sketches[3], sk)
    assert set(np.unique(refs.sketches[3][:, 0, 0])) == {0.0}  # black canvas
    assert np.all(refs.sketches[3][0] == refs.sketches[3][1]) and refs.sketches[3].max() <= 224 / 255 + 1e-6


def test_window_landmarks_pose_copied_content_predicted_windows_clamped(model, analysis, clip):
    from talkformer_core.audio import audio_windows

    _, windows = audio_windows(clip[0].audio, 25)
    plan = np.arange(analysis.num_frames)
    refs = pipeline.reference_landmark_sets(analysis, 15)
    T = len(plan)
    lms = ip.window_landmarks(model, analysis, windows, plan, [0, 10, T - 1], refs)  # (3, 5, 131, 2)
    assert lms.shape == (3, 5, 131, 2)
    assert iplap.window(0, T) == [0, 0, 0, 1, 2] and iplap.window(T - 1, T) == [T - 3, T - 2, T - 1, T - 1, T - 1]
    pose = list(topology.POSE_POS)
    for j, t in enumerate([0, 10, T - 1]):
        w = iplap.window(t, T)
        np.testing.assert_array_equal(lms[j][:, pose], analysis.points_box(plan[w])[:, pose])
        # the same numbers as the network called on IP-LAP's window by hand
        mels = torch.as_tensor(windows[[max(p, 2) for p in w]])[None, :, None]
        want = model.landmark.complete(mels, torch.as_tensor(analysis.points_box(plan[w])[:, pose])[None],
                                       torch.as_tensor(refs)[None])
        np.testing.assert_allclose(lms[j], want[0].numpy(), atol=1e-5)
    assert not np.allclose(lms[0][2], analysis.points_box(0))  # jaw and lips are predicted, not copied


def test_target_sketch_uses_each_frames_own_canvas():
    pts = np.full((131, 2), 0.5, np.float32)
    pts[:, 0] = np.linspace(0.05, 0.95, 131)
    tall, wide = (0, 0, 100, 200), (0, 0, 200, 100)  # boxes (x1, y1, x2, y2): 200x100 and 100x200 px
    sk = ip.target_sketches(np.stack([pts] * 5), np.array([tall, wide, tall, wide, tall]))
    assert sk.shape == (5, 3, 128, 128)
    np.testing.assert_array_equal(sk[0], iplap.draw_sketch(pts, 200, 100))
    np.testing.assert_array_equal(sk[1], iplap.draw_sketch(pts, 100, 200))
    assert not np.array_equal(sk[0], sk[1])
    assert iplap.sketch_canvas_size(200, 100) == (256, 128)


def test_renderer_inputs_shapes_and_the_lower_half_is_the_renderers_to_zero(model, analysis, clip):
    frames = clip[0].frames
    refs = ip.build_references(analysis, lambda t: frames[t], 1)
    face = iplap.crop_face(frames[5], analysis.landmark_boxes[5])
    sk = np.zeros((5, 3, 128, 128), np.float32)
    mel = np.zeros((80, 16), np.float32)
    x = ip.renderer_inputs(face, sk, refs, mel)
    assert [tuple(t.shape) for t in x] == [(1, 1, 3, 128, 128), (1, 5, 3, 128, 128), (1, 1, 3, 128, 128),
                                           (1, 1, 3, 128, 128), (1, 1, 1, 80, 16)]
    assert float(x[0][..., 64:, :].abs().sum()) > 0  # the builder keeps the lower half ...
    other = face.copy()
    other[:, 64:] = np.random.default_rng(0).random((3, 64, 128))
    a = ip.render(model, np.stack([face, other]), np.stack([sk, sk]), refs, np.stack([mel, mel]))
    assert a.shape == (2, 3, 128, 128) and a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a[0], a[1])  # ... and the renderer ignores it (vr.py:359)


def test_paste_face_only_inside_the_landmark_box():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
    box = (40, 30, 190, 180)
    face = np.full((128, 128, 3), 255, np.uint8)
    pts = np.array([[80, 70], [150, 70], [150, 150], [80, 150]], np.float64)
    mask = ip.face_contour_mask(pts, box)
    assert mask.shape == (150, 150) and mask.max() <= 1 and mask[75, 75] == pytest.approx(1.0, abs=1e-3)
    assert mask[0].max() == 0 and mask[:, 0].max() == 0 and mask[-1].max() == 0  # zero on the box border
    out = ip.paste_face(frame, face, box, mask)
    outside = np.ones((200, 240), bool)
    outside[30:180, 40:190] = False
    np.testing.assert_array_equal(out[outside], frame[outside])
    assert np.all(out[110, 115] == 255)  # the hull's middle is the generated face
    sharp = ip.face_contour_mask(pts, box, blur=0)
    assert set(np.unique(sharp)) == {0.0, 1.0}
    with pytest.raises(InputError):
        ip.face_contour_mask(pts, box, blur=-1)


def test_frame_renderer_changes_only_the_face_and_reports_progress(model, analysis, clip):
    from talkformer_core.audio import audio_windows

    frames = clip[0].frames
    _, windows = audio_windows(clip[0].audio, 25)
    aud = pipeline.AudioFeatures(windows, 25, 25.0)
    plan = np.arange(25)
    opts = pipeline.SyncOptions(iplap_references=1, batch_size=1)
    r = ip.IPLAPFrameRenderer(model, analysis, aud, plan, lambda t: frames[t], opts)
    calls = []
    found = np.array([True, False, True])
    out, preview, marks = r([frames[i] for i in (3, 4, 5)], 3, 6, found, lambda i, n: calls.append((i, n)))
    # after each batch (one frame at a time on a CPU), and between the renderer's layers with the
    # batches done so far: progress and the interrupt point
    assert (1, 2) in calls and calls[-1] == (2, 2) and calls == sorted(calls)
    assert preview.shape == (128, 128, 3) and preview.dtype == np.uint8
    np.testing.assert_array_equal(out[1], frames[4])  # found False: passes through
    for i, t in ((0, 3), (2, 5)):
        x1, y1, x2, y2 = analysis.landmark_boxes[t]
        outside = np.ones(frames[t].shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        np.testing.assert_array_equal(out[i][outside], frames[t][outside])
        assert np.abs(out[i].astype(int) - frames[t]).sum() > 0
        np.testing.assert_array_equal(marks[i], analysis.boxes[t])  # watermark: where detect.py looks


# ---------------------------------------------------------------------------------------------
# end to end: pipeline.lipsync, the CLI, progress / interrupt

def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _read(path: Path) -> list[np.ndarray]:
    from talkformer_core.video import iter_frames

    return list(iter_frames(path, 25.0))


def test_lipsync_end_to_end(model, clip, analysis, tmp_path):
    from talkformer_core.video import probe_video

    c, path = clip
    seen = []
    res = pipeline.lipsync(path, _audio(c, 5), model, tmp_path / "out.mp4",
                           pipeline.SyncOptions(iplap_references=1, batch_size=3, watermark=False, crf=12),
                           callback=lambda d, n, p: seen.append((d, n, None if p is None else p.shape)))
    assert res.num_frames == 5 and res.num_faceless == 0
    info = probe_video(res.out_path)
    assert info.has_audio and info.num_frames == 5
    assert seen[-1] == (5, 5, (128, 128, 3))
    out, src = _read(res.out_path), _read(path)[:5]
    assert len(out) == 5
    for t in range(5):
        x1, y1, x2, y2 = analysis.landmark_boxes[t]
        outside = np.ones(out[t].shape[:2], bool)
        outside[max(y1 - 16, 0):y2 + 16, max(x1 - 16, 0):x2 + 16] = False  # + h264 macroblocks
        assert _psnr(out[t][outside], src[t][outside]) > 40  # the template's own crf: re-encoding only
        assert _psnr(out[t][~outside], src[t][~outside]) < 30  # random weights: the face changed
    from talkformer_core.detect import read_tags

    assert "TalkFormer" in read_tags(res.out_path)["comment"]  # the provenance tag


def test_sync_cli_runs_the_iplap_path(ckpt, clip, tmp_path):
    from talkformer_core import sync
    from talkformer_core.video import probe_video

    c, path = clip
    wav = tmp_path / "a.wav"
    import soundfile as sf

    sf.write(str(wav), _audio(c, 5)[0], SR)
    out = tmp_path / "cli.mp4"
    args = ["--video", str(path), "--audio", str(wav), "--checkpoint", str(ckpt[0]), "--out", str(out)]
    assert sync.main(args + ["--iplap-references", "0"]) == 2 and not out.exists()
    assert sync.main(args + ["--iplap-references", "1", "--batch-size", "4"]) == 0
    info = probe_video(out)
    assert info.num_frames == 5 and info.has_audio


def test_interrupt_points_stop_a_forward_pass_midway(model):
    """Cancel inside one renderer call: the callback runs between layers and its exception ends the
    forward pass there (a CPU frame with 25 references takes tens of seconds)."""
    renderer = model.model.renderer
    n_modules = sum(1 for _ in renderer.modules())
    calls = []

    def cb():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    x = torch.zeros(1, 3, 8, 8)
    conv = next(m for m in renderer.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 3)
    with pytest.raises(KeyboardInterrupt):
        with ip.interrupt_points(renderer, cb, every_s=0.0):
            for _ in range(5):  # every submodule's forward is a point; the third call stops it
                conv(x)
    assert len(calls) == 3 and n_modules > 3
    conv(x)  # hooks are gone after the block
    assert len(calls) == 3


def test_lipsync_reports_every_frame_on_cpu(model, clip, tmp_path):
    c, path = clip
    seen = []
    pipeline.lipsync(path, _audio(c, 5), model, tmp_path / "p.mp4",
                     pipeline.SyncOptions(iplap_references=1, batch_size=8, watermark=False),
                     callback=lambda d, n, p: seen.append(d))
    assert {1, 2, 3, 4, 5} <= set(seen) and seen == sorted(seen)


def test_interrupt_leaves_no_file(model, clip, tmp_path):
    c, path = clip

    class Stop(Exception):
        pass

    def cb(done, total, preview):
        raise Stop

    with pytest.raises(Stop):
        pipeline.lipsync(path, _audio(c, 5), model, tmp_path / "x.mp4",
                         pipeline.SyncOptions(iplap_references=1, batch_size=1), callback=cb)
    assert not (tmp_path / "x.mp4").exists()


# ---------------------------------------------------------------------------------------------
# ComfyUI nodes: the loader takes an IP-LAP file; Complete Landmarks runs on it alone

def _pack():
    name = "talkformer_pack_iplap_tests"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_nodes_load_iplap_and_complete_landmarks(ckpt, clip, analysis):
    nodes = _pack().NODE_CLASS_MAPPINGS
    (m,) = nodes["TalkFormerModelLoader"]().load(str(ckpt[1]), "fp32")  # the landmark-only file is enough
    assert m.loaded.kind == "iplap" and m.image_size == 128
    T = analysis.num_frames
    aud = pipeline.audio_features(_audio(clip[0], T), num_frames=T)
    lms, preview = nodes["TalkFormerCompleteLandmarks"]().complete(m, analysis, aud)
    assert lms.shape == (T, 131, 2) and preview.shape == (T, 128, 128, 3)
    pose = list(topology.POSE_POS)
    np.testing.assert_allclose(lms[:, pose], analysis.track.points_crop()[:, pose], atol=1e-4)
    assert np.all(np.isfinite(lms))
    with pytest.raises(InputError, match="no diffusion stage"):
        nodes["TalkFormerEncodeReference"]().encode(m, analysis, torch.from_numpy(clip[0].frames).float() / 255)


def test_iplap_workflow_twins():
    ui = json.loads((ROOT / "workflows" / "iplap_lipsync.json").read_text())
    api = json.loads((ROOT / "workflows" / "iplap_lipsync.api.json").read_text())
    types = {n["type"] for n in ui["nodes"]}
    assert {"TalkFormerModelLoader", "TalkFormerLipSyncVideo"} <= types
    loader = next(v for v in api.values() if v["class_type"] == "TalkFormerModelLoader")
    assert loader["inputs"]["ckpt_name"].startswith("iplap")

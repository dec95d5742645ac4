"""Every node called directly, as plain Python, with real core objects: a tiny random-weight
checkpoint and a synthetic talking clip of scikit-image's astronaut (1 s, 128 px frames).

The pack is imported the way ComfyUI imports it (by file path, under a path-derived module name).
Where COMFYUI_DIR is set, the ComfyUI-hosted parts (ProgressBar previews, interrupt, ModelPatcher,
models folder registration) run in a subprocess with ComfyUI's own modules loaded.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STAGE_NODES = ["TalkFormerModelLoader", "TalkFormerAudioFeatures", "TalkFormerMatchLength",
               "TalkFormerDetectFaceLandmarks", "TalkFormerCompleteLandmarks", "TalkFormerEncodeReference",
               "TalkFormerSampler", "TalkFormerBlendFace"]
FPS = 25.0


def _load_pack():
    name = "talkformer_pack_tests"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


pack = _load_pack()
NODES = pack.NODE_CLASS_MAPPINGS


def node(name: str):
    return NODES[name]()


@pytest.fixture(scope="module")
def clip():
    from skimage.data import astronaut

    from talkformer_core.data.synthetic import make_clip

    return make_clip(astronaut(), seed=0, duration=1.0, fps=FPS, frame_size=128)


@pytest.fixture(scope="module")
def images(clip):
    return torch.from_numpy(clip.frames).float() / 255.0  # [T, H, W, 3]


@pytest.fixture(scope="module")
def audio(clip):
    return {"waveform": torch.from_numpy(clip.audio)[None, None].float(), "sample_rate": 16000}


@pytest.fixture(scope="module")
def track(images):
    tr, preview = node("TalkFormerDetectFaceLandmarks").detect(images, crop_size=96, face_index=-1)
    return tr, preview


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from talkformer_core.config import tiny
    from talkformer_core.models.checkpoint import save_checkpoint
    from talkformer_core.models.model import TalkFormer

    torch.manual_seed(0)
    model = TalkFormer.from_config(tiny())
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    mods = {k: getattr(model, k) for k in ("autoencoder", "landmark", "appearance", "unet") if getattr(model, k) is not None}
    save_checkpoint(path, mods, model.config)
    return path


# ---------------------------------------------------------------------------------------------
# the pack itself

def test_import_is_light_and_appends_the_pack_dir():
    code = (
        "import importlib.util, sys, json\n"
        f"root = {str(ROOT)!r}\n"
        "before = list(sys.path)\n"
        "spec = importlib.util.spec_from_file_location('/x/custom_nodes/pack', root + '/__init__.py', "
        "submodule_search_locations=[root])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)\n"
        "print(json.dumps({'n': len(m.NODE_CLASS_MAPPINGS), 'torch': 'torch' in sys.modules,\n"
        "  'core': 'talkformer_core' in sys.modules, 'numpy': 'numpy' in sys.modules,\n"
        "  'appended': sys.path[:len(before)] == before and sys.path[-1] == root}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"n": out["n"], "torch": False, "core": False, "numpy": False, "appended": True}
    assert out["n"] >= len(STAGE_NODES)


@pytest.mark.parametrize("name", STAGE_NODES)
def test_node_contract(name: str):
    cls = NODES[name]
    assert cls.CATEGORY == "TalkFormer" and callable(getattr(cls, cls.FUNCTION))
    assert cls.DESCRIPTION and name in pack.NODE_DISPLAY_NAME_MAPPINGS
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    from talkformer_pack_tests.nodes._common import tooltips_complete

    assert tooltips_complete(cls) == [], f"{name}: inputs without a tooltip"
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional"}


# ---------------------------------------------------------------------------------------------
# nodes without a model

def test_match_length_modes(images, audio):
    T = images.shape[0]
    long_audio = {"waveform": torch.zeros(1, 2, int(1.22 * 44100)), "sample_rate": 44100}  # 30.5 frames
    ml = node("TalkFormerMatchLength")
    out, n, a = ml.match(images, long_audio, FPS, "pingpong")
    assert n == out.shape[0] == math.ceil(1.22 * FPS) == 31
    assert torch.equal(out[T], images[T - 2]) and torch.equal(out[30], images[T - 2 - 5])  # 0..24, 23, 22, ...
    assert a["waveform"].shape[-1] == long_audio["waveform"].shape[-1]  # the frames cover the audio: not cut
    out, n, _ = ml.match(images, long_audio, FPS, "loop")
    assert n == 31 and torch.equal(out[T], images[0]) and torch.equal(out[30], images[5])
    out, n, a = ml.match(images, long_audio, FPS, "trim")
    assert n == T and torch.equal(out, images)
    assert a["waveform"].shape[-1] == round(T / FPS * 44100)  # the audio is cut to the frames
    short = {"waveform": torch.zeros(1, 1, 8000), "sample_rate": 16000}  # 0.5 s
    out, n, _ = ml.match(images, short, FPS, "trim")
    assert n == 13 and torch.equal(out, images[:13])


def test_audio_features(audio, clip):
    from talkformer_core.audio import audio_windows

    af = node("TalkFormerAudioFeatures")
    feats, n = af.features(audio, FPS, 0)
    assert n == len(clip.frames) == feats.windows.shape[0] and feats.windows.shape[1:] == (80, 16)
    _, ref = audio_windows(clip.audio, num_frames=n, fps=FPS)
    np.testing.assert_array_equal(feats.windows, ref)
    # any rate and channel count: 48 kHz stereo of the same signal gives nearly the same windows
    from scipy.signal import resample_poly

    st = np.stack([resample_poly(clip.audio, 3, 1)] * 2)
    feats48, n48 = af.features({"waveform": torch.from_numpy(st)[None].float(), "sample_rate": 48000}, FPS, 0)
    assert n48 == n and np.abs(feats48.windows - ref).mean() < 0.05
    # silence reads as the mel floor (-4: a closed mouth); frame_count pads past the end with it
    feats0, n0 = af.features({"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000}, FPS, 40)
    assert n0 == 40 and feats0.windows.max() <= -3.9


def test_detect_face_landmarks(track, images):
    analysis, preview = track
    tr = analysis.track
    T, H, W, _ = images.shape
    assert len(tr) == T and tr.found.all() and tr.crop_size == 96
    assert tr.points131.shape == (T, 131, 2)
    assert preview.shape == images.shape and preview.dtype == torch.float32
    assert 0 <= float(preview.min()) and float(preview.max()) <= 1
    # something was drawn, and only in and around the crop boxes
    diff = (preview - images).abs().amax(-1) > 1.5 / 255  # [T, H, W]
    assert diff.any()
    for t in range(T):
        x0, y0, s = tr.boxes[t]
        outside = torch.ones(H, W, dtype=torch.bool)  # the box, and the points (some lie outside it)
        outside[max(int(y0) - 5, 0):int(y0 + s) + 6, max(int(x0) - 5, 0):int(x0 + s) + 6] = False
        (px0, py0), (px1, py1) = tr.points131[t].min(0), tr.points131[t].max(0)
        outside[max(int(py0) - 4, 0):int(py1) + 5, max(int(px0) - 4, 0):int(px1) + 5] = False
        assert not diff[t][outside].any()


def test_detect_face_landmarks_errors(images):
    from talkformer_core.errors import FaceError, InputError

    with pytest.raises(FaceError, match=r"face index 3: only 1 face found in the 3 frame\(s\) of images"):
        node("TalkFormerDetectFaceLandmarks").detect(images[:3], crop_size=96, face_index=3)  # no 4th face
    with pytest.raises(InputError, match="IMAGE"):
        node("TalkFormerDetectFaceLandmarks").detect(torch.zeros(2, 8, 8), crop_size=96)


def test_blend_face(track, images):
    from talkformer_core.errors import InputError
    from talkformer_core.face.track import crop_frame
    from talkformer_pack_tests.nodes._common import image_to_uint8, uint8_to_image

    analysis, _ = track
    tr = analysis.track
    frames = image_to_uint8(images)
    T, H, W, _ = frames.shape
    bf = node("TalkFormerBlendFace")
    # the frames' own crops pasted back: nearly the identity (PSNR over the whole frame)
    own = uint8_to_image(np.stack([crop_frame(frames[t], tr.boxes[t], 64) for t in range(T)]))
    (out,) = bf.blend(images, own, analysis, -1)
    mse = float(((out - images) ** 2).mean())
    assert out.shape == images.shape and 10 * math.log10(1 / mse) > 35
    # white crops: the lower face turns white, everything outside the box and the upper half is unchanged
    # (the blend alone: the provenance watermark, on by default, touches the face region; test_provenance.py)
    white = torch.ones(T, 64, 64, 3)
    (out,) = bf.blend(images, white, analysis, 0, watermark=False)
    o = image_to_uint8(out)
    for t in range(T):
        x0, y0, s = tr.boxes[t]
        inside = np.zeros((H, W), bool)
        inside[max(int(y0), 0):int(np.ceil(y0 + s)), max(int(x0), 0):int(np.ceil(x0 + s))] = True
        assert np.array_equal(o[t][~inside], frames[t][~inside])
        cy, cx = int(y0 + 0.75 * s), int(x0 + 0.5 * s)
        assert (o[t, cy, cx] == 255).all()
        uy = int(y0 + 0.25 * s)
        assert np.array_equal(o[t, uy, cx], frames[t, uy, cx])
    with pytest.raises(InputError, match="same count"):
        bf.blend(images[:-1], white, analysis, -1)


# ---------------------------------------------------------------------------------------------
# model nodes (need talkformer_core.pipeline)

def test_loader_names_fp32_vae_when_the_vae_input_is_half_precision(tmp_path):
    """A checkpoint that names its external VAE by hash, given that VAE through the VAE input: it
    loads in fp32; held in bf16 (ComfyUI's default for VAEs on many GPUs) its hash differs, and the
    error (a VAEMismatchError) says to start ComfyUI with --fp32-vae."""
    from pipeline_helpers import save_tiny_checkpoint, tiny_model

    from talkformer_core.errors import VAEMismatchError

    ck = save_tiny_checkpoint(tmp_path / "ext.safetensors", external_vae=tmp_path / "vae.safetensors")
    _, m = tiny_model(0)  # the same seed: the same autoencoder weights

    class VAE:  # what _vae_state_dict reads from ComfyUI's VAE object
        first_stage_model = m.autoencoder

    (loaded,) = node("TalkFormerModelLoader").load(str(ck), "fp32", vae=VAE())
    assert loaded.image_size == 32
    VAE.first_stage_model = m.autoencoder.to(torch.bfloat16)
    with pytest.raises(VAEMismatchError, match="--fp32-vae"):
        node("TalkFormerModelLoader").load(str(ck), "fp32", vae=VAE())


def test_model_chain(checkpoint, images, audio, track):
    from talkformer_core.errors import FaceError, InputError

    analysis, _ = track
    tr = analysis.track
    T = images.shape[0]
    (model,) = node("TalkFormerModelLoader").load(str(checkpoint), "fp32")
    assert model.image_size == 32 and model.patcher is None  # no ComfyUI: no patcher
    feats, n = node("TalkFormerAudioFeatures").features(audio, FPS, T)
    lms, preview = node("TalkFormerCompleteLandmarks").complete(model, analysis, feats, images)
    lms_np = np.asarray(lms)
    assert lms_np.shape == (T, 131, 2) and np.isfinite(lms_np).all()
    assert preview.shape == (T, 96, 96, 3)
    # the pose (upper face) points are the tracked ones; only lips and jaw are predicted
    from talkformer_core.face import topology

    pose = list(topology.POSE_POS)
    np.testing.assert_allclose(lms_np[:, pose], tr.points_crop()[:, pose], atol=1e-4)
    (ref_auto,) = node("TalkFormerEncodeReference").encode(model, analysis, images, -1)
    (ref_img,) = node("TalkFormerEncodeReference").encode(model, analysis, images, 0, reference_image=images[3:4])
    with pytest.raises(InputError, match="expected 0 <= frame"):
        node("TalkFormerEncodeReference").encode(model, analysis, images, T + 5)
    with pytest.raises(FaceError, match="reference_image"):
        node("TalkFormerEncodeReference").encode(model, analysis, images, -1, reference_image=torch.zeros(1, 64, 64, 3))
    sampler = node("TalkFormerSampler")
    (a,) = sampler.sample(model, images, analysis, lms, ref_auto, steps=2, sampler="ddim", seed=1, eta=0.0)
    (b,) = sampler.sample(model, images, analysis, lms, ref_auto, steps=2, sampler="ddim", seed=1, eta=0.0)
    (c,) = sampler.sample(model, images, analysis, lms, ref_auto, steps=2, sampler="ddim", seed=2, eta=0.0)
    assert a.shape == (T, 32, 32, 3) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    (d,) = sampler.sample(model, images, analysis, lms, ref_img, steps=2, sampler="dpmpp_2m", seed=1, eta=0.0)
    assert d.shape == a.shape
    # noise_scale: -1 (the default) = the model's own (1 for this tiny config); another scale, other faces
    assert sampler.INPUT_TYPES()["optional"]["noise_scale"][1]["default"] == -1.0
    kw = dict(steps=2, sampler="ddim", seed=1, eta=0.0)
    (e,) = sampler.sample(model, images, analysis, lms, ref_auto, noise_scale=1.0, **kw)
    (f,) = sampler.sample(model, images, analysis, lms, ref_auto, noise_scale=0.3, **kw)
    assert torch.equal(a, e) and not torch.equal(a, f)
    # decode_passes: -1 (the default) = the model's own (0 for this tiny config); passes change the faces
    assert sampler.INPUT_TYPES()["optional"]["decode_passes"][1]["default"] == -1
    (g0,) = sampler.sample(model, images, analysis, lms, ref_auto, decode_passes=0, **kw)
    (g2,) = sampler.sample(model, images, analysis, lms, ref_auto, decode_passes=2, **kw)
    assert torch.equal(a, g0) and not torch.equal(a, g2)
    # mouth_guidance: -1 (the default) = the model's own (0 for this tiny config)
    assert sampler.INPUT_TYPES()["optional"]["mouth_guidance"][1]["default"] == -1.0
    (m0,) = sampler.sample(model, images, analysis, lms, ref_auto, mouth_guidance=0.0, **kw)
    assert torch.equal(a, m0)
    # the reference image is what R-Align reads. An untrained checkpoint's zero-initialised output
    # projections make R-Align add exactly zero, so a second copy gets weights there first; then two
    # reference images give different mouths, with the same seed, and the change is in the lower
    # (generated) half, not the upper half (the frame's own, kept)
    (live,) = node("TalkFormerModelLoader").load(str(checkpoint), "fp32")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for prm in live.load().model.parameters():
            if not prm.any():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
    enc = node("TalkFormerEncodeReference")
    outs = [sampler.sample(live, images, analysis, lms, enc.encode(live, analysis, images, 0, reference_image=im)[0],
                           steps=2, sampler="ddim", seed=1, eta=0.0)[0] for im in (images[3:4], images[3:4], images[-1:])]
    assert torch.equal(outs[0], outs[1])  # the same reference image: the same faces
    diff = (outs[0] - outs[2]).abs()  # (T, 32, 32, 3)
    upper, lower = float(diff[:, :12].mean()), float(diff[:, 16:].mean())
    # measured: mean change 0.0045 in the lower half (about 1.2 levels of 255),
    # 0.0005 in the upper half (the decoder's spread across the middle rows)
    assert lower > 0.002 and lower > 4 * upper, (lower, upper)
    # mouth guidance (stage 1's neutral mouth from the face track) redraws the faces of a model whose
    # landmarks matter
    ref_live = enc.encode(live, analysis, images, 0, reference_image=images[3:4])[0]
    (m2,) = sampler.sample(live, images, analysis, lms, ref_live, mouth_guidance=2.0, **kw)
    assert not torch.equal(outs[0], m2)
    (out,) = node("TalkFormerBlendFace").blend(images, a, analysis, -1)
    assert out.shape == images.shape


# ---------------------------------------------------------------------------------------------
# hosted by ComfyUI (real comfy modules, in a subprocess so this process stays ComfyUI-free)

HOSTED = r"""
import importlib.util, json, os, sys
comfy_dir, root, ckpt, extra = sys.argv[1:5]
sys.path.insert(0, comfy_dir)
import comfy.options; comfy.options.enable_args_parsing(False)
from comfy.cli_args import args; args.cpu = True
import comfy.model_management as mm, comfy.model_patcher, comfy.utils, folder_paths
folder_paths.add_model_folder_path("talkformer", extra)  # as extra_model_paths.yaml would, before the pack loads
spec = importlib.util.spec_from_file_location("/custom_nodes/pack", root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)
common = sys.modules["/custom_nodes/pack.nodes._common"]
res = {"paths": folder_paths.get_folder_paths("talkformer"), "exts": sorted(folder_paths.folder_names_and_paths["talkformer"][1]),
       "files": folder_paths.get_filename_list("talkformer")}
calls = []
comfy.utils.PROGRESS_BAR_HOOK = lambda v, t, preview, node_id=None: calls.append([v, t, None if preview is None else [preview[0], list(preview[1].size), preview[2]]])
import numpy as np
p = common.Progress(4); p.update(1); p.update(2, np.zeros((600, 300, 3), np.uint8))
res["calls"] = calls
mm.interrupt_current_processing(True)
try:
    p.update(3); res["interrupt"] = "not raised"
except Exception as e:
    res["interrupt"] = type(e).__name__
if os.path.exists(root + "/talkformer_core/pipeline.py"):
    loader = pack.NODE_CLASS_MAPPINGS["TalkFormerModelLoader"]()
    (model,) = loader.load(os.path.basename(ckpt), "auto")
    res["patcher"] = type(model.patcher).__name__
    model.load(); res["loaded_after_load"] = len(mm.current_loaded_models)
    mm.unload_all_models(); res["loaded_after_unload"] = len(mm.current_loaded_models)
    model.load(); res["loaded_after_reload"] = len(mm.current_loaded_models)
print("RESULT " + json.dumps(res))
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout")
def test_hosted_by_comfyui(checkpoint, tmp_path):
    extra = tmp_path / "extra_talkformer"
    extra.mkdir()
    (extra / checkpoint.name).write_bytes(checkpoint.read_bytes())
    (extra / "not_a_checkpoint.ckpt").write_bytes(b"x")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    r = subprocess.run([python, "-c", HOSTED, os.environ["COMFYUI_DIR"], str(ROOT), str(checkpoint), str(extra)],
                       capture_output=True, text=True, timeout=300, cwd=os.environ["COMFYUI_DIR"])
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(lines[0][7:])
    assert res["paths"][0] == str(extra) and res["paths"][1].endswith(os.path.join("models", "talkformer"))
    # the user's folders first, the pack's own checkpoints/ (the demo model) listed last; .safetensors only
    pack_ckpts = ROOT / "checkpoints"
    assert res["paths"][-1] == str(pack_ckpts)
    assert res["exts"] == [".safetensors"] and sorted(res["files"]) == sorted(
        [checkpoint.name] + [f.name for f in pack_ckpts.glob("*.safetensors")])
    assert res["calls"] == [[1, 4, None], [2, 4, ["JPEG", [300, 600], 512]]]
    assert res["interrupt"] == "InterruptProcessingException"
    if "patcher" in res:
        assert res["patcher"] == "ModelPatcher"
        assert res["loaded_after_load"] == 1 and res["loaded_after_unload"] == 0 and res["loaded_after_reload"] == 1

"""TalkFormer Lip Sync (Video), called directly (no server), with a tiny random-weight checkpoint and
a synthetic talking clip of scikit-image's astronaut (2 s, 128 px, 25 fps, AAC).

The VIDEO input is built two ways: a plain file path (always), and ComfyUI's own VideoFromFile, as
LoadVideo builds it, where COMFYUI_DIR names a ComfyUI checkout (its comfy_api is imported here,
with ComfyUI's CPU flag set first, and taken out of sys.modules again afterwards so that later
tests do not see a "ComfyUI host"). In the ComfyUI case the real ProgressBar hook is installed, as
the server's main.py does, to check the preview tuple and that a raising hook (what the server's
hook does after /interrupt) stops the run without leaving an output file.
"""
from __future__ import annotations

import importlib.util
import io
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
FPS = 25.0
SECONDS = 2.0
SIZE = 128


def _load_pack():
    """Import the pack the way ComfyUI does (by file, under a path-derived module name); the same
    module name as tests/test_nodes.py so both share one import."""
    name = "talkformer_pack_tests"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


pack = _load_pack()
video_node = sys.modules[pack.__name__ + ".nodes.video_node"]
NODE = pack.NODE_CLASS_MAPPINGS["TalkFormerLipSyncVideo"]


# ---------------------------------------------------------------------------------------------
# inputs

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import torch
    from skimage.data import astronaut

    from talkformer_core.config import tiny
    from talkformer_core.data.synthetic import make_clip, write_clip
    from talkformer_core.models.checkpoint import save_checkpoint
    from talkformer_core.models.model import TalkFormer

    d = tmp_path_factory.mktemp("video_node")
    torch.manual_seed(0)
    m = TalkFormer.from_config(tiny())
    mods = {"autoencoder": m.autoencoder, "landmark": m.landmark, "unet": m.unet}
    if m.appearance is not None:
        mods["appearance"] = m.appearance
    ckpt = save_checkpoint(d / "tiny.safetensors", mods, m.config)
    clip = make_clip(astronaut(), seed=0, duration=SECONDS, fps=FPS, frame_size=SIZE)
    src = write_clip(clip, d / "talk.mp4")
    return {"dir": d, "ckpt": ckpt, "src": src, "clip": clip}


@pytest.fixture(scope="module")
def model(assets):
    loader = pack.NODE_CLASS_MAPPINGS["TalkFormerModelLoader"]()
    (m,) = loader.load(str(assets["ckpt"]), "fp32")
    return m


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """ComfyUI's comfy_api / folder_paths / comfy.utils imported in-process (COMFYUI_DIR only)."""
    if not COMFYUI_DIR:
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout to build VIDEO objects with its comfy_api")
    before = set(sys.modules)
    sys.path.append(COMFYUI_DIR)  # appended: its top-level names must not shadow anything of ours
    try:
        import comfy.options

        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args

        args.cpu = True  # before anything imports comfy.model_management, which reads it at import
        import comfy.utils
        import folder_paths
        from comfy_api.input_impl import VideoFromComponents, VideoFromFile
        from comfy_api.util import VideoComponents
    except ImportError as e:
        sys.path.remove(COMFYUI_DIR)
        pytest.skip(f"ComfyUI at {COMFYUI_DIR} is not importable here: {e}")
    temp = tmp_path_factory.mktemp("comfy_temp")
    old_temp = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(temp))
    ns = type("Comfy", (), dict(VideoFromFile=VideoFromFile, VideoFromComponents=VideoFromComponents,
                                VideoComponents=VideoComponents, utils=comfy.utils, folder_paths=folder_paths,
                                temp=Path(temp)))
    yield ns
    comfy.utils.set_progress_bar_global_hook(None)
    folder_paths.set_temp_directory(old_temp)
    for name in set(sys.modules) - before:  # later tests must not find a "running ComfyUI"
        f = getattr(sys.modules[name], "__file__", None) or ""
        if f.startswith(os.path.abspath(COMFYUI_DIR)):
            del sys.modules[name]
    sys.path.remove(COMFYUI_DIR)


@pytest.fixture
def plain_temp(tmp_path, monkeypatch):
    """The node's temp folder outside ComfyUI is $TMPDIR/talkformer: point it at tmp_path."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path / "talkformer"


def _outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.is_file()) if folder.exists() else []


def _faceless_clip(path: Path) -> Path:
    """1 s of a scikit-image texture (bricks) panning, with a tone: no face anywhere."""
    from skimage.data import brick

    from talkformer_core.video import VideoWriter

    tex = np.repeat(brick()[:, :, None], 3, axis=2)
    t = np.arange(16000, dtype=np.float32) / 16000
    with VideoWriter(path, FPS, audio=0.2 * np.sin(2 * np.pi * 220 * t), audio_rate=16000) as w:
        for i in range(25):
            w.write(np.ascontiguousarray(tex[2 * i:2 * i + SIZE, 3 * i:3 * i + SIZE]))
    return path


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _check_output(out_path: Path, src: Path, frame_count: int) -> None:
    """Audio track, frame count, fps, and untouched pixels outside the face boxes."""
    from talkformer_core import pipeline
    from talkformer_core.audio import read_audio
    from talkformer_core.video import iter_frames, probe_video

    info = probe_video(out_path)
    assert info.has_audio and info.codec == "h264"
    assert abs(info.fps - FPS) < 1e-6
    n_expected = int(round(SECONDS * FPS))  # own audio, 2 s -> 50 frames
    assert frame_count == n_expected
    out = np.stack(list(iter_frames(out_path, None)))
    assert out.shape == (n_expected, SIZE, SIZE, 3)
    wav, sr = read_audio(out_path)
    assert abs(wav.shape[1] / sr - SECONDS) < 0.1  # AAC priming/padding: a few ms either way

    src_frames = np.stack(list(iter_frames(src, FPS)))
    analysis = pipeline.analyze_frames(src_frames, 32)  # the same deterministic tracker as the node
    outside, inside = np.ones(out.shape[:3], bool), np.zeros(out.shape[:3], bool)
    margin = 8  # h264 blocks straddling the box edge
    for t, (x0, y0, s) in enumerate(analysis.boxes):
        y_0, x_0 = max(int(y0) - margin, 0), max(int(x0) - margin, 0)
        outside[t, y_0:int(y0 + s) + margin, x_0:int(x0 + s) + margin] = False
        inside[t, int(y0 + s / 2):int(y0 + s), int(x0):int(x0 + s)] = True  # the generated lower half
    assert outside.mean() > 0.15, "the face box covers almost the whole frame; the check would be empty"
    p_out = _psnr(out[outside], src_frames[outside])
    p_in = _psnr(out[inside], src_frames[inside])
    assert p_out > 35.0, f"pixels outside the face boxes changed: PSNR {p_out:.1f} dB"
    assert p_in < p_out - 5.0, f"the face was not re-synthesised (inside {p_in:.1f} dB, outside {p_out:.1f} dB)"


# ---------------------------------------------------------------------------------------------
# the node, plain Python (no ComfyUI)

def test_node_definition():
    spec = NODE.INPUT_TYPES()
    assert spec["required"]["video"][0] == "VIDEO"
    assert spec["required"]["model"][0] == "TALKFORMER_MODEL"
    assert spec["optional"]["audio"][0] == "AUDIO"
    assert spec["optional"]["noise_scale"][1]["default"] == -1.0  # the model's own
    assert video_node.noise_scale_option(-1.0) is None and video_node.noise_scale_option(0.5) == 0.5
    assert spec["optional"]["decode_passes"][1]["default"] == -1  # the model's own
    assert video_node.decode_passes_option(-1) is None and video_node.decode_passes_option(3) == 3
    assert spec["optional"]["mouth_guidance"][1]["default"] == -1.0  # the model's own
    assert video_node.mouth_guidance_option(-1.0) is None and video_node.mouth_guidance_option(1.5) == 1.5
    assert NODE.RETURN_TYPES == ("VIDEO", "INT")
    assert set(spec["required"]) >= {"steps", "sampler", "seed", "length_mode", "face_index", "reference_frame",
                                      "feather", "watermark"}
    for section in spec.values():
        for name, s in section.items():
            assert s[1].get("tooltip"), name
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["TalkFormerLipSyncVideo"] == "TalkFormer Lip Sync (Video)"


def test_lipsync_plain_path(assets, model, plain_temp):
    video, n = NODE().lipsync(str(assets["src"]), model, steps=2, seed=0, watermark=False)
    assert isinstance(video, video_node.FileVideo)
    out = Path(os.fspath(video))
    assert out.parent == plain_temp and out.name.startswith("talkformer_lipsync_")
    assert _outputs(plain_temp) == [out]  # nothing else left behind (no spilled source, no temp file)
    assert video.get_dimensions() == (SIZE, SIZE)
    _check_output(out, assets["src"], n)
    # decode_passes reaches the pipeline: 0 is this tiny model's own (the same frames), 2 redraws the faces
    from talkformer_core.video import iter_frames

    frames = lambda v: np.stack(list(iter_frames(Path(v.get_stream_source()), None))).astype(np.int16)  # noqa: E731
    same, _ = NODE().lipsync(str(assets["src"]), model, steps=2, seed=0, watermark=False, decode_passes=0)
    other, _ = NODE().lipsync(str(assets["src"]), model, steps=2, seed=0, watermark=False, decode_passes=2)
    assert np.array_equal(frames(video), frames(same)) and not np.array_equal(frames(video), frames(other))
    # mouth_guidance likewise: 0 is this model's own; 2 (stage 1's neutral mouth from the video's track)
    # redraws the faces of a copy whose zero-initialised projections got weights (landmarks matter)
    same, _ = NODE().lipsync(str(assets["src"]), model, steps=2, seed=0, watermark=False, mouth_guidance=0.0)
    assert np.array_equal(frames(video), frames(same))
    import torch

    (live,) = pack.NODE_CLASS_MAPPINGS["TalkFormerModelLoader"]().load(str(assets["ckpt"]), "fp32")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for prm in live.load().model.parameters():
            if not prm.any():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
    off, _ = NODE().lipsync(str(assets["src"]), live, steps=2, seed=0, watermark=False, mouth_guidance=0.0)
    on, _ = NODE().lipsync(str(assets["src"]), live, steps=2, seed=0, watermark=False, mouth_guidance=2.0)
    assert not np.array_equal(frames(off), frames(on))


def test_explicit_audio_sets_length_and_track(assets, model, plain_temp):
    """An AUDIO input (ComfyUI's dict, stereo 44.1 kHz, 1.2 s) drives the length (trim) and is muxed."""
    import torch

    from talkformer_core.audio import read_audio
    from talkformer_core.video import probe_video

    t = np.arange(int(1.2 * 44100), dtype=np.float32) / 44100
    wave = np.stack([0.3 * np.sin(2 * np.pi * 300 * t), 0.3 * np.sin(2 * np.pi * 500 * t)])
    audio = {"waveform": torch.from_numpy(wave)[None], "sample_rate": 44100}
    video, n = NODE().lipsync(str(assets["src"]), model, steps=1, length_mode="trim", watermark=False, audio=audio)
    info = probe_video(os.fspath(video))
    assert n == 30 and info.has_audio
    wav, sr = read_audio(os.fspath(video))
    assert sr == 44100 and wav.shape[0] == 2 and abs(wav.shape[1] / sr - 1.2) < 0.1


def test_corrupt_video_is_a_clear_error(assets, model, plain_temp, tmp_path):
    from talkformer_core.errors import VideoError

    bad = tmp_path / "corrupt.mp4"
    data = assets["src"].read_bytes()
    bad.write_bytes(data[: len(data) // 3])  # cut inside the stream
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    for f in (bad, junk):
        with pytest.raises(VideoError, match=f.name):
            NODE().lipsync(str(f), model, steps=1, watermark=False)
    with pytest.raises(VideoError, match="not found"):
        NODE().lipsync(str(tmp_path / "missing.mp4"), model, steps=1, watermark=False)
    assert _outputs(plain_temp) == []


def test_faceless_video_is_a_clear_error(model, plain_temp, tmp_path):
    """Documented: frames without a face pass through, but a video in which no frame has a face is
    a FaceError naming the file, raised before anything is written."""
    from talkformer_core.errors import FaceError

    f = _faceless_clip(tmp_path / "bricks.mp4")
    with pytest.raises(FaceError, match="bricks.mp4"):
        NODE().lipsync(str(f), model, steps=1, watermark=False)
    assert _outputs(plain_temp) == []


def test_video_without_audio_needs_an_audio_input(assets, model, plain_temp, tmp_path):
    from talkformer_core.errors import AudioError
    from talkformer_core.video import VideoWriter, iter_frames

    silent = tmp_path / "silent.mp4"
    with VideoWriter(silent, FPS) as w:
        for f in iter_frames(assets["src"], FPS, max_frames=10):
            w.write(f)
    with pytest.raises(AudioError, match="silent.mp4"):
        NODE().lipsync(str(silent), model, steps=1, watermark=False)
    assert _outputs(plain_temp) == []


# ---------------------------------------------------------------------------------------------
# with ComfyUI's own VIDEO objects (COMFYUI_DIR)

def test_lipsync_comfy_video_from_file(assets, model, comfy):
    """LoadVideo's object in, ComfyUI's VideoFromFile out (in folder_paths' temp folder), with the
    real ProgressBar hook receiving (value, total, ("JPEG", PIL image, 512)) previews."""
    from PIL import Image

    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, preview, node_id=None: calls.append((v, t, preview)))
    try:
        video, n = NODE().lipsync(comfy.VideoFromFile(str(assets["src"])), model, steps=2, watermark=False)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert isinstance(video, comfy.VideoFromFile)
    out = Path(video.get_stream_source())
    assert out.parent == comfy.temp and _outputs(comfy.temp) == [out]
    _check_output(out, assets["src"], n)
    assert video.get_dimensions() == (SIZE, SIZE)
    previews = [p for _, _, p in calls if p is not None]
    assert calls[-1][0] == calls[-1][1] == n
    assert [v for v, _, _ in calls] == sorted(v for v, _, _ in calls)  # monotone progress
    assert previews and all(p[0] == "JPEG" and isinstance(p[1], Image.Image) for p in previews)
    assert previews[-1][1].size == (model.image_size, model.image_size)  # the latest generated face


def test_interrupt_leaves_no_output(assets, model, comfy):
    """The server's progress hook raises InterruptProcessingException after /interrupt; any
    exception from it stops the run between chunks, and no output file is left."""

    class Interrupted(Exception):
        pass

    seen = []

    def hook(v, t, preview, node_id=None):
        seen.append(v)
        if v > 0:
            raise Interrupted()

    before = _outputs(comfy.temp)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(Interrupted):
            NODE().lipsync(comfy.VideoFromFile(str(assets["src"])), model, steps=1, watermark=False)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert seen and max(seen) < int(SECONDS * FPS)
    assert _outputs(comfy.temp) == before  # no new file, no half-written temp file


def test_video_source_bytesio_and_components(assets, comfy):
    """A BytesIO-backed VideoFromFile is spilled to a temp file byte for byte; a VideoFromComponents
    (CreateVideo's output, frames in memory) is written once with save_to; both are removed after."""
    import torch

    from talkformer_core.video import iter_frames, probe_video

    data = assets["src"].read_bytes()
    with video_node.video_source(comfy.VideoFromFile(io.BytesIO(data))) as p:
        assert p.read_bytes() == data and p.parent == comfy.temp
    assert not p.exists()

    frames = np.stack(list(iter_frames(assets["src"], FPS, max_frames=12)))
    comps = comfy.VideoComponents(images=torch.from_numpy(frames).float() / 255.0, audio=None, frame_rate=25)
    with video_node.video_source(comfy.VideoFromComponents(comps)) as p:
        info = probe_video(p)
        assert (info.width, info.height) == (SIZE, SIZE) and info.frames_at(FPS) == 12
    assert not p.exists()
    with video_node.video_source(comfy.VideoFromFile(str(assets["src"]))) as p:
        assert p == assets["src"]  # a file-backed VIDEO is read in place, never copied
    assert p.exists()

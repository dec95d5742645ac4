"""Integration with a real ComfyUI: only where the environment variable COMFYUI_DIR names a checkout.

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/python pytest tests/test_comfyui_integration.py

Starts ComfyUI headless on loopback with --cpu on a free port, in a temporary base directory whose
custom_nodes/ holds a symlink to this pack (the checkout itself is not touched); the tiny random-weight
checkpoint lies in a folder named by an --extra-model-paths-config file (so extra model paths are
exercised) under the name the workflows use. Checks that /object_info lists our nodes exactly as
build_workflows.py derives them, posts every API workflow with workflows/run_api.py (2 sampling steps)
and checks the outputs: an mp4 with the right frame count, size and an audio track, and the preview
images of the stage-by-stage workflow. Where PLAYWRIGHT_CORE names an installed playwright-core
(npm), node and Debian's chromium are present, every UI workflow is also loaded in the real frontend
(tests/ui/load_workflow.js): no missing node types, its API prompt equals our twin, and it fits a
1400x900 window below the tab strip.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WF = ROOT / "workflows"
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")

CLIP_SECONDS, AUDIO_SECONDS, FPS, FRAME = 1.0, 1.2, 25.0, 128
PERSON_SECONDS = 1.6  # the training clip of the flagship workflow (preprocessing wants >= 1.5 s)
API_FILES = sorted(WF.glob("*.api.json"))
# What the CPU server runs small: the IP-LAP renderer with 5 references (seconds per frame), the
# trainer capped at a few steps.
FAST = {"iplap_lipsync.api.json": ["iplap_references=5"],
        "finetune_then_lipsync.api.json": ["max_steps=2", "budget_minutes=60"]}


SERVER_PID: dict[str, int] = {}


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A running ComfyUI with the pack linked in; yields (url, base dir, inputs dir)."""
    import soundfile as sf
    import torch
    from skimage.data import astronaut

    from talkformer_core.config import tiny
    from talkformer_core.data.synthetic import make_clip, synthesize_audio, phoneme_sequence, write_clip
    from talkformer_core.models.checkpoint import save_checkpoint
    from talkformer_core.models.model import TalkFormer

    build = _load(WF / "build_workflows.py", "tf_build_workflows_it")
    tmp = tmp_path_factory.mktemp("comfy")
    base = tmp / "base"
    (base / "custom_nodes").mkdir(parents=True)
    os.symlink(ROOT, base / "custom_nodes" / "talkformer_nodes", target_is_directory=True)
    ckpts = tmp / "extra_models" / "talkformer"
    ckpts.mkdir(parents=True)
    torch.manual_seed(0)
    model = TalkFormer.from_config(tiny())
    save_checkpoint(ckpts / build.CHECKPOINT, {k: getattr(model, k) for k in ("autoencoder", "landmark", "appearance", "unet")
                                               if getattr(model, k) is not None}, model.config)
    _iplap_checkpoint(ckpts / build.IPLAP_CHECKPOINT, tmp / "iplap_pth")
    yaml = tmp / "extra_model_paths.yaml"
    yaml.write_text(f"talkformer_test:\n    base_path: {tmp / 'extra_models'}\n    talkformer: talkformer\n")
    # inputs: a synthetic talking clip (template) and different, longer synthetic speech (driving)
    inputs = tmp / "inputs"
    inputs.mkdir()
    clip = make_clip(astronaut(), seed=0, duration=CLIP_SECONDS, fps=FPS, frame_size=FRAME)
    write_clip(clip, inputs / "template.mp4")
    rng = np.random.default_rng(1)
    speech = synthesize_audio(phoneme_sequence(AUDIO_SECONDS, rng), AUDIO_SECONDS, rng)
    sf.write(inputs / "speech.wav", speech, 16000)
    speech2 = synthesize_audio(phoneme_sequence(AUDIO_SECONDS, rng), AUDIO_SECONDS, rng)
    sf.write(inputs / "speech2.wav", speech2, 16000)
    person = make_clip(astronaut(), seed=5, duration=PERSON_SECONDS, fps=FPS, frame_size=FRAME)
    write_clip(person, inputs / "person.mp4")

    port = _free_port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    log = open(tmp / "comfyui.log", "w")
    proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base), "--extra-model-paths-config", str(yaml),
                             "--disable-auto-launch"],
                            cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                break
            try:
                _get(url + "/object_info/LoadImage")
                break
            except Exception:
                time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail(f"ComfyUI exited ({proc.returncode}):\n{(tmp / 'comfyui.log').read_text()[-4000:]}")
        SERVER_PID["pid"] = proc.pid
        yield url, base, inputs, build, tmp / "comfyui.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _iplap_checkpoint(out: Path, work: Path) -> None:
    """A random-weight IP-LAP checkpoint in IP-LAP's layout, converted as a user converts theirs."""
    import torch

    from talkformer_core.config import LandmarkConfig
    from talkformer_core.convert import convert_iplap
    from talkformer_core.models.iplap_renderer import IPLAPRenderer
    from talkformer_core.models.landmark_completion import LandmarkCompletion

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, net in (("lg.pth", LandmarkCompletion(LandmarkConfig())), ("rd.pth", IPLAPRenderer())):
        torch.save({"state_dict": net.state_dict()}, work / name)
    convert_iplap(work / "lg.pth", out, work / "rd.pth")


def test_server_lists_our_nodes_and_checkpoint(server):
    url, base, inputs, build, log = server
    text = log.read_text()
    assert "IMPORT FAILED" not in text, text[-3000:]
    info = _get(url + "/object_info")
    ours = build.our_object_info()
    for name, expected in ours.items():
        assert name in info, f"/object_info lacks {name}"
        got = {k: v for k, v in info[name].items() if k not in ("python_module", "deprecated", "experimental")}
        if name == "TalkFormerModelLoader":  # the combo lists the live models folder
            # the live folders: the test's models (tiny TalkFormer, random IP-LAP) and the pack's own
            # checkpoints/ (the smoke-test model, listed with no copying; same name as the tiny one)
            assert got["input"]["required"]["ckpt_name"][0] == sorted([build.CHECKPOINT, build.IPLAP_CHECKPOINT])
            got["input"]["required"]["ckpt_name"][0] = expected["input"]["required"]["ckpt_name"][0]
        for section in ("required", "optional"):  # other combos over models/talkformer (e.g. the
            for key, spec in got["input"].get(section, {}).items():  # trainer's IP-LAP file) list it live
                want = expected["input"].get(section, {}).get(key)
                live = {build.CHECKPOINT, build.IPLAP_CHECKPOINT}
                if want and isinstance(spec[0], list) and live & set(spec[0]) and spec[0] != want[0]:
                    assert [v for v in spec[0] if v not in live] == [v for v in want[0] if v not in live], (name, key)
                    spec[0] = want[0]
        assert got == expected, name
    assert build.CHECKPOINT in _get(url + "/models/talkformer")
    assert (base / "models" / "talkformer").is_dir()  # created at start: users see where models go


def _probe(path: Path):
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        n = sum(1 for _ in c.decode(video=0))
        has_audio = len(c.streams.audio) > 0
        return n, v.codec_context.width, v.codec_context.height, has_audio


def _run(server, api: Path, out: Path, video: str = "template.mp4", audio: str = "speech.wav", extra=()):
    url, base, inputs, build, log = server
    run_api = _load(WF / "run_api.py", "tf_run_api_it")
    prompt = json.loads(api.read_text())
    sets = [f"{i}.steps=2" for i, n in prompt.items() if "steps" in n["inputs"]]
    sets += [f"{i}.{kv}" for i, n in prompt.items() for kv in FAST.get(api.name, []) if kv.split("=")[0] in n["inputs"]]
    try:
        return run_api.run(url, api, inputs=[f"video={inputs / video}", f"audio={inputs / audio}"],
                           sets=sets + list(extra), out=out, timeout=900, include_temp=True, verbose=False)
    except run_api.ComfyError as e:
        pytest.fail(f"{api.name}: {e}\n--- server log ---\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("api", API_FILES, ids=lambda p: p.name.removesuffix(".api.json"))
def test_every_api_workflow_runs(server, api: Path, tmp_path: Path):
    url, base, inputs, build, log = server
    person = api.name.startswith("finetune")
    files = _run(server, api, tmp_path, video="person.mp4" if person else "template.mp4")
    videos = [f for f in files if f.suffix == ".mp4"]
    assert len(videos) == 1, files
    frames, w, h, has_audio = _probe(videos[0])
    expected = math.ceil(AUDIO_SECONDS * FPS - 1e-6)  # pingpong: the template is played to the audio's length
    assert frames == expected and has_audio
    scale = 2 if "upscale" in api.name else 1
    assert (w, h) == (FRAME * scale, FRAME * scale)
    pngs = [f for f in files if f.suffix == ".png"]
    if api.name.startswith("stage_by_stage"):
        previews = sum(1 for n in json.loads(api.read_text()).values() if n["class_type"] == "PreviewImage")
        assert len(pngs) == previews * expected
    elif not person:  # the trainer's progress previews are its own
        assert not pngs


def test_flagship_trains_once_for_two_audios(server, tmp_path: Path):
    """Train on the person's video, lip-sync new audio; the second audio reuses the saved model: no
    training step runs. The second prompt also flips ``resume`` (not part of the training key), so
    ComfyUI's own node cache cannot be what skips the training."""
    url, base, inputs, build, log = server
    api = WF / "finetune_then_lipsync.api.json"
    trainer = next(i for i, n in json.loads(api.read_text()).items() if n["class_type"] == "TalkFormerTrainOnVideo")
    from talkformer_core.models.checkpoint import read_metadata

    first = _run(server, api, tmp_path / "a", video="person.mp4", extra=[f"{trainer}.name=flagship"])
    saved = [p for p in (base.parent / "extra_models" / "talkformer", base / "models" / "talkformer")
             if (p / "flagship.safetensors").exists()]
    assert len(saved) == 1, saved  # in the first models folder, where the loader lists it
    model_file = saved[0] / "flagship.safetensors"
    stamp, key = model_file.stat().st_mtime_ns, read_metadata(model_file)["training_key"]
    t0 = time.perf_counter()
    second = _run(server, api, tmp_path / "b", video="person.mp4", audio="speech2.wav",
                  extra=[f"{trainer}.name=flagship", f"{trainer}.resume=false"])
    print(f"second run (no training): {time.perf_counter() - t0:.1f} s")  # reported, not asserted
    assert model_file.stat().st_mtime_ns == stamp and read_metadata(model_file)["training_key"] == key
    assert "trained on this clip with these settings: using it (no training)" in log.read_text()
    a = [f for f in first if f.suffix == ".mp4"][0]
    b = [f for f in second if f.suffix == ".mp4"][0]
    assert _probe(a)[0] == _probe(b)[0] and a.read_bytes() != b.read_bytes()  # other audio, other video


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_soak_good_and_bad_prompts(server, tmp_path: Path):
    """20 prompts on the main one-node workflow, a good short clip alternating with bad inputs (corrupt
    video, no face, a foreign checkpoint): the server answers every one (success, or a rejection /
    node error naming the input), leaves no partial or stray temp files, and its RSS after the last
    good run is within 10 % of that after the first."""
    import tempfile

    from talkformer_core.video import VideoWriter

    url, base, inputs, build, log = server
    run_api = _load(WF / "run_api.py", "tf_run_api_it")
    api = WF / "lipsync_long_video.api.json"
    rng = np.random.default_rng(0)
    (inputs / "corrupt.mp4").write_bytes(rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    import soundfile as sf

    speech, _ = sf.read(inputs / "speech.wav", dtype="float32")
    with VideoWriter(inputs / "noface.mp4", FPS, audio=speech[: 16000], audio_rate=16000) as w:
        for _ in range(25):
            w.write(np.full((FRAME, FRAME, 3), 128, np.uint8))
    from safetensors.numpy import save_file

    foreign = base.parent / "extra_models" / "talkformer" / "foreign.safetensors"
    save_file({"w": np.zeros((4, 4), np.float32)}, str(foreign))  # a valid file, not a TalkFormer model
    prompt = json.loads(api.read_text())
    loader = next(i for i, n in prompt.items() if n["class_type"] == "TalkFormerModelLoader")
    syncer = next(i for i, n in prompt.items() if n["class_type"] == "TalkFormerLipSyncVideo")
    bad = [dict(video="corrupt.mp4"), dict(video="noface.mp4"), dict(sets=[f"{loader}.ckpt_name=foreign.safetensors"])]
    sys_tmp = set(Path(tempfile.gettempdir()).glob("talkformer*"))
    temp = base / "temp"
    before = set(temp.rglob("*")) if temp.exists() else set()  # earlier tests' previews are ComfyUI's own
    # one good prompt first, outside the count: a fresh server loads mediapipe's graph, the model and
    # the codecs on first use (measured alone: +36 MB on the first run, ~10 MB on each later one)
    run_api.run(url, api, inputs=[f"video={inputs / 'template.mp4'}", f"audio={inputs / 'speech.wav'}"],
                sets=[f"{syncer}.steps=2", f"{syncer}.watermark=false"], out=tmp_path / "warm", timeout=600,
                verbose=False)
    rss, outcomes = [], []
    for k in range(20):
        case = {} if k % 2 == 0 else bad[(k // 2) % len(bad)]
        try:
            run_api.run(url, api, inputs=[f"video={inputs / case.get('video', 'template.mp4')}",
                                          f"audio={inputs / 'speech.wav'}"],
                        sets=[f"{syncer}.steps=2", f"{syncer}.watermark=false", *case.get("sets", [])], out=tmp_path / str(k),
                        timeout=600, verbose=False)
            outcomes.append("ok")
        except run_api.ComfyError as e:
            outcomes.append(type(e).__name__)
            assert case, f"good prompt {k} failed: {e}"
            msg = str(e)
            assert any(w in msg for w in ("corrupt", "no face", "foreign", "not a TalkFormer", "Error")), msg
        if not case:
            rss.append(_rss_kib(SERVER_PID["pid"]))
    assert outcomes.count("ok") == 10 and len(outcomes) == 20, outcomes
    assert all(o != "ok" for o in outcomes[1::2]), outcomes
    assert max(abs(r - rss[0]) for r in rss[1:]) <= 0.10 * rss[0], rss
    leftovers = [p for p in set(temp.rglob("*")) - before
                 if p.is_file() and (p.name.startswith(".") or p.suffix != ".mp4")]
    assert not leftovers, leftovers  # no .part files, no copies of inputs
    assert set(Path(tempfile.gettempdir()).glob("talkformer*")) <= sys_tmp


def test_ui_workflows_load_in_the_real_frontend(server, tmp_path: Path):
    """Every UI workflow in the real frontend (headless Chromium, 1400x900): no missing node types, the
    prompt Run would send equals our API twin, and every node is in the window below the tab strip."""
    pw = os.environ.get("PLAYWRIGHT_CORE")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not pw or not shutil.which("node") or not Path(chromium).exists():
        pytest.skip("set PLAYWRIGHT_CORE to an installed playwright-core (npm) and install Debian's chromium")
    url, *_ = server
    ui_files = sorted(p for p in WF.glob("*.json") if not p.name.endswith(".api.json"))
    r = subprocess.run(["node", str(ROOT / "tests" / "ui" / "load_workflow.js"), "--url", url, "--out-dir",
                        str(tmp_path), "--chromium", chromium, *map(str, ui_files)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PLAYWRIGHT_CORE": pw})
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(ui_files) and r.returncode == 0, r.stdout + r.stderr[-2000:]
    for res in results:
        assert res["ok"] and not res["missing_types"], res
        assert res["tab_strip_bottom"] > 0 and not res["outside_window"], res
        stem = Path(res["file"]).stem
        fe = json.loads((tmp_path / f"{stem}.api.json").read_text())
        twin = json.loads((WF / f"{stem}.api.json").read_text())
        assert fe == twin, stem
    shots = os.environ.get("TALKFORMER_UI_SHOTS")  # keep the screenshots to look at
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        for png in tmp_path.glob("*.png"):
            shutil.copy(png, Path(shots) / png.name)

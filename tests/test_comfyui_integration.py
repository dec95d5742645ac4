"""Integration with a real ComfyUI: only where the environment variable COMFYUI_DIR names a checkout.

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/python pytest tests/test_comfyui_integration.py

Starts ComfyUI headless on loopback with --cpu on a free port, in a temporary base directory whose
custom_nodes/ holds a symlink to this pack (the checkout itself is not touched); the tiny random-weight
checkpoint lies in a folder named by an --extra-model-paths-config file (so extra model paths are
exercised) under the name the workflows use. Checks that /object_info lists our nodes exactly as
build_workflows.py derives them, posts every API workflow with workflows/run_api.py (2 sampling steps)
and checks the outputs: an mp4 with the right frame count, size and an audio track, and the preview
images of the stage-by-stage workflow. Where TALKFORMER_UITEST names a headless-frontend loader
(load_workflow.js, see docs/nodes.md) and node is installed, every UI workflow is also loaded in the
real frontend: no missing node types, and its API prompt equals our twin.
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
API_FILES = sorted(WF.glob("*.api.json"))
# Not run here (they still load in the frontend below and are type-checked in test_workflows.py):
# the IP-LAP workflow needs an IP-LAP checkpoint whose renderer costs seconds per frame on CPU, and
# the fine-tune workflow trains for minutes. Both paths are run without a server in
# test_iplap_pipeline.py and test_finetune.py.
SLOW_ON_CPU = {"iplap_lipsync.api.json": "IP-LAP renderer: seconds per frame on CPU",
               "finetune_then_lipsync.api.json": "trains a model for minutes"}
API_PARAMS = [pytest.param(p, marks=pytest.mark.skip(reason=SLOW_ON_CPU[p.name])) if p.name in SLOW_ON_CPU else p
              for p in API_FILES]


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
        yield url, base, inputs, build, tmp / "comfyui.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


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
            assert got["input"]["required"]["ckpt_name"][0] == [build.CHECKPOINT]
            got["input"]["required"]["ckpt_name"][0] = expected["input"]["required"]["ckpt_name"][0]
        for section in ("required", "optional"):  # other combos over models/talkformer (e.g. the
            for key, spec in got["input"].get(section, {}).items():  # trainer's IP-LAP file) list it live
                want = expected["input"].get(section, {}).get(key)
                if want and isinstance(spec[0], list) and build.CHECKPOINT in spec[0] and spec[0] != want[0]:
                    assert [v for v in spec[0] if v != build.CHECKPOINT] == [v for v in want[0] if v != build.CHECKPOINT], (name, key)
                    spec[0] = want[0]
        assert got == expected, name
    assert build.CHECKPOINT in _get(url + "/models/talkformer")


def _probe(path: Path):
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        n = sum(1 for _ in c.decode(video=0))
        has_audio = len(c.streams.audio) > 0
        return n, v.codec_context.width, v.codec_context.height, has_audio


@pytest.mark.parametrize("api", API_PARAMS, ids=lambda p: p.name.removesuffix(".api.json"))
def test_every_api_workflow_runs(server, api: Path, tmp_path: Path):
    url, base, inputs, build, log = server
    run_api = _load(WF / "run_api.py", "tf_run_api_it")
    steps = [f"{i}.steps=2" for i, n in json.loads(api.read_text()).items() if "steps" in n["inputs"]]
    try:
        files = run_api.run(url, api, inputs=[f"video={inputs / 'template.mp4'}", f"audio={inputs / 'speech.wav'}"],
                            sets=steps, out=tmp_path, timeout=900,
                            include_temp=True, verbose=False)
    except run_api.ComfyError as e:
        pytest.fail(f"{api.name}: {e}\n--- server log ---\n{log.read_text()[-3000:]}")
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
    else:
        assert not pngs


def test_ui_workflows_load_in_the_real_frontend(server, tmp_path: Path):
    loader = os.environ.get("TALKFORMER_UITEST")
    if not loader or not shutil.which("node"):
        pytest.skip("set TALKFORMER_UITEST to load_workflow.js (headless chromium + playwright-core)")
    url, *_ = server
    ui_files = sorted(p for p in WF.glob("*.json") if not p.name.endswith(".api.json"))
    r = subprocess.run(["node", loader, "--url", url, "--out-dir", str(tmp_path), *map(str, ui_files)],
                       capture_output=True, text=True, timeout=300)
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(ui_files) and r.returncode == 0, r.stdout + r.stderr[-2000:]
    for res in results:
        assert res["ok"] and not res["missing_types"], res
        stem = Path(res["file"]).stem
        fe = json.loads((tmp_path / f"{stem}.api.json").read_text())
        twin = json.loads((WF / f"{stem}.api.json").read_text())
        assert fe == twin, stem

"""``python -m talkformer_core.sync``: every bad input of docs/bad_inputs.md gets one clear line on stderr
(naming the file and what was expected), exit status 2, no traceback, before any long work."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline_helpers import save_tiny_checkpoint, synthetic_clip, write_video, write_wav
from talkformer_core import sync
from talkformer_core.video import iter_frames, read_audio_track

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sync")
    clip = synthetic_clip(0, 2.0, 256)
    f = dict(dir=d)
    f["video"] = write_video(d / "clip.mp4", clip.frames[:25], clip.audio[:16000])
    f["audio"] = write_wav(d / "speech.wav", clip.audio[:12000])  # 0.75 s -> 19 frames
    f["ckpt"] = save_tiny_checkpoint(d / "tiny.safetensors")
    f["ext_ckpt"] = save_tiny_checkpoint(d / "ext.safetensors", external_vae=d / "vae.safetensors")
    save_tiny_checkpoint(d / "other.safetensors", seed=1, external_vae=d / "other_vae.safetensors")
    f["other_vae"] = d / "other_vae.safetensors"
    f["vae"] = d / "vae.safetensors"
    return f


def run(capsys, files, **over):
    args = {"--video": files["video"], "--audio": files["audio"], "--checkpoint": files["ckpt"],
            "--out": files["dir"] / "out.mp4", "--steps": 1}
    args.update(over)
    argv = []
    for k, v in args.items():
        if v is True:
            argv.append(k)
        elif v is not None:
            argv += [k, str(v)]
    rc = sync.main(argv)
    err = capsys.readouterr().err
    return rc, err


def bad(capsys, files, *patterns, **over):
    out = files["dir"] / "out.mp4"
    if out.exists():
        out.unlink()
    rc, err = run(capsys, files, **over)
    assert rc == 2, err
    assert "Traceback" not in err
    line = [l for l in err.splitlines() if l.startswith("error:")]
    assert line, err
    msg = err[err.index("error:"):]
    for p in patterns:
        assert p in msg, msg[:2000]
    assert not out.exists()


def test_missing_and_corrupt_video(capsys, files):
    d = files["dir"]
    bad(capsys, files, "nope.mp4", "not found", **{"--video": d / "nope.mp4"})
    junk = d / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    bad(capsys, files, "junk.mp4", "video", **{"--video": junk})
    cut = d / "cut.mp4"
    cut.write_bytes(files["video"].read_bytes()[:3000])
    bad(capsys, files, "cut.mp4", **{"--video": cut})


def test_bad_audio(capsys, files):
    d = files["dir"]
    silent_video = write_video(d / "noaudio.mp4", [np.zeros((64, 64, 3), np.uint8)] * 3)
    bad(capsys, files, "noaudio.mp4", "no audio stream", **{"--audio": silent_video})
    empty = write_wav(d / "empty.wav", np.zeros(0, np.float32))
    bad(capsys, files, "empty.wav", "zero-length", **{"--audio": empty})
    text = d / "notes.wav"
    text.write_text("not audio at all")
    bad(capsys, files, "notes.wav", "not a readable audio", **{"--audio": text})


def test_bad_checkpoints(capsys, files):
    import torch
    from safetensors.torch import save_file

    d = files["dir"]
    # a bare VAE (no TalkFormer metadata) given as the checkpoint: wrong kind of file
    bad(capsys, files, "vae.safetensors", "not a TalkFormer checkpoint", **{"--checkpoint": files["vae"]})
    pkl = d / "model.pth"
    torch.save({"w": torch.zeros(2)}, pkl)
    bad(capsys, files, "model.pth", "pickle", **{"--checkpoint": pkl})
    # right metadata, wrong shapes: tiny tensors under a config with a wider U-Net
    from talkformer_core.models.checkpoint import load_safetensors, read_metadata
    import json

    meta = read_metadata(files["ckpt"])
    cfg = json.loads(meta["config"])
    cfg["model"]["unet"]["model_channels"] = 48
    save_file(load_safetensors(files["ckpt"]), str(d / "shape.safetensors"), metadata={**meta, "config": json.dumps(cfg)})
    bad(capsys, files, "shape.safetensors", "model expects", **{"--checkpoint": d / "shape.safetensors"})
    # an external VAE: missing, then the wrong one
    bad(capsys, files, "ext.safetensors", "does not contain its autoencoder", "--vae", **{"--checkpoint": files["ext_ckpt"]})
    bad(capsys, files, "other_vae.safetensors", "sha256", **{"--checkpoint": files["ext_ckpt"], "--vae": files["other_vae"]})


def test_no_face_bad_options(capsys, files):
    d = files["dir"]
    noise = np.random.default_rng(1).integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    noface = write_video(d / "noface.mp4", list(noise))
    bad(capsys, files, "noface.mp4", "found none in any of its 5 frame(s)", **{"--video": noface})
    bad(capsys, files, "reference frame 99", **{"--reference-frame": 99})
    import torch

    if not torch.cuda.is_available():
        bad(capsys, files, "CUDA is not available", **{"--device": "cuda"})
    with pytest.raises(SystemExit) as e:  # argparse: unknown sampler / length mode
        sync.main(["--video", str(files["video"]), "--audio", str(files["audio"]), "--checkpoint",
                   str(files["ckpt"]), "--out", str(d / "o.mp4"), "--sampler", "euler_magic"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'euler_magic'" in err and "ddim" in err and "Traceback" not in err


def test_cli_end_to_end_with_external_vae(capsys, files):
    out = files["dir"] / "ok.mp4"
    rc, err = run(capsys, files, **{"--checkpoint": files["ext_ckpt"], "--vae": files["vae"], "--out": out,
                                    "--no-watermark": True, "--length-mode": "trim", "--seed": 3})
    assert rc == 0, err
    assert "lip-sync" in err  # the tqdm bar
    assert len(list(iter_frames(out))) == 19  # trim: the audio (19 frames) is shorter than the video (25)
    wav, sr = read_audio_track(out)
    assert abs(wav.shape[1] / sr - 19 / 25) < 0.05


def test_module_entry_point(files, tmp_path):
    """``python -m talkformer_core.sync`` as a user runs it: a bad input -> one line, exit 2."""
    res = subprocess.run([sys.executable, "-m", "talkformer_core.sync", "--video", str(tmp_path / "missing.mp4"),
                          "--audio", str(files["audio"]), "--checkpoint", str(files["ckpt"]), "--out",
                          str(tmp_path / "o.mp4")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "missing.mp4" in res.stderr and "Traceback" not in res.stderr

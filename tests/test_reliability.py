"""Reliability: output paths checked before any work, no partial file after Ctrl-C at any moment,
one meaning of the face index, a minimum audio length, --help of every CLI, the demo
checkpoint's purpose and its warning."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_helpers import synthetic_clip, write_video, write_wav  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "demo_astronaut.safetensors"


# ---------------------------------------------------------------------------------------------
# output paths

def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder nobody may create files in. chmod does not stop root, so as root: /proc (no
    regular files can be created there by anyone)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        d = Path("/proc")
        try:
            (d / ".talkformer-probe").touch()
        except OSError:
            return d
        pytest.skip("no folder here refuses root's writes")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


def test_check_output_paths(tmp_path):
    from talkformer_core.errors import OutputError
    from talkformer_core.paths import check_output_dir, check_output_file

    f = tmp_path / "existing.mp4"
    f.write_bytes(b"x")
    assert check_output_file(tmp_path / "new" / "deeper" / "o.mp4") == tmp_path / "new" / "deeper" / "o.mp4"
    assert check_output_file(f) == f  # an existing file is replaced
    assert check_output_dir(tmp_path / "run") == tmp_path / "run"
    for bad, needle in ((f / "o.mp4", "is a file, not a folder"), (f / "a" / "o.mp4", "is a file, not a folder"),
                        (tmp_path, "is an existing folder")):
        with pytest.raises(OutputError, match=needle):
            check_output_file(bad, "--out")
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(f, "--out")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(f / "run", "--out")
    ro = _unwritable_folder(tmp_path)
    with pytest.raises(OutputError, match="cannot write in"):
        check_output_file(ro / "o.mp4", "--out")
    with pytest.raises(OutputError, match="cannot write in"):
        check_output_dir(ro / "run", "--out")
    with pytest.raises(OutputError, match="MB free"):
        check_output_file(tmp_path / "o.mp4", min_free=1 << 62)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.mp4"]  # the probes left nothing


@pytest.fixture(scope="module")
def junk(tmp_path_factory):
    """Existing files of the wrong kind: a CLI that checks its output first never looks at them."""
    d = tmp_path_factory.mktemp("junk")
    for n in ("v.mp4", "a.wav", "c.safetensors"):
        (d / n).write_bytes(os.urandom(64))
    (d / "file.mp4").write_bytes(b"x")
    (d / "shards").mkdir()
    return d


MAIN_MODULES = {"train": "train.__main__", "eval": "eval.cli", "finetune": "finetune.cli"}  # where ``python -m`` finds main()


def _cli_main(module: str):
    return importlib.import_module(f"talkformer_core.{MAIN_MODULES.get(module, module)}").main


def _main(module: str, argv: list[str], capsys) -> tuple[int, str]:
    rc = _cli_main(module)(argv)
    return rc, capsys.readouterr().err


def test_every_cli_refuses_an_unwritable_output_before_work(junk, tmp_path, capsys):
    """Each writing CLI: --out under a regular file (or an existing folder for a file output, a
    read-only folder for sync) -> exit 2, one line naming the path, no traceback. The inputs are
    junk files, so the output check must come before any input is read."""
    under = junk / "file.mp4" / "out"
    ro = _unwritable_folder(tmp_path)
    cases = [
        ("sync", ["--video", str(junk / "v.mp4"), "--audio", str(junk / "a.wav"), "--checkpoint",
                  str(junk / "c.safetensors"), "--out", str(ro / "o.mp4")], str(ro / "o.mp4")),
        ("sync", ["--video", str(junk / "v.mp4"), "--audio", str(junk / "a.wav"), "--checkpoint",
                  str(junk / "c.safetensors"), "--out", str(under / "o.mp4")], "is a file, not a folder"),
        ("sync", ["--video", str(junk / "v.mp4"), "--audio", str(junk / "a.wav"), "--checkpoint",
                  str(junk / "c.safetensors"), "--out", str(junk)], "is an existing folder"),
        ("train", ["--stage", "autoencoder", "--data", str(junk / "shards"), "--preset", "tiny", "--out",
                   str(under)], "is a file, not a folder"),
        ("data.preprocess", ["--inputs", str(junk / "v.mp4"), "--out", str(junk / "file.mp4")], "is a file"),
        ("data.synthetic", ["--out", str(under)], "is a file, not a folder"),
        ("demo", ["--out", str(under)], "is a file, not a folder"),
        ("convert", ["iplap", "--landmark-generator", str(junk / "c.safetensors"), "--out", str(junk)],
         "is an existing folder"),
        ("eval", ["--generated", str(junk / "v.mp4"), "--truth", str(junk / "v.mp4"), "--out-dir",
                  str(junk / "file.mp4")], "is a file"),
    ]
    for module, argv, needle in cases:
        rc, err = _main(module, argv, capsys)
        assert rc == 2, (module, err)
        assert needle in err and "Traceback" not in err and err.startswith("error: "), (module, err)
    assert sorted(p.name for p in junk.iterdir()) == ["a.wav", "c.safetensors", "file.mp4", "shards", "v.mp4"]


def test_finetune_and_lipsync_api_refuse_an_output_under_a_file(junk, tmp_path):
    from talkformer_core import pipeline
    from talkformer_core.errors import OutputError
    from talkformer_core.finetune.run import validate_inputs

    clip = synthetic_clip(0, 0.6, 128)
    video = write_video(tmp_path / "t.mp4", clip.frames, audio=clip.audio)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        validate_inputs(video, junk / "file.mp4" / "p.safetensors", budget_minutes=1.0, holdout=0.0, vae=None,
                        init_landmarks=None, steps=None, preset="tiny")
    with pytest.raises(OutputError, match="is a file, not a folder"):  # before the audio and the model
        pipeline.lipsync(video, str(junk / "a.wav"), str(junk / "c.safetensors"), junk / "file.mp4" / "o.mp4")


# ---------------------------------------------------------------------------------------------
# Ctrl-C at any moment of a write leaves no file

def _frames(n=6):
    return [np.full((32, 48, 3), 40 * i % 255, np.uint8) for i in range(n)]


def _sigint(*_a, **_k):
    os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: Python raises it at the next bytecode


@pytest.fixture(autouse=True)
def _ctrl_c_raises():
    """Python's own Ctrl-C handler, also when pytest was started with SIGINT ignored (`nohup cmd &`
    from a script: a real Ctrl-C could never reach it, so the test would prove nothing)."""
    prev = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, prev)


@pytest.mark.parametrize("moment", ["before_open", "right_after_create", "after_open", "mid_write",
                                    "inside_encoder", "finalize", "rename"])
def test_writer_leaves_no_partial_file_after_ctrl_c(tmp_path, monkeypatch, moment):
    import talkformer_core.video as V

    out = tmp_path / "o.mp4"
    audio = np.zeros(16000, np.float32)
    finalize = None
    if moment == "before_open":
        def no_file(*a, **k):
            raise KeyboardInterrupt
        monkeypatch.setattr(V.tempfile, "mkstemp", no_file)
    elif moment == "right_after_create":  # the signal lands between creating the file and noting its name
        real = V.tempfile.mkstemp

        def created(*a, **k):
            r = real(*a, **k)
            _sigint()
            return r
        monkeypatch.setattr(V.tempfile, "mkstemp", created)
    elif moment == "after_open":  # the empty .part exists, PyAV has not written a byte
        import av

        def fail_open(*a, **k):
            raise KeyboardInterrupt
        monkeypatch.setattr(av, "open", fail_open)
    elif moment == "inside_encoder":
        real_send = V.VideoWriter._send_audio

        def send(self, upto):
            if self.num_frames == 3:
                _sigint()
            return real_send(self, upto)
        monkeypatch.setattr(V.VideoWriter, "_send_audio", send)
    elif moment == "finalize":
        def finalize(p):
            assert p.exists()
            _sigint()
    elif moment == "rename":
        monkeypatch.setattr(V, "_chmod_like_new_file", lambda p: _sigint())
    with pytest.raises(KeyboardInterrupt):
        with V.VideoWriter(out, 25.0, audio=audio, finalize=finalize) as w:
            for i, f in enumerate(_frames()):
                if moment == "mid_write" and i == 3:
                    raise KeyboardInterrupt
                w.write(f)
    left = sorted(p.name for p in tmp_path.iterdir())
    if moment == "rename":  # Ctrl-C held over the rename: the finished video, complete, or nothing
        assert left == ["o.mp4"], left
        assert V.probe_video(out).num_frames == 6
    else:
        assert left == [], left


# ---------------------------------------------------------------------------------------------
# face index: -1 = the largest, K >= 0 = the K-th largest; out of range says how many were found

@pytest.fixture(scope="module")
def two_faces(tmp_path_factory):
    d = tmp_path_factory.mktemp("two")
    clip = synthetic_clip(0, 0.6, 128)
    frames = [np.ascontiguousarray(np.concatenate([f, f[:, ::-1]], 1)) for f in clip.frames]
    return write_video(d / "two.mp4", frames, audio=clip.audio), write_wav(d / "a.wav", clip.audio)


def test_face_index_meaning_and_range_error(two_faces):
    from talkformer_core import pipeline
    from talkformer_core.errors import FaceError, InputError
    from talkformer_core.face.landmarks import face_index_or_none
    from talkformer_core.video import iter_frames

    assert face_index_or_none(None) is None and face_index_or_none(-1) is None and face_index_or_none(0) == 0
    with pytest.raises(InputError, match="expected -1"):
        face_index_or_none(-2)
    frames = list(iter_frames(two_faces[0], 25.0))
    largest = pipeline.analyze_frames(frames, 32, -1)
    assert np.array_equal(largest.boxes, pipeline.analyze_frames(frames, 32, None).boxes)
    assert np.array_equal(largest.boxes, pipeline.analyze_frames(frames, 32, 0).boxes)
    second = pipeline.analyze_frames(frames, 32, 1)
    assert second.found.all() and not np.allclose(second.boxes, largest.boxes)
    with pytest.raises(FaceError, match=r"face index 5: only 2 faces found in the 15 frame\(s\).*indices 0\.\.1"):
        pipeline.analyze_frames(frames, 32, 5)


def test_sync_cli_face_index(two_faces, tmp_path, capsys):
    video, audio = two_faces
    base = ["--video", str(video), "--audio", str(audio), "--checkpoint", str(DEMO), "--no-watermark",
            "--steps", "1"]
    rc, err = _main("sync", base + ["--out", str(tmp_path / "a.mp4"), "--face-index", "5"], capsys)
    assert rc == 2 and "--face-index 5: only 2 faces found in the 15 frame(s)" in err and "indices 0..1" in err, err
    assert "demo checkpoint" in err  # the demo checkpoint's warning comes first, before the work
    rc, err = _main("sync", base + ["--out", str(tmp_path / "b.mp4"), "--face-index", "-2"], capsys)
    assert rc == 2 and "--face-index -2: expected -1" in err, err
    rc, err = _main("sync", base + ["--out", str(tmp_path / "c.mp4"), "--decode-refine", "-1"], capsys)
    assert rc == 2 and "decode refine -1: expected >= 0 passes" in err, err  # before the work: no output
    rc, err = _main("sync", base + ["--out", str(tmp_path / "d.mp4"), "--mouth-guidance", "-0.5"], capsys)
    assert rc == 2 and "mouth guidance -0.5: expected a number >= 0" in err, err
    from talkformer_core.sync import build_parser

    assert build_parser().parse_args(base + ["--out", "o.mp4"]).face_index == -1  # the default: the largest
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# audio shorter than one stage-1 window

def test_too_short_audio_is_refused_and_short_audio_warned(tmp_path, capsys):
    from talkformer_core import pipeline
    from talkformer_core.errors import AudioError

    wav = np.sin(np.arange(16000) / 10.0).astype(np.float32) * 0.3
    with pytest.raises(AudioError, match=r"0\.100 s of audio is too short; expected at least 0\.2 s"):
        pipeline.audio_features((wav[:1600], 16000))
    with pytest.warns(UserWarning, match=r"only 0\.30 s of audio: the output has 8 frames"):
        assert pipeline.audio_features((wav[:4800], 16000)).num_frames == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipeline.audio_features((wav[:8000], 16000)).num_frames == 13  # 0.5 s: no warning
    with pytest.warns(UserWarning, match="the output has 5 frames"):  # 0.2 s: the minimum
        assert pipeline.audio_features(write_wav(tmp_path / "min.wav", wav[:3200])).num_frames == 5
    short = write_wav(tmp_path / "s.wav", wav[:1600])
    video = write_video(tmp_path / "v.mp4", synthetic_clip(0, 0.6, 128).frames)
    rc, err = _main("sync", ["--video", str(video), "--audio", str(short), "--checkpoint", str(DEMO),
                             "--out", str(tmp_path / "o.mp4")], capsys)
    assert rc == 2 and "too short" in err and "0.100 s" in err, err


# ---------------------------------------------------------------------------------------------
# --help

CLIS = ["sync", "finetune", "train", "data.preprocess", "data.synthetic", "demo", "convert", "eval", "detect"]


class _Parsed(Exception):
    pass


def _parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The ArgumentParser a CLI's main() builds (caught at parse_args)."""
    def grab(self, *a, **k):
        raise _Parsed(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    try:
        _cli_main(module)(["--help"])
    except _Parsed as e:
        return e.args[0]
    finally:
        monkeypatch.undo()
    raise AssertionError(f"{module}: main() parsed no arguments")


@pytest.mark.parametrize("module", CLIS)
def test_help_names_the_command_and_documents_every_option(module, monkeypatch):
    ap = _parser_of(module, monkeypatch)
    assert ap.prog == f"python -m talkformer_core.{module}"
    assert "``" not in (ap.description or "")
    parsers = [ap] + [p for a in ap._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    for p in parsers:
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert a.help and a.help.strip(), (module, a.option_strings or a.dest)
    h = " ".join(ap.format_help().split())
    if module in ("sync", "train", "finetune"):
        import re

        assert re.search(r"--seed SEED [^-]*\(default: 0\)", h), h  # --seed shows its default
    if module == "sync":
        assert "counting from 0" in h and "-1 = the largest" in h
        assert re.search(r"--sampler \{[^}]*\} stage-2 sampler \(default", h), h


def test_train_preprocess_and_finetune_offer_the_same_presets(monkeypatch):
    from talkformer_core.config import PRESET_NAMES

    for module in ("train", "data.preprocess", "finetune"):
        ap = _parser_of(module, monkeypatch)
        (preset,) = [a for a in ap._actions if "--preset" in a.option_strings]
        assert tuple(preset.choices) == PRESET_NAMES, module


# ---------------------------------------------------------------------------------------------
# what a checkpoint is for

def test_demo_checkpoint_says_it_is_a_demo_and_loading_it_warns(tmp_path, capsys):
    from talkformer_core import pipeline
    from talkformer_core.models.checkpoint import (DemoCheckpointWarning, load_safetensors, read_metadata,
                                                   state_dict_sha256)

    assert read_metadata(DEMO)["purpose"] == "demo"
    # the tensors are the trained ones (the metadata was added without touching them)
    assert state_dict_sha256(load_safetensors(DEMO)) == \
        "2f9b9f482f18b8cf3f32f97dadf66d68dd185aaef42586d02b5f08a7bd88005b"
    with pytest.warns(DemoCheckpointWarning, match="on a real person the mouth will be a blurred box"):
        pipeline.load_model(DEMO)
    from nodes.model_nodes import LoadTalkFormerModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DemoCheckpointWarning)
        LoadTalkFormerModel().load(str(DEMO), "fp32")
    assert "demo_astronaut.safetensors: demo checkpoint: trained on one synthetic face" in capsys.readouterr().out
    # a checkpoint for a person: no warning
    from talkformer_core.models.checkpoint import copy_with_metadata

    person = copy_with_metadata(DEMO, tmp_path / "p.safetensors", {"purpose": "person:anna"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DemoCheckpointWarning)
        pipeline.load_model(person)


# ---------------------------------------------------------------------------------------------
# Ctrl-C: one line, exit 130 (the train CLI's real SIGINT: tests/test_train.py)

@pytest.mark.parametrize("module,target", [("finetune", "finetune"), ("data.preprocess", "preprocess"),
                                           ("train", "train"), ("sync", "_error")])
def test_ctrl_c_prints_one_line_and_exits_130(module, target, junk, tmp_path, monkeypatch, capsys):
    mod = importlib.import_module(f"talkformer_core.{MAIN_MODULES.get(module, module)}")

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    argv = {"finetune": ["--video", str(junk / "v.mp4"), "--out", str(tmp_path / "p.safetensors")],
            "data.preprocess": ["--inputs", str(junk / "v.mp4"), "--out", str(tmp_path / "shards")],
            "train": ["--stage", "autoencoder", "--data", str(junk / "shards"), "--out", str(tmp_path / "run")],
            "sync": ["--video", str(junk / "v.mp4"), "--audio", str(junk / "a.wav"), "--checkpoint",
                     str(junk / "c.safetensors"), "--out", str(tmp_path / "o.mp4")]}[module]
    if module == "sync":  # Ctrl-C while the inputs are checked (the first long call)
        from talkformer_core import video

        monkeypatch.setattr(video, "probe_video", ctrl_c)
    else:
        monkeypatch.setattr(mod, target, ctrl_c)
    rc, err = _main(module, argv, capsys)
    assert rc == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err

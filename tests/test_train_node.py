"""Train TalkFormer on Video as ComfyUI runs it: inside torch.inference_mode(), trained once per clip
and settings (a second run with the same clip loads the saved model at once), no work files left by
a failed run."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from train_helpers import synthetic_clip  # noqa: E402


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from talkformer_core.data.synthetic import write_clip
    from talkformer_core.video import VideoWriter

    d = tmp_path_factory.mktemp("trainnode")
    clip = synthetic_clip(0, 1.6, 128)
    write_clip(clip, d / "talk.mp4")
    with VideoWriter(d / "noface.mp4", 25.0, audio=clip.audio, audio_rate=16000) as w:
        for _ in range(40):
            w.write(np.full((128, 128, 3), 120, np.uint8))
    return d


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("TALKFORMER_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("TALKFORMER_WORK", str(tmp_path / "output"))
    return tmp_path


def test_finetune_trains_inside_inference_mode(clips, tmp_path):
    """ComfyUI calls every node under inference_mode, where backward() has no graph: training must
    leave it and still produce a loadable model."""
    from talkformer_core.finetune.run import finetune
    from talkformer_core.pipeline import load_model

    with torch.inference_mode():
        res = finetune(clips / "talk.mp4", tmp_path / "p.safetensors", budget_minutes=60, preset="tiny", steps=2,
                       eval_every=0, print_fn=None, tqdm_bar=False)
        assert torch.is_inference_mode_enabled()  # the caller's mode is restored
    assert res.steps == {"autoencoder": 2, "talkformer": 2}
    assert load_model(res.checkpoint).kind == "talkformer"


def test_train_node_trains_once_per_clip_and_settings(clips, folders, monkeypatch):
    import talkformer_core.finetune.run as ft
    from nodes.train_node import TrainTalkFormerOnVideo
    from talkformer_core.models.checkpoint import read_metadata
    from talkformer_core.training_key import KEY_FIELD

    node = TrainTalkFormerOnVideo()
    kw = dict(budget_minutes=60.0, preset="cpu64", resume=True, holdout=0.0, max_steps=2)
    with torch.inference_mode():
        model, path = node.train("anna", video=clips / "talk.mp4", **kw)
    out = Path(path)
    assert out == folders / "models" / "anna.safetensors" and model is not None
    meta = read_metadata(out)
    assert meta["purpose"] == "person:anna" and len(meta[KEY_FIELD]) == 64
    stamp = out.stat().st_mtime_ns

    calls = []
    real = ft.finetune
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: calls.append(k) or real(*a, **k))
    with torch.inference_mode():  # same clip, same settings (new audio downstream): no training
        _, again = node.train("anna", video=clips / "talk.mp4", **kw)
    assert again == path and calls == [] and out.stat().st_mtime_ns == stamp

    with torch.inference_mode():  # another setting: trains again, and replaces the model
        node.train("anna", video=clips / "talk.mp4", **{**kw, "max_steps": 3})
    assert len(calls) == 1 and calls[0]["steps"] == 3
    assert read_metadata(out)[KEY_FIELD] != meta[KEY_FIELD]


def test_train_node_failure_leaves_no_work_files(clips, folders):
    from nodes.train_node import TrainTalkFormerOnVideo, work_directory
    from talkformer_core.errors import FaceError

    with pytest.raises(FaceError):
        with torch.inference_mode():
            TrainTalkFormerOnVideo().train("nobody", budget_minutes=60.0, preset="cpu64", max_steps=2,
                                           video=clips / "noface.mp4")
    assert not work_directory("nobody").exists()
    assert not (folders / "models" / "nobody.safetensors").exists()

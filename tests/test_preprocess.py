"""Preprocessing CLI: a synthetic clip through video encode, mediapipe, crops and mel; resume; rejects."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import synthetic_clip  # noqa: E402


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from talkformer_core.data.synthetic import write_clip
    from talkformer_core.video import VideoWriter

    d = tmp_path_factory.mktemp("videos")
    clip = synthetic_clip(0, 1.6, 128)
    write_clip(clip, d / "talk.mp4")
    with VideoWriter(d / "mute.mp4", 25.0) as w:  # a face but no audio track
        for f in clip.frames[:30]:
            w.write(f)
    rng = np.random.default_rng(0)
    with VideoWriter(d / "noface.mp4", 25.0, audio=clip.audio, audio_rate=16000) as w:
        for _ in range(len(clip.frames)):
            w.write(np.full((128, 128, 3), rng.integers(60, 200), np.uint8))
    with VideoWriter(d / "short.mp4", 25.0, audio=clip.audio[:16000 // 5], audio_rate=16000) as w:
        for f in clip.frames[:5]:
            w.write(f)
    return d, clip


def test_preprocess_clip_resume_and_rejects(videos, tmp_path):
    from talkformer_core.data.preprocess import main, shard_name
    from talkformer_core.face import topology

    d, clip = videos
    out = tmp_path / "shards"
    assert main(["--inputs", str(d), "--out", str(out), "--preset", "tiny", "--crop-size", "48"]) == 0
    shard = out / shard_name(d / "talk.mp4")
    assert shard.exists() and len(list(out.glob("*.npz"))) == 1
    z = np.load(shard)
    T = len(clip.frames)
    assert z["crops"].shape == (T, 48, 48, 3) and z["crops"].dtype == np.uint8
    assert z["mels"].shape == (T, 80, 16) and z["found"].all() and int(z["num_frames"]) == T
    for k in ("points131_px", "points131_crop", "points131_box"):
        assert z[k].shape == (T, 131, 2)
    assert z["crop_boxes"].shape == (T, 3) and z["landmark_boxes"].shape == (T, 4)
    # mediapipe on the h264 video follows the true (synthetic) mouth opening; the face is found
    # where it is (mean distance to the true 478 points small against the 128 px frame)
    p = z["points478_px"]
    gap = np.linalg.norm(p[:, 13] - p[:, 14], axis=1)
    assert np.linalg.norm(p - clip.points478, axis=2).mean() < 3.0
    assert np.corrcoef(gap, clip.opening_px)[0, 1] > 0.9
    # the three frames agree: crop frame and box frame map back to the same pixels
    px = z["points131_px"].astype(np.float64)
    assert np.allclose(topology.crop_to_px(z["points131_crop"].astype(np.float64), z["crop_boxes"]), px, atol=1e-2)
    assert np.allclose(topology.denormalize(z["points131_box"].astype(np.float64), z["landmark_boxes"]), px, atol=1e-2)
    # the mouth lies in the crop's lower half (the generated part), the eyes in the upper half
    pc = z["points131_crop"]
    assert pc[:, list(topology.LIP_POS), 1].min() > 0.5 and pc[:, 59:91, 1].max() < 0.5

    rej = json.loads((out / "rejected.json").read_text())
    reasons = {Path(k).name: v["reason"] for k, v in rej.items()}
    assert reasons == {"mute.mp4": "no_audio", "noface.mp4": "no_face", "short.mp4": "too_short"}

    # resumable: a second run skips the finished clip and leaves it untouched
    mtime = shard.stat().st_mtime_ns
    from talkformer_core.data.preprocess import preprocess

    res = preprocess([d / "talk.mp4"], out, "tiny", crop_size=48, progress=False)
    assert res["done"] == [] and res["skipped"] == [str(d / "talk.mp4")]
    assert shard.stat().st_mtime_ns == mtime


def test_shard_option_splits_inputs(tmp_path):
    from talkformer_core.data.preprocess import take_shard

    items = [Path(f"{i}.mp4") for i in range(7)]
    parts = [take_shard(items, f"{i}/3") for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(items) and parts[1] == [Path("1.mp4"), Path("4.mp4")]
    with pytest.raises(ValueError):
        take_shard(items, "3/3")

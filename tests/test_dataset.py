"""TalkingFaceDataset: shapes, frames, masks, reference choice, determinism."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import tiny_config, write_shards  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), crop_size=32, seeds=(0,))


def test_sample_shapes_and_frames(shards):
    from talkformer_core.data.dataset import TalkingFaceDataset
    from talkformer_core.face import topology

    cfg = tiny_config()
    ds = TalkingFaceDataset(shards, cfg, frames=(0.0, 0.8))
    L, N, S = 5, 5, 32
    T = 40
    assert len(ds) == int(0.8 * T) - L + 1
    s = ds[(3, 1)]
    shapes = {k: tuple(v.shape) for k, v in s.items()}
    assert shapes == {"crops": (L, 3, S, S), "masked": (L, 3, S, S), "mels": (L, 1, 80, 16), "pose": (L, 74, 2),
                      "target_box": (L, 131, 2), "target_crop": (L, 131, 2), "landmark_box": (L, 4),
                      "crop_box": (L, 3), "reference": (3, S, S), "ref_landmarks": (N, 131, 2),
                      "frame_index": (L,), "clip_index": (),
                      "reference_index": ()}
    assert s["crops"].min() >= -1 and s["crops"].max() <= 1
    assert torch.equal(s["masked"][:, :, :S // 2], s["crops"][:, :, :S // 2])
    assert (s["masked"][:, :, S // 2:] == -1).all()
    assert torch.equal(s["pose"], s["target_box"][:, list(topology.POSE_POS)])
    # box -> crop affine per frame maps the box-frame target onto the crop-frame target
    mapped = topology.box_to_crop(s["target_box"].double(), s["landmark_box"].double(), s["crop_box"].double())
    assert torch.allclose(mapped.float(), s["target_crop"], atol=1e-4)
    # same (index, epoch): same sample; other epoch: other references
    assert all(torch.equal(v, ds[(3, 1)][k]) for k, v in s.items())
    assert not torch.equal(ds[(3, 2)]["ref_landmarks"], s["ref_landmarks"]) or \
        not torch.equal(ds[(3, 2)]["reference"], s["reference"])
    # references are frames outside the window, inside the training part (in stage 1's stable box,
    # whose constants come from the training part's frames)
    from talkformer_core.data.dataset import stage1_box_frame

    z = stage1_box_frame(dict(np.load(next(Path(shards).glob("*.npz")))), 0, 32)
    win = set(s["frame_index"].tolist())
    allowed = [t for t in range(0, 32) if t not in win]
    ref_ids = [int(np.argmin(np.abs(z["points131_box"][allowed] - r.numpy()).sum((1, 2)))) for r in s["ref_landmarks"]]
    for i, r in zip(ref_ids, s["ref_landmarks"]):
        assert np.allclose(z["points131_box"][allowed[i]], r.numpy())
    # reference_index names the frame the reference crop is (the latent cache looks it up by it)
    ri = int(s["reference_index"])
    assert ri in allowed
    assert torch.equal(s["reference"], torch.from_numpy(z["crops"][ri]).permute(2, 0, 1).float() / 127.5 - 1.0)


def test_holdout_and_deterministic_references(shards):
    from talkformer_core.data.dataset import TalkingFaceDataset
    from talkformer_core.face import topology

    cfg = tiny_config()
    test = TalkingFaceDataset(shards, cfg, split="test", frames=(0.8, 1.0))
    assert test.deterministic and len(test) == 8 - 5 + 1
    s = test[0]
    assert s["frame_index"].min() >= 32
    # spread over lip openness: sorted openness of the N references covers the range of the candidates
    opn = topology.lip_openness(s["ref_landmarks"].double())
    assert len(set(opn.tolist())) >= 2
    assert torch.equal(test[0]["ref_landmarks"], test[(0, 5)]["ref_landmarks"])


def test_found_false_frames_are_never_targets(shards, tmp_path):
    from talkformer_core.data.dataset import TalkingFaceDataset
    from talkformer_core.data.preprocess import save_shard

    z = dict(np.load(next(Path(shards).glob("*.npz"))))
    z["found"][10] = False
    save_shard(tmp_path / "holes.npz", z)
    ds = TalkingFaceDataset(tmp_path, tiny_config())
    for i in range(len(ds)):
        assert 10 not in ds.windows[i][1] + np.arange(5)
    assert len(ds) == 40 - 5 + 1 - 5


def test_stage1_box_ignores_the_jaw_and_matches_iplap_on_a_typical_frame(shards):
    """The stable box: pose points' box-frame coordinates do not move when only the jaw moves, and
    on the median frame the box is IP-LAP's per-frame box (so IP-LAP-trained weights still fit)."""
    from talkformer_core.face import topology

    z = dict(np.load(next(Path(shards).glob("*.npz"))))
    px = z["points131_px"].astype(np.float64)
    H, W = (int(v) for v in z["frame_size"])
    stable = topology.stable_landmark_boxes(px, W, H)
    iplap = z["landmark_boxes"]
    # the same box up to a few percent of its size on a typical frame
    rel = np.median(np.abs(stable - iplap), 0) / np.median(iplap[:, 2:] - iplap[:, :2], 0).repeat(2)
    assert rel.max() < 0.03, rel
    # open the jaw of frame 0 (chin and lips 3 px down): IP-LAP's box grows, the stable box does not
    moved = px.copy()
    moved[0, list(topology.JAW_POS) + list(topology.LIP_POS), 1] += 3.0
    assert topology.landmark_box(moved[0], W, H)[3] >= topology.landmark_box(px[0], W, H)[3] + 2
    s2 = topology.stable_landmark_boxes(moved, W, H, valid=np.arange(len(px)) > 0)
    s1 = topology.stable_landmark_boxes(px, W, H, valid=np.arange(len(px)) > 0)
    np.testing.assert_allclose(s2, s1)
    pose = list(topology.POSE_POS)
    np.testing.assert_allclose(topology.normalize(moved[0], s2[0])[pose], topology.normalize(px[0], s1[0])[pose])

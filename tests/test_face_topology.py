"""131-point topology: counts, order (against IP-LAP's lists), split/merge, frames, gradients."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from talkformer_core.face import topology as T

LAYOUTS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "iplap_layouts.json"
ROOT = Path(__file__).resolve().parents[1]


def test_counts_and_uniqueness():
    assert len(T.FULL_131) == 131 == len(set(T.FULL_131))
    assert (len(T.POSE_74), len(T.JAW_17), len(T.LIPS_40)) == (74, 17, 40)
    assert set(T.POSE_74) | set(T.JAW_17) | set(T.LIPS_40) == set(T.FULL_131)
    assert not (set(T.POSE_74) & set(T.JAW_17)) and not (set(T.POSE_74) & set(T.LIPS_40))
    assert all(0 <= i < 478 for i in T.FULL_131)
    # positions (IP-LAP: pose 0-3 and 21-90, jaw 4-20, lips 91-130)
    assert T.POSE_POS == tuple(range(4)) + tuple(range(21, 91))
    assert T.JAW_POS == tuple(range(4, 21))
    assert T.LIP_POS == tuple(range(91, 131))
    assert T.CONTENT_POS == T.JAW_POS + T.LIP_POS
    assert sorted(T.NETWORK_ORDER) == list(range(131))
    assert T.NETWORK_ORDER[:74] == T.POSE_POS and T.NETWORK_ORDER[74:91] == T.JAW_POS


def test_known_entries():
    assert T.FULL_131[:5] == (162, 127, 234, 93, 132)
    assert T.FULL_131[-1] == 95
    assert T.JAW_17 == (132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361)
    assert T.LIPS_40[:6] == (61, 185, 40, 39, 37, 0) and T.LIPS_40[15] == 17 and T.LIPS_40[-1] == 95
    assert T.POSE_74[:8] == (162, 127, 234, 93, 323, 454, 356, 389)
    assert T.POSE_74[28:32] == (168, 6, 197, 195)  # nose starts after 8 oval + 20 brow points


def test_sketch_edges():
    sizes = {k: len(v) for k, v in T.SKETCH_EDGE_GROUPS.items()}
    assert sizes == {"lips": 40, "left_eye": 16, "right_eye": 16, "left_eyebrow": 8,
                     "right_eyebrow": 8, "face_oval": 24, "nose": 13}
    assert len(T.SKETCH_EDGES) == 125 == len(set(T.SKETCH_EDGES))
    # the 131 points are exactly the union of the edges' end points (IP-LAP's sketch)
    assert {i for e in T.SKETCH_EDGES for i in e} == set(T.FULL_131)
    assert all(T.FULL_131[a] == e[0] and T.FULL_131[b] == e[1] for (a, b), e in zip(T.SKETCH_EDGES_131, T.SKETCH_EDGES))


@pytest.mark.skipif(not LAYOUTS.exists(), reason="../shared/reference/iplap_layouts.json absent")
def test_lists_equal_iplap_json():
    li = json.loads(LAYOUTS.read_text())["landmark_indices"]
    assert list(T.FULL_131) == li["full_131_order"]
    assert list(T.POSE_74) == li["pose_74"]
    assert list(T.JAW_17) == li["jaw_17"]
    assert list(T.LIPS_40) == li["lips_40"]
    assert [T.FULL_131[p] for p in T.CONTENT_POS] == li["content_57"]
    assert [T.FULL_131[p] for p in T.NETWORK_ORDER] == li["network_full_order_pose_then_content"]
    assert tuple(li["lip_openness_pair"]) == T.LIP_OPENNESS_PAIR
    names = {"lips": "FACEMESH_LIPS", "left_eye": "FACEMESH_LEFT_EYE", "right_eye": "FACEMESH_RIGHT_EYE",
             "left_eyebrow": "FACEMESH_LEFT_EYEBROW", "right_eyebrow": "FACEMESH_RIGHT_EYEBROW",
             "face_oval": "FACEMESH_FACE_OVAL", "nose": "FACEMESH_NOSE"}
    for ours, theirs in names.items():
        assert [list(e) for e in T.SKETCH_EDGE_GROUPS[ours]] == li["sketch_edges"][theirs]


def test_import_is_light():
    code = ("import sys, talkformer_core.face.topology, talkformer_core.face; "
            "heavy = [m for m in ('mediapipe', 'cv2', 'torch') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _p478(batch=(2, 3), seed=0):
    return np.random.default_rng(seed).uniform(0, 500, size=batch + (478, 2)).astype(np.float32)


def test_select_split_merge_numpy_and_torch():
    p478 = np.stack([np.arange(478), -np.arange(478)], axis=-1).astype(np.float64)  # point i = (i, -i)
    p131 = T.select_131(p478)
    assert p131[:, 0].tolist() == list(T.FULL_131)
    pose, jaw, lips = T.split(p131)
    assert pose[:, 0].tolist() == list(T.POSE_74)
    assert jaw[:, 0].tolist() == list(T.JAW_17) and lips[:, 0].tolist() == list(T.LIPS_40)
    np.testing.assert_array_equal(T.merge(pose, jaw, lips), p131)
    # batched, both array kinds
    p = T.select_131(_p478())
    for arr in (p, torch.from_numpy(p)):
        parts = T.split(arr)
        assert [tuple(q.shape) for q in parts] == [(2, 3, 74, 2), (2, 3, 17, 2), (2, 3, 40, 2)]
        back = T.merge(*parts)
        assert type(back) is type(arr)
        np.testing.assert_array_equal(np.asarray(back), p)
    net = T.to_network_order(p)
    np.testing.assert_array_equal(net[..., :74, :], T.split(p)[0])
    np.testing.assert_array_equal(T.from_network_order(net), p)
    with pytest.raises(ValueError):
        T.split(p[..., :130, :])


def test_landmark_box_matches_iplap_formula():
    rng = np.random.default_rng(1)
    w, h = 640, 360
    p = np.stack([rng.uniform(100, 400, 131), rng.uniform(40, 330, 131)], axis=-1)
    p[7, 1] = 350.0  # within 25 px of the bottom edge
    # IP-LAP inference_single.py:270-291 in mediapipe's normalised coordinates
    xn, yn = p[:, 0] / w, p[:, 1] / h
    x_min, x_max = max(xn.min() - 25 / w, 0), min(xn.max() + 25 / w, 1)
    y_min, y_max = max(yn.min() - 25 / h, 0), min(yn.max() + 25 / h, 1)
    ref = (int(x_min * w), int(y_min * h), int(x_max * w), int(y_max * h))
    assert T.landmark_box(p, w, h) == ref
    assert ref[3] == h  # clipped at the bottom (350 + 25 > 360)
    with pytest.raises(ValueError):
        T.landmark_box(np.full((131, 2), np.nan), w, h)


def test_normalize_and_box_to_crop_round_trips_numpy():
    p = T.select_131(_p478((4,)))  # (4, 131, 2)
    p[:2] = p[:2] * 0.6 + 100  # frames 0-1 well inside the 640x480 frame, 2-3 touching its edges
    boxes = np.array([T.landmark_box(q, 640, 480) for q in p], dtype=np.float64)  # (4, 4)
    n = T.normalize(p.astype(np.float64), boxes)
    # unclipped boxes hold every point: all in [0, 1]; a box clipped by the frame leaves some outside
    unclipped = (boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < 640) & (boxes[:, 3] < 480)
    assert unclipped.tolist() == [True, True, False, False]
    assert np.all((n[unclipped] >= 0) & (n[unclipped] <= 1))
    np.testing.assert_allclose(T.denormalize(n, boxes), p, atol=1e-4)
    crop = np.array([[50.0, 20.0, 300.0], [60.0, 25.0, 310.0], [40.0, 10.0, 280.0], [55.0, 30.0, 305.0]])
    c = T.box_to_crop(n, boxes, crop)
    np.testing.assert_allclose(c, (p - crop[:, None, :2]) / crop[:, None, 2:], atol=1e-6)
    np.testing.assert_allclose(T.crop_to_box(c, boxes, crop), n, atol=1e-9)
    # a single tuple box broadcasts too
    n0 = T.normalize(p[0], (10, 20, 410, 470))
    np.testing.assert_allclose(n0[5], [(p[0, 5, 0] - 10) / 400, (p[0, 5, 1] - 20) / 450], rtol=1e-6)


def test_box_to_crop_torch_round_trip_and_gradient():
    torch.manual_seed(0)
    pts = torch.rand(3, 5, 131, 2, dtype=torch.float64, requires_grad=True)  # (B, L, 131, 2) box frame
    box = torch.tensor([[100.0, 80.0, 300.0, 320.0]], dtype=torch.float64).expand(3, 5, 4)
    crop = torch.tensor([90.0, 60.0, 280.0], dtype=torch.float64)
    out = T.box_to_crop(pts, box, crop)
    assert out.shape == pts.shape and out.requires_grad
    back = T.crop_to_box(out, box, crop)
    torch.testing.assert_close(back, pts)
    out.sum().backward()
    # d crop_x / d box_x = (x2 - x1) / size
    torch.testing.assert_close(pts.grad[..., 0], torch.full_like(pts.grad[..., 0], 200.0 / 280.0))
    torch.testing.assert_close(pts.grad[..., 1], torch.full_like(pts.grad[..., 1], 240.0 / 280.0))
    assert torch.autograd.gradcheck(lambda x: T.box_to_crop(x, box, crop), (pts.detach()[:1, :1, :4].clone().requires_grad_(),))
    # float32 tensors with tuple boxes keep their dtype
    f = T.normalize(torch.rand(131, 2) * 100, (0, 0, 100, 50))
    assert f.dtype == torch.float32


def test_lip_openness():
    p = _p478((6,))
    d478 = T.lip_openness(p)
    np.testing.assert_allclose(d478, np.linalg.norm(p[:, 0] - p[:, 17], axis=-1), rtol=1e-6)
    np.testing.assert_allclose(T.lip_openness(T.select_131(p)), d478, rtol=1e-6)
    dn = T.lip_openness(p, size=(400, 800))
    np.testing.assert_allclose(dn, np.hypot((p[:, 0, 0] - p[:, 17, 0]) / 800, (p[:, 0, 1] - p[:, 17, 1]) / 400), rtol=1e-5)
    t = torch.from_numpy(p).requires_grad_()
    T.lip_openness(t).sum().backward()
    assert t.grad[:, 0].abs().sum() > 0 and t.grad[:, 1].abs().sum() == 0


def test_pick_spread_matches_iplap_reference_choice():
    rng = np.random.default_rng(3)
    for length, n in [(200, 5), (37, 15), (7, 15), (1, 5)]:
        v = rng.uniform(0, 1, length)
        v[::5] = v[0]  # ties: stable order as Python's sorted
        ranked = [i for i, _ in sorted(enumerate(v), key=lambda x: x[1])]
        ref = [ranked[int(r)] for r in torch.linspace(0, length - 1, steps=n)]
        assert T.pick_spread(v, n).tolist() == ref
    v = np.array([0.3, np.nan, 0.1, 0.9, np.nan, 0.5])
    got = T.pick_spread(v, 3)
    assert got.tolist() == [2, 0, 3]  # ranks int(0, 1.5, 3) of the finite values ranked [2, 0, 5, 3]
    with pytest.raises(ValueError):
        T.pick_spread(np.full(4, np.nan), 2)

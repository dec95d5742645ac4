"""Landmark completion = IP-LAP's Landmark_generator: layout, function, our conventions, gradients.

Equivalence with IP-LAP's code: the weight rule (every tensor of the state dict,
in state-dict order, from one ``torch.Generator().manual_seed(0)``; see ``fill_deterministic`` in
tests/fixtures/iplap/make_fixture.py) and the fixed inputs are shared with the script that made
tests/fixtures/iplap/landmark_generator.npz from IP-LAP's own code; our module must reproduce those
outputs within 1e-4. Where IPLAP_DIR points to an IP-LAP checkout, IP-LAP is also compared live.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from talkformer_core import config as C
from talkformer_core.face import topology
from talkformer_core.models.landmark_completion import (LandmarkCompletion, LandmarkGenerator,
                                                        iplap_layout)

ROOT = Path(__file__).resolve().parents[1]
SHARED_LAYOUT = ROOT.parent / "shared" / "reference" / "iplap_layouts.json"
FIXTURE_DIR = ROOT / "tests" / "fixtures" / "iplap"
FIXTURE = FIXTURE_DIR / "landmark_generator.npz"

_spec = importlib.util.spec_from_file_location("iplap_make_fixture", FIXTURE_DIR / "make_fixture.py")
mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mf)


def reference_layout() -> dict[str, tuple[int, ...]]:
    """IP-LAP's layouts as extracted from its code where that copy is present, else the packaged copy."""
    if SHARED_LAYOUT.is_file():
        sd = json.loads(SHARED_LAYOUT.read_text())["landmark_generator"]["state_dict"]
        return {k: tuple(s) for k, s, _ in sd}
    return iplap_layout()


@pytest.fixture(scope="module")
def full() -> LandmarkCompletion:
    torch.manual_seed(0)
    return LandmarkCompletion(C.LandmarkConfig()).eval()


@pytest.fixture(scope="module")
def full_deterministic() -> LandmarkCompletion:
    net = LandmarkCompletion(C.paper().model.landmark)
    net.load_state_dict(mf.fill_deterministic(net.state_dict()), strict=True)
    return net.eval()


def tiny_net(seed: int = 0) -> LandmarkCompletion:
    torch.manual_seed(seed)
    return LandmarkCompletion(C.tiny().model.landmark)


def our_inputs(B: int, L: int, N: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mels = (2 * torch.randn(B, L, 1, 80, 16, generator=g)).clamp(-4, 4)
    p131 = torch.rand(B, L, 131, 2, generator=g)
    refs = torch.rand(B, N, 131, 2, generator=g)
    return mels, p131[..., topology.POSE_POS, :], refs, p131


# ---------------------------------------------------------------------------------------------
# layout

def test_state_dict_layout_equals_iplap(full):
    sd = full.state_dict()
    ref = reference_layout()
    assert list(sd) == list(ref)  # same keys, same order
    assert {k: tuple(v.shape) for k, v in sd.items()} == ref
    assert iplap_layout() == ref  # the packaged copy agrees with the one extracted from IP-LAP
    assert len(sd) == 435
    assert sum(p.numel() for p in full.parameters()) == 13_724_394
    assert all(p.requires_grad for p in full.parameters())
    assert sum(1 for v in sd.values() if v.dtype == torch.int64) == 54


def test_position_tables_are_iplaps_sinusoids(full):
    pe = full.fusion_transformer.position_v.pe[0]  # (512, 512)
    p, i = 7, 10
    assert pe[p, 2 * i].item() == pytest.approx(np.sin(p / 10000 ** (2 * i / 512)), abs=1e-6)
    assert pe[p, 2 * i + 1].item() == pytest.approx(np.cos(p / 10000 ** (2 * i / 512)), abs=1e-6)
    assert torch.equal(pe, full.fusion_transformer.position_a.pe[0])


def test_tiny_config_shrinks_the_module():
    n = sum(p.numel() for p in tiny_net().parameters())
    assert n < 300_000, n


# ---------------------------------------------------------------------------------------------
# equivalence with IP-LAP's outputs (stored fixture)

@pytest.mark.parametrize("case", sorted(mf.LANDMARK_CASES))
def test_matches_iplap_fixture(full_deterministic, case):
    data = np.load(FIXTURE)
    B, T, N = mf.LANDMARK_CASES[case]
    x = {k: torch.from_numpy(data[f"{case}/{k}"]) for k in ("T_mels", "T_pose", "Nl_pose", "Nl_content")}
    # the stored inputs are the ones the rule regenerates (so the README's description is true)
    for k, v in mf.landmark_inputs(B, T, N).items():
        assert torch.equal(v, x[k]), k
    with torch.no_grad():
        y = full_deterministic(**x)
    want = torch.from_numpy(data[f"{case}/output"])
    assert y.shape == want.shape == (B * T, 2, 57)
    assert want.std() > 0.5  # the fixture carries signal, not zeros
    err = (y - want).abs().max().item()
    assert err < 1e-4, f"{case}: max abs diff {err:.3g} against IP-LAP's outputs"


def test_complete_is_forward_in_our_conventions(full_deterministic):
    """complete() on FULL_131 (..., K, 2) data = IP-LAP's forward on its own layouts."""
    data = np.load(FIXTURE)
    x = {k: torch.from_numpy(data[f"n15/{k}"]) for k in ("T_mels", "T_pose", "Nl_pose", "Nl_content")}
    refs_net = torch.cat([x["Nl_pose"], x["Nl_content"]], dim=3).transpose(2, 3)  # (B, N, 131, 2) net order
    refs = topology.from_network_order(refs_net)  # (B, N, 131, 2) FULL_131 order
    pose = x["T_pose"].transpose(2, 3)  # (B, T, 74, 2)
    with torch.no_grad():
        out = full_deterministic.complete(x["T_mels"], pose, refs)  # (B, T, 131, 2)
    want = torch.from_numpy(data["n15/output"]).view(2, 5, 2, 57).transpose(2, 3)  # (B, T, 57, 2)
    assert out.shape == (2, 5, 131, 2)
    assert (out[:, :, list(topology.CONTENT_POS)] - want).abs().max() < 1e-4
    assert torch.equal(out[:, :, list(topology.POSE_POS)], pose)


# ---------------------------------------------------------------------------------------------
# N and L are not weight shapes

def test_n5_and_n15_run_on_the_same_weights(full):
    mels, pose, refs, _ = our_inputs(1, 5, 15)
    with torch.no_grad():
        a = full.complete(mels, pose, refs)
        b = full.complete(mels, pose, refs[:, :5])
    assert a.shape == b.shape == (1, 5, 131, 2)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max() > 1e-4  # the references matter


def test_reference_order_does_not_matter(full):
    """Reference tokens carry no position: permuting the N sets leaves the output unchanged."""
    mels, pose, refs, _ = our_inputs(1, 5, 6, seed=3)
    with torch.no_grad():
        a = full.complete(mels, pose, refs)
        b = full.complete(mels, pose, refs[:, torch.randperm(6)])
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("L", [1, 3, 9])
def test_any_sequence_length(L):
    net = tiny_net().eval()
    mels, pose, refs, _ = our_inputs(2, L, 5)
    with torch.no_grad():
        out = net.complete(mels, pose, refs)
    assert out.shape == (2, L, 131, 2)


def test_tiny_forward_is_fast():
    net = tiny_net().eval()
    mels, pose, refs, _ = our_inputs(2, 5, 5)
    with torch.no_grad():
        net.complete(mels, pose, refs)  # warm-up
        times = []
        for _ in range(5):  # best of 5: other processes share this CPU
            t0 = time.perf_counter()
            net.complete(mels, pose, refs)
            times.append(time.perf_counter() - t0)
    assert min(times) < 0.5, f"tiny landmark completion forward took {min(times):.3f} s"


# ---------------------------------------------------------------------------------------------
# merge, loss, gradients, errors

def test_merge_keeps_the_input_pose_exactly():
    net = tiny_net().eval()
    mels, pose, refs, p131 = our_inputs(2, 5, 5, seed=7)
    with torch.no_grad():
        out = net.complete(mels, pose, refs)
        content = net.predict_content(mels, pose, refs)
    assert torch.equal(out[:, :, list(topology.POSE_POS)], pose)
    assert torch.equal(out[:, :, list(topology.JAW_POS)], content[:, :, :17])
    assert torch.equal(out[:, :, list(topology.LIP_POS)], content[:, :, 17:])
    # merge of the ground truth's own pose and content gives back the ground truth
    gt = LandmarkCompletion.merge(p131[:, :, list(topology.POSE_POS)], p131[:, :, list(topology.CONTENT_POS)])
    assert torch.equal(gt, p131)


def test_l1_loss_is_iplaps_mean():
    a, b = torch.rand(2, 5, 57, 2), torch.rand(2, 5, 57, 2)
    want = (a - b).abs().sum() / a.numel()
    assert torch.allclose(LandmarkCompletion.l1_loss(a, b), want)
    # same value on IP-LAP's (B*T, 2, 57) layout
    flat = lambda t: t.flatten(0, 1).transpose(1, 2)
    assert torch.allclose(LandmarkCompletion.l1_loss(flat(a), flat(b)), want)


@pytest.mark.parametrize("cfg", ["tiny", "paper"])
def test_gradients_reach_every_parameter(cfg):
    torch.manual_seed(0)
    net = LandmarkCompletion(C.preset(cfg).model.landmark).train()
    mels, pose, refs, p131 = our_inputs(2, 5, 5, seed=1)
    out = net.complete(mels, pose, refs)
    loss = LandmarkCompletion.l1_loss(out[:, :, list(topology.CONTENT_POS)], p131[:, :, list(topology.CONTENT_POS)])
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    # the modality padding row (id 0) is never used, as in IP-LAP
    assert net.fusion_transformer.modality.weight.grad[0].abs().sum() == 0


def test_bad_shapes_are_input_errors():
    from talkformer_core.errors import InputError
    net = tiny_net().eval()
    mels, pose, refs, _ = our_inputs(1, 5, 5)
    with pytest.raises(InputError, match="references"):
        net.complete(mels, pose, refs[:, :, :74])
    with pytest.raises(InputError, match="pose"):
        net.complete(mels, pose.transpose(2, 3), refs)
    with pytest.raises(InputError, match="mels"):
        net.complete(mels[:, :4], pose, refs)


# ---------------------------------------------------------------------------------------------
# live comparison with an IP-LAP checkout (IPLAP_DIR)

IPLAP_DIR = os.environ.get("IPLAP_DIR")


@pytest.mark.skipif(not IPLAP_DIR, reason="IPLAP_DIR (a checkout of Weizhi-Zhong/IP_LAP) not set")
def test_against_iplap_checkout(full_deterministic):
    # 1) regenerate the fixture's numbers from IP-LAP's code; they equal the stored ones
    fresh = mf.landmark_fixture_arrays(IPLAP_DIR)
    stored = np.load(FIXTURE)
    assert sorted(fresh) == sorted(stored.files)
    for k in fresh:
        assert np.abs(fresh[k] - stored[k]).max() < 1e-5, k
    # 2) random weights (IP-LAP's own init, another seed) loaded into ours, training-mode BN off
    lg = mf.import_iplap_file(IPLAP_DIR, "models/landmark_generator.py", "iplap_lg_live")
    worst = 0.0
    with mf.cuda_is_identity(), torch.no_grad():
        torch.manual_seed(123)
        theirs = lg.Landmark_generator(5, 512, 4, 4, 1024, 0.1).eval()
        ours = LandmarkGenerator(C.LandmarkConfig()).eval()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        for N in (15, 5, 1):
            x = mf.landmark_inputs(3, 5, N, seed=N)
            worst = max(worst, (ours(**x) - theirs(**x)).abs().max().item())
        # and the deterministic-rule weights on fresh inputs
        theirs = mf.iplap_landmark_generator(IPLAP_DIR, 5)
        x = mf.landmark_inputs(2, 5, 15, seed=99)
        worst = max(worst, (full_deterministic(**x) - theirs(**x)).abs().max().item())
    print(f"\nlargest |ours - IP-LAP| on the landmark generator: {worst:.3g}")
    assert worst < 1e-4

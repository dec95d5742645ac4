"""convert.py: IP-LAP's training-format .pth files -> one safetensors checkpoint, bit-exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from talkformer_core import convert
from talkformer_core.errors import CheckpointError
from talkformer_core.models.iplap_renderer import IPLAPRenderer
from talkformer_core.models.landmark_completion import LandmarkGenerator

ROOT = Path(__file__).resolve().parents[1]
SHARED_LAYOUTS = ROOT.parent / "shared" / "reference" / "iplap_layouts.json"


class NotATensor:
    """A custom class: torch.load(weights_only=True) refuses to unpickle it."""

    def __init__(self, v: int = 1):
        self.v = v


def _perturbed(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The module's state dict with every float tensor randomised (BatchNorm stats included) and
    num_batches_tracked set, so nothing in the round trip is a default value."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            sd[k] = torch.randn(v.shape, generator=g) if not k.endswith("running_var") else torch.rand(v.shape, generator=g) + 0.5
        else:
            sd[k] = torch.full_like(v, 7)
    module.load_state_dict(sd)
    return module.state_dict()


def _adam_state(module: torch.nn.Module, seed: int) -> dict:
    """An Adam state_dict after one step, as IP-LAP's training saves it (save_optimizer_state=True)."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    saved = [p.detach().clone() for p in params]
    opt.step()
    with torch.no_grad():  # keep the module's weights as they were; only the state matters
        for p, s in zip(params, saved):
            p.copy_(s)
            p.grad = None
    return opt.state_dict()


def _training_format(sd, optimizer, step=1234, epoch=56, prefix=""):
    return {"state_dict": {prefix + k: v for k, v in sd.items()}, "optimizer": optimizer,
            "global_step": step, "global_epoch": epoch}


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    lg, rd = LandmarkGenerator(), IPLAPRenderer()
    return lg, _perturbed(lg, 1), rd, _perturbed(rd, 2)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], prefix: str):
    keys = [k for k in got if k.startswith(prefix + ".")]
    assert sorted(k[len(prefix) + 1:] for k in keys) == sorted(want)  # all keys (safetensors sorts them)
    for k in want:
        a, b = got[f"{prefix}.{k}"], want[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a, b.contiguous().view(-1).view(torch.uint8) if b.numel() else b), k


def test_round_trip_training_format_bit_exact(tmp_path, nets):
    lg, lg_sd, rd, rd_sd = nets
    lpath, rpath = tmp_path / "landmarkgenerator_checkpoint.pth", tmp_path / "renderer_checkpoint.pth"
    # landmark generator: one GPU, plain keys, Adam state; renderer: DataParallel, `module.` on every
    # key (flow_module.* keeps its inner "module."), Adam state, and IP-LAP's VGG keys to be dropped
    torch.save(_training_format(lg_sd, _adam_state(lg, 3)), lpath)
    rd_file = dict(rd_sd)
    rd_file["perceptual.model.network.0.weight"] = torch.randn(64, 3, 3, 3)
    rd_file["perceptual.model.network.0.bias"] = torch.randn(64)
    torch.save(_training_format(rd_file, _adam_state(rd, 4), step=9, epoch=2, prefix="module."), rpath)
    out = tmp_path / "iplap.safetensors"
    assert convert.main(["iplap", "--landmark-generator", str(lpath), "--renderer", str(rpath), "--out", str(out)]) == 0

    tensors, meta = _read(out)
    _assert_bit_exact(tensors, lg_sd, "landmark")
    _assert_bit_exact(tensors, rd_sd, "renderer")
    assert not any("perceptual" in k for k in tensors)
    assert len(tensors) == 435 + 252
    assert meta["kind"] == "iplap" and meta["format_version"] == "1"
    cfg = json.loads(meta["config"])
    assert cfg == {"landmark_generator": {"T": 5, "d_model": 512, "nlayers": 4, "nhead": 4,
                                          "dim_feedforward": 1024, "dropout": 0.1}, "renderer": {}}
    src = json.loads(meta["source"])
    assert src["landmark_generator"] == {"file": lpath.name, "global_step": 1234, "global_epoch": 56}
    assert src["renderer"] == {"file": rpath.name, "global_step": 9, "global_epoch": 2}

    # and back into modules
    models = convert.load_iplap_checkpoint(out, "cpu", torch.float32)
    for m, want in ((models.landmark_generator, lg_sd), (models.renderer, rd_sd)):
        assert not m.training
        got = m.state_dict()
        assert list(got) == list(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
    m64 = convert.load_iplap_checkpoint(out, "cpu", torch.float64)
    assert m64.renderer.flow_module.conv1.weight.dtype == torch.float64
    assert m64.renderer.flow_module.conv1_bn.num_batches_tracked.dtype == torch.int64


def test_round_trip_bare_and_plain(tmp_path, nets):
    lg, lg_sd, rd, rd_sd = nets
    lpath, rpath = tmp_path / "lg_bare.pth", tmp_path / "rd_plain.pth"
    torch.save({"module." + k: v for k, v in lg_sd.items()}, lpath)  # bare, prefixed
    torch.save(_training_format(rd_sd, {}), rpath)  # plain keys: flow_module.* must survive
    out = convert.convert_iplap(lpath, tmp_path / "m.safetensors", rpath)
    tensors, meta = _read(out)
    _assert_bit_exact(tensors, lg_sd, "landmark")
    _assert_bit_exact(tensors, rd_sd, "renderer")
    assert "global_step" not in json.loads(meta["source"])["landmark_generator"]
    # landmark generator alone
    out2 = convert.convert_iplap(lpath, tmp_path / "lg_only.safetensors")
    tensors2, meta2 = _read(out2)
    assert len(tensors2) == 435 and json.loads(meta2["config"])["renderer"] is None
    assert convert.load_iplap_checkpoint(out2).renderer is None


def test_wrong_shape_missing_and_unexpected_are_named(tmp_path, nets):
    _, lg_sd, _, rd_sd = nets
    sd = dict(rd_sd)
    sd["translation.conv_last.weight"] = torch.zeros(3, 64, 5, 5)
    del sd["flow_module.conv_4.bias"]
    sd["flow_module.extra.weight"] = torch.zeros(2)
    bad = tmp_path / "bad_renderer.pth"
    torch.save(_training_format(sd, {}), bad)
    lpath = tmp_path / "lg.pth"
    torch.save(lg_sd, lpath)
    with pytest.raises(CheckpointError) as e:
        convert.convert_iplap(lpath, tmp_path / "x.safetensors", bad)
    msg = str(e.value)
    assert str(bad) in msg and "3 tensor(s)" in msg
    assert "translation.conv_last.weight: file has (3, 64, 5, 5), IP-LAP's Renderer has (3, 64, 7, 7)" in msg
    assert "flow_module.conv_4.bias: missing" in msg and "(2,)" in msg
    assert "flow_module.extra.weight: unexpected" in msg
    assert not (tmp_path / "x.safetensors").exists()


def test_not_an_iplap_file(tmp_path, nets):
    _, lg_sd, _, rd_sd = nets
    other = tmp_path / "other_model.pth"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3, 3)}, "global_step": 1}, other)
    with pytest.raises(CheckpointError, match=r"other_model\.pth: not an IP-LAP landmark generator checkpoint"):
        convert.convert_iplap(other, tmp_path / "x.safetensors")
    swapped = tmp_path / "renderer_checkpoint.pth"
    torch.save(_training_format(rd_sd, {}), swapped)
    with pytest.raises(CheckpointError, match=r"renderer_checkpoint\.pth.*pass it as --renderer"):
        convert.convert_iplap(swapped, tmp_path / "x.safetensors")
    a_list = tmp_path / "list.pth"
    torch.save([1, 2, 3], a_list)
    with pytest.raises(CheckpointError, match=r"list\.pth: not an IP-LAP checkpoint"):
        convert.convert_iplap(a_list, tmp_path / "x.safetensors")
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a readable torch checkpoint"):
        convert.convert_iplap(text, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=r"missing\.pth: no such file"):
        convert.convert_iplap(tmp_path / "missing.pth", tmp_path / "x.safetensors")


def test_pickle_with_custom_class_is_refused_not_unpickled(tmp_path, nets, capsys):
    _, lg_sd, _, _ = nets
    evil = tmp_path / "custom_class.pth"
    torch.save({"state_dict": lg_sd, "extra": NotATensor(5)}, evil)
    with pytest.raises(CheckpointError) as e:
        convert.convert_iplap(evil, tmp_path / "x.safetensors")
    assert str(evil) in str(e.value) and "weights_only=True) refused" in str(e.value)
    # the CLI turns it into a message and exit code 2
    assert convert.main(["iplap", "--landmark-generator", str(evil), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "custom_class.pth" in capsys.readouterr().err


def test_load_rejects_a_non_iplap_checkpoint(tmp_path):
    from talkformer_core.models.checkpoint import save_checkpoint

    p = save_checkpoint(tmp_path / "tf.safetensors", {"landmark": {"w": torch.zeros(2)}}, {"a": 1}, kind="talkformer")
    with pytest.raises(CheckpointError, match=r"tf\.safetensors: a 'talkformer' checkpoint; expected kind 'iplap'"):
        convert.load_iplap_checkpoint(p)


def test_packaged_layouts_equal_shared_reference():
    if not SHARED_LAYOUTS.is_file():
        pytest.skip("../shared/reference not present")
    ref = json.loads(SHARED_LAYOUTS.read_text())
    for which in ("landmark_generator", "renderer"):
        want = [(k, tuple(s), t) for k, s, t in ref[which]["state_dict"] if not k.startswith("perceptual.")]
        got = [(k, s, t) for k, (s, t) in convert.iplap_layout(which).items()]
        assert got == want, which

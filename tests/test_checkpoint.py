"""Safetensors checkpoints: exact round trips, named mismatches, header-only metadata, pickle
refusal, external-VAE hashing, and bit-exact training resume."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from talkformer_core.config import AutoencoderConfig, tiny
from talkformer_core.errors import CheckpointError, VAEMismatchError
from talkformer_core.models.autoencoder import AutoencoderKL
from talkformer_core.models.checkpoint import (capture_rng_state, checkpoint_config, checkpoint_kind,
                                               config_differences, external_vae_spec, load_model_state,
                                               load_training_state, read_checkpoint, read_metadata,
                                               resolve_external_vae, restore_rng_state, save_checkpoint,
                                               save_training_state, state_dict_sha256)

AE_CFG = AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, resolution=16, z_channels=3, embed_dim=3,
                           scale_factor=0.9)


class Toy(nn.Module):
    """Stands in for TalkFormer: the four children with the checkpoint's prefixes."""

    def __init__(self, unet_width: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.autoencoder = AutoencoderKL(AE_CFG)
        self.landmark = nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(8 * 5, 4))
        self.appearance = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU())
        self.unet = nn.Sequential(nn.Conv2d(3, unet_width, 3, padding=1), nn.Dropout(0.5),
                                  nn.Conv2d(unet_width, 3, 3, padding=1))

    def loss(self, g: torch.Generator | None = None) -> torch.Tensor:
        # uses the global RNG (dropout, randn) so that a resume test sees RNG state matter
        x = torch.randn(2, 3, 4, 4)
        lm = self.landmark(torch.randn(2, 2, 5))
        return (self.unet(x + self.appearance(x)[:, :3]) - x).pow(2).mean() + lm.pow(2).mean()


def _modules(m: Toy) -> dict:
    return {"autoencoder": m.autoencoder, "landmark": m.landmark, "appearance": m.appearance, "unet": m.unet}


def test_round_trip_is_exact(tmp_path):
    cfg = tiny()
    src = Toy()
    src.landmark[1].running_mean.normal_()  # buffers travel too
    ema = {k: v.clone() + 1 for k, v in src.unet.state_dict().items()}
    path = save_checkpoint(tmp_path / "ck" / "model.safetensors", {**_modules(src), "ema": ema},
                           cfg, extra_metadata={"training_state": {"step": 12, "epoch": 1}})
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temporary left behind
    tensors, meta = read_checkpoint(path)
    want = {f"{n}.{k}": v for n, mod in _modules(src).items() for k, v in mod.state_dict().items()}
    want.update({f"ema.{k}": v for k, v in ema.items()})
    assert set(tensors) == set(want)
    assert all(torch.equal(tensors[k], want[k]) and tensors[k].dtype == want[k].dtype for k in want)
    assert meta["format"] == "talkformer" and meta["format_version"] == "1" and meta["kind"] == "talkformer"
    assert meta["autoencoder"] == "embedded" and meta["created_by"].startswith("talkformer_core")
    assert json.loads(meta["training_state"]) == {"epoch": 1, "step": 12}
    assert checkpoint_config(meta, path) == cfg and config_differences(checkpoint_config(meta), cfg) == []
    dst = Toy(seed=1)
    assert not torch.equal(dst.unet[0].weight, src.unet[0].weight)
    load_model_state(dst, tensors, "")  # whole model; the ema.* copy is skipped
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())
    unet = Toy(seed=2).unet
    load_model_state(unet, tensors, "ema")
    assert all(torch.equal(unet.state_dict()[k], ema[k]) for k in ema)
    # overwrite in place
    save_checkpoint(path, _modules(dst), cfg)
    assert "ema.0.weight" not in read_checkpoint(path)[0]


def test_mismatch_names_each_tensor(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", _modules(Toy(unet_width=64)), tiny())
    tensors, _ = read_checkpoint(path)
    with pytest.raises(CheckpointError) as e:
        load_model_state(Toy(unet_width=32), tensors, "", source=path)
    msg = str(e.value)
    assert str(path) in msg
    assert "unet.0.weight: checkpoint has (64, 3, 3, 3), model expects (32, 3, 3, 3)" in msg
    assert "unet.2.weight: checkpoint has (3, 64, 3, 3), model expects (3, 32, 3, 3)" in msg
    tensors = dict(tensors)
    del tensors["landmark.1.running_var"]
    tensors["appearance.5.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as e:
        load_model_state(Toy(unet_width=64), tensors, "")
    assert "landmark.1.running_var: missing from checkpoint" in str(e.value)
    assert "appearance.5.weight: unexpected key" in str(e.value)
    # prefix form on one module
    with pytest.raises(CheckpointError, match=r"unet\.0\.bias: checkpoint has \(64,\), model expects \(32,\)"):
        load_model_state(Toy(unet_width=32).unet, tensors, "unet.")


def test_metadata_read_from_header_alone(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", _modules(Toy()), tiny())
    n = int.from_bytes(path.read_bytes()[:8], "little")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: 8 + n])  # header only: every tensor's bytes are gone
    meta = read_metadata(cut)
    assert meta == read_metadata(path) and checkpoint_kind(cut) == "talkformer"
    assert checkpoint_config(meta) == tiny()
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        read_checkpoint(cut)


def test_pickle_and_foreign_files_refused(tmp_path):
    sd = Toy().unet.state_dict()
    torch.save(sd, tmp_path / "model.ckpt")
    torch.save(sd, tmp_path / "model.pth", _use_new_zipfile_serialization=False)
    for name in ("model.ckpt", "model.pth"):
        with pytest.raises(CheckpointError, match=f"only safetensors checkpoints are read; .*{name} looks like a pickle"):
            read_checkpoint(tmp_path / name)
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_metadata(tmp_path / "junk.safetensors")
    save_file(sd, tmp_path / "bare.safetensors")  # a plain state dict: no TalkFormer metadata
    with pytest.raises(CheckpointError, match="not a TalkFormer checkpoint"):
        read_checkpoint(tmp_path / "bare.safetensors")
    with pytest.raises(CheckpointError, match="no such"):
        read_metadata(tmp_path / "absent.safetensors")
    # a newer format version is named, not misread
    save_file(sd, tmp_path / "v2.safetensors", metadata={"format": "talkformer", "format_version": "2"})
    with pytest.raises(CheckpointError, match="format_version '2'"):
        read_metadata(tmp_path / "v2.safetensors")


def test_external_vae(tmp_path):
    src = Toy()
    vae_sd = src.autoencoder.state_dict()
    save_file(dict(vae_sd), tmp_path / "vae.safetensors")
    # the same weights in a full-checkpoint layout hash the same
    save_file({f"first_stage_model.{k}": v for k, v in vae_sd.items()}, tmp_path / "sd_full.safetensors")
    other = {k: v.clone() for k, v in vae_sd.items()}
    other["decoder.conv_out.bias"][0] += 0.01
    save_file(other, tmp_path / "other_vae.safetensors")

    spec = external_vae_spec(tmp_path / "vae.safetensors", AE_CFG)
    assert spec["sha256"] == state_dict_sha256(vae_sd) and spec["scale_factor"] == 0.9
    cfg = tiny()
    with pytest.raises(ValueError, match="autoencoder.ch_mult"):  # tiny()'s own VAE is not this one
        save_checkpoint(tmp_path / "m.safetensors", _modules(src), cfg, external_vae=spec)
    cfg.model.autoencoder = AE_CFG
    ck = save_checkpoint(tmp_path / "m.safetensors", _modules(src), cfg, external_vae=spec)
    tensors, meta = read_checkpoint(ck)
    assert not any(k.startswith("autoencoder.") for k in tensors)
    assert json.loads(meta["autoencoder"])["sha256"] == spec["sha256"]

    with pytest.raises(CheckpointError) as e:
        resolve_external_vae(meta, None, checkpoint_path=ck)
    assert spec["sha256"] in str(e.value) and "3 latent channels" in str(e.value) and "m.safetensors" in str(e.value)
    assert not isinstance(e.value, VAEMismatchError)  # no VAE given: not a mismatch
    with pytest.raises(VAEMismatchError) as e:  # a CheckpointError the loader node can tell apart
        resolve_external_vae(meta, tmp_path / "other_vae.safetensors", checkpoint_path=ck)
    msg = str(e.value)
    assert "other_vae.safetensors" in msg and "m.safetensors" in msg and spec["sha256"] in msg
    for name in ("vae.safetensors", "sd_full.safetensors"):
        ext = resolve_external_vae(meta, tmp_path / name, checkpoint_path=ck)
        assert ext.sha256 == spec["sha256"] and ext.config == AE_CFG and ext.scale_factor == 0.9
        dst = Toy(seed=3)
        load_model_state(dst, tensors, "", allow_missing=("autoencoder.",))
        dst.autoencoder.load_ldm_state_dict(ext.state_dict)
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())
    # without allow_missing the absent autoencoder is named
    with pytest.raises(CheckpointError, match="autoencoder.quant_conv.weight: missing"):
        load_model_state(Toy(), tensors, "")
    # an embedded checkpoint needs no VAE
    emb = save_checkpoint(tmp_path / "e.safetensors", _modules(src), tiny())
    assert resolve_external_vae(read_metadata(emb), None) is None


def test_config_differences_are_named():
    a, b = tiny(), tiny()
    b.model.unet.model_channels = 48
    b.model.autoencoder.ch_mult = (1, 2, 4)
    diffs = config_differences(a, b)
    assert "config.model.unet.model_channels: 32 != 48" in diffs
    assert any(d.startswith("config.model.autoencoder.ch_mult") for d in diffs) and len(diffs) == 2


def test_training_state_resume_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    ema = {k: v.clone() for k, v in model.unet.state_dict().items()}

    def step():
        loss = model.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for k, v in model.unet.state_dict().items():
                ema[k].mul_(0.9).add_(v, alpha=0.1)
        random.random(), np.random.rand()  # other RNGs advance too

    model.train()
    for _ in range(3):
        step()
    save_checkpoint(tmp_path / "m.safetensors", _modules(model), tiny())
    save_training_state(tmp_path / "state.safetensors", {"optimizer": opt.state_dict(), "ema": ema,
                                                         "rng": capture_rng_state(), "step": 3})
    for _ in range(3):
        step()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_ema = {k: v.clone() for k, v in ema.items()}
    want_rng = (torch.rand(3), random.random(), np.random.rand())

    # resume in a fresh process-like state
    torch.manual_seed(123), random.seed(5), np.random.seed(5)
    model = Toy(seed=9)
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    tensors, _ = read_checkpoint(tmp_path / "m.safetensors")
    load_model_state(model, tensors, "")
    state = load_training_state(tmp_path / "state.safetensors")
    opt.load_state_dict(state["optimizer"])
    assert opt.param_groups[0]["betas"] == (0.8, 0.95) and opt.param_groups[0]["lr"] == 1e-2
    ema = state["ema"]
    restore_rng_state(state["rng"])
    assert state["step"] == 3
    model.train()
    for _ in range(3):
        step()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(ema[k], want_ema[k]) for k in want_ema)
    got_rng = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got_rng[0], want_rng[0]) and got_rng[1:] == want_rng[1:]


def test_training_state_named_generators_and_refusal(tmp_path):
    g = torch.Generator().manual_seed(42)
    torch.rand(5, generator=g)
    save_training_state(tmp_path / "s.safetensors", {"rng": capture_rng_state({"loader": g}),
                                                     "nested": {3: (1.5, None, [True, "x"])}})
    want = torch.rand(4, generator=g)
    state = load_training_state(tmp_path / "s.safetensors")
    assert state["nested"] == {3: (1.5, None, [True, "x"])}
    g2 = torch.Generator()
    restore_rng_state(state["rng"], {"loader": g2})
    assert torch.equal(torch.rand(4, generator=g2), want)
    ck = save_checkpoint(tmp_path / "m.safetensors", _modules(Toy()), tiny())
    with pytest.raises(CheckpointError, match="not a TalkFormer training-state file"):
        load_training_state(ck)

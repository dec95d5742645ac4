"""AutoencoderKL: LDM key layout, shapes, safetensors loading, hashing, and that it learns."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from talkformer_core.config import AutoencoderConfig
from talkformer_core.errors import CheckpointError
from talkformer_core.config import sd_vae_config
from talkformer_core.models.autoencoder import AutoencoderKL, DiagonalGaussian, group_norm, kl_f4_config
from talkformer_core.models.checkpoint import read_vae_file, state_dict_sha256

ROOT = Path(__file__).resolve().parents[1]
SHARED_LAYOUTS = ROOT.parent / "shared" / "reference" / "autoencoder_key_layouts.json"
PACKAGED_LAYOUTS = ROOT / "talkformer_core" / "models" / "ae_layouts.json"


def _layouts() -> dict:
    path = SHARED_LAYOUTS if SHARED_LAYOUTS.is_file() else PACKAGED_LAYOUTS
    return json.loads(path.read_text())


def _cfg_from_layout(entry: dict) -> AutoencoderConfig:
    c = dict(entry["config"])
    c["ch_mult"] = tuple(c["ch_mult"])
    c["attn_resolutions"] = tuple(c["attn_resolutions"])
    return AutoencoderConfig(**c, embed_dim=entry["embed_dim"], scale_factor=entry.get("scale_factor", 1.0))


def _shapes(m: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in m.state_dict().items()}


def tiny_cfg(f: int = 4, c: int = 3, **kw) -> AutoencoderConfig:
    mult = {4: (1, 2, 2), 8: (1, 2, 2, 2)}[f]
    base = dict(ch=16, ch_mult=mult, num_res_blocks=1, resolution=32, z_channels=c, embed_dim=c)
    base.update(kw)
    return AutoencoderConfig(**base)


@pytest.mark.parametrize("name", ["sd_vae_f8", "ldm_kl_f4"])
def test_keys_and_shapes_equal_reference_layout(name):
    entry = _layouts()[name]
    ref = entry["state_dict_shapes"]
    m = AutoencoderKL(_cfg_from_layout(entry))
    assert _shapes(m) == ref  # same keys, same shapes
    assert list(_shapes(m)) == list(ref)  # and LDM's order
    # the named helpers build the same layouts
    helper = {"sd_vae_f8": sd_vae_config, "ldm_kl_f4": kl_f4_config}[name]()
    assert _shapes(AutoencoderKL(helper)) == ref
    assert m.downsample == {"sd_vae_f8": 8, "ldm_kl_f4": 4}[name]


def test_packaged_layouts_match_shared_copy():
    if not SHARED_LAYOUTS.is_file():
        pytest.skip("../shared/reference absent")
    shared, ours = json.loads(SHARED_LAYOUTS.read_text()), json.loads(PACKAGED_LAYOUTS.read_text())
    for name in ("sd_vae_f8", "ldm_kl_f4"):
        assert ours[name]["state_dict_shapes"] == shared[name]["state_dict_shapes"]
        assert ours[name]["config"] == shared[name]["config"]
    assert sd_vae_config().scale_factor == shared["sd_vae_f8"]["scale_factor"] == 0.18215


@pytest.mark.parametrize("f,c", [(4, 3), (4, 4), (8, 3), (8, 4)])
def test_encode_decode_shapes_and_scaling(f, c):
    torch.manual_seed(0)
    cfg = tiny_cfg(f, c, scale_factor=0.5)
    m = AutoencoderKL(cfg).eval()
    x = torch.rand(2, 3, 32, 24) * 2 - 1  # non-square works too
    with torch.no_grad():
        post = m.encode(x)
        assert post.mean.shape == post.logvar.shape == post.std.shape == (2, c, 32 // f, 24 // f)
        z = m.encode_latent(x)
        assert torch.equal(z, 0.5 * post.mean)  # deterministic latent = scale * mean
        y = m.decode(post.mean)
        assert y.shape == (2, 3, 32, 24)
        assert torch.allclose(m.decode_latent(z), y, atol=1e-6)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        zs1, zs2 = m.encode_latent(x, sample=True, generator=g1), m.encode_latent(x, sample=True, generator=g2)
        assert torch.equal(zs1, zs2) and not torch.equal(zs1, z)
        recon, p2 = m(x, generator=torch.Generator().manual_seed(0))
        assert recon.shape == x.shape and p2.kl().shape == (2,)


def test_diagonal_gaussian():
    B, C = 2, 3
    mean = torch.randn(B, C, 4, 4)
    post = DiagonalGaussian(torch.cat([mean, torch.full_like(mean, 100.0)], 1))
    assert post.logvar.max().item() == 20.0  # clamped as LDM
    post = DiagonalGaussian(torch.cat([mean, torch.full_like(mean, -100.0)], 1))
    assert post.logvar.min().item() == -30.0
    std_normal = DiagonalGaussian(torch.zeros(B, 2 * C, 4, 4))
    assert torch.equal(std_normal.kl(), torch.zeros(B))
    # kl = 0.5 * sum(mu^2) for unit variance
    unit = DiagonalGaussian(torch.cat([mean, torch.zeros_like(mean)], 1))
    assert torch.allclose(unit.kl(), 0.5 * mean.pow(2).sum((1, 2, 3)))
    # sample statistics: N(mean, std^2)
    big = DiagonalGaussian(torch.cat([torch.full((1, 1, 200, 200), 2.0), torch.full((1, 1, 200, 200), 2 * 0.0)], 1))
    s = big.sample(torch.Generator().manual_seed(0))
    assert abs(s.mean().item() - 2.0) < 0.02 and abs(s.std().item() - 1.0) < 0.02


def test_attention_resolutions_and_group_norm_fallback():
    cfg = tiny_cfg(4, 4, attn_resolutions=(16,))
    m = AutoencoderKL(cfg)
    keys = set(m.state_dict())
    # resolution 32 -> level 1 runs at 16: one attention per res block there (encoder 1, decoder 2)
    assert "encoder.down.1.attn.0.q.weight" in keys and "encoder.down.0.attn.0.q.weight" not in keys
    assert {"decoder.up.1.attn.0.proj_out.weight", "decoder.up.1.attn.1.k.bias"} <= keys
    assert "decoder.up.1.attn.2.q.weight" not in keys
    assert m.state_dict()["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    with torch.no_grad():
        assert m(torch.zeros(1, 3, 32, 32))[0].shape == (1, 3, 32, 32)
    assert group_norm(128).num_groups == 32 and group_norm(16).num_groups == 16
    assert group_norm(48).num_groups == 16 and group_norm(48).eps == 1e-6


def test_load_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(4, 3, scale_factor=0.7)
    src = AutoencoderKL(cfg).eval()
    sd = src.state_dict()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want = src(x, sample_posterior=False)[0]
    # 1) bare LDM layout plus LDM's loss.* keys
    bare = dict(sd, **{"loss.logvar": torch.zeros(())})
    save_file(bare, tmp_path / "vae.safetensors")
    # 2) a full LDM/SD checkpoint: first stage under first_stage_model., other modules beside it
    full = {f"first_stage_model.{k}": v for k, v in sd.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 3, 3, 3)
    full["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    full["cond_stage_model.transformer.x"] = torch.zeros(2)
    save_file(full, tmp_path / "model.safetensors")
    for name in ("vae.safetensors", "model.safetensors"):
        m = AutoencoderKL.from_file(tmp_path / name, cfg)
        assert not m.training and m.scale_factor == 0.7
        got = m.state_dict()
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
        with torch.no_grad():
            assert torch.equal(m(x, sample_posterior=False)[0], want)
    # the hash names the weights, not the file layout: both files give the same hash
    assert state_dict_sha256(read_vae_file(tmp_path / "vae.safetensors")) == state_dict_sha256(sd)
    assert state_dict_sha256(read_vae_file(tmp_path / "model.safetensors")) == state_dict_sha256(sd)


def test_two_dimensional_attention_weights_are_accepted():
    cfg = tiny_cfg(4, 3)
    sd = AutoencoderKL(cfg).state_dict()
    flat = {k: (v[:, :, 0, 0] if k.endswith("attn_1.q.weight") else v) for k, v in sd.items()}
    m = AutoencoderKL(cfg)
    m.load_ldm_state_dict(flat)
    assert torch.equal(m.state_dict()["decoder.mid.attn_1.q.weight"], sd["decoder.mid.attn_1.q.weight"])


def test_mismatch_names_every_tensor():
    cfg = tiny_cfg(4, 3)
    sd = dict(AutoencoderKL(cfg).state_dict())
    sd["decoder.conv_in.weight"] = torch.zeros(32, 4, 3, 3)  # 4 latent channels, config says 3
    del sd["encoder.conv_out.bias"]
    sd["encoder.down.0.attn.0.q.weight"] = torch.zeros(16, 16, 1, 1)
    m = AutoencoderKL(cfg)
    with pytest.raises(CheckpointError) as e:
        m.load_ldm_state_dict(sd, source="my_vae.safetensors")
    msg = str(e.value)
    assert "my_vae.safetensors" in msg
    assert "decoder.conv_in.weight: file has (32, 4, 3, 3), this config expects (32, 3, 3, 3)" in msg
    assert "encoder.conv_out.bias: missing" in msg
    assert "encoder.down.0.attn.0.q.weight: unexpected" in msg
    # SD's f8 VAE into the f4 config: a clear error before anything is loaded
    with pytest.raises(CheckpointError, match="decoder.conv_in.weight"):
        AutoencoderKL(kl_f4_config()).load_ldm_state_dict(
            {k: torch.empty(v) for k, v in _layouts()["sd_vae_f8"]["state_dict_shapes"].items()})


def test_pickle_files_refused(tmp_path):
    sd = AutoencoderKL(tiny_cfg(4, 3)).state_dict()
    torch.save(sd, tmp_path / "vae.ckpt")
    torch.save(sd, tmp_path / "vae.pt", _use_new_zipfile_serialization=False)
    for name in ("vae.ckpt", "vae.pt"):
        with pytest.raises(CheckpointError, match="only safetensors checkpoints are read") as e:
            AutoencoderKL.from_file(tmp_path / name, tiny_cfg(4, 3))
        assert name in str(e.value) and "pickle" in str(e.value)
    with pytest.raises(CheckpointError, match="no such"):
        AutoencoderKL.from_file(tmp_path / "absent.safetensors", tiny_cfg(4, 3))
    save_file({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, tmp_path / "diffusers.safetensors")
    with pytest.raises(CheckpointError, match="diffusers"):
        AutoencoderKL.from_file(tmp_path / "diffusers.safetensors", tiny_cfg(4, 3))


def test_state_dict_sha256():
    sd = AutoencoderKL(tiny_cfg(4, 3)).state_dict()
    h = state_dict_sha256(sd)
    assert len(h) == 64 and h == state_dict_sha256(dict(reversed(list(sd.items()))))
    changed = dict(sd)
    changed["quant_conv.bias"] = sd["quant_conv.bias"].clone()
    changed["quant_conv.bias"][0] += 1e-3
    assert state_dict_sha256(changed) != h
    assert state_dict_sha256({k: v.half() for k, v in sd.items()}) != h  # dtype is part of it
    renamed = dict(sd)
    renamed["quant_conv.bias_"] = renamed.pop("quant_conv.bias")
    assert state_dict_sha256(renamed) != h
    reshaped = dict(sd)
    reshaped["quant_conv.weight"] = sd["quant_conv.weight"].reshape(-1)
    assert state_dict_sha256(reshaped) != h


@pytest.mark.skipif(not os.environ.get("LDM_REPO"), reason="set LDM_REPO to a latent-diffusion checkout")
def test_matches_latent_diffusion_numerically():
    sys.path.insert(0, os.environ["LDM_REPO"])
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    torch.manual_seed(0)
    cfg = tiny_cfg(4, 4, ch=32, attn_resolutions=(16,))
    m = AutoencoderKL(cfg).eval()
    kw = dict(ch=32, out_ch=3, ch_mult=cfg.ch_mult, num_res_blocks=1, attn_resolutions=(16,), in_channels=3,
              resolution=32, z_channels=4, double_z=True)
    enc, dec = Encoder(**kw).eval(), Decoder(**kw).eval()
    sd = m.state_dict()
    enc.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("encoder.")})
    dec.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("decoder.")})
    x, z = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(m.encoder(x), enc(x), atol=1e-5)
        assert torch.allclose(m.decoder(z), dec(z), atol=1e-5)


def test_tiny_autoencoder_learns_to_reconstruct():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: threads only contend (10x slower on a loaded 2-core box)
    try:
        cfg = AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, resolution=16, z_channels=4, embed_dim=4)
        m = AutoencoderKL(cfg)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
        x = torch.stack([torch.stack([torch.sin(3 * xx + i), torch.cos(2 * yy - i), torch.tanh(xx * yy * (i + 1))])
                         for i in range(4)])  # (4, 3, 16, 16) smooth images in [-1, 1]
        opt = torch.optim.Adam(m.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(100):
            recon, post = m(x, generator=g)
            mse = (recon - x).pow(2).mean()
            loss = mse + 1e-6 * post.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(mse.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[0] / (sum(losses[-5:]) / 5) > 3.0, (losses[0], losses[-5:])

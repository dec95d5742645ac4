"""Training loop: end-to-end gradient (eq. 6), bit-identical resume, DDP = accumulation,
--init-landmarks, the autoencoder stage's scale factor."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]



def _tensors(path):
    from talkformer_core.models.checkpoint import load_safetensors

    return load_safetensors(path)


@pytest.mark.parametrize("end_to_end", [True, False])
def test_ldm_gradient_reaches_landmark_module_only_end_to_end(shards, ae_file, end_to_end):
    """After the first optimiser step (zero-initialised TalkFormer convs are then non-zero), L_ldm
    alone gives non-zero gradients in the completion module with end_to_end=True, exactly zero without."""
    from talkformer_core.data.dataset import TalkingFaceDataset
    from talkformer_core.models.checkpoint import load_model_state, read_checkpoint
    from talkformer_core.models.model import TalkFormer
    from talkformer_core.train.steps import TalkFormerStep

    cfg = tiny_config(end_to_end=end_to_end)
    torch.manual_seed(0)
    model = TalkFormer(cfg)
    load_model_state(model.autoencoder, read_checkpoint(ae_file)[0], "autoencoder")
    step = TalkFormerStep(model, cfg).train()
    ds = TalkingFaceDataset(shards, cfg)
    batch = torch.utils.data.default_collate([ds[i] for i in (0, 7)])
    params = [p for m in (model.landmark, model.unet, model.appearance) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731

    # at initialisation: the zero output convs block the path, so even end to end it is zero
    model.zero_grad()
    step.losses(batch, g())["ldm"].backward()
    lm0 = [p.grad for p in model.landmark.parameters()]
    assert all(gr is None or gr.abs().max() == 0 for gr in lm0)

    model.zero_grad()
    step.losses(batch, g())["loss"].backward()
    opt.step()
    model.zero_grad()
    step.losses(batch, g())["ldm"].backward()
    grads = [p.grad for p in model.landmark.parameters()]
    total = sum(float(gr.abs().sum()) for gr in grads if gr is not None)
    if end_to_end:
        assert total > 0
        # it reaches the lip and jaw heads, the parts M-Align reads
        assert model.landmark.mouse_keypoint_map.weight.grad.abs().max() > 0
        assert model.landmark.jaw_keypoint_map.weight.grad.abs().max() > 0
    else:
        assert total == 0.0
    # the U-Net itself learns from L_ldm in both cases
    assert sum(float(p.grad.abs().sum()) for p in model.unet.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("balance", [0.0, 1.0])
def test_resume_is_bit_identical(shards, ae_file, tmp_path, balance):
    """6 steps straight == 3 steps + --resume 3 steps: the same losses and parameters (torch.equal),
    with dropout on (landmark module 0.1) and EMA; also with openness-balanced batches."""
    from talkformer_core.train import train

    cfg = tiny_config()
    cfg.train.balance_openness = balance
    kw = dict(stage="talkformer", data=shards, autoencoder=ae_file, batch_size=2, ema=True, progress=False,
              device="cpu", seed=3)
    full = train(cfg, out=tmp_path / "full", steps=6, **kw)
    first = train(cfg, out=tmp_path / "split", steps=3, **kw)
    second = train(cfg, out=tmp_path / "split", steps=6, resume=True, **kw)
    assert first.metrics["loss"] + second.metrics["loss"] == full.metrics["loss"]
    assert len(set(full.metrics["loss"])) == 6
    a, b = _tensors(full.checkpoint), _tensors(second.checkpoint)
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the CSV log of the resumed run is the uninterrupted run's
    assert (tmp_path / "full" / "log.csv").read_text().splitlines()[1:] == \
        [ln for ln in (tmp_path / "split" / "log.csv").read_text().splitlines()[1:]]


def test_balance_weights_flatten_a_skewed_opening_distribution():
    """balance_weights(power 1) makes each histogram bin equally likely; power 0.5 halves the skew in
    log terms; a lone outlier is not drawn as often as a whole bin; no face (nan) gets the mean weight; the weighted sampler stays a pure function of
    (seed, step) and draws in proportion to the weights."""
    from talkformer_core.train.batching import StepBatchSampler, balance_weights

    rng = np.random.default_rng(0)
    v = np.concatenate([[0.0], rng.uniform(0.0, 0.09, 899), rng.uniform(0.71, 0.8, 99), [0.8], [np.nan]])  # 9:1
    lone = balance_weights(np.append(v[:-1], 0.4), 1.0)  # one frame alone in its bin: weighted as 5 %
    assert np.isclose(lone[-1] / lone[0], (900 / 1001) / 0.05)
    assert balance_weights(v, 0.0) is None
    w = balance_weights(v, 1.0)
    assert w.shape == v.shape and np.isclose(w.mean(), 1.0) and np.isclose(w[-1], w[:-1].mean())
    open_share = w[900:1000].sum() / w[:1000].sum()
    assert abs(open_share - 0.5) < 1e-9  # two occupied bins, equal mass
    w_half = balance_weights(v, 0.5)
    assert abs(w_half[900:1000].sum() / w_half[:1000].sum() - 0.25) < 1e-9  # 9:1 -> 3:1
    s1 = StepBatchSampler(len(v), 8, seed=5, total_steps=400, weights=w)
    s2 = StepBatchSampler(len(v), 8, seed=5, start_step=200, total_steps=400, weights=w)
    assert s1.micro_batches(250) == s2.micro_batches(250)
    drawn = np.array([i for s in range(400) for mb in s1.micro_batches(s) for i, _ in mb])
    share = np.isin(drawn, np.arange(900, 1000)).mean()
    assert 0.45 < share < 0.55, share  # uniform draws give 0.1
    with pytest.raises(Exception, match="sampler weights"):
        StepBatchSampler(3, 2, weights=np.array([1.0, -1.0, 1.0]))


def test_dataset_openness_is_the_middle_frames_lip_opening(shards):
    from talkformer_core.data.dataset import FrameDataset, TalkingFaceDataset
    from talkformer_core.face import topology

    cfg = tiny_config()
    ds = TalkingFaceDataset(shards, cfg)
    o = ds.openness()
    assert o.shape == (len(ds),) and np.all(np.isfinite(o)) and np.ptp(o) > 0
    item = ds[3]
    mid = item["target_box"][ds.L // 2].double().numpy()
    assert np.isclose(o[3], topology.lip_openness(mid))
    fd = FrameDataset(shards, cfg)
    fo = fd.openness()
    assert fo.shape == (len(fd),)
    it = fd[5]
    if bool(it["found"]):
        assert np.isclose(fo[5], topology.lip_openness(it["landmarks"].double().numpy()))


def test_ddp_two_processes_equal_gradient_accumulation(shards, ae_file, tmp_path):
    """torchrun, 2 CPU processes (gloo), dropout off: after 3 steps the parameters equal those of
    one process accumulating over the same two half-batches; BatchNorm running
    statistics are per process and not compared."""
    from talkformer_core.train import train

    cfg = tiny_config()
    cfg.model.landmark.dropout = 0.0
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.to_json())
    common = ["--stage", "talkformer", "--data", str(shards), "--config", str(cfg_file), "--autoencoder",
              str(ae_file), "--steps", "3", "--batch-size", "2", "--seed", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "talkformer_core.train", *common, "--out", str(tmp_path / "ddp")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # one thread as in each torchrun process: the same float summation order (Adam divides by
    # sqrt(v), so last-bit differences in near-zero gradients would grow to ~lr otherwise)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(cfg, stage="talkformer", data=shards, out=tmp_path / "one", steps=3, batch_size=2,
                       grad_accum=2, autoencoder=ae_file, seed=1, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b = _tensors(tmp_path / "ddp" / "last.safetensors"), _tensors(single.checkpoint)
    params = [k for k in a if not ("running_" in k or "num_batches_tracked" in k)]
    assert len(params) > 100
    worst = max(float((a[k] - b[k]).abs().max()) for k in params)
    assert worst < 1e-6, worst  # measured: 0.0 (bit-identical)
    # and the runs did train (parameters differ from a different seed's run by far more)
    other = train(cfg, stage="talkformer", data=shards, out=tmp_path / "other", steps=3, batch_size=2,
                  grad_accum=2, autoencoder=ae_file, seed=2, device="cpu", progress=False)
    c = _tensors(other.checkpoint)
    assert max(float((a[k] - c[k]).abs().max()) for k in params) > 1e-4


def test_init_landmarks_from_iplap_checkpoint(shards, ae_file, tmp_path):
    from talkformer_core.models.checkpoint import save_checkpoint
    from talkformer_core.models.landmark_completion import LandmarkCompletion
    from talkformer_core.train import train

    cfg = tiny_config()
    torch.manual_seed(42)
    src = LandmarkCompletion(cfg.model.landmark)
    ip = save_checkpoint(tmp_path / "iplap.safetensors", {"landmark": src}, {"landmark_generator": {}}, kind="iplap")
    res = train(cfg, stage="talkformer", data=shards, out=tmp_path / "run", steps=1, lr=1e-12,
                autoencoder=ae_file, init_landmarks=ip, progress=False, device="cpu")
    got = _tensors(res.checkpoint)
    for k, v in src.state_dict().items():
        if "running_" in k or "num_batches" in k:
            continue
        assert torch.allclose(got[f"landmark.{k}"], v, atol=1e-6), k
    # a file without landmark tensors is refused with its name
    from talkformer_core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="ae.safetensors"):
        train(cfg, stage="talkformer", data=shards, out=tmp_path / "bad", steps=1, autoencoder=ae_file,
              init_landmarks=ae_file, progress=False, device="cpu")


def test_autoencoder_stage_scale_factor_and_use(shards, tmp_path):
    from talkformer_core.models.checkpoint import checkpoint_config, read_checkpoint
    from talkformer_core.train import train

    cfg = tiny_config()
    res = train(cfg, stage="autoencoder", data=shards, out=tmp_path / "ae", steps=3, batch_size=4,
                progress=False, device="cpu", preview_every=3)
    tensors, meta = read_checkpoint(res.checkpoint)
    sf = checkpoint_config(meta).model.autoencoder.scale_factor
    assert sf == res.metrics["scale_factor"] and sf != 1.0 and np.isfinite(sf)
    assert (tmp_path / "ae" / "previews" / "step_0000003.png").exists()
    # its latents, scaled, have unit std (LDM's rule) on the training crops
    from talkformer_core.data.dataset import FrameDataset
    from talkformer_core.models.autoencoder import AutoencoderKL
    from talkformer_core.models.checkpoint import load_model_state

    ae = AutoencoderKL(checkpoint_config(meta).model.autoencoder)
    load_model_state(ae, tensors, "autoencoder")
    x = torch.stack([FrameDataset(shards, cfg)[i]["crops"] for i in range(0, 80, 2)])
    with torch.no_grad():
        post = ae.encode(x)
        z = sf * (post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(0)))
    assert 0.8 < float(z.std()) < 1.25
    # and the talkformer stage takes it, with a preview grid
    res2 = train(cfg, stage="talkformer", data=shards, out=tmp_path / "tf", steps=2, batch_size=2,
                 autoencoder=res.checkpoint, progress=False, device="cpu", preview_every=2, preview_steps=3)
    assert checkpoint_config(read_checkpoint(res2.checkpoint)[1]).model.autoencoder.scale_factor == sf
    assert (tmp_path / "tf" / "previews" / "step_0000002.png").exists()
    rows = (tmp_path / "tf" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,ldm,l1") and len(rows) == 3
    assert any((tmp_path / "tf" / "tb").iterdir())


@pytest.mark.parametrize("turn,yaw", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.1)])
def test_latent_cache_gives_the_losses_and_gradients_of_encoding_every_step(shards, ae_file, turn, yaw):
    """LatentCache (stage talkformer) holds E(crop) and E(masked crop) of every training frame (and,
    with the turn augmentation, E(turned crop) per level; with the yaw augmentation both latents of
    the yawed crop per level); a step reading it computes the same losses and gradients as a step
    encoding its images."""
    from talkformer_core.data.dataset import TalkingFaceDataset
    from talkformer_core.models.checkpoint import load_model_state, read_checkpoint
    from talkformer_core.models.model import TalkFormer
    from talkformer_core.train.latents import LatentCache
    from talkformer_core.train.steps import TalkFormerStep

    from talkformer_core.train.augment import turn_levels, turn_lower_face, yaw_face

    cfg = tiny_config(end_to_end=True)
    cfg.train.turn_augment = turn
    cfg.train.yaw_augment = yaw
    torch.manual_seed(0)
    model = TalkFormer(cfg).eval()
    load_model_state(model.autoencoder, read_checkpoint(ae_file)[0], "autoencoder")
    ds = TalkingFaceDataset(shards, cfg, frames=(0.0, 0.8))
    turns = turn_levels(turn, cfg.model.image_size) if turn else []
    yaws = turn_levels(yaw, cfg.model.image_size) if yaw else []
    cache = LatentCache(model, ds, torch.device("cpu"), batch=7, turns=turns, yaws=yaws)  # 7 splits clips unevenly
    assert len(cache.z) == len(ds.clips) == 2
    for ci, clip in enumerate(ds.clips):
        assert cache.z[ci].shape[0] == clip.hi - clip.lo
    levels = len(turns) + 2 * len(yaws)
    assert LatentCache.estimate_bytes(model, ds, levels) == sum((2 + levels) * z.numel() * 4 for z in cache.z)
    if yaw:
        i = 0  # the most negative level
        b0 = torch.utils.data.default_collate([ds[(2, 3)]])
        with torch.no_grad():
            z_y, ctx_y, _ = cache.lookup(b0, yaw=[i])
            x = yaw_face(b0["crops"].flatten(0, 1), torch.full((b0["crops"].shape[1],), yaws[i]))
            assert torch.allclose(z_y, model.encode(x), atol=1e-5)
            assert torch.allclose(ctx_y, model.encode_masked(x), atol=1e-5)
            assert not torch.allclose(ctx_y, cache.lookup(b0)[1], atol=1e-3)  # the context turned too
    if turn:
        assert len(turns) >= 5 and 0.0 in turns
        i = len(turns) - 1
        b0 = torch.utils.data.default_collate([ds[(2, 3)]])
        with torch.no_grad():
            z_t, _, _ = cache.lookup(b0, [i])
            x = b0["crops"].flatten(0, 1)
            assert torch.allclose(z_t, model.encode(turn_lower_face(x, torch.full((len(x),), turns[i]))), atol=1e-5)
            assert not torch.allclose(z_t, model.encode(x), atol=1e-3)  # the level is not the plain crop
            assert torch.equal(cache.lookup(b0, [turns.index(0.0)])[0], cache.lookup(b0)[0])

    batch = torch.utils.data.default_collate([ds[(i, 3)] for i in (0, 5, len(ds) - 1)])
    with torch.no_grad():
        z0, ctx, z_r = cache.lookup(batch)
        assert torch.allclose(z0, model.encode(batch["crops"].flatten(0, 1)), atol=1e-5)
        assert torch.allclose(ctx, model.encode(batch["masked"].flatten(0, 1)), atol=1e-5)
        assert torch.allclose(z_r, model.encode(batch["reference"]), atol=1e-5)
    out = []
    for latents in (None, cache):
        step = TalkFormerStep(model, cfg, latents=latents).train()
        model.zero_grad()
        torch.manual_seed(11)  # dropout draws from the global RNG
        parts = step.losses(batch, torch.Generator().manual_seed(3))
        parts["loss"].backward()
        grads = torch.cat([p.grad.flatten() for p in model.unet.parameters() if p.grad is not None])
        out.append((float(parts["ldm"].detach()), float(parts["l1"].detach()), grads))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-4) and out[0][1] == out[1][1]
    assert torch.allclose(out[0][2], out[1][2], rtol=1e-3, atol=1e-6)


def test_ema_warm_up_forgets_the_initial_weights_of_a_short_run():
    """EMA.update(step) uses min(decay, (1 + step) / (10 + step)): after 150 steps of fixed weights
    the shadow holds what prod(decays) predicts, and far less of the initialisation than the plain
    decay would (0.995 ** 150 = 47 %)."""
    from talkformer_core.train.ema import EMA

    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.zero_()
    ema = EMA({"m": lin}, 0.995)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    keep = 1.0
    for step in range(1, 151):
        ema.update(step)
        keep *= ema.decay_at(step)
    assert ema.decay_at(10_000) == 0.995 and ema.decay_at(1) == pytest.approx(2 / 11)
    got = ema.state_dict()["m.weight"]
    assert torch.allclose(got, torch.full_like(got, 1.0 - keep), atol=1e-5)
    assert keep < 0.05 < 0.995 ** 150


def test_mouth_weight_covers_the_lips_box():
    from talkformer_core.face.topology import LIP_POS
    from talkformer_core.train.steps import mouth_weight

    lm = torch.full((2, 131, 2), 0.3)
    lips = list(LIP_POS)
    lm[0, lips] = torch.tensor([[0.40, 0.70], [0.55, 0.78]]).repeat(20, 1)  # x in [0.40, 0.55], y in [0.70, 0.78]
    lm[1, lips] = torch.tensor([[0.10, 0.55], [0.20, 0.60]]).repeat(20, 1)
    w = mouth_weight(lm, (16, 16), 5.0)
    assert w.shape == (2, 1, 16, 16) and set(w.unique().tolist()) == {1.0, 5.0}
    c = (torch.arange(16) + 0.5) / 16
    for n, (x0, x1, y0, y1) in enumerate([(0.40, 0.55, 0.70, 0.78), (0.10, 0.20, 0.55, 0.60)]):
        inside = ((c[:, None] >= y0 - 1 / 16) & (c[:, None] <= y1 + 1 / 16)
                  & (c[None] >= x0 - 1 / 16) & (c[None] <= x1 + 1 / 16))
        assert torch.equal(w[n, 0] == 5.0, inside)
        assert inside.sum() >= 4  # the box and one cell around it
    assert torch.equal(mouth_weight(lm, (16, 16), 1.0), torch.ones(2, 1, 16, 16))


def test_autoencoder_mouth_weight_is_a_weighted_l1_on_the_lips_box(shards):
    """TrainConfig.autoencoder_mouth_weight: the autoencoder stage's L1 becomes the weighted mean of
    |rec - x| with weight w on the lips' box (grown by S/16 pixels) of each found frame, 1 elsewhere;
    frames without a face and w = 1 give the plain L1."""
    from talkformer_core.data.dataset import FrameDataset
    from talkformer_core.models.autoencoder import AutoencoderKL
    from talkformer_core.train.steps import AutoencoderStep, mouth_weight

    cfg = tiny_config()
    torch.manual_seed(0)
    ae = AutoencoderKL(cfg.model.autoencoder)
    ds = FrameDataset(shards, cfg)
    batch = torch.utils.data.default_collate([ds[i] for i in (0, 5, 11, 17)])
    x, S = batch["crops"], cfg.model.image_size
    assert batch["landmarks"].shape == (4, 131, 2) and batch["found"].all()

    def l1(w: float, found: bool = True) -> float:
        cfg.train.autoencoder_mouth_weight = w
        b = dict(batch, found=torch.full((4,), found))
        with torch.no_grad():
            return float(AutoencoderStep(ae, cfg)(b, torch.Generator().manual_seed(3))[1]["l1"])

    with torch.no_grad():  # the step's reconstruction, redrawn with the same generator
        post = ae.encode(x)
        eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3))
        err = (ae.decode(post.mean + post.std * eps) - x).abs()  # (4, 3, S, S)
    wmap = mouth_weight(batch["landmarks"], (S, S), 6.0, grow=S // 16)
    assert 0.02 < float((wmap > 1).float().mean()) < 0.5  # the lips' box: a part of the crop
    want = float((err * wmap).sum() / (wmap.sum() * 3))
    assert l1(6.0) == pytest.approx(want, rel=1e-5)
    assert l1(1.0) == pytest.approx(float(err.mean()), rel=1e-5)
    assert l1(6.0, found=False) == pytest.approx(float(err.mean()), rel=1e-5)
    assert abs(l1(6.0) - l1(1.0)) > 1e-4  # the box's error differs from the rest's: the weight counts


def test_shift_columns_moves_latents_by_whole_cells():
    from talkformer_core.train.steps import shift_columns

    z = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    out, valid = shift_columns(z, torch.tensor([2, -1]))
    assert torch.equal(out[0, :, :, 2:], z[0, :, :, :4]) and torch.equal(out[0, :, :, :2], z[0, :, :, :1].expand(3, 4, 2))
    assert torch.equal(out[1, :, :, :5], z[1, :, :, 1:]) and torch.equal(out[1, :, :, 5], z[1, :, :, 5])
    assert valid.shape == (2, 1, 1, 6)
    assert valid[0].flatten().tolist() == [False, False, True, True, True, True]
    assert valid[1].flatten().tolist() == [True] * 5 + [False]
    same, v0 = shift_columns(z, torch.zeros(2, dtype=torch.long))
    assert torch.equal(same, z) and v0.all()


def _spied_step(shards, ae_file, **train):
    """A tiny w/o-End2End TalkFormerStep with ``train`` set on its TrainConfig, a batch of 4 windows,
    and the dict its U-Net's inputs land in (z_t, lms) on each call."""
    from talkformer_core.data.dataset import TalkingFaceDataset
    from talkformer_core.models.checkpoint import load_model_state, read_checkpoint
    from talkformer_core.models.model import TalkFormer
    from talkformer_core.train.steps import TalkFormerStep

    cfg = tiny_config(end_to_end=False)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    torch.manual_seed(0)
    model = TalkFormer(cfg).eval()
    load_model_state(model.autoencoder, read_checkpoint(ae_file)[0], "autoencoder")
    ds = TalkingFaceDataset(shards, cfg)
    batch = torch.utils.data.default_collate([ds[i] for i in (0, 3, 9, 12)])
    seen = {}
    unet_forward = model.unet.forward

    def spy(z_t, t, lms, ref, num_frames):
        seen.update(z_t=z_t.detach(), lms=lms.detach())
        return unet_forward(z_t, t, lms, ref, num_frames=num_frames)

    model.unet.forward = spy
    return TalkFormerStep(model, cfg), batch, seen


def test_shift_augment_moves_latents_context_and_landmarks_together(shards, ae_file):
    """TrainConfig.shift_augment: per window one whole-cell shift k; the U-Net sees the context
    shifted by k cells and every landmark's x moved by k / w (the same crop-frame distance), the
    window's L frames share k, and k spans [-K, K] over draws."""
    from talkformer_core.train.steps import shift_columns

    step, batch, seen = _spied_step(shards, ae_file, shift_augment=1)
    B, L = batch["crops"].shape[:2]
    with torch.no_grad():
        ctx = step.model.encode(batch["masked"].flatten(0, 1))  # (B*L, C, h, w)
    lm = batch["target_crop"].flatten(0, 1)  # (B*L, 131, 2)
    w = ctx.shape[-1]
    shifts = set()
    for seed in range(6):
        with torch.no_grad():
            step.losses(batch, torch.Generator().manual_seed(seed))
        dx = (seen["lms"] - lm)[..., 0]  # (B*L, 131)
        assert torch.allclose(seen["lms"][..., 1], lm[..., 1])
        k = torch.round(dx[:, 0] * w).long()  # (B*L,)
        assert torch.allclose(dx, (k.float() / w)[:, None].expand_as(dx), atol=1e-6)
        assert (k.view(B, L) == k.view(B, L)[:, :1]).all()  # one shift per window
        assert k.abs().max() <= 1
        h = ctx.shape[2]
        shifted, _ = shift_columns(ctx, k)
        assert torch.allclose(seen["z_t"][:, :, : h // 2], shifted[:, :, : h // 2], atol=1e-5)
        shifts.update(k.tolist())
    assert shifts == {-1, 0, 1}


def test_turn_lower_face_moves_pixels_and_landmarks_alike():
    """train.augment: the upper half (the masked context's visible part) is untouched; from the lips'
    rows down the content moves by the level's whole pixels; in between by the ramp; a landmark moves
    where its pixel went. The levels are whole pixels, symmetric, at most MAX_LEVELS."""
    from talkformer_core.train.augment import MAX_LEVELS, ramp, turn_landmarks, turn_levels, turn_lower_face

    S = 64
    assert turn_levels(0.0, S) == [0.0]
    lv = turn_levels(1 / 16, S)
    assert [round(v * S) for v in lv] == list(range(-4, 5))
    big = turn_levels(0.08, 256)
    assert len(big) <= MAX_LEVELS and big == [-v for v in big[::-1]] and all(float(v * 256).is_integer() for v in big)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, S, S, generator=g)
    s = torch.tensor([3 / S, -2 / S])
    out = turn_lower_face(img, s)
    assert torch.allclose(out[:, :, : S // 2], img[:, :, : S // 2], atol=1e-5)
    rows = slice(int(0.66 * S), S)  # ramp 1
    assert torch.allclose(out[0, :, rows, 3:], img[0, :, rows, :-3], atol=1e-5)
    assert torch.allclose(out[1, :, rows, :-2], img[1, :, rows, 2:], atol=1e-5)
    # one bright dot per ramp row: its centre of mass lands where turn_landmarks puts the point
    for y in (35, 37, 39, 41, 50):
        dot = torch.zeros(1, 1, S, S)
        dot[0, 0, y, 30] = 1.0
        moved = turn_lower_face(dot, torch.tensor([4 / S]))[0, 0, y]
        got_x = float((moved * (torch.arange(S) + 0.5)).sum() / moved.sum()) / S
        p = torch.tensor([[[30.5 / S, (y + 0.5) / S]]])
        want = turn_landmarks(p, torch.tensor([4 / S]))
        assert got_x == pytest.approx(float(want[0, 0, 0]), abs=1e-4)
        assert float(want[0, 0, 1]) == float(p[0, 0, 1])
        assert float(ramp(torch.tensor((y + 0.5) / S))) * 4 == pytest.approx((got_x * S - 30.5), abs=1e-3)


def test_turn_augment_turns_each_window_and_its_landmarks_together(shards, ae_file):
    """TrainConfig.turn_augment: per window one level; the U-Net sees every landmark moved by
    level * ramp(y) and its context unchanged; over draws the levels span both directions."""
    from talkformer_core.train.augment import ramp

    step, batch, seen = _spied_step(shards, ae_file, turn_augment=0.1)
    B, L = batch["crops"].shape[:2]
    S = step.cfg.model.image_size
    with torch.no_grad():
        ctx = step.model.encode(batch["masked"].flatten(0, 1))  # (B*L, C, h, w)
    h = ctx.shape[2]
    lm = batch["target_crop"].flatten(0, 1)  # (B*L, 131, 2)
    r = ramp(lm[..., 1])
    top = r.argmax(1)  # per frame the point lowest on the ramp
    assert (r.amax(1) > 0.5).all() and (r == 0).any(1).all()
    levels = set()
    for seed in range(8):
        with torch.no_grad():
            step.losses(batch, torch.Generator().manual_seed(seed))
        dx = (seen["lms"] - lm)[..., 0]  # (B*L, 131)
        rows = torch.arange(B * L)
        s = dx[rows, top] / r[rows, top]  # (B*L,) the level
        assert torch.allclose(dx, s[:, None] * r, atol=1e-6)  # level * ramp(y), upper face still
        assert torch.allclose(seen["lms"][..., 1], lm[..., 1])
        assert torch.allclose(seen["z_t"][:, :, : h // 2], ctx[:, :, : h // 2], atol=1e-5)  # context unturned
        px = torch.round(s * S)
        assert torch.allclose(s * S, px, atol=1e-4)  # whole pixels at the lips
        assert (px.view(B, L) == px.view(B, L)[:, :1]).all()  # one level per window
        levels.update(px.tolist())
    assert min(levels) < 0 < max(levels)


def test_context_noise_noises_each_windows_context_alone(shards, ae_file):
    """TrainConfig.context_noise: the U-Net's known context is E(masked crop) plus noise whose std is
    one draw in [0, scale] per window (its frames share it); the noised lower half, the landmarks and
    the target are untouched; off, a step's inputs are those of a config without the option."""
    scale = 0.8
    step, batch, seen = _spied_step(shards, ae_file, context_noise=scale)
    B, L = batch["crops"].shape[:2]
    with torch.no_grad():
        ctx = step.model.encode(batch["masked"].flatten(0, 1))  # (B*L, C, h, w)
    h = ctx.shape[2]
    stds = []
    for seed in range(6):
        with torch.no_grad():
            step.losses(batch, torch.Generator().manual_seed(seed))
        d = (seen["z_t"] - ctx)[:, :, : h // 2]  # the context's added noise
        std = d.flatten(1).std(1).view(B, L)  # per frame
        assert (std > 0).all() and (std < scale * 1.3).all()
        assert torch.allclose(std, std[:, :1].expand(B, L), rtol=0.35)  # one level per window
        assert torch.allclose(seen["lms"], batch["target_crop"].flatten(0, 1))
        stds += std[:, 0].tolist()
    assert max(stds) > 0.4 * scale and min(stds) < 0.6 * scale  # the level is drawn, not fixed
    # off: the same inputs as a step without the option (its random stream unchanged)
    outs = []
    for kw in ({}, {"context_noise": 0.0}):
        off, batch_off, seen_off = _spied_step(shards, ae_file, **kw)
        with torch.no_grad():
            loss = off.losses(batch_off, torch.Generator().manual_seed(5))["ldm"]
        outs.append((seen_off["z_t"], float(loss)))
        assert torch.allclose(seen_off["z_t"][:, :, : h // 2], ctx[:, :, : h // 2], atol=1e-5)
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]


def test_interrupt_inside_a_step_saves_nothing_of_it(shards, ae_file, tmp_path, monkeypatch):
    """Ctrl-C inside step 4 (after the landmark module's forward updated its BatchNorm statistics
    and drew dropout masks): the saved state is exactly the 3-step state, buffers included, and
    --resume then ends bit-identical to an uninterrupted run (every tensor, torch.equal)."""
    import talkformer_core.diffusion as diffusion
    from talkformer_core.train import train

    cfg = tiny_config()
    kw = dict(stage="talkformer", data=shards, autoencoder=ae_file, batch_size=2, ema=True, progress=False,
              device="cpu", seed=3)
    three = train(cfg, out=tmp_path / "three", steps=3, **kw)
    full = train(cfg, out=tmp_path / "full", steps=6, **kw)

    real, calls = diffusion.ldm_loss, []

    def interrupted_at_step_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # stage 1 of step 4 already ran (BatchNorm buffers, dropout RNG)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(diffusion, "ldm_loss", interrupted_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=tmp_path / "split", steps=6, **kw)
    monkeypatch.setattr(diffusion, "ldm_loss", real)
    saved, ref = _tensors(tmp_path / "split" / "last.safetensors"), _tensors(three.checkpoint)
    bn = [k for k in saved if "running_mean" in k or "num_batches_tracked" in k]
    assert bn, "the tiny landmark module has BatchNorm buffers"
    assert saved.keys() == ref.keys()
    for k in saved:
        assert torch.equal(saved[k], ref[k]), k
    resumed = train(cfg, out=tmp_path / "split", steps=6, resume=True, **kw)
    assert resumed.metrics["loss"] == full.metrics["loss"][3:]
    a, b = _tensors(full.checkpoint), _tensors(resumed.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_cli_ctrl_c_exits_130_with_one_line(shards, tmp_path):
    """SIGINT to a running ``python -m talkformer_core.train``: exit status 130, one line on
    stderr, no traceback, and a resumable checkpoint of a finished step."""
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "talkformer_core.train", "--stage", "autoencoder", "--data",
                          str(shards), "--preset", "tiny", "--out", str(out), "--steps", "100000",
                          "--batch-size", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # SIG_DFL in the child: a pytest started with SIGINT ignored (`nohup cmd &`) would pass that on
    try:
        for _ in range(600):  # wait (for synchronisation only) until a few steps are logged
            if (out / "log.csv").exists() and len((out / "log.csv").read_text().splitlines()) > 3:
                break
            if p.poll() is not None:
                break
            time.sleep(0.5)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "interrupted" in ln]
    assert len(lines) == 1 and "--resume" in lines[0], err
    from talkformer_core.models.checkpoint import read_metadata

    step = json.loads(read_metadata(out / "last.safetensors")["training_state"])["step"]
    assert step >= 3


def test_yaw_augment_moves_context_target_and_landmarks_together(shards, ae_file):
    """TrainConfig.yaw_augment: per window one level s; the U-Net sees every landmark at
    x + s * yaw_profile(x) and the context E(masked crop yawed by s) (the upper face turns too);
    the levels span both directions; turn and yaw together are refused."""
    from talkformer_core.models.model import TalkFormer  # noqa: F401 (the spied step builds it)
    from talkformer_core.train.augment import yaw_face, yaw_profile
    from talkformer_core.train.steps import TalkFormerStep

    step, batch, seen = _spied_step(shards, ae_file, yaw_augment=0.1)
    B, L = batch["crops"].shape[:2]
    S = step.cfg.model.image_size
    lm = batch["target_crop"].flatten(0, 1)  # (B*L, 131, 2)
    w = yaw_profile(lm[..., 0])
    top = w.argmax(1)
    assert (w.amax(1) > 0.8).all()
    x = batch["crops"].flatten(0, 1)
    levels = set()
    for seed in range(8):
        with torch.no_grad():
            step.losses(batch, torch.Generator().manual_seed(seed))
        dx = (seen["lms"] - lm)[..., 0]
        rows = torch.arange(B * L)
        s = dx[rows, top] / w[rows, top]  # (B*L,)
        assert torch.allclose(dx, s[:, None] * w, atol=1e-6)
        assert torch.allclose(seen["lms"][..., 1], lm[..., 1])
        px = torch.round(s * S)
        assert torch.allclose(s * S, px, atol=1e-4) and (px.view(B, L) == px.view(B, L)[:, :1]).all()
        h = seen["z_t"].shape[2]
        with torch.no_grad():
            ctx = step.model.encode_masked(yaw_face(x, s))
        assert torch.allclose(seen["z_t"][:, :, : h // 2], ctx[:, :, : h // 2], atol=1e-4)
        levels.update(px.tolist())
    assert min(levels) < 0 < max(levels)
    step.cfg.train.turn_augment = 0.1
    with pytest.raises(ValueError, match="exclusive"):
        TalkFormerStep(step.model, step.cfg)


def test_yaw_face_moves_pixels_as_yaw_landmarks_moves_points():
    """A small bright blob drawn at a point lands where yaw_landmarks moves the point (its centroid,
    within 0.25 px); columns outside the bump are unchanged; s = 0 is the identity."""
    from talkformer_core.train.augment import YAW_HALF_WIDTH, yaw_face, yaw_landmarks

    S = 64
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    for x0, y0, spx in ((0.42, 0.3, 4), (0.55, 0.7, -4), (0.35, 0.5, 3)):
        img = torch.exp(-((xx - x0 * S) ** 2 + (yy - y0 * S) ** 2) / (2 * 1.5 ** 2))[None, None]
        s = torch.tensor([spx / S])
        out = yaw_face(img, s)[0, 0]
        got = float((out * xx).sum() / out.sum()) / S
        want = float(yaw_landmarks(torch.tensor([[[x0, y0]]]), s)[0, 0, 0])
        assert got == pytest.approx(want, abs=0.25 / S), (x0, spx)  # the stretch skews a blob a little
        assert abs(want - x0) > 1 / S  # it moved
    noise = torch.rand(2, 3, S, S)
    out = yaw_face(noise, torch.tensor([4 / S, -4 / S]))
    edge = int((0.5 - YAW_HALF_WIDTH) * S) - 1
    assert torch.allclose(out[..., :edge], noise[..., :edge]) and torch.allclose(out[..., -edge:], noise[..., -edge:])
    assert torch.allclose(yaw_face(noise, torch.zeros(2)), noise, atol=1e-6)


def test_similarity_warp_moves_pixels_as_warp_points_moves_points():
    """train.augment.similarity_thetas / warp_images / warp_points: a small blob drawn at a point lands
    where warp_points moves the point (its centroid, within 0.15 px); each draw stays inside its
    bounds (shift, scale, rotation); the same generator seed gives the same draws; amount 0 is the
    identity."""
    from talkformer_core.train.augment import similarity_thetas, warp_images, warp_points

    S, amount = 64, 0.08
    th = similarity_thetas(64, amount, torch.Generator().manual_seed(1))
    assert th.shape == (64, 2, 3)
    assert torch.equal(th, similarity_thetas(64, amount, torch.Generator().manual_seed(1)))
    A = th[:, :, :2]
    scale = 1 / torch.sqrt(torch.linalg.det(A))  # theta maps output -> input: its A is R / scale
    ang = torch.atan2(A[:, 1, 0], A[:, 0, 0])
    assert float((scale - 1).abs().max()) <= amount + 1e-6 and float(ang.abs().max()) <= amount + 1e-6
    assert float(th[:, :, 2].abs().max()) <= 2 * amount + 1e-6
    assert float((scale - 1).abs().max()) > amount / 2 and float(th[:, :, 2].abs().max()) > amount  # not all near 0
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    pts = torch.tensor([[0.42, 0.35], [0.55, 0.68], [0.5, 0.5]])
    for i in range(6):
        for x0, y0 in pts.tolist():
            img = torch.exp(-((xx - x0 * S) ** 2 + (yy - y0 * S) ** 2) / (2 * 1.5 ** 2))[None, None]
            out = warp_images(img, th[i:i + 1])[0, 0]
            got = torch.stack([(out * xx).sum(), (out * yy).sum()]) / out.sum() / S
            want = warp_points(torch.tensor([[[x0, y0]]]), th[i:i + 1])[0, 0]
            assert torch.allclose(got, want, atol=0.15 / S), (i, x0, y0, got, want)
    moved = warp_points(pts[None].expand(6, -1, -1), th[:6])
    assert float((moved - pts).abs().max()) > 1 / S  # they moved
    noise = torch.rand(2, 3, S, S)
    ident = similarity_thetas(2, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(warp_images(noise, ident), noise, atol=1e-5)
    assert torch.allclose(warp_points(pts[None].expand(2, -1, -1), ident), pts[None].expand(2, -1, -1), atol=1e-6)


def test_autoencoder_warp_trains_on_warped_crops_with_the_lips_box_moved_along(shards):
    """TrainConfig.autoencoder_warp: the autoencoder stage encodes and reconstructs each crop warped by
    its draw from the step's generator (the loss equals the one computed by hand on warp_images of the
    crops, the mouth weight on warp_points of the landmarks); 0 leaves the step as it was."""
    from talkformer_core.data.dataset import FrameDataset
    from talkformer_core.models.autoencoder import AutoencoderKL
    from talkformer_core.train.augment import similarity_thetas, warp_images, warp_points
    from talkformer_core.train.steps import AutoencoderStep, mouth_weight

    cfg = tiny_config()
    cfg.train.autoencoder_mouth_weight = 6.0
    torch.manual_seed(0)
    ae = AutoencoderKL(cfg.model.autoencoder)
    ds = FrameDataset(shards, cfg)
    batch = torch.utils.data.default_collate([ds[i] for i in (0, 5, 11, 17)])
    S = cfg.model.image_size

    def step_l1(warp: float) -> float:
        cfg.train.autoencoder_warp = warp
        with torch.no_grad():
            return float(AutoencoderStep(ae, cfg)(batch, torch.Generator().manual_seed(3))[1]["l1"])

    def by_hand(x: torch.Tensor, lms: torch.Tensor, g: torch.Generator) -> float:
        with torch.no_grad():
            post = ae.encode(x)
            eps = torch.randn(post.mean.shape, generator=g)
            err = (ae.decode(post.mean + post.std * eps) - x).abs()
        wmap = mouth_weight(lms, (S, S), 6.0, grow=S // 16)
        return float((err * wmap).sum() / (wmap.sum() * 3))

    g = torch.Generator().manual_seed(3)
    th = similarity_thetas(4, 0.1, g)  # the step draws the warp first, then the posterior's noise
    want = by_hand(warp_images(batch["crops"], th), warp_points(batch["landmarks"], th), g)
    assert step_l1(0.1) == pytest.approx(want, rel=1e-5)
    plain = by_hand(batch["crops"], batch["landmarks"], torch.Generator().manual_seed(3))
    assert step_l1(0.0) == pytest.approx(plain, rel=1e-5)
    assert abs(step_l1(0.1) - plain) > 1e-5  # the warp reached the loss


def test_edge_l1_sees_lost_edges_not_uniform_shifts_and_the_step_adds_it(shards):
    """train.steps.edge_l1 (TrainConfig.autoencoder_edge_weight): 0 for a reconstruction off by a
    constant, positive for one that blurs a one-pixel line (the line between closed lips), weighted
    like the L1 by the lips' box; the autoencoder step adds w * edge to its loss and logs it."""
    from talkformer_core.data.dataset import FrameDataset
    from talkformer_core.models.autoencoder import AutoencoderKL
    from talkformer_core.train.steps import AutoencoderStep, edge_l1, mouth_weight

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    assert float(edge_l1(x + 0.3, x)) == pytest.approx(0.0, abs=1e-6)
    line = torch.zeros(1, 3, 16, 16)
    line[..., 8, :] = 1.0  # a bright one-pixel row
    blur = torch.nn.functional.avg_pool2d(line, (3, 1), stride=1, padding=(1, 0))
    assert float(edge_l1(blur, line)) > 0.05
    assert float(edge_l1(blur, line)) > 2 * float(edge_l1(0.9 * line, line))  # a lost edge, not a dimmer one
    w = torch.ones(1, 1, 16, 16)
    w[..., :4, :] = 5.0  # the weight sits away from the line: its error counts less
    assert float(edge_l1(blur, line, w)) < float(edge_l1(blur, line))
    rec = blur.clone().requires_grad_(True)
    edge_l1(rec, line).backward()
    assert rec.grad[..., 7:10, :].abs().sum() > 0 and rec.grad[..., :5, :].abs().sum() == 0

    cfg = tiny_config()
    torch.manual_seed(0)
    ae = AutoencoderKL(cfg.model.autoencoder)
    ds = FrameDataset(shards, cfg)
    batch = torch.utils.data.default_collate([ds[i] for i in (0, 5, 11, 17)])
    cfg.train.autoencoder_mouth_weight = 4.0

    def step(w_edge: float):
        cfg.train.autoencoder_edge_weight = w_edge
        with torch.no_grad():
            return AutoencoderStep(ae, cfg)(batch, torch.Generator().manual_seed(3))

    (loss0, logs0), (loss2, logs2) = step(0.0), step(2.0)
    assert "edge" not in logs0 and float(logs2["edge"]) > 0
    with torch.no_grad():  # the step's reconstruction, redrawn with the same generator
        post = ae.encode(batch["crops"])
        eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3))
        rec = ae.decode(post.mean + post.std * eps)
    S = cfg.model.image_size
    want = edge_l1(rec, batch["crops"], mouth_weight(batch["landmarks"], (S, S), 4.0, grow=S // 16))
    assert float(logs2["edge"]) == pytest.approx(float(want), rel=1e-5)
    assert float(loss2) == pytest.approx(float(loss0) + 2.0 * float(want), rel=1e-5)


def test_adversarial_autoencoder_bench_is_the_plain_run_at_weight_zero_and_not_above(shards, tmp_path):
    """bench/autoencoder_adversarial.py (docs/dubbing.md): at weight 0 its autoencoder is the plain
    loop's, weight for weight (the discriminator beside it touches nothing of the run); above 0 the
    discriminator's verdict reaches the autoencoder; the loop's step class is put back afterwards."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import autoencoder_adversarial as A

    from talkformer_core.finetune.presets import finetune_config
    from talkformer_core.models.checkpoint import read_checkpoint
    from talkformer_core.train import loop
    from talkformer_core.train.steps import AutoencoderStep

    for w in ("0", "0.5"):
        assert A.main(["--shard-dir", str(shards), "--out", str(tmp_path / f"w{w}"), "--steps", "3", "--weight", w,
                       "--preset", "tiny", "--threads", "1"]) == 0
    assert loop.AutoencoderStep is AutoencoderStep
    plain = loop.train(finetune_config("tiny"), stage="autoencoder", data=shards, out=tmp_path / "plain", steps=3,
                       batch_size=8, frames=(0.0, 0.6), seed=0, progress=False)
    ref = read_checkpoint(plain.checkpoint)[0]
    zero, adv = (read_checkpoint(tmp_path / f"w{w}" / "last.safetensors")[0] for w in ("0", "0.5"))
    assert set(zero) == set(ref) == set(adv)
    assert all(torch.equal(zero[k], ref[k]) for k in ref)
    assert any(not torch.equal(adv[k], ref[k]) for k in ref if k.startswith("autoencoder.encoder"))
    log = (tmp_path / "w0.5" / "log.csv").read_text().splitlines()
    d = float(log[-1].split(",")[log[0].split(",").index("d")])
    assert 0.0 <= d < 10.0  # the hinge loss of a discriminator that was stepped

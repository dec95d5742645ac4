"""talkformer_core.diffusion: schedule, eq. 1 loss, samplers (CPU, seeded, < 30 s)."""
from __future__ import annotations

import inspect
import math
import subprocess
import sys

import pytest
import torch

from talkformer_core.config import DiffusionConfig
from talkformer_core.diffusion import (SAMPLERS, SPACINGS, NoiseSchedule, get_sampler, ldm_loss,
                                       lower_half_mask, sample_ddim, sample_ddpm, sample_dpmpp_2m,
                                       upper_half_mask)
from talkformer_core.errors import InputError

SCH = NoiseSchedule(DiffusionConfig())
RUNS = [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("dpmpp_2m", 0.0), ("dpmpp_2m", 1.0)]


@pytest.fixture(autouse=True)
def one_thread():
    """Elementwise work on ~1M floats: one thread is fastest, and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gaussian_eps(mu: float, s: float):
    """The EXACT epsilon predictor for data ~ N(mu, s^2) per element:
    E[eps | x_t] = (x_t - sqrt(a) mu) sqrt(1 - a) / (a s^2 + 1 - a)."""
    ac = SCH.alphas_cumprod

    def model_fn(x, t):
        a = ac[t].to(x.dtype).view(-1, 1, 1, 1)
        return (x - a.sqrt() * mu) * (1 - a).sqrt() / (a * s * s + 1 - a)
    return model_fn


def conv_model(C=3, seed=0):
    """A small real network (mixes rows, so the unknown region sees the known one)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(C, 8, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, C, 3, padding=1))
    emb = torch.nn.Embedding(SCH.num_timesteps, C)

    def model_fn(x, t):
        return net(x) + emb(t.long())[:, :, None, None]
    return model_fn, list(net.parameters()) + list(emb.parameters())


def antithetic(n, seed):
    z = torch.randn(n // 2, 1, 64, 64, generator=torch.Generator().manual_seed(seed))
    return torch.cat([z, -z])  # the start noise's own sampling error drops out of the mean


# -- schedule --------------------------------------------------------------------------------------
def test_schedule_values():
    b = SCH.betas
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert abs(b[0].item() - 0.0015) < 1e-15 and abs(b[-1].item() - 0.0195) < 1e-15
    d = torch.diff(b.sqrt())  # LDM "linear": linear in sqrt(beta)
    assert torch.allclose(d, d[0].expand_as(d), atol=1e-15)
    ac = SCH.alphas_cumprod
    assert (torch.diff(ac) < 0).all() and ac[0] < 1 and ac[-1] > 0
    assert abs(ac[0].item() - 0.9985) < 1e-15
    assert torch.allclose(ac, torch.cumprod(1 - b, 0))
    assert torch.allclose(SCH.sigmas, ((1 - ac) / ac).sqrt())
    assert 1e-4 < ac[-1].item() < 2e-4  # LDM linear: a_999 = 1.42e-4
    with pytest.raises(InputError, match="beta_schedule"):
        NoiseSchedule(DiffusionConfig(beta_schedule="cosine"))


@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_distinct_descending(spacing):
    for S in (1, 2, 7, 50, 200, 333, 999, 1000):
        ts = SCH.timesteps(S, spacing)
        assert ts.dtype == torch.long and ts.shape == (S,)
        assert (ts[:-1] > ts[1:]).all() and ts.min() >= 0 and ts.max() <= 999


def test_timesteps_known_values():
    assert SCH.timesteps(200, "uniform").tolist() == list(range(995, -1, -5))  # DDIM's range(0, T, T//S)
    assert SCH.timesteps(200, "leading").tolist() == list(range(996, 0, -5))  # LDM's make_ddim_timesteps
    assert SCH.timesteps(50, "trailing")[0] == 999 and SCH.timesteps(50, "trailing")[-1] == 19
    ls = SCH.timesteps(50, "logsnr")
    assert ls[0] == 999 and ls[-1] == 0
    lam = SCH.log_snr[ls]
    assert (torch.diff(lam).abs() < 0.35).all()  # near-uniform in log-SNR (ideal 7.67 / 49 = 0.157)
    assert SCH.timesteps(1000, "uniform").tolist() == list(range(999, -1, -1))
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(InputError, match="num_steps"):
            SCH.timesteps(bad)
    with pytest.raises(InputError, match="spacing"):
        SCH.timesteps(10, "karras")


def test_q_sample_statistics_and_inverses():
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((64, 1, 64, 64), 0.7)
    for t_ in (0, 300, 999):
        t = torch.full((64,), t_)
        noise = torch.randn(x0.shape, generator=g)
        xt = SCH.q_sample(x0, t, noise)
        a = SCH.alphas_cumprod[t_].item()
        assert xt.dtype == torch.float32
        assert abs(xt.mean().item() - math.sqrt(a) * 0.7) < 0.01
        assert abs(xt.var().item() / (1 - a) - 1) < 0.01
        assert torch.allclose(SCH.predict_x0(xt, t, noise), x0, atol=1e-3 if t_ == 999 else 1e-5)
        assert torch.allclose(SCH.predict_eps(xt, t, x0), noise, atol=1e-5)
    # per-sample timesteps: sample b uses t[b]
    t = torch.tensor([0, 999])
    xt = SCH.q_sample(torch.ones(2, 1, 1, 1), t, torch.zeros(2, 1, 1, 1)).flatten()
    assert torch.allclose(xt.double(), SCH.sqrt_alphas_cumprod[t], rtol=1e-6)
    with pytest.raises(InputError, match="integer"):
        SCH.q_sample(x0[:2], torch.tensor([1.5, 2.0]), x0[:2])
    with pytest.raises(InputError, match=r"\[0, 1000\)"):
        SCH.q_sample(x0[:2], torch.tensor([0, 1000]), x0[:2])


# -- eq. 1 loss ------------------------------------------------------------------------------------
def test_lower_half_mask():
    m = lower_half_mask(7, 5)
    assert m.shape == (1, 1, 7, 5) and m.dtype == torch.bool
    assert not m[..., :3, :].any() and m[..., 3:, :].all()
    assert torch.equal(upper_half_mask(8, 8), ~lower_half_mask(8, 8))


def test_ldm_loss_contract():
    model_fn, params = conv_model()
    g = torch.Generator().manual_seed(1)
    z0, ctx = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    noise = torch.randn(4, 3, 8, 8, generator=g)
    loss, info = ldm_loss(model_fn, z0, ctx, SCH, t=t, noise=noise)
    z_t = info["z_t"]
    assert torch.equal(z_t[:, :, :4], ctx[:, :, :4])  # clean context, bit-exact
    assert torch.equal(z_t[:, :, 4:], SCH.q_sample(z0, t, noise)[:, :, 4:])
    manual = ((model_fn(z_t, t) - noise)[:, :, 4:] ** 2).mean()
    assert torch.allclose(loss, manual)
    assert info["loss_per_sample"].shape == (4,)

    # only the lower half counts: junk in the prediction's upper half, or in the noise's upper half
    junk = torch.zeros(1, 1, 8, 8)
    junk[:, :, :4] = 100.0
    loss2, _ = ldm_loss(lambda x, tt: model_fn(x, tt) + junk, z0, ctx, SCH, t=t, noise=noise)
    assert torch.equal(loss, loss2)
    loss3, _ = ldm_loss(model_fn, z0, ctx, SCH, t=t, noise=noise + junk)
    assert torch.equal(loss, loss3)
    # ...but the lower half does
    loss4, _ = ldm_loss(lambda x, tt: model_fn(x, tt) + junk.flip(2), z0, ctx, SCH, t=t, noise=noise)
    assert loss4 > loss + 1000

    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_ldm_loss_gradient_of_prediction_is_zero_on_upper_half():
    pred = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss, _ = ldm_loss(lambda x, t: pred * 1.0, torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), SCH,
                       generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.equal(pred.grad[:, :, :4], torch.zeros(2, 3, 4, 8))
    assert (pred.grad[:, :, 4:] != 0).all()


def test_ldm_loss_sampling_seeded_and_errors():
    model_fn, _ = conv_model()
    z0 = torch.randn(3, 3, 8, 8)
    a, ia = ldm_loss(model_fn, z0, z0, SCH, generator=torch.Generator().manual_seed(5))
    b, ib = ldm_loss(model_fn, z0, z0, SCH, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(ia["t"], ib["t"])
    assert ia["t"].min() >= 0 and ia["t"].max() < 1000
    with pytest.raises(InputError, match="context"):
        ldm_loss(model_fn, z0, z0[:, :, :4], SCH)
    with pytest.raises(InputError, match="model_fn returned"):
        ldm_loss(lambda x, t: x[:, :1], z0, z0, SCH)


# -- samplers --------------------------------------------------------------------------------------
def test_registry_and_one_signature():
    assert {"ddim", "dpmpp_2m", "ddpm"} <= set(SAMPLERS)
    sigs = {str(inspect.signature(f)) for f in SAMPLERS.values()}
    assert len(sigs) == 1
    assert get_sampler("ddim") is sample_ddim
    with pytest.raises(InputError, match="ddim.*dpmpp_2m"):
        get_sampler("euler_a")


@pytest.mark.parametrize("name,eta", RUNS)
@pytest.mark.parametrize("batch_mask", [False, True])
def test_known_region_bit_identical(name, eta, batch_mask):
    model_fn, _ = conv_model()
    g = torch.Generator().manual_seed(3)
    noise, known = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mask = upper_half_mask(8, 8)
    if batch_mask:  # per-sample masks: a different known region per sample
        mask = torch.stack([mask[0], torch.rand(1, 8, 8, generator=g) < 0.5])
    seen = []

    def cb(i, n, x, x0):
        seen.append(torch.equal(torch.where(mask, known, x), x) and torch.equal(torch.where(mask, known, x0), x0))
    out = get_sampler(name)(model_fn, noise, SCH, 7, known=known, known_mask=mask, eta=eta, callback=cb,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[mask.expand_as(out)], known[mask.expand_as(known)])
    assert len(seen) == 7 and all(seen)
    assert not torch.equal(out, noise) and torch.isfinite(out).all()
    # the unknown region reads the known one through the network (so "known" truly conditions)
    out2 = get_sampler(name)(model_fn, noise, SCH, 7, known=known + 1, known_mask=mask, eta=eta,
                             generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out2[~mask.expand_as(out)], out[~mask.expand_as(out)])


def test_known_argument_errors():
    model_fn, _ = conv_model()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(InputError, match="both"):
        sample_ddim(model_fn, x, SCH, 3, known=x)
    with pytest.raises(InputError, match="known_mask"):
        sample_ddim(model_fn, x, SCH, 3, known=x, known_mask=upper_half_mask(8, 8).float())
    with pytest.raises(InputError, match="model_fn returned"):
        sample_ddim(lambda x, t: x[:, :1], x, SCH, 3)


def test_determinism_and_seeding():
    model_fn, _ = conv_model()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_ddim(model_fn, noise, SCH, 10), sample_ddim(model_fn, noise, SCH, 10))
    assert torch.equal(sample_dpmpp_2m(model_fn, noise, SCH, 10), sample_dpmpp_2m(model_fn, noise, SCH, 10))
    for f in (sample_ddim, sample_dpmpp_2m, sample_ddpm):
        kw = dict(eta=0.5)
        a = f(model_fn, noise, SCH, 10, generator=torch.Generator().manual_seed(1), **kw)
        b = f(model_fn, noise, SCH, 10, generator=torch.Generator().manual_seed(1), **kw)
        c = f(model_fn, noise, SCH, 10, generator=torch.Generator().manual_seed(2), **kw)
        assert torch.equal(a, b) and not torch.allclose(a, c)


def test_ddpm_posterior_equals_ddim_eta1():
    """Two independently written formulas (posterior mean/variance vs DDIM eq. 12 with eta = 1)."""
    model_fn, _ = conv_model()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for S in (5, 50):
        a = sample_ddpm(model_fn, noise, SCH, S, generator=torch.Generator().manual_seed(7))
        b = sample_ddim(model_fn, noise, SCH, S, eta=1.0, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_count_last_x0_and_interrupt(name):
    model_fn, _ = conv_model()
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    out = get_sampler(name)(model_fn, noise, SCH, 6, callback=lambda i, n, x, x0: calls.append((i, n, x0)),
                            generator=torch.Generator().manual_seed(0))
    assert [(i, n) for i, n, _ in calls] == [(i, 6) for i in range(6)]
    assert torch.equal(out, calls[-1][2])  # the final step returns the x0 prediction

    evals = []

    class Stop(Exception):
        pass

    def counting(x, t):
        evals.append(int(t[0]))
        return model_fn(x, t)

    def interrupt(i, n, x, x0):
        if i == 2:
            raise Stop
    with pytest.raises(Stop):
        get_sampler(name)(counting, noise, SCH, 6, callback=interrupt, generator=torch.Generator().manual_seed(0))
    assert len(evals) == 3  # stopped right after step 2: no further network evaluations


@pytest.mark.parametrize("name,eta", RUNS)
def test_gaussian_toy_mean_50_steps(name, eta):
    """mu = 0.7, s = 0.3, exact eps, 50 steps: every sampler's mean within 2%; the second-order
    DPM-Solver++ (ODE and SDE) also its variance. (DDIM/DDPM are first order: at s = 0.3 their
    variance is still -9% / -15% at 50 steps and -3% / -6% at all 1000 steps; see the next test.)"""
    mu, s = 0.7, 0.3
    noise = antithetic(256, seed=0)  # 1M elements: the variance's standard error is 0.14%
    x = get_sampler(name)(gaussian_eps(mu, s), noise, SCH, 50, eta=eta, generator=torch.Generator().manual_seed(1))
    assert abs(x.mean().item() / mu - 1) < 0.02
    if name == "dpmpp_2m":
        assert abs(x.var().item() / s ** 2 - 1) < 0.02


@pytest.mark.parametrize("name,eta", [r for r in RUNS if r[0] != "ddpm"])  # ddpm == ddim eta=1 (tested)
def test_gaussian_toy_converged(name, eta):
    """Unit-variance data (LDM scales latents to unit variance), mu = 0.7: at 1000 steps (every
    timestep) the first-order samplers recover mean and variance within 2%; DPM++ 2M at 50 steps."""
    mu, s = 0.7, 1.0
    steps = 50 if name == "dpmpp_2m" else 1000
    noise = antithetic(64, seed=0)  # 262k elements: standard error 0.28% for the variance
    x = get_sampler(name)(gaussian_eps(mu, s), noise, SCH, steps, eta=eta, generator=torch.Generator().manual_seed(1))
    assert abs(x.mean().item() / mu - 1) < 0.02
    assert abs(x.var().item() / s ** 2 - 1) < 0.02


def test_more_steps_more_accurate():
    """DDIM's variance error shrinks with the step count (first-order convergence)."""
    mu, s = 0.7, 0.3
    noise = antithetic(16, seed=0)
    errs = [abs(sample_ddim(gaussian_eps(mu, s), noise, SCH, S).var().item() / s ** 2 - 1) for S in (20, 50, 200)]
    assert errs[0] > errs[1] > errs[2]


def test_diffusion_does_not_import_models():
    code = ("import sys, talkformer_core.diffusion; "
            "assert not any(m.startswith('talkformer_core.models') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ldm_loss_weight_is_a_weighted_mean():
    """``weight``: each lower-half cell's share of the mean; all ones is eq. 1 unchanged, a weight
    multiplies ``valid``, and a cell with weight w gets w times the gradient of a weight-1 cell."""
    model_fn, _ = conv_model()
    g = torch.Generator().manual_seed(3)
    z0, ctx, noise = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([10, 700])
    full, _ = ldm_loss(model_fn, z0, ctx, SCH, t=t, noise=noise)
    ones, _ = ldm_loss(model_fn, z0, ctx, SCH, t=t, noise=noise, weight=torch.ones(2, 1, 8, 8))
    assert torch.allclose(full, ones)
    pred = model_fn(ldm_loss(model_fn, z0, ctx, SCH, t=t, noise=noise)[1]["z_t"], t).detach().requires_grad_(True)
    weight = torch.ones(2, 1, 8, 8)
    weight[:, :, 5:7, 2:5] = 4.0
    valid = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    valid[1, ..., :1] = False
    loss, _ = ldm_loss(lambda x, tt: pred * 1.0, z0, ctx, SCH, t=t, noise=noise, valid=valid, weight=weight)
    err = ((pred - noise)[:, :, 4:] ** 2).detach()
    w = (weight * valid)[:, :, 4:].expand(2, 3, 4, 8)
    assert torch.allclose(loss, (err * w).sum() / w.sum())
    loss.backward()
    d = (pred - noise).detach()
    ratio = pred.grad / d  # 2 w / sum(w): the weight's ratio between cells
    assert torch.allclose(ratio[0, :, 5, 2], 4 * ratio[0, :, 4, 0]) and (pred.grad[1, :, 4:, 0] == 0).all()


def test_ldm_loss_valid_columns_carry_no_loss():
    """``valid`` (a shift augmentation's real columns): the loss is the mean over valid lower-half
    cells; prediction junk in invalid columns changes nothing and gets no gradient."""
    model_fn, _ = conv_model()
    g = torch.Generator().manual_seed(2)
    z0, ctx, noise = (torch.randn(3, 3, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([5, 300, 900])
    full, _ = ldm_loss(model_fn, z0, ctx, SCH, t=t, noise=noise)
    same, _ = ldm_loss(model_fn, z0, ctx, SCH, t=t, noise=noise, valid=torch.ones(3, 1, 1, 8, dtype=torch.bool))
    assert torch.allclose(full, same)

    valid = torch.ones(3, 1, 1, 8, dtype=torch.bool)
    valid[0, ..., :2] = False  # sample 0: two columns came in from the left border
    valid[2, ..., -1:] = False
    pred = model_fn(ldm_loss(model_fn, z0, ctx, SCH, t=t, noise=noise)[1]["z_t"], t).detach().requires_grad_(True)
    loss, info = ldm_loss(lambda x, tt: pred * 1.0, z0, ctx, SCH, t=t, noise=noise, valid=valid)
    err = ((pred - noise)[:, :, 4:] ** 2).detach()
    w = valid.expand(3, 1, 4, 8).float()
    assert torch.allclose(loss, (err * w).sum() / (w.sum() * 3))
    assert torch.allclose(info["loss_per_sample"][1], err[1].mean())
    loss.backward()
    assert torch.equal(pred.grad[0, :, 4:, :2], torch.zeros(3, 4, 2))
    assert (pred.grad[0, :, 4:, 2:] != 0).all() and (pred.grad[:, :, :4] == 0).all()
    junk = torch.zeros(1, 1, 8, 8)
    junk[..., 4:, :2] = 100.0
    only0 = valid.clone()
    only0[1:, ..., :2] = False
    a, _ = ldm_loss(lambda x, tt: pred.detach(), z0, ctx, SCH, t=t, noise=noise, valid=only0)
    b, _ = ldm_loss(lambda x, tt: pred.detach() + junk, z0, ctx, SCH, t=t, noise=noise, valid=only0)
    assert torch.equal(a, b)

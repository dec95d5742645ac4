"""TalkFormer U-Net, appearance encoder and the TalkFormer container (models/unet.py, appearance.py,
model.py): shapes, placement, zero-init independence, caches, ablations."""
import dataclasses

import pytest
import torch

from talkformer_core.config import tiny
from talkformer_core.errors import InputError
from talkformer_core.models.appearance import AppearanceEncoder
from talkformer_core.models.model import TalkFormer, parameter_counts
from talkformer_core.models.talkformer import TalkFormerBlock
from talkformer_core.models.unet import LandmarkCache, ReferenceCache, TalkFormerUNet


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster, and immune to a busy machine's descheduled OpenMP threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw):
    m = tiny().model
    unet_kw = {k: kw.pop(k) for k in list(kw) if k in {f.name for f in dataclasses.fields(m.unet)}}
    return dataclasses.replace(m, unet=dataclasses.replace(m.unet, **unet_kw), **kw)


def _build(cfg, seed=0):
    torch.manual_seed(seed)
    app = AppearanceEncoder(cfg)
    return app, TalkFormerUNet(cfg, appearance=app)


def _inputs(cfg, N=4, B_ref=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    s, C = cfg.latent_size, cfg.latent_channels
    return (torch.randn(N, C, s, s, generator=g), torch.randint(0, 1000, (N,), generator=g),
            torch.rand(N, 131, 2, generator=g), torch.randn(B_ref, C, s, s, generator=g))


def _randomize_zeros(*modules, std=0.1):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def test_shapes_at_every_scale():
    cfg = _cfg(channel_mult=(1, 2, 2))  # 3 scales: 8x8, 4x4, 2x2
    app, unet = _build(cfg)
    z, t, lm, zr = _inputs(cfg)
    expect = unet.hidden_shapes()
    assert expect == [(32, 8, 8), (64, 4, 4), (64, 2, 2)]
    feats = app.features(zr)
    assert [tuple(f.shape) for f in app(zr)] == [(2, *s) for s in expect]
    assert tuple(feats.middle.shape) == (2, *expect[-1]) and feats.decoder is not None
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append((m.part, m.scale, tuple(a[0].shape), tuple(o.shape))))
             for b in unet.blocks]
    out = unet(z, t, lm, zr, num_frames=2)
    for h in hooks:
        h.remove()
    assert out.shape == z.shape
    assert len(seen) == len(unet.blocks)
    for part, scale, ishape, oshape in seen:
        assert ishape == oshape == (4, *expect[scale - 1])
        assert tuple(feats.for_block(part, scale).shape[1:]) == ishape[1:]


def test_talkformer_blocks_only_at_scales_2_to_I():
    cfg = _cfg(channel_mult=(1, 2, 2))
    _, unet = _build(cfg)
    nr = cfg.unet.num_res_blocks
    enc = [len(level.tf) for level in unet.encoder]
    dec = [len(level.tf) for level in unet.decoder][::-1]  # decoder is stored deepest first
    assert enc == [0, nr, nr] and dec == [0, nr + 1, nr + 1]
    assert isinstance(unet.mid_tf, TalkFormerBlock)
    assert sorted({(b.part, b.scale) for b in unet.blocks}) == [
        ("decoder", 2), ("decoder", 3), ("encoder", 2), ("encoder", 3), ("middle", 3)]
    # paper preset (meta device, no memory): TalkFormer at latent resolutions 32, 16, 8
    with torch.device("meta"):
        paper = TalkFormer.from_config("paper")
    blocks = paper.unet.blocks
    assert len(blocks) == 2 * 3 + 1 + 3 * 3
    res = sorted({paper.config.model.latent_size >> (b.scale - 1) for b in blocks})
    assert res == [8, 16, 32]
    assert [b.m_align.heads for b in blocks if b.part == "middle"] == [896 // 32]


def test_output_exactly_independent_of_conditions_at_init_then_dependent_after_one_step():
    cfg = _cfg()
    app, unet = _build(cfg)
    z, t, lm, zr = _inputs(cfg, N=4, B_ref=2)
    lm2, zr2 = torch.rand_like(lm), torch.randn_like(zr)
    with torch.no_grad():
        base = unet(z, t, lm, zr, num_frames=2)
        assert torch.equal(base, unet(z, t, lm2, zr, num_frames=2))
        assert torch.equal(base, unet(z, t, lm, zr2, num_frames=2))
    params = list(unet.parameters()) + list(app.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    target = torch.randn_like(z)
    lm_g = lm.clone().requires_grad_(True)  # the end-to-end path: loss -> landmark coordinates
    loss = (unet(z, t, lm_g, zr, num_frames=2) - target).pow(2).mean()
    loss.backward()
    assert torch.equal(lm_g.grad, torch.zeros_like(lm))  # zero-init output convs: exactly no gradient yet
    opt.step()
    lm_g.grad = None
    (unet(z, t, lm_g, zr, num_frames=2) - target).pow(2).mean().backward()
    assert lm_g.grad.abs().max() > 0  # after one step, L_ldm reaches the landmarks
    with torch.no_grad():
        base = unet(z, t, lm, zr, num_frames=2)
        assert (base - unet(z, t, lm2, zr, num_frames=2)).abs().max() > 1e-5
        assert (base - unet(z, t, lm, zr2, num_frames=2)).abs().max() > 1e-5


@pytest.mark.parametrize("variant", [{}, {"temporal_attention": True}, {"complete_reference_encoder": True},
                                     {"r_align": False}, {"m_align": False}, {"landmark_map": True},
                                     {"landmark_map": True, "landmark_fill": True}])
def test_cached_equals_uncached(variant):
    cfg = _cfg(**variant)
    app, unet = _build(cfg)
    _randomize_zeros(unet, app)  # give every zero-init projection weight, so all paths matter
    unet.eval()
    N, L = 6, 3
    z, t, lm, zr = _inputs(cfg, N=N, B_ref=2)
    motion = torch.randn(2, 2, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    with torch.no_grad():
        raw = unet(z, t, lm, zr, motion=motion, num_frames=L)
        lc, rc = unet.prepare_landmarks(lm), unet.prepare_reference(zr)
        mc = unet.prepare_motion(motion)
        assert isinstance(lc, LandmarkCache) and isinstance(rc, ReferenceCache)
        for tt in (t, t.flip(0)):  # the same caches serve every step
            cached = unet(z, tt, lc, rc, motion=mc, num_frames=L)
            assert torch.allclose(cached, unet(z, tt, lm, zr, motion=motion, num_frames=L), atol=1e-5)
        assert torch.allclose(raw, unet(z, t, lc, rc, motion=mc, num_frames=L), atol=1e-5)
        # one reference per clip == the same reference given per frame (expanded)
        per_frame = zr.repeat_interleave(L, 0)
        assert torch.allclose(raw, unet(z, t, lc, per_frame, motion=mc, num_frames=L), atol=1e-5)
        # one reference for the whole batch == it given per clip
        one = unet(z, t, lc, unet.prepare_reference(zr[:1]), motion=mc, num_frames=L)
        assert torch.allclose(one, unet(z, t, lc, zr[:1].expand(2, -1, -1, -1), motion=mc, num_frames=L),
                              atol=1e-5)
        if cfg.r_align:  # appearance features are accepted as the raw reference too
            assert torch.allclose(raw, unet(z, t, lm, app.features(zr), motion=motion, num_frames=L), atol=1e-5)
        if cfg.temporal_attention:
            assert (raw - unet(z, t, lc, rc, motion=None, num_frames=L)).abs().max() > 1e-4
        else:
            assert torch.equal(raw, unet(z, t, lc, rc, motion=None, num_frames=L))


def test_landmark_map_draws_each_group_where_its_points_are():
    """UNetConfig.landmark_map: jaw / outer lip / inner lip as Gaussian dots on the latent grid; the
    peak sits on the point's cell, and a sub-cell move of the points moves the map's centroid by as much."""
    from talkformer_core.face.topology import JAW_POS, LIP_POS
    from talkformer_core.models.unet import landmark_map

    p = torch.full((1, 131, 2), 0.5)
    p[0, list(JAW_POS)] = torch.tensor([(3 + 0.5) / 16, (12 + 0.5) / 16])  # cell (row 12, col 3)
    p[0, list(LIP_POS[:20])] = torch.tensor([(8 + 0.5) / 16, (10 + 0.5) / 16])
    p[0, list(LIP_POS[20:])] = torch.tensor([(9 + 0.5) / 16, (10 + 0.5) / 16])
    m = landmark_map(p, 16, 16)  # (1, 3, 16, 16)
    assert m.shape == (1, 3, 16, 16) and float(m.max()) == pytest.approx(1.0)
    peaks = [divmod(int(m[0, c].argmax()), 16) for c in range(3)]
    assert peaks == [(12, 3), (10, 8), (10, 9)]
    xs = torch.arange(16) + 0.5

    def centroid_x(mm):
        return float((mm.sum(-2) * xs).sum() / mm.sum())

    q = p.clone()
    q[..., 0] += 0.3 / 16  # 0.3 of a cell to the right
    shift = centroid_x(landmark_map(q, 16, 16)[0, 1]) - centroid_x(m[0, 1])
    assert shift == pytest.approx(0.3, abs=0.04)  # a sigma-0.5 dot sampled at cell centres: within ~10 %


def test_polygon_coverage_is_the_area_inside():
    """A square covering 4 x 4 cells exactly, and a triangle whose edges cut cells: the summed
    coverage is the polygon's area in cells (within the 4 x 4 sampling)."""
    from talkformer_core.models.unet import polygon_coverage

    sq = torch.tensor([[[0.25, 0.25], [0.5, 0.25], [0.5, 0.5], [0.25, 0.5]]])
    c = polygon_coverage(sq, 16, 16, 4)[0]
    assert float(c.sum()) == pytest.approx(16.0) and float(c[4:8, 4:8].min()) == 1.0 and float(c[8:].max()) == 0.0
    tri = torch.tensor([[[0.1, 0.1], [0.9, 0.1], [0.1, 0.9]]])  # area 0.32 of the crop
    assert float(polygon_coverage(tri, 16, 16, 4).sum()) / 256 == pytest.approx(0.32, abs=0.005)


def test_landmark_fill_grows_with_the_mouth_opening():
    """UNetConfig.landmark_fill: the inner-lip channel is 0 for a closed mouth (upper and lower inner lip
    on one line) and its sum is the opening's area, which a sub-cell dot map barely separates."""
    from talkformer_core.face.topology import LIP_POS
    from talkformer_core.models.unet import landmark_map

    def mouth(gap):  # an elliptic mouth 6 cells wide at row 10 of a 16x16 grid, inner gap in cells
        p = torch.full((1, 131, 2), 0.5)
        a = torch.linspace(0, 2 * torch.pi, 21)[:-1]  # contour order, as the lips are listed
        for pos, half_h in ((LIP_POS[:20], gap / 2 + 0.8), (LIP_POS[20:], gap / 2)):
            p[0, list(pos), 0] = (8 + 3 * torch.cos(a)) / 16
            p[0, list(pos), 1] = (10 + half_h * torch.sin(a)) / 16
        return landmark_map(p, 16, 16, fill=True)[0]

    closed, half, open_ = mouth(0.0), mouth(0.6), mouth(1.2)
    assert closed.shape == (5, 16, 16)
    assert float(closed[4].sum()) == 0.0  # a closed mouth has no inside
    areas = [float(m[4].sum()) for m in (half, open_)]
    assert areas[0] == pytest.approx(torch.pi * 3 * 0.3, rel=0.15) and areas[1] == pytest.approx(2 * areas[0], rel=0.15)
    assert float(open_[3].sum()) > float(open_[4].sum())  # the outer lips enclose the inner mouth


def test_landmark_map_path_is_zero_at_init_and_follows_the_landmarks_once_trained():
    cfg = _cfg(landmark_map=True, m_align=False)
    app, unet = _build(cfg)
    z, t, lm, zr = _inputs(cfg, N=2, B_ref=1)
    lm2 = lm.clone()
    lm2[..., 0] += 1 / cfg.latent_size
    with torch.no_grad():
        lc = unet.prepare_landmarks(lm)
        assert lc.map is not None and lc.map.shape == (2, 3, cfg.latent_size, cfg.latent_size)
        assert torch.equal(unet(z, t, lc, zr), unet(z, t, lm2, zr))  # zero-init: ignored at init
        _randomize_zeros(unet, app)
        assert (unet(z, t, lm, zr) - unet(z, t, lm2, zr)).abs().max() > 1e-4
        with pytest.raises(InputError, match="landmark map"):
            unet(z, t, LandmarkCache(lc.per_block, lc.batch), zr)


def test_clips_are_independent():
    """Frame n of clip b sees only clip b's reference, motion and (with Temp-Att) frames."""
    cfg = _cfg(temporal_attention=True)
    app, unet = _build(cfg)
    _randomize_zeros(unet, app)
    unet.eval()
    z, t, lm, zr = _inputs(cfg, N=4, B_ref=2)
    motion = torch.randn(2, 2, 3, 8, 8)
    with torch.no_grad():
        a = unet(z, t, lm, zr, motion=motion, num_frames=2)
        z2, zr2, m2 = z.clone(), zr.clone(), motion.clone()
        z2[2:] += 1
        zr2[1] += 1
        m2[1] += 1
        b = unet(z2, t, lm, zr2, motion=m2, num_frames=2)
    assert torch.allclose(a[:2], b[:2], atol=1e-6) and (a[2:] - b[2:]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", [{"m_align": False}, {"r_align": False}, {"temporal_attention": True},
                                     {"complete_reference_encoder": True}, {"sequence_length": 1},
                                     {"r_align": False, "temporal_attention": True}])
def test_ablations_build_and_train(variant):
    cfg = _cfg(**variant)
    model = TalkFormer(dataclasses.replace(tiny(), model=cfg))
    assert [n for n, _ in model.named_children()] == (
        ["autoencoder", "landmark", "appearance", "unet"] if model.appearance is not None
        else ["autoencoder", "landmark", "unet"])
    L = cfg.sequence_length
    z, t, lm, zr = _inputs(cfg, N=2 * L, B_ref=2)
    motion = torch.randn(2, 2, 3, 8, 8) if cfg.temporal_attention else None
    out = model(z, t, lm, zr, motion=motion, num_frames=L)
    out.pow(2).mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith("landmark.")]
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, missing  # every U-Net / appearance weight is used (DDP needs no unused params)
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("autoencoder."))


def test_without_m_align_landmarks_are_added_everywhere():
    cfg = _cfg(m_align=False)
    app, unet = _build(cfg)
    _randomize_zeros(unet)
    z, t, lm, zr = _inputs(cfg)
    with torch.no_grad():
        assert (unet(z, t, lm, zr) - unet(z, t, torch.rand_like(lm), zr)).abs().max() > 1e-4


def test_without_r_align_reference_is_concatenated():
    cfg = _cfg(r_align=False)
    app, unet = _build(cfg)
    assert unet.conv_in.in_channels == 2 * cfg.latent_channels
    assert all(type(b.r_align).__name__ == "SelfAttention2d" for b in unet.blocks)
    z, t, lm, zr = _inputs(cfg)
    with torch.no_grad():
        base = unet(z, t, lm, zr)
        assert torch.equal(base, unet(z, t, lm, torch.randn_like(zr)))  # z_r's conv_in half starts at 0
        unet.conv_in.weight.normal_()
        base = unet(z, t, lm, zr)
        zr_b = zr.clone()
        zr_b[1] += 1
        other = unet(z, t, lm, zr_b)
        assert torch.equal(base[:2], other[:2]) and not torch.allclose(base[2:], other[2:])


def test_bad_inputs_raise_clear_errors():
    cfg = _cfg()
    app, unet = _build(cfg)
    z, t, lm, zr = _inputs(cfg, N=4, B_ref=2)
    with pytest.raises(InputError, match="131, 2"):
        unet(z, t, lm[:, :68], zr)
    with pytest.raises(InputError, match="references"):
        unet(z, t, lm, torch.randn(3, 3, 8, 8))
    with pytest.raises(InputError, match="clips"):
        unet(z, t, lm, zr, num_frames=3)
    with pytest.raises(InputError, match="appearance"):
        TalkFormerUNet(cfg)(z, t, lm, zr)


def test_container_latents_and_counts():
    torch.manual_seed(0)
    cfg = tiny()
    model = TalkFormer.from_config(cfg)
    assert model.unet.appearance is model.appearance
    assert not any(k.startswith("unet.appearance") for k in model.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    masked = x.clone()
    masked[:, :, 16:] = -1
    with torch.no_grad():
        assert torch.equal(model.encode_masked(x), model.encode(masked))
        z = model.encode(x)
        assert z.shape == (2, 3, 8, 8) and model.decode(z).shape == (2, 3, 32, 32)
    mask = model.known_mask(8, 8)
    assert mask.shape == (1, 1, 8, 8) and mask[..., :4, :].eq(1).all() and mask[..., 4:, :].eq(0).all()
    counts = parameter_counts(cfg)
    real = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()}
    assert {k: counts[k] for k in real} == real
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert 0 < counts["unet.talkformer"] < counts["unet"]

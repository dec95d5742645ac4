"""Evaluation metrics, metric networks (random weights saved to files) and the eval CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from talkformer_core.errors import CheckpointError, InputError
from talkformer_core.eval import metrics
from talkformer_core.eval.fid import FIDInception, fid_from_features, frechet_distance, load_fid_inception
from talkformer_core.eval.lpips import LPIPS, load_lpips
from talkformer_core.eval.syncnet import SyncNet, SyncScorer, load_syncnet, mfcc, sync_offset, syncnet_mfcc

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
CLIP = MEDIA / "videoretalking_face_5.mp4"


def _rand_images(rng, shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _random_inception(**kw) -> FIDInception:
    """Random weights that keep activations at unit scale through the ~20 layers (He init)."""
    torch.manual_seed(0)
    m = FIDInception(**kw)
    for c in m.modules():
        if isinstance(c, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(c.weight, nonlinearity="relu")
    return m


def _noised(rng, a, sigma):
    return np.clip(a.astype(np.float64) + rng.normal(0, sigma, a.shape), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- pixel metrics

def test_psnr_ssim_properties_and_skimage_agreement():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = _rand_images(rng, (3, 48, 64, 3))
    b1, b2 = _noised(rng, a, 5), _noised(rng, a, 25)
    assert np.all(np.isinf(metrics.psnr(a, a))) and np.allclose(metrics.ssim(a, a), 1.0)
    assert np.all(metrics.psnr(a, b2) < metrics.psnr(a, b1))
    assert np.all(metrics.ssim(a, b2) < metrics.ssim(a, b1))
    mse = ((a.astype(float) - b2) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(metrics.psnr(a, b2), 10 * np.log10(255 ** 2 / mse))
    ref = [structural_similarity(a[i], b2[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 channel_axis=-1, data_range=255) for i in range(3)]
    np.testing.assert_allclose(metrics.ssim(a, b2), ref, atol=1e-10)
    with pytest.raises(InputError):
        metrics.psnr(a, b2[:, :10])


def test_lip_distance_mouth_opening_pearson():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 128, (5, 478, 2)).astype(np.float32)
    q = p.copy()
    q[:, :, 0] += 3.0  # every point moved 3 px right in a 128 crop -> 6 px at 256
    np.testing.assert_allclose(metrics.lip_distance(p, q, crop_size=128), 6.0, rtol=1e-6)
    assert np.all(metrics.lip_distance(p, p, 128) == 0)
    p[:, 13] = [50, 60]
    p[:, 14] = [[50, 60 + k] for k in range(5)]
    np.testing.assert_allclose(metrics.mouth_opening(p), np.arange(5.0))
    x = rng.normal(size=50)
    assert metrics.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert metrics.pearson(x, -x) == pytest.approx(-1.0)
    assert metrics.pearson(x, np.ones(50)) is None  # constant series: undefined, not 0


# ----------------------------------------------------------------------------- FID

def test_frechet_distance_closed_form():
    rng = np.random.default_rng(2)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.5, 3, d), rng.uniform(0.5, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T  # commuting: FID = |dmu|^2 + sum (sqrt a - sqrt b)^2
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    # general SPD pair: Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) via eigh
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)

    def psd_sqrt(m):
        w, v = np.linalg.eigh(m)
        return v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = psd_sqrt(s1)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * psd_sqrt(r1 @ s2 @ r1))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # sample version: two Gaussians' samples approach the closed form
    x = rng.normal(size=(4000, 2)) * [1.0, 2.0]
    y = rng.normal(size=(4000, 2)) * [1.0, 1.0] + [1.0, 0.0]
    assert fid_from_features(x, y) == pytest.approx(1.0 + 1.0, abs=0.15)
    # fewer samples than dimensions (a clip's frames vs 2048 features): the nuclear-norm route
    # equals pytorch-fid's sqrtm formula on the same sample statistics
    from talkformer_core.eval.fid import feature_stats

    x, y = rng.normal(size=(12, 40)), 1.5 * rng.normal(size=(15, 40)) + 0.2
    assert fid_from_features(x, y) == pytest.approx(frechet_distance(*feature_stats(x), *feature_stats(y)), rel=1e-5)


def test_fid_inception_layout_loading_and_features(tmp_path):
    torch.manual_seed(0)
    src = FIDInception(resize_input=False)
    for m in src.modules():  # non-trivial BN statistics, so loading them is checked
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # pytorch-fid's file has fc
    f = tmp_path / "pt_inception.pth"
    torch.save(sd, f)
    net = load_fid_inception(f, resize_input=False)
    x = torch.rand(2, 3, 75, 75)
    with torch.no_grad():
        torch.testing.assert_close(net(x), src(x))
        assert net(x).shape == (2, 2048)
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in sd and "Conv2d_1a_3x3.conv.weight" in sd
    rng = np.random.default_rng(3)
    a = _rand_images(rng, (4, 75, 75, 3))
    fa = net.features_uint8(a)
    assert fid_from_features(fa, fa) == pytest.approx(0.0, abs=1e-6 * max(1.0, np.trace(np.cov(fa.T))))
    bad = dict(sd)
    bad["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth.*Mixed_5b.branch1x1.conv.weight"):
        load_fid_inception(tmp_path / "bad.pth")


# ----------------------------------------------------------------------------- LPIPS

def _lpips_files(tmp_path, net="alex"):
    torch.manual_seed(0)
    m = LPIPS(net)
    for k in range(5):  # trained heads are non-negative (lpips clamps them); so are ours here
        w = getattr(m, f"lin{k}").model[1].weight
        w.data = w.data.abs()
    backbone = {f"features.{k}": v for k, v in m.features.state_dict().items()}
    backbone["classifier.1.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier: ignored
    heads = {k: v for k, v in m.state_dict().items() if k.startswith("lin")}
    torch.save(backbone, tmp_path / f"{net}_backbone.pth")
    torch.save(heads, tmp_path / f"{net}_heads.pth")
    return m, tmp_path / f"{net}_backbone.pth", tmp_path / f"{net}_heads.pth"


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_loading_and_properties(tmp_path, net):
    src, fb, fh = _lpips_files(tmp_path, net)
    assert set(torch.load(fh, weights_only=True)) == {f"lin{k}.model.1.weight" for k in range(5)}
    m = load_lpips(fb, fh)  # net read from the heads' channels
    assert m.net_name == net
    rng = np.random.default_rng(4)
    a = _rand_images(rng, (3, 64, 96, 3) if net == "alex" else (2, 32, 48, 3))
    x = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        torch.testing.assert_close(m(x, x.flip(0)), src(x, x.flip(0)))
    assert np.all(m.distance_uint8(a, a) == 0)
    d1, d2 = m.distance_uint8(a, _noised(rng, a, 10)), m.distance_uint8(a, _noised(rng, a, 60))
    assert np.all(d1 > 0) and np.all(d2 > d1)


def test_refused_pickle_names_the_file(tmp_path):
    f = tmp_path / "whole_module.pth"
    torch.save(torch.nn.Linear(2, 2), f)  # a pickled module, not a state dict: weights_only refuses it
    with pytest.raises(CheckpointError, match="whole_module.pth.*weights_only"):
        load_syncnet(f)
    with pytest.raises(CheckpointError, match="not found"):
        load_lpips(tmp_path / "missing.pth", tmp_path / "missing2.pth")


# ----------------------------------------------------------------------------- SyncNet

def _mfcc_reference(x: np.ndarray) -> np.ndarray:
    """MFCC written out independently: explicit DFT and DCT-II matrices, loops over frames."""
    sr, flen, step, nfft, nfilt = 16000, 400, 160, 512, 26
    y = np.concatenate([[x[0]], x[1:] - 0.97 * x[:-1]]).astype(np.float64)
    n = 1 + int(math.ceil((len(y) - flen) / step))
    y = np.concatenate([y, np.zeros((n - 1) * step + flen - len(y))])
    k = np.arange(nfft // 2 + 1)[:, None]
    dft = np.exp(-2j * np.pi * k * np.arange(flen)[None, :] / nfft)  # zero-padded to nfft
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    imel = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    pts = np.floor((nfft + 1) * imel(np.linspace(mel(0), mel(sr / 2), nfilt + 2)) / sr).astype(int)
    fb = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        for i in range(pts[j], pts[j + 1]):
            fb[j, i] = (i - pts[j]) / (pts[j + 1] - pts[j])
        for i in range(pts[j + 1], pts[j + 2]):
            fb[j, i] = (pts[j + 2] - i) / (pts[j + 2] - pts[j + 1])
    c = np.arange(13)[:, None]
    dct = np.sqrt(2 / nfilt) * np.cos(np.pi * c * (2 * np.arange(nfilt)[None, :] + 1) / (2 * nfilt))
    dct[0] /= np.sqrt(2)
    lift = 1 + 11 * np.sin(np.pi * np.arange(13) / 22)
    out = []
    for t in range(n):
        p = np.abs(dft @ y[t * step:t * step + flen]) ** 2 / nfft
        v = (dct @ np.log(fb @ p)) * lift
        v[0] = np.log(p.sum())
        out.append(v)
    return np.array(out)


def test_mfcc_matches_independent_and_python_speech_features():
    rng = np.random.default_rng(5)
    x = np.round(rng.normal(0, 2000, 5000) + 3000 * np.sin(np.arange(5000) * 0.05))
    m = mfcc(x)
    assert m.shape == (1 + math.ceil((5000 - 400) / 160), 13)
    np.testing.assert_allclose(m, _mfcc_reference(x), rtol=1e-9, atol=1e-8)
    psf = pytest.importorskip("python_speech_features")
    np.testing.assert_allclose(m, psf.mfcc(x.astype(np.int16), 16000), rtol=1e-9, atol=1e-8)
    # syncnet_mfcc feeds the int16 scale of a pcm_s16le wav
    np.testing.assert_allclose(syncnet_mfcc(x / 32768.0), m.T, rtol=1e-9, atol=1e-8)


def test_sync_offset_recovers_a_known_shift():
    g = torch.Generator().manual_seed(0)
    im = torch.randn(60, 32, generator=g)
    for d in (-4, 0, 3):
        cc = torch.roll(im, -d, dims=0)  # cc[m] = im[m + d] -> syncnet's offset d
        r = sync_offset(im, cc, vshift=15)
        assert r.offset == d and r.confidence > 1.0 and r.min_dist < r.confidence
        assert r.dists.shape == (60, 31)


def test_syncnet_loading_and_scorer(tmp_path):
    torch.manual_seed(0)
    src = SyncNet()
    f = tmp_path / "syncnet_v2.model"
    torch.save({k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}, f)
    net = load_syncnet(f)
    a = torch.randn(2, 1, 13, 20)
    torch.testing.assert_close(net.forward_aud(a), src.forward_aud(a))
    rng = np.random.default_rng(6)
    frames = _rand_images(rng, (12, 100, 100, 3))  # resized to 224 inside
    sc = SyncScorer(net, batch=4)
    sc.add(frames)
    wav = rng.normal(0, 0.1, 16000 * 12 // 25 + 100).astype(np.float32)
    r = sc.result(wav, vshift=3)
    assert r.frames == 12 - 5 and r.dists.shape == (7, 7)
    assert -3 <= r.offset <= 3 and r.confidence >= 0


# ----------------------------------------------------------------------------- score_crops

def test_score_crops_identical_and_noised_with_networks(tmp_path):
    rng = np.random.default_rng(7)
    lp, fb, fh = _lpips_files(tmp_path)
    fid = _random_inception(resize_input=False)
    crops = _rand_images(rng, (4, 160, 160, 3))
    same = metrics.score_crops(crops, crops, landmarks=False, lpips=lp, fid=fid)
    assert same["frames"] == 4 and math.isinf(same["psnr"]) and same["ssim"] == pytest.approx(1.0)
    assert same["lpips"] == 0.0 and same["lmd"] is None
    # only the lower half counts: changing the upper half changes nothing
    upper = crops.copy()
    upper[:, :80] = 0
    assert math.isinf(metrics.score_crops(upper, crops, landmarks=False)["psnr"])
    noisy = crops.copy()
    noisy[:, 80:] = _noised(rng, crops[:, 80:], 30)
    worse = metrics.score_crops(noisy, crops, landmarks=False, lpips=lp, fid=fid)
    assert worse["psnr"] < 25 and worse["ssim"] < 0.95 and worse["lpips"] > 0
    assert worse["fid"] > 0 and abs(same["fid"]) < 1e-9 * worse["fid"] * 1e3


# ----------------------------------------------------------------------------- real clip

@pytest.fixture(scope="module")
def clip_variants(tmp_path_factory):
    """Re-encoded first 40 frames of the clip: a plain copy, a copy with the lower face blurred,
    and a 38-frame copy (for trimming)."""
    if not CLIP.exists():
        pytest.skip(f"{CLIP} not present")
    import cv2

    from talkformer_core.video import VideoWriter, iter_frames

    d = tmp_path_factory.mktemp("evalclip")
    frames = list(iter_frames(CLIP, 25.0, max_frames=40))
    h, w = frames[0].shape[:2]
    with VideoWriter(d / "copy.mp4", 25.0, crf=16) as wc, VideoWriter(d / "blur.mp4", 25.0, crf=16) as wb, \
            VideoWriter(d / "short.mp4", 25.0, crf=16) as ws:
        for i, f in enumerate(frames):
            wc.write(f)
            if i < 38:
                ws.write(f)
            b = f.copy()
            y0, y1, x0, x1 = int(0.5 * h), int(0.9 * h), int(0.2 * w), int(0.8 * w)  # mouth and chin region
            b[y0:y1, x0:x1] = cv2.GaussianBlur(b[y0:y1, x0:x1], (0, 0), 6)
            wb.write(b)
    return d


def test_real_clip_self_blurred_and_trimmed(clip_variants):
    d = clip_variants
    self_ = metrics.evaluate_pair(CLIP, CLIP, max_frames=40)
    assert self_["frames"] == 40 and math.isinf(self_["psnr"]) and self_["ssim"] == pytest.approx(1.0)
    assert self_["lmd"] == 0.0 and self_["mouth_corr"] == pytest.approx(1.0) and self_["lmd_frames"] == 40
    copy = metrics.evaluate_pair(d / "copy.mp4", CLIP, max_frames=40)
    blur = metrics.evaluate_pair(d / "blur.mp4", CLIP, max_frames=40)
    assert copy["psnr"] > 35 and blur["psnr"] < copy["psnr"] - 5
    assert blur["ssim"] < copy["ssim"] < 1.0
    assert blur["lmd"] > 0 and blur["lmd"] > copy["lmd"]
    assert len(blur["per_frame"]["mouth_open_gen"]) == 40
    short = metrics.evaluate_pair(d / "short.mp4", CLIP, max_frames=40)
    assert short["frames"] == 38 and short["frames_truth"] == 40
    assert any("trimmed" in n for n in short["notes"])
    with pytest.raises(InputError, match="differ in length"):
        metrics.evaluate_pair(d / "short.mp4", CLIP)  # 38 vs 122 frames: not a pair


def test_cli_batch_mode_writes_table_json_plot(clip_variants, tmp_path):
    from talkformer_core.eval.cli import main

    d = clip_variants
    _, fb, fh = _lpips_files(tmp_path)
    src = SyncNet()
    torch.save(src.state_dict(), tmp_path / "syncnet_v2.model")
    (tmp_path / "pairs.csv").write_text(f"generated,truth,name\n{d / 'copy.mp4'},{CLIP},copy\n{d / 'blur.mp4'},{CLIP},blur\n")
    out = tmp_path / "out"
    rc = main(["--pairs", str(tmp_path / "pairs.csv"), "--out-dir", str(out), "--max-frames", "12",
               "--crop-size", "128", "--lpips-backbone", str(fb), "--lpips-heads", str(fh),
               "--syncnet-weights", str(tmp_path / "syncnet_v2.model"), "--csim"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in res["pairs"]] == ["copy", "blur"]
    copy, blur = res["pairs"]
    assert blur["psnr"] < copy["psnr"] and blur["lpips"] > copy["lpips"]
    assert copy["sync"]["frames"] == 12 - 5 and "truth" in copy["sync"]
    assert res["mean"]["psnr"] == pytest.approx((copy["psnr"] + blur["psnr"]) / 2)
    md = (out / "results.md").read_text()
    assert "| copy | 12 |" in md and "| **mean** |" in md and "FID: no Inception weights given" in md
    from talkformer_core.eval.csim import csim_unavailable_reason

    if csim_unavailable_reason() is None:
        assert 0.9 < copy["csim"] <= 1.0 + 1e-9 and blur["csim"] < copy["csim"] + 1e-9
    else:
        assert copy["csim"] is None and "CSIM skipped" in md
    assert (out / "mouth_opening.png").stat().st_size > 1000
    assert main(["--generated", str(d / "copy.mp4")]) == 2  # no --truth: a clear error, exit code 2

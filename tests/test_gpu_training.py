"""High fidelity on the user's GPU, tested on the CPU at tiny sizes: the one preset list and
``auto``, the GPU person presets' recipe, device checks and batch sizing, bf16 autocast and
channels_last training steps, the image-less batches of a latent-cached step, the 256 px ruler,
the grid writer, packed shards and the GPU bench script end to end (without mediapipe / PyAV)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]



# ---------------------------------------------------------------------------------------------- presets

def test_one_preset_list_read_by_the_clis_and_the_node():
    from talkformer_core import config
    from talkformer_core.finetune.cli import build_parser as finetune_parser
    from talkformer_core.finetune.presets import PRESETS as finetune_presets
    from talkformer_core.train.__main__ import build_parser as train_parser

    names = config.PRESET_NAMES
    assert names[0] == "auto" and {"cpu64", "cpu96", "gpu128", "gpu256", "small", "paper", "tiny"} <= set(names)
    assert set(names) - {"auto"} == set(config.PRESETS)  # every name but auto builds a config
    assert finetune_presets is names
    ft = {a.dest: a for a in finetune_parser()._actions}
    assert tuple(ft["preset"].choices) == names and ft["preset"].default == "auto"
    tr = {a.dest: a for a in train_parser()._actions}
    assert tuple(tr["preset"].choices) == names
    sys.path.insert(0, str(ROOT))
    from nodes import train_node

    assert train_node.presets() == [n for n in names if n != "tiny"]
    widget = train_node.TrainTalkFormerOnVideo.INPUT_TYPES()["required"]["preset"]
    assert widget[0] == train_node.presets() and widget[1]["default"] == "auto"
    for name in ("auto", "cpu64", "gpu256"):
        assert name in (ROOT / "docs" / "finetune.md").read_text()


def test_auto_picks_cpu64_on_a_cpu_and_gpu256_on_cuda():
    from talkformer_core.config import person_config, preset, resolve_preset
    from talkformer_core.finetune.presets import finetune_config

    assert resolve_preset("auto", "cpu") == resolve_preset("auto", torch.device("cpu")) == "cpu64"
    for dev in ("cuda", "cuda:1", torch.device("cuda", 0)):
        assert resolve_preset("auto", dev) == "gpu256"
    assert resolve_preset("gpu128", "cpu") == "gpu128" and resolve_preset("tiny", "cuda") == "tiny"
    if not torch.cuda.is_available():
        assert resolve_preset("auto") == "cpu64"
    assert preset("auto", "cpu").to_json() == person_config(64).to_json() == finetune_config("auto", device="cpu").to_json()
    assert finetune_config("auto", device="cuda").to_json() == preset("gpu256").to_json()
    with pytest.raises(ValueError, match="gpu256"):
        preset("gpu512")


@pytest.mark.parametrize("name, crop, latent", [("gpu128", 128, 32), ("gpu256", 256, 64)])
def test_gpu_presets_keep_the_cpu_recipe_at_the_papers_crop(name, crop, latent):
    """Position features, landmark map, shift augmentation (the same fraction of the crop as
    cpu64's), mouth anchor, mouth model, w/o End2End; KL-f4 latent 3 channels; bf16; batches."""
    from talkformer_core.config import preset

    cpu, cfg = preset("cpu64"), preset(name)
    m, t = cfg.model, cfg.train
    assert (m.image_size, m.latent_size, m.latent_channels, m.autoencoder.downsample) == (crop, latent, 3, 4)
    assert m.unet.position_features and m.unet.landmark_map and m.unet.landmark_fill and m.anchor_mouth_x
    assert m.landmark == cpu.model.landmark  # stage 1 as cpu64's
    assert not t.end_to_end and t.bf16 and not cpu.train.bf16
    assert t.autoencoder_warp == cpu.train.autoencoder_warp > 0  # a fraction of the crop: the same at any size
    frac = lambda c: c.train.shift_augment * c.model.autoencoder.downsample / c.model.image_size  # noqa: E731
    assert frac(cfg) == frac(cpu) == 0.125
    assert m.unet.channel_mult == (1, 2, 3, 4) and 64 <= m.unet.model_channels <= 128
    assert t.batch_size >= 4 * cpu.train.batch_size and 2e-4 <= t.lr <= 1e-3
    assert 0 < t.autoencoder_share < 1 and t.autoencoder_batch_size >= 1
    assert cfg.from_json(cfg.to_json()).to_json() == cfg.to_json()  # the new fields serialise


# ---------------------------------------------------------------------------------------------- device

def test_batch_for_device_fits_the_free_memory():
    from talkformer_core.train.device import GIB, batch_for_device

    assert batch_for_device(16, 100 * GIB, GIB) == 16  # plenty: the preset's batch
    assert batch_for_device(16, 10 * GIB, GIB, headroom=0.85) == 8  # floor(8.5)
    assert batch_for_device(16, 10 * GIB, GIB, fixed_bytes=3 * GIB, headroom=1.0) == 7
    assert batch_for_device(16, GIB // 2, GIB) == 0  # not even one sample
    assert batch_for_device(16, GIB, GIB, fixed_bytes=2 * GIB) == 0
    with pytest.raises(ValueError):
        batch_for_device(16, GIB, 0)


def test_cuda_without_a_gpu_is_a_clear_error():
    from talkformer_core.errors import InputError
    from talkformer_core.train.device import resolve_device

    assert resolve_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert resolve_device(None).type == "cpu"
    with pytest.raises(InputError, match=r"--device cuda: no CUDA GPU.*--preset cpu64"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="not a torch device"):
        resolve_device("gpu0")


def test_fit_batches_shrinks_the_batch_or_names_the_preset_that_fits():
    from talkformer_core.config import preset
    from talkformer_core.errors import InputError
    from talkformer_core.train.device import GIB, HEADROOM, MIN_BATCH, fit_batches, sample_bytes

    dev = torch.device("cpu")
    cfg = preset("cpu96")
    per_tf, fix_tf = sample_bytes(cfg, dev, True, "talkformer")
    per_ae, fix_ae = sample_bytes(cfg, dev, True, "autoencoder")
    assert per_tf > 0 and fix_tf > 0 and per_ae > 0
    assert sample_bytes(cfg, dev, True, "talkformer")[0] < sample_bytes(cfg, dev, False, "talkformer")[0]  # bf16 halves
    assert fit_batches(cfg, dev, True, free_bytes=1000 * GIB) == (cfg.train.batch_size, cfg.train.autoencoder_batch_size)
    # room for exactly MIN_BATCH windows and as many crops (cpu96's batch is 4 = MIN_BATCH)
    need = max(fix_tf + MIN_BATCH * per_tf, fix_ae + MIN_BATCH * per_ae)
    assert fit_batches(cfg, dev, True, free_bytes=int(need / HEADROOM) + 1024)[0] == MIN_BATCH
    small = preset("cpu64")
    n64 = max(f + MIN_BATCH * p for p, f in (sample_bytes(small, dev, True, s) for s in ("talkformer", "autoencoder")))
    assert n64 < need
    with pytest.raises(InputError, match=r"preset cpu96: needs about .* GiB .* --preset cpu64 fits"):
        fit_batches(cfg, dev, True, name="cpu96", free_bytes=int((n64 + (need - n64) / 4) / HEADROOM))
    with pytest.raises(InputError, match="no person preset fits"):
        fit_batches(cfg, dev, True, name="cpu96", free_bytes=GIB // 1024)


# ---------------------------------------------------------------------------------------------- training steps

def test_bf16_autocast_and_channels_last_training_steps_on_the_cpu(shards, ae_file, tmp_path):
    """Both stages train under bf16 autocast on the CPU with finite losses close to fp32's, and
    channels_last gives fp32's losses; the metrics say where the wall time went."""
    from talkformer_core.train import train

    cfg = tiny_config()
    runs = {}
    for name, kw in (("fp32", {}), ("bf16", {"bf16": True}), ("nhwc", {"channels_last": True})):
        r = train(cfg, stage="talkformer", data=shards, out=tmp_path / name, steps=3, autoencoder=ae_file,
                  device="cpu", seed=0, progress=False, **kw)
        runs[name] = r.metrics
    for name, m in runs.items():
        assert all(np.isfinite(v) for v in m["loss"]), name
        assert 0 < m["busy_share"] <= 1 and m["samples_per_s"] > 0 and m["batch_size"] == cfg.train.batch_size
        assert m["compute_seconds"] + m["data_seconds"] <= m["wall_seconds"] + 1e-6
    assert runs["bf16"]["loss"] != runs["fp32"]["loss"]  # autocast did run in bf16
    np.testing.assert_allclose(runs["bf16"]["loss"], runs["fp32"]["loss"], rtol=0.1)
    np.testing.assert_allclose(runs["nhwc"]["loss"], runs["fp32"]["loss"], rtol=1e-3)
    ae = train(cfg, stage="autoencoder", data=shards, out=tmp_path / "ae_bf16", steps=3, batch_size=4, device="cpu",
               bf16=True, seed=0, progress=False)
    assert all(np.isfinite(v) for v in ae.metrics["loss"]) and np.isfinite(ae.metrics["scale_factor"])
    assert ae.metrics["samples_per_s"] > 0


def test_a_latent_cached_step_needs_no_images(shards, ae_file):
    """With the latents cached the dataset leaves the image tensors out, and the step's losses
    are those of the full batch."""
    from talkformer_core.data.dataset import TalkingFaceDataset
    from talkformer_core.models.checkpoint import load_model_state, read_checkpoint
    from talkformer_core.models.model import TalkFormer
    from talkformer_core.train.latents import LatentCache
    from talkformer_core.train.steps import TalkFormerStep

    cfg = tiny_config()
    torch.manual_seed(0)
    model = TalkFormer(cfg).eval()
    load_model_state(model.autoencoder, read_checkpoint(ae_file)[0], "autoencoder")
    ds = TalkingFaceDataset(shards, cfg, frames=(0.0, 0.8))
    cache = LatentCache(model, ds, torch.device("cpu"))
    items = [(0, 1), (4, 1), (len(ds) - 1, 2)]
    full = torch.utils.data.default_collate([ds[i] for i in items])
    ds.images = False
    lean = torch.utils.data.default_collate([ds[i] for i in items])
    assert lean["crops"].shape == (3, cfg.model.sequence_length, 0) and lean["reference"].numel() == 0
    assert full["crops"].shape[-1] == cfg.model.image_size
    step = TalkFormerStep(model, cfg, latents=cache).eval()
    with torch.no_grad():
        a = step.losses(full, torch.Generator().manual_seed(5))
        b = step.losses(lean, torch.Generator().manual_seed(5))
    assert float(a["ldm"]) == float(b["ldm"]) and float(a["l1"]) == float(b["l1"])


# ---------------------------------------------------------------------------------------------- ruler, grid

def test_ruler_upscales_and_scores_the_lower_half():
    from talkformer_core.eval.ruler import RULER, ruler_scores, to_ruler

    assert RULER == 256
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert to_ruler(truth, 32) is truth
    up = to_ruler(truth[:, ::4, ::4], 32)  # 8 px -> 32 px bicubic
    assert up.shape == (2, 32, 32, 3) and up.dtype == np.uint8
    down = to_ruler(np.repeat(np.repeat(truth, 2, 1), 2, 2), 32)  # 64 px of 2x2 blocks -> area average = truth
    np.testing.assert_array_equal(down, truth)
    same = ruler_scores(truth, truth, landmarks=False, size=32)
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0) and same["gen_size"] == 32
    # only the lower half counts: the upper half may differ freely
    g = truth.copy()
    g[:, :16] = 0
    assert ruler_scores(g, truth, landmarks=False, size=32)["psnr"] == float("inf")
    g[:, 16:] = np.clip(truth[:, 16:].astype(int) + 10, 0, 255)
    diff = g[:, 16:].astype(float) - truth[:, 16:]
    expect = np.mean([10 * np.log10(255 ** 2 / np.mean(d ** 2)) for d in diff])
    assert ruler_scores(g, truth, landmarks=False, size=32)["psnr"] == pytest.approx(expect, rel=1e-6)
    # a smooth image kept at 1/4 size and upscaled scores close to itself, far above noise
    yy, xx = np.mgrid[0:32, 0:32]
    smooth = np.stack([np.stack([yy * 8, xx * 8, (yy + xx) * 4], -1)] * 2).astype(np.uint8)
    small = to_ruler(smooth, 8)
    s_up = ruler_scores(small, smooth, landmarks=False, size=32)
    s_noise = ruler_scores(rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8), smooth, landmarks=False, size=32)
    assert s_up["psnr"] > s_noise["psnr"] + 10 and s_up["ssim"] > s_noise["ssim"]


def test_grid_places_tiles_row_major_with_labels():
    from talkformer_core.eval.ruler import grid, write_png

    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(10, 20, 30), (200, 100, 0), (0, 0, 0)]]
    rows = [[np.full((s, s, 3), c, np.uint8) for c, s in zip(r, (8, 16, 4))] for r in colours]  # any tile size
    img = grid(rows, tile=8, pad=2)
    assert img.shape == (2 + 2 * 10, 2 + 3 * 10, 3) and img.dtype == np.uint8
    for r, row in enumerate(colours):
        for c, col in enumerate(row):
            y, x = 2 + r * 10, 2 + c * 10
            np.testing.assert_array_equal(img[y:y + 8, x:x + 8].reshape(-1, 3), np.tile(col, (64, 1)))
    assert (img[0] == 255).all() and (img[:, 10:12] == 255).all()  # padding is background
    wide = grid(rows, tile=(4, 8), pad=0, col_labels=["a", "b", "c"], row_labels=["x", "y"])
    top, left = 22, 7 + 8
    assert wide.shape == (top + 2 * 4, left + 3 * 8, 3)
    np.testing.assert_array_equal(wide[top + 4, left + 8], (200, 100, 0))
    assert (wide[:top] < 255).any()  # the labels are drawn
    import cv2

    p = write_png(Path(pytest.importorskip("tempfile").mkdtemp()) / "g" / "grid.png", img)
    np.testing.assert_array_equal(cv2.imread(str(p))[..., ::-1], img)


# ---------------------------------------------------------------------------------------------- packed shards, bench

def test_packed_shard_round_trip_is_exact(shards, tmp_path):
    from talkformer_core.data.dataset import load_shard
    from talkformer_core.data.packed import pack_shard, unpack_shard

    src = sorted(shards.glob("*.npz"))[0]
    packed = pack_shard(src, tmp_path / "p.npz")
    back = load_shard(unpack_shard(packed, tmp_path / "u" / "s.npz"))
    orig = load_shard(src)
    assert set(back) == set(orig)
    for k in orig:
        np.testing.assert_array_equal(back[k], orig[k], err_msg=k)
    from talkformer_core.data.packed import decode_images, encode_images

    noise = np.random.default_rng(1).integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)  # lossless even on noise
    np.testing.assert_array_equal(decode_images(encode_images(noise, "x"), "x"), noise)


def test_gpu_bench_script_runs_without_mediapipe_or_pyav(shards, tmp_path):
    """bench/gpu_finetune.py end to end on the CPU (tiny, 2 + 2 steps, with --dubbing), mediapipe and
    PyAV made unimportable as on the GPU box; then the scorer reads its file (PSNR / SSIM only) and
    scores the dubbing protocol's crops with mediapipe here."""
    from talkformer_core.data.packed import pack_shard

    src = sorted(shards.glob("*.npz"))[0]
    packed = pack_shard(src, tmp_path / "packed" / src.name)
    out = tmp_path / "out" / "clip.tiny.npz"
    code = ("import sys, runpy; sys.modules['mediapipe'] = None; sys.modules['av'] = None; "
            f"sys.argv = ['gpu_finetune.py', '--shard', {str(packed)!r}, '--out', {str(out)!r}, '--minutes', '30', "
            f"'--preset', 'tiny', '--steps', '2', '--sampler-steps', '2', '--threads', '1', '--work', {str(tmp_path / 'w')!r}, "
            "'--holdout', '0.4', '--dubbing']; "
            "runpy.run_path('bench/gpu_finetune.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={"DEV": "cpu", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(out) as z:
        meta = json.loads(str(z["meta"]))
    assert meta["steps"] == {"autoencoder": 2, "talkformer": 2} and meta["preset"] == "tiny"
    assert meta["speed"]["talkformer"]["samples_per_s"] > 0
    # the scorer reads the (WebP-encoded) crops back; its truth shard must be 256 px
    sys.path.insert(0, str(ROOT / "bench"))
    import score_gpu_finetune as S

    runs = S.load_results([str(out.parent)])
    assert list(runs) == [src.name] and list(runs[src.name]) == ["tiny"]
    r = runs[src.name]["tiny"]
    gen, test_idx = r["ours_audio"], r["test_idx"]
    assert gen.dtype == np.uint8 and gen.shape == (len(test_idx), 32, 32, 3) and len(test_idx) >= 3
    assert r["ours_landmarks"].shape == gen.shape
    with pytest.raises(SystemExit, match="256 px shard"):
        S.score_clip(src, runs[src.name], meta["holdout"], landmarks=False)
    # the dubbing protocol's crops, made without mediapipe, read here: every row and the silence check
    from talkformer_core.finetune.dubbing import format_dubbing, score_dubbing

    assert (out.parent / "clip.tiny.dubbing.npz").exists()  # a file of its own (returned files are capped)
    dub = r["dubbing"]
    assert dub is not None and dub["crops"]["silence"].shape == (50, 32, 32, 3)
    assert dub["crops"]["train"].shape[0] == dub["meta"]["train_frames"] == len(dub["series"]["train"])
    rep = score_dubbing(dub)
    for key in ("stage1", "faces", "renderer_true_landmarks", "nearest_mouth", "loudness"):
        assert {"corr_audio", "corr_template"} <= set(rep["rows"][key])
    assert rep["silence"]["faces_ok"] == (rep["silence"]["faces_max"] <= rep["silence"]["faces_closed_real"])
    assert "silence (50 frames)" in format_dubbing(rep) and "### Dubbing" in S.dubbing_markdown(runs)


def test_gpu_bench_script_rejects_dubbing_without_a_holdout(tmp_path, capsys):
    """--dubbing with --holdout 0 is refused before the shard is read or anything trains."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_finetune as G

    with pytest.raises(SystemExit) as e:
        G.main(["--shard", str(tmp_path / "absent.npz"), "--out", str(tmp_path / "o.npz"), "--minutes", "1",
                "--dubbing", "--holdout", "0"])
    assert e.value.code == 2 and "--dubbing needs 0 < --holdout < 1" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()

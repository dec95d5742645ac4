"""LEARNING TEST: train on synthetic clips of one photo, drive with unseen audio.

Everything (data generation, autoencoder, TalkFormer, evaluation) runs here on CPU. Asserts:
  - the mouth opening measured on the generated frames (area of the dark mouth interior in the
    lower half) correlates >= 0.8 with the true opening of the unseen clip;
  - the generated lower half is closer to the true frames (PSNR) than the copied reference mouth;
  - the completion module's landmark L1 falls by >= 5x during training;
  - dubbing (another unseen clip's frames driven by that audio): stage 1 and the faces follow the
    audio (>= 0.8), the faces do not follow the template (<= 0.2), and silence keeps the mouth within
    the closed range.
Stage 1 is checked both ways the person presets can run it: the fitted mouth model and the transformer.
Run standalone for the numbers: ``python tests/test_train_learning.py``.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CROP = 32
TRAIN_SEEDS = (0, 1)
TRAIN_SECONDS = 8.0
TEST_SEED = 1000
DUB_SEED = 1001  # dubbing: this clip's frames driven by TEST_SEED's audio
AE_STEPS, TF_STEPS = 100, 1200  # fixed step counts: the verdict never depends on the machine's speed
TF_BATCH = 8
SAMPLER_STEPS = 10
# torch's CPU kernels split their reductions by thread count (measured: the TalkFormer loss differs
# in the 3rd digit after 10 steps at 1 vs 2 threads), so the thread count is fixed for the numbers
THREADS = 2


def learning_config():
    """tiny's sizes with the person presets' stage-2 recipe (config.person_config): the landmark map
    with filled lips, M-Align's position features, and the U-Net trained on the detected landmarks (w/o End2End).
    With tiny's own recipe (end to end, no map) the renderer trained on stage 1's early, poor
    predictions and learned to ignore its landmarks: faces 0.33 on unseen audio (docs/dubbing.md)."""
    from talkformer_core.config import AutoencoderConfig, tiny

    cfg = tiny()
    cfg.model.image_size = CROP
    cfg.model.autoencoder = AutoencoderConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=CROP)
    cfg.model.landmark.dropout = 0.0
    cfg.model.unet.landmark_map = True
    cfg.model.unet.landmark_fill = True
    cfg.model.unet.position_features = True
    cfg.model.diffusion.decode_refine = 4  # the person presets' decode (sampling.decode_faces)
    cfg.train.end_to_end = False
    cfg.train.lr = 1e-3
    cfg.train.autoencoder_lr = 2e-3
    return cfg


def mouth_area(crops: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """(T, S, S, 3) uint8 -> (T,) count of dark pixels (the mouth interior) inside box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    r = crops[:, y0:y1, x0:x1].astype(np.float32)
    lum = r.mean(-1)
    return (np.clip((90.0 - lum) / 40.0, 0, 1)).sum((1, 2))  # soft count: robust to blur


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def run(workdir: Path, log=print, tf_steps: int = TF_STEPS, threads: int = THREADS, save_every: int = 0) -> dict:
    """Train (seeded, ``tf_steps`` TalkFormer steps at ``threads`` torch threads) and evaluate.
    ``save_every``: also keep the checkpoints every that many steps in workdir/tf/step_N.safetensors."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(workdir, log, tf_steps, save_every)
    finally:
        torch.set_num_threads(prev_threads)


def _run(workdir: Path, log, tf_steps: int, save_every: int) -> dict:
    from talkformer_core.data import synthetic
    from talkformer_core.data.preprocess import save_shard, shard_from_synthetic
    from talkformer_core.train import train

    t0, c0 = time.time(), time.process_time()
    cfg = learning_config()
    photo = synthetic.load_photo("astronaut")
    train_dir, test_dir = workdir / "train", workdir / "test"
    for s in TRAIN_SEEDS:
        clip = synthetic.make_clip(photo, seed=s, duration=TRAIN_SECONDS, frame_size=96)
        save_shard(train_dir / f"syn{s}.npz", shard_from_synthetic(clip, CROP))
    test_clip = synthetic.make_clip(photo, seed=TEST_SEED, duration=4.0, frame_size=96)
    save_shard(test_dir / "test.npz", shard_from_synthetic(test_clip, CROP))
    t_data = time.time() - t0
    log(f"data: {t_data:.1f} s")

    t1 = time.time()
    ae = train(cfg, stage="autoencoder", data=train_dir, out=workdir / "ae", steps=AE_STEPS, batch_size=16,
               device="cpu", progress=False, seed=0)
    t_ae = time.time() - t1
    log(f"autoencoder: {AE_STEPS} steps {t_ae:.1f} s, last L1 {ae.metrics['l1'][-1]:.4f}")

    t2 = time.time()
    keep = []

    def snapshot(step, total, vals):  # train saved last.safetensors at this step just before
        if step % save_every == 0 and step < total:
            keep.append(step)
            shutil.copy(workdir / "tf" / "last.safetensors", workdir / "tf" / f"step_{step}.safetensors")

    tf = train(cfg, stage="talkformer", data=train_dir, out=workdir / "tf", steps=tf_steps, batch_size=TF_BATCH,
               autoencoder=ae.checkpoint, device="cpu", progress=False, seed=0, save_every=save_every,
               callback=snapshot if save_every else None)
    t_tf = time.time() - t2
    assert int(tf.metrics["final_step"]) == tf_steps
    l1 = np.array(tf.metrics["l1"])
    l1_first, l1_last = float(l1[:5].mean()), float(l1[-20:].mean())
    log(f"talkformer: {tf_steps} steps {t_tf:.1f} s ({tf_steps / t_tf:.2f} steps/s), landmark L1 "
        f"{l1_first:.4f} -> {l1_last:.4f}, ldm {np.mean(tf.metrics['ldm'][:5]):.3f} -> "
        f"{np.mean(tf.metrics['ldm'][-20:]):.3f}")

    t3 = time.time()
    dub_clip = synthetic.make_clip(photo, seed=DUB_SEED, duration=4.0, frame_size=96)
    save_shard(workdir / "dub" / "template.npz", shard_from_synthetic(dub_clip, CROP))
    mouth = fit_mouth(train_dir)
    res = {}
    for stage1 in ("mouth", "transformer"):
        r = evaluate(tf.checkpoint, test_dir, test_clip, test_dir, stage1, mouth,
                     workdir / f"learning_{stage1}.png")
        d = evaluate(tf.checkpoint, workdir / "dub", test_clip, test_dir, stage1, mouth,
                     template_clip=dub_clip)
        sil = evaluate(tf.checkpoint, workdir / "dub", test_clip, test_dir, stage1, mouth,
                       template_clip=dub_clip, silence=True)
        res[stage1] = {**r, "dub_corr_audio": d["corr_generated"], "dub_corr_template": d["corr_template"],
                       "dub_partial_template": d["partial_template"],
                       "dub_template_weight": d["template_weight"], "dub_corr_stage1": d["corr_stage1"],
                       "silence_area_max": sil["area_max"], "closed_area": r["closed_area"]}
    res.update(res["mouth"])  # the person presets' stage 1 (ModelConfig / LandmarkConfig.mouth_model)
    for k in keep:
        r = evaluate(workdir / "tf" / f"step_{k}.safetensors", test_dir, test_clip, test_dir, "mouth", mouth)
        log(f"step {k}: corr {r['corr_generated']:.3f}, PSNR {r['psnr_generated']:.2f} vs copy "
            f"{r['psnr_copy_reference']:.2f}")
        res.setdefault("earlier", {})[k] = {n: r[n] for n in ("corr_generated", "psnr_generated")}
    t_eval = time.time() - t3
    res.update({"l1_first": l1_first, "l1_last": l1_last, "l1_ratio": l1_first / l1_last,
                "seconds": {"data": t_data, "autoencoder": t_ae, "talkformer": t_tf, "eval": t_eval,
                            "total": time.time() - t0, "cpu_total": time.process_time() - c0},
                "tf_steps": tf_steps, "tf_steps_per_s": tf_steps / t_tf})  # the clock only reports
    log(json.dumps(res, indent=1))
    return res


def fit_mouth(train_dir: Path):
    """The person presets' stage 1 (models.mouth_model) fitted on the training clips' frames, as
    finetune does (finetune.run.mouth_training_data: stable box frame)."""
    from talkformer_core.data.dataset import list_shards
    from talkformer_core.finetune.run import mouth_training_data
    from talkformer_core.models.mouth_model import MouthModel

    parts = [mouth_training_data(p, (0.0, 1.0)) for p in list_shards(train_dir)]
    return MouthModel(3).fit(np.concatenate([m for m, _ in parts]), np.concatenate([c for _, c in parts]))


def evaluate(checkpoint: Path, template_dir: Path, audio_clip, audio_dir: Path, stage1: str = "mouth",
             mouth=None, png: Path | None = None, template_clip=None, silence: bool = False) -> dict:
    """Drive the frames of ``template_dir``'s clip with the audio of ``audio_dir``'s (the same clip:
    self-reconstruction; another: dubbing; ``silence``: zero audio) through stage 1 (``"mouth"``:
    the fitted mouth model; ``"transformer"``: the completion module) and stage 2. Mouth-area
    correlation with the audio's true opening and the template's, PSNR."""
    from talkformer_core.audio import audio_windows
    from talkformer_core.data.dataset import TalkingFaceDataset, load_shard
    from talkformer_core.diffusion import NoiseSchedule, sample_ddim, upper_half_mask
    from talkformer_core.eval.dubbing import partial_corr, template_weight
    from talkformer_core.face import topology
    from talkformer_core.pipeline import load_model
    from talkformer_core.sampling import decode_faces, decode_refine_of

    loaded = load_model(checkpoint, "cpu", use_ema=False)  # tiny's EMA (decay 0.9999) is not trained yet
    model, mcfg = loaded.model, loaded.config
    ds = TalkingFaceDataset(template_dir, mcfg, split="test")
    audio_mels = load_shard(next(iter(sorted(Path(audio_dir).glob("*.npz")))))["mels"]
    if silence:
        audio_mels = audio_windows(np.zeros(int(16000 * len(audio_mels) / audio_clip.fps) + 1600, np.float32),
                                   len(audio_mels), audio_clip.fps)[1]
    content = torch.as_tensor(mouth(audio_mels)) if stage1 == "mouth" else None  # (T, 57, 2) box frame
    L = mcfg.model.sequence_length
    sched = NoiseSchedule(mcfg.model.diffusion)
    gen, truth, copy_ref, idx, gap1 = [], [], [], [], []
    ref = None
    with torch.no_grad():
        for w in range(0, len(ds), L):  # non-overlapping windows
            s = ds[w]
            fi = s["frame_index"].numpy()
            if ref is None:  # one reference frame for the whole clip, as at inference
                ref_img = s["reference"]
                ref = model.prepare_reference(model.encode(ref_img[None]))
            b = {k: v[None] for k, v in s.items()}
            b["mels"] = torch.as_tensor(audio_mels[fi], dtype=torch.float32)[None, :, None]
            if stage1 == "mouth":
                jaw, lips = content[fi][None, :, :17], content[fi][None, :, 17:]
                lm_box = topology.merge(b["pose"], jaw, lips)
            else:
                lm_box = model.landmark.complete(b["mels"], b["pose"], b["ref_landmarks"])
            gap1.append(topology.lip_openness(lm_box[0].numpy().astype(np.float64)))
            lm_crop = topology.box_to_crop(lm_box, b["landmark_box"], b["crop_box"])[0]
            ctx = model.encode(s["masked"])
            lmc = model.prepare_landmarks(lm_crop)
            g = torch.Generator().manual_seed(w)
            noise = torch.randn(ctx.shape, generator=g)
            h, wd = ctx.shape[-2:]
            z = sample_ddim(lambda x, t: model.unet(x, t, lmc, ref, num_frames=L), noise, sched, SAMPLER_STEPS,
                            known=ctx, known_mask=upper_half_mask(h, wd))
            to8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
            # decoded as the product decodes (refine passes: the template's mouth out of the decode)
            gen.append(decode_faces(loaded, z, to8(s["crops"]), decode_refine_of(loaded)))
            truth.append(to8(s["crops"]))
            copy_ref.append(np.repeat(to8(ref_img[None]), L, 0))
            idx.append(fi)
    gen, truth, copy_ref, idx, gap1 = (np.concatenate(a) for a in (gen, truth, copy_ref, idx, gap1))
    S = CROP
    # the mouth region: the template's true mouth box over the clip (the same region for every image)
    z = np.load(next(iter(sorted(Path(template_dir).glob("*.npz")))))
    lips = z["points131_crop"][:, list(topology.LIP_POS)] * S
    x0, y0 = np.floor(lips.min((0, 1)) - 2).astype(int)
    x1, y1 = np.ceil(lips.max((0, 1)) + 2).astype(int)
    box = (max(x0, 0), max(y0, S // 2), min(x1, S), min(y1, S))
    opening = audio_clip.opening[idx]
    templ = (template_clip or audio_clip).opening[idx]
    a_gen, a_true = mouth_area(gen, box), mouth_area(truth, box)
    lower = slice(S // 2, S)
    res = {"corr_generated": _corr(a_gen, opening), "corr_true_frames": _corr(a_true, templ),
           "corr_stage1": _corr(gap1, opening), "corr_template": _corr(a_gen, templ),
           "partial_template": float(partial_corr(a_gen, templ, opening)) if template_clip is not None else 0.0,
           "template_weight": float(template_weight(a_gen, opening, templ)) if template_clip is not None else 0.0,
           "psnr_generated": psnr(gen[:, lower], truth[:, lower]),
           "psnr_copy_reference": psnr(copy_ref[:, lower], truth[:, lower]),
           "area_max": float(a_gen.max()), "closed_area": float(np.percentile(a_true, 10)),
           "frames_tested": int(len(idx))}
    if png is not None:
        import cv2

        grid = np.concatenate([np.concatenate(list(a[:10]), 1) for a in (copy_ref, gen, truth)], 0)
        cv2.imwrite(str(png), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return res


def _corr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    return run(tmp_path_factory.mktemp("learning"))


@pytest.mark.slow
def test_landmark_l1_falls_fivefold(learned):
    assert learned["l1_ratio"] >= 5.0, learned


# Measured with this file (2 threads, seed 0, 1200 steps, decoded in two passes; four read the same
# to the third digit on the dubbing rows, silence 6.80): landmark L1 0.761 -> 0.0076 (101x); stage 1
# on the unseen audio: mouth model 0.977, transformer 0.991; the generated faces 0.963 / 0.973 (true
# frames 0.984), lower-half PSNR 24.50 / 24.87 dB vs 19.21 dB for the copied reference; dubbed (clip
# 1001's frames, clip 1000's audio) 0.962 / 0.975 with the audio, -0.184 / -0.035 with the template,
# template weight -0.113 / 0.038 (partial correlation -0.410 / 0.171; decoded once 0.223, the reading
# of a 0.052 weight); 2 s of silence: mouth area at most 3.95 / 6.82 against the person's closed area
# 7.27 (10th percentile of the true frames). On templates 1002 / 1003 the weights read 0.152 / -0.005
# and 0.015 / 0.000. These are the numbers of the suite, where other tests train first: the first
# training in a fresh, idle process takes another oneDNN path (its first loss 1e-7 apart; the
# autoencoder's L1 0.0494 against 0.0472 after 100 steps; not so under load, with ONEDNN_VERBOSE, or
# with torch.backends.mkldnn off, which trains 2.7x slower; mkldnn.deterministic does not change it).
# Run alone, four passes: faces 0.964 / 0.976, weights -0.115 / -0.015, silence 4.81 / 7.01.
@pytest.mark.slow
def test_generated_mouth_follows_unseen_audio(learned):
    for r in (learned["mouth"], learned["transformer"]):
        assert r["corr_generated"] >= 0.8, r
        assert r["psnr_generated"] > r["psnr_copy_reference"], r


@pytest.mark.slow
def test_mouth_follows_new_audio_when_dubbing(learned):
    """Dubbing: another clip's frames driven by the unseen audio. Stage 1 (the person presets' mouth
    model, and the transformer) and the faces follow that audio, the faces do not copy the template's
    mouth, and 2 s of silence keep it closed."""
    for r in (learned["mouth"], learned["transformer"]):
        assert r["dub_corr_stage1"] >= 0.8, r
        assert r["dub_corr_audio"] >= 0.8, r  # the faces follow the new audio ...
        # ... and not the template (negative: against it, no leak); its weight with the audio held
        # fixed, not the partial correlation, which reads noise when the faces follow the audio at 0.97
        assert r["dub_corr_template"] <= 0.2 and r["dub_template_weight"] <= 0.2, r
        assert r["silence_area_max"] <= r["closed_area"], r  # silence: within the closed-mouth range


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import argparse

    ap = argparse.ArgumentParser(description="the learning test's numbers (bench: steps and threads)")
    ap.add_argument("out", nargs="?", default="/tmp/talkformer_learning")
    ap.add_argument("--tf-steps", type=int, default=TF_STEPS)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--save-every", type=int, default=0, help="also evaluate the run's earlier checkpoints")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    run(out, tf_steps=a.tf_steps, threads=a.threads, save_every=a.save_every)

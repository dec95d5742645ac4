"""Real-clip run (not a test): train on the first 80% of one clip from a folder of talking clips
(default ../shared/media), test on the last 20% with its own audio.

    python bench/train_real_clip.py [--clip NAME] [--preset small] [--ae-minutes 5] [--tf-minutes 10]

Reports lower-half PSNR, SSIM and the mouth landmark distance (mediapipe on the output crop, lip
points in the crop frame, mean px at the crop size) for: the generated frames, the reference mouth
copied, and the masked input decoded without denoising.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MEDIA = ROOT.parent / "shared" / "media"


def lower_metrics(gen: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    S = truth.shape[1]
    p = np.mean([peak_signal_noise_ratio(t[S // 2:], g[S // 2:], data_range=255) for g, t in zip(gen, truth)])
    s = np.mean([structural_similarity(t[S // 2:], g[S // 2:], channel_axis=2, data_range=255) for g, t in zip(gen, truth)])
    return float(p), float(s)


def lip_distance(images: np.ndarray, truth_crop01: np.ndarray) -> float:
    """Mean px distance (at the crop size) of mediapipe's 40 lip points on ``images`` to the truth."""
    from talkformer_core.face import topology
    from talkformer_core.face.landmarks import LandmarkDetector

    S = images.shape[1]
    d = []
    with LandmarkDetector(static_image_mode=True) as det:
        for img, tr in zip(images, truth_crop01):
            up = np.ascontiguousarray(np.repeat(np.repeat(img, 2, 0), 2, 1))  # mediapipe likes >= 256 px
            p, ok = det.detect(up)
            if not ok:
                continue
            lips = topology.select_131(p[:, :2] / 2.0)[list(topology.LIP_POS)]
            d.append(np.linalg.norm(lips - tr[list(topology.LIP_POS)] * S, axis=1).mean())
    return float(np.mean(d)) if d else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip", default=None)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--work", default="/tmp/talkformer_real_clip")
    ap.add_argument("--ae-minutes", type=float, default=5)
    ap.add_argument("--tf-minutes", type=float, default=10)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--sampler-steps", type=int, default=20)
    a = ap.parse_args()
    if not MEDIA.is_dir():
        sys.exit(f"{MEDIA} not found")
    clip = MEDIA / a.clip if a.clip else sorted(MEDIA.glob("*.mp4"))[0]
    from talkformer_core.config import preset
    from talkformer_core.data.dataset import TalkingFaceDataset
    from talkformer_core.data.preprocess import preprocess
    from talkformer_core.diffusion import NoiseSchedule, sample_ddim, upper_half_mask
    from talkformer_core.face import topology
    from talkformer_core.models.checkpoint import checkpoint_config, load_model_state, read_checkpoint
    from talkformer_core.models.model import TalkFormer
    from talkformer_core.train import train

    work = Path(a.work)
    cfg = preset(a.preset)
    t0 = time.time()
    preprocess([clip], work / "shards", cfg, progress=False)
    print(f"preprocess {time.time() - t0:.0f} s")
    ae = train(cfg, stage="autoencoder", data=work / "shards", out=work / "ae", steps=10**6, batch_size=8,
               frames=(0.0, 0.8), budget_minutes=a.ae_minutes, progress=False)
    print(f"autoencoder {ae.metrics['final_step']} steps, L1 {ae.metrics['l1'][-1]:.4f}")
    tf = train(cfg, stage="talkformer", data=work / "shards", out=work / "tf", steps=10**6, batch_size=a.batch_size,
               autoencoder=ae.checkpoint, frames=(0.0, 0.8), budget_minutes=a.tf_minutes, progress=False,
               preview_every=200)
    print(f"talkformer {tf.metrics['final_step']} steps ({tf.metrics['steps_per_s']:.3f}/s), "
          f"L1 {np.mean(tf.metrics['l1'][:5]):.4f} -> {np.mean(tf.metrics['l1'][-20:]):.4f}")

    tensors, meta = read_checkpoint(tf.checkpoint)
    mcfg = checkpoint_config(meta)
    model = TalkFormer(mcfg)
    load_model_state(model, tensors)
    model.eval()
    ds = TalkingFaceDataset(work / "shards", mcfg, split="test", frames=(0.8, 1.0))
    L, sched = mcfg.model.sequence_length, NoiseSchedule(mcfg.model.diffusion)
    to8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
    out = {"gen": [], "copy": [], "masked": [], "truth": [], "lm": []}
    ref = ref_img = None
    with torch.no_grad():
        for w in range(0, len(ds), L):
            s = ds[w]
            if ref is None:
                ref_img = s["reference"]
                ref = model.prepare_reference(model.encode(ref_img[None]))
            b = {k: v[None] for k, v in s.items()}
            lm = topology.box_to_crop(model.landmark.complete(b["mels"], b["pose"], b["ref_landmarks"]),
                                      b["landmark_box"], b["crop_box"])[0]
            ctx = model.encode(s["masked"])
            lmc = model.prepare_landmarks(lm)
            noise = torch.randn(ctx.shape, generator=torch.Generator().manual_seed(w))
            z = sample_ddim(lambda x, t: model.unet(x, t, lmc, ref, num_frames=L), noise, sched, a.sampler_steps,
                            known=ctx, known_mask=upper_half_mask(*ctx.shape[-2:]))
            out["gen"].append(to8(model.decode(z)))
            out["masked"].append(to8(model.decode(ctx)))
            cp = s["crops"].clone()
            cp[:, :, cp.shape[2] // 2:] = ref_img[:, ref_img.shape[1] // 2:]
            out["copy"].append(to8(cp))
            out["truth"].append(to8(s["crops"]))
            out["lm"].append(s["target_crop"].numpy())
    arr = {k: np.concatenate(v) for k, v in out.items()}
    table = {}
    for name in ("gen", "copy", "masked"):
        p, s = lower_metrics(arr[name], arr["truth"])
        table[name] = {"psnr_lower": p, "ssim_lower": s, "lip_px": lip_distance(arr[name], arr["lm"])}
    table["truth_lip_px (detector noise floor)"] = lip_distance(arr["truth"], arr["lm"])
    print(json.dumps({"clip": clip.name, "frames_tested": len(arr["truth"]), **table}, indent=1))


if __name__ == "__main__":
    main()

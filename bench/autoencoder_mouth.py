"""Does the person autoencoder draw the mouth it is given? Side by side in one run: the cpu64
autoencoder trained on a clip's frames [0, 0.6) (seeded, fixed steps, one thread) with
``TrainConfig.autoencoder_mouth_weight`` = each of ``--weights``, and what mediapipe reads on its
reconstructions of those frames (pasted into the real crops with the pipeline's lower-face mask, as
the generated faces are): the mouth opening (inner-lip gap over the nose length,
``talkformer_core.eval.dubbing``) against the real crops' (correlation, mean absolute error), on the
10 % most closed frames, and their 10th percentile (the silence check's closed range).

The renderer cannot draw a mouth its decoder does not: a reconstruction that reads a closed mouth
as open is the floor of the dubbing report's silence check (docs/dubbing.md).

    python bench/autoencoder_mouth.py [--clip VIDEO] [--steps 250] [--weights 1 4 10] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLIP = ROOT.parent / "shared" / "media" / "sadtalker_WDA_KatieHill_000.mp4"
TRAIN_FRAC = 0.6


def make_shard(video: Path, work: Path) -> Path:
    """The clip preprocessed as finetune does it (cpu64: 64 px crops)."""
    from talkformer_core.config import person_config
    from talkformer_core.data.preprocess import options_for, process_clip, save_shard, shard_name

    shard = work / "shards" / shard_name(video)
    if not shard.exists():
        save_shard(shard, process_clip(video, options_for(person_config(64))))
    return shard


def measure(shard: Path, steps: int, weight: float, work: Path, seed: int = 0) -> dict[str, float]:
    """Train the autoencoder at ``weight`` and score its reconstructions of the training frames."""
    import torch

    from talkformer_core.config import person_config
    from talkformer_core.eval import dubbing as D
    from talkformer_core.face.blend import lower_face_mask
    from talkformer_core.finetune.dubbing import points478
    from talkformer_core.finetune.holdout import paste_lower_face, load_holdout
    from talkformer_core.models.autoencoder import AutoencoderKL
    from talkformer_core.models.checkpoint import load_model_state
    from talkformer_core.pixels import to_pixels, to_signed
    from talkformer_core.train.loop import train
    from talkformer_core.train.weights import load_autoencoder_file

    cfg = person_config(64)
    cfg.train.autoencoder_mouth_weight = float(weight)
    res = train(cfg, stage="autoencoder", data=shard.parent, out=work / f"ae_w{weight:g}", steps=steps,
                batch_size=cfg.train.autoencoder_batch_size, frames=(0.0, TRAIN_FRAC), budget_minutes=10 ** 4,
                device="cpu", seed=seed, progress=False, log_every=50)
    state, ae_cfg = load_autoencoder_file(res.checkpoint, cfg)
    ae = AutoencoderKL(ae_cfg).eval()
    load_model_state(ae, state, "autoencoder")
    h = load_holdout(shard, 1.0 - TRAIN_FRAC)
    crops = h.crops[h.train_idx]
    with torch.no_grad():
        rec = to_pixels(ae.decode_latent(ae.encode_latent(to_signed(torch.from_numpy(crops)).permute(0, 3, 1, 2))))
    rec = paste_lower_face(rec.permute(0, 2, 3, 1).numpy(), crops, lower_face_mask(crops.shape[1]))
    real, got = D.mouth_opening(points478(crops)), D.mouth_opening(points478(rec))
    closed = real <= np.nanquantile(real, 0.1)
    return {"weight": float(weight), "steps": int(steps), "corr": D.pearson(got, real),
            "mean_abs_error": float(np.nanmean(np.abs(got - real))),
            "closed_frames_real": float(np.nanmean(real[closed])), "closed_frames_rec": float(np.nanmean(got[closed])),
            "p10_real": D.closed_threshold(real), "p10_rec": D.closed_threshold(got)}


def table(rows: list[dict[str, float]], clip: str) -> str:
    lines = [f"{clip}, autoencoder trained on frames [0, {TRAIN_FRAC}), mediapipe on its reconstructions of them:", "",
             "| mouth weight | steps | opening corr with the real crops ↑ | mean abs error ↓ | 10 % most closed "
             "frames: real / reconstructed | 10th percentile: real / reconstructed |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['weight']:g} | {r['steps']} | {r['corr']:.3f} | {r['mean_abs_error']:.4f} | "
                     f"{r['closed_frames_real']:.4f} / {r['closed_frames_rec']:.4f} | "
                     f"{r['p10_real']:.4f} / {r['p10_rec']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", type=Path, default=CLIP, help="a talking-face video (default: the KatieHill clip)")
    ap.add_argument("--steps", type=int, default=250, help="autoencoder steps per weight (default 250: what "
                    "a 30-minute finetune gives when 3 run at once on 2 cores)")
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0, 4.0, 10.0])
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows here (JSON)")
    a = ap.parse_args(argv)
    if not a.clip.exists():
        print(f"{a.clip}: not found (give --clip VIDEO)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)  # the numbers depend on the thread count (torch's reduction order)
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        shard = make_shard(a.clip, work)
        rows = [measure(shard, a.steps, w, work) for w in a.weights]
    print(table(rows, a.clip.name))
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

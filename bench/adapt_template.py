"""Does the renderer follow new audio better on the dubbed video once it has trained on that video's frames?

The dubbing protocol's template frames ([0.8, 1.0)) are held out: the renderer never saw them, as
when a user dubs another video of the person than the one the model trained on. Here the
renderer of a ``finetune --holdout 0.4`` run goes on training on the template frames themselves
(their own tracked landmarks, the same loss; nothing of the new audio [0.6, 0.8)), for each of
``--steps`` in turn (cumulative), and the dubbing report (``finetune.dubbing.dubbing_report``) scores
the checkpoint before and after, side by side in one run. ``--frames 0 0.6`` continues on the
training frames instead: the same steps spent on a longer run, the comparison that says whether
the template's frames or the extra steps make the difference. Stage 1 is left as it was: the landmark
module's weights are put back after the renderer's steps (the person presets train the U-Net on the
true landmarks, so that is the same as freezing it) and the mouth model is the run's, fitted on
[0, 0.6).

    python bench/adapt_template.py --checkpoint CKPT [--steps 100 300] [--frames 0.8 1.0] [--threads 1]
                                   [--decode-refine N] [--json OUT]

CKPT: a person checkpoint written by ``finetune --holdout 0.4`` (its run folder CKPT.work beside it:
the shard and the TalkFormer run). Results: docs/dubbing.md, "Training the renderer on the dubbed
video's frames".
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HOLDOUT = 0.4


def summary(rep: dict) -> dict[str, float]:
    """The numbers the table prints, from a dubbing report."""
    r, s = rep["rows"], rep["silence"]
    return {"faces": r["faces"]["corr_audio"], "faces_template_given_audio": r["faces"]["corr_template_given_audio"],
            "faces_vs_landmarks": r["faces"]["corr_landmarks"],
            "renderer_true_landmarks": r["renderer_true_landmarks"]["corr_audio"],
            "silence_max": s["faces_max"], "silence_p90": s["faces_p90"], "closed_range": s["faces_closed_real"],
            "loudness": r["loudness"]["corr_audio"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a person checkpoint from finetune --holdout 0.4")
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 300], help="renderer steps on the template frames")
    ap.add_argument("--frames", type=float, nargs=2, default=(1 - HOLDOUT / 2, 1.0),
                    help="the frames the renderer goes on training on (default the template's; 0 0.6: the "
                         "training frames, i.e. a longer run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode-refine", type=int, default=None, help="decode passes of the reports (None: the model's)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import torch

    from talkformer_core.finetune.dubbing import dubbing_report
    from talkformer_core.finetune.run import fit_mouth_model, work_dir_for
    from talkformer_core.models.checkpoint import (checkpoint_config, load_training_state, read_checkpoint,
                                                   read_metadata, replace_tensors)
    from talkformer_core.train import train
    from talkformer_core.train.loop import CHECKPOINT_NAME, STATE_NAME

    torch.set_num_threads(a.threads)
    ck = Path(a.checkpoint)
    work = work_dir_for(ck)
    shards = sorted(work.glob("shards_*"))
    run = work / "talkformer"
    if not shards or not (run / STATE_NAME).exists():
        raise SystemExit(f"{work}: expected the run folder of `finetune --holdout {HOLDOUT}` (shards_*/ and "
                         f"talkformer/{STATE_NAME})")
    shard = next(shards[0].glob("*.npz"))
    steps = sorted(set(a.steps))
    res: dict = {"checkpoint": str(ck), "frames": list(a.frames), "steps": {}}

    def score(path: Path) -> dict[str, float]:
        return summary(dubbing_report(path, shard, HOLDOUT, device="cpu", decode_refine=a.decode_refine))

    res["steps"][0] = score(ck)
    print(f"{ck.name}: 0 steps {res['steps'][0]}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tf = Path(tmp) / "talkformer"
        shutil.copytree(run, tf)
        start = int(load_training_state(tf / STATE_NAME)["step"])
        cfg = checkpoint_config(read_metadata(tf / CHECKPOINT_NAME), tf / CHECKPOINT_NAME)
        landmark = {k: v for k, v in read_checkpoint(ck)[0].items() if k.startswith(("landmark.", "ema.landmark."))}
        for n in steps:
            t0 = time.time()
            out = train(cfg, stage="talkformer", data=shards[0], out=tf, steps=start + n, frames=tuple(a.frames),
                        ema=True, resume=True, device="cpu", seed=0, progress=False, log_every=10)
            adapted = Path(tmp) / f"adapted_{n}.safetensors"
            shutil.copy(out.checkpoint, adapted)
            replace_tensors(adapted, landmark)  # stage 1 as it was (the renderer's steps only)
            fit_mouth_model(adapted, shard, (0.0, 1 - HOLDOUT))
            res["steps"][n] = {**score(adapted), "train_seconds": time.time() - t0}
            print(f"{ck.name}: {n} steps {res['steps'][n]}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

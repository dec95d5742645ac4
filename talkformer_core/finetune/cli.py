"""``python -m talkformer_core.finetune``: the command line over ``run.finetune`` and the reports.

    python -m talkformer_core.finetune --video V.mp4 --out person.safetensors \
        [--budget-minutes 30] [--vae SD_VAE.safetensors] [--init-landmarks IPLAP.safetensors] \
        [--holdout 0.2] [--device cpu] [--resume] [--preset cpu64] [--steps N]

``--report-only`` scores a finished run's checkpoint again without training.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .dubbing import dubbing_report, format_dubbing
from .holdout import format_report, holdout_report
from .presets import PRESETS
from .run import load_state, finetune, work_dir_for


def build_parser() -> argparse.ArgumentParser:
    from ..clitools import parser

    ap = parser("finetune", "Train a person-specific TalkFormer on one video of that person.")
    ap.add_argument("--video", required=True, help="a video of the person talking (5-10 s or more, with its audio)")
    ap.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    ap.add_argument("--budget-minutes", type=float, default=30.0,
                    help="wall-clock budget for everything (default 30: a 5-10 s clip on a 2-core CPU)")
    ap.add_argument("--vae", default=None, help="your Stable Diffusion VAE (.safetensors): no autoencoder training; "
                                                "the checkpoint names it by hash and sync / the loader need it")
    ap.add_argument("--init-landmarks", default=None,
                    help="start the landmark module from IP-LAP's weights converted by python -m talkformer_core.convert")
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="train on the first 1-F of the frames and report the hold-out metrics on the rest")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--resume", action="store_true", help="continue the run in OUT.work/ (after Ctrl-C or a budget stop)")
    ap.add_argument("--preset", default="auto", choices=PRESETS,
                    help="auto (default: cpu64 on a CPU, gpu256 on a GPU); cpu64, cpu96: 64 / 96 px, CPU-sized; "
                         "gpu128, gpu256: 128 / 256 px, one GPU; small, paper: the paper's recipe; tiny: tests")
    ap.add_argument("--steps", type=int, default=None, help="cap on TalkFormer steps (the budget still applies)")
    ap.add_argument("--ae-steps", type=int, default=None,
                    help="cap on autoencoder steps (default: --steps; the budget still applies)")
    ap.add_argument("--crop-size", type=int, default=None, help="override the preset's crop size")
    ap.add_argument("--lr", type=float, default=None, help="TalkFormer learning rate (default: the preset's)")
    ap.add_argument("--batch-size", type=int, default=None, help="windows of L frames per step")
    ap.add_argument("--turn-augment", type=float, default=None,
                    help="the lower face sheared sideways against the upper face by up to this fraction of the crop "
                         "width while training (a head turn; 0 = off; default: the preset's)")
    ap.add_argument("--yaw-augment", type=float, default=None,
                    help="the inner face (eyes, nose, mouth) moved sideways against the face outline by up to this "
                         "fraction of the crop width while training (a head turn; 0 = off; default: the preset's)")
    ap.add_argument("--autoencoder-warp", type=float, default=None,
                    help="each autoencoder training crop moved by a random similarity of up to this fraction of the "
                         "crop (shift), 1 +- this (scale) and this many radians (rotation) (0 = off; default: the "
                         "preset's)")
    ap.add_argument("--autoencoder-edge", type=float, default=None,
                    help="weight of the autoencoder's L1 on pixel differences (edges), added to its pixel L1 (0 = "
                         "off; default: the preset's)")
    ap.add_argument("--context-noise", type=float, default=None,
                    help="Gaussian noise of std up to this (latent units) on the known upper-face context while "
                         "training (0 = off; default: the preset's)")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast (on by itself with the gpu presets on CUDA; on a CPU only when asked)")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between the printed held-out metrics (0: off)")
    ap.add_argument("--sampler-steps", type=int, default=25, help="sampler steps of the hold-out report")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a busy machine)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and noise")
    ap.add_argument("--report-json", default=None, help="write the result (minutes, steps, hold-out report) here")
    ap.add_argument("--noise-scale", type=float, default=None,
                    help="hold-out report: scale of the shared starting noise x_T (default: the model's, "
                         "as sync does: 0.5 for the person presets)")
    ap.add_argument("--decode-refine", type=int, default=None,
                    help="hold-out report: re-encoding passes of the decode (default: the model's, as sync does: "
                         "4 for the person presets)")
    ap.add_argument("--mouth-guidance", type=float, default=None,
                    help="hold-out report: the mouth guidance scale (default: the model's, as sync does: 0 = off)")
    ap.add_argument("--dubbing", action="store_true",
                    help="with --holdout F: also the dubbing report, the held-out part's second half driven by the "
                         "audio of its first (F = 0.4: frames [0.8, 1) by the audio of [0.6, 0.8); docs/dubbing.md)")
    ap.add_argument("--report-only", action="store_true",
                    help="no training: score the existing --out checkpoint on the hold-out of OUT.work/")
    return ap


def _report_only(a: argparse.Namespace) -> int:
    from ..clitools import error
    from ..data.preprocess import shard_name

    work = work_dir_for(a.out)
    st = load_state(work)
    shards = sorted(work.glob(f"shards_*/{shard_name(Path(a.video))}"))
    if not st or not shards or not Path(a.out).is_file():
        return error(f"--report-only: no finished run in {work} for {a.video}")
    holdout = float(st["holdout"]) if not a.holdout else a.holdout
    rep = holdout_report(a.out, shards[0], holdout, device=a.device, vae=a.vae, steps=a.sampler_steps,
                         seed=a.seed, noise_scale=a.noise_scale, decode_refine=a.decode_refine,
                         mouth_guidance=a.mouth_guidance)
    print(format_report(rep))
    if a.dubbing:
        rep["dubbing"] = dubbing_report(a.out, shards[0], holdout, device=a.device, vae=a.vae, steps=a.sampler_steps,
                                        seed=a.seed, noise_scale=a.noise_scale, decode_refine=a.decode_refine,
                                        mouth_guidance=a.mouth_guidance)
        print(format_dubbing(rep["dubbing"]))
    if a.report_json:
        from ..models.checkpoint import read_metadata

        tf_steps = json.loads(read_metadata(a.out).get("training_state", "{}")).get("step", 0)
        Path(a.report_json).write_text(json.dumps({"checkpoint": str(a.out), "minutes": st.get("minutes", {}),
                                                   "steps": {"autoencoder": st.get("ae_steps", 0),
                                                             "talkformer": tf_steps}, "report": rep},
                                                  indent=1, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..clitools import error, run

    a = build_parser().parse_args(argv)
    if a.report_only:
        return _report_only(a)

    def body() -> int:
        res = finetune(a.video, a.out, budget_minutes=a.budget_minutes, vae=a.vae, init_landmarks=a.init_landmarks,
                       holdout=a.holdout, device=a.device, resume=a.resume, preset=a.preset, steps=a.steps,
                       ae_steps=a.ae_steps,
                       crop_size=a.crop_size, lr=a.lr, batch_size=a.batch_size, bf16=a.bf16, seed=a.seed,
                       eval_every=a.eval_every, sampler_steps=a.sampler_steps, noise_scale=a.noise_scale,
                       decode_refine=a.decode_refine, mouth_guidance=a.mouth_guidance,
                       dubbing=a.dubbing, threads=a.threads, turn_augment=a.turn_augment,
                       context_noise=a.context_noise, yaw_augment=a.yaw_augment,
                       autoencoder_warp=a.autoencoder_warp, autoencoder_edge=a.autoencoder_edge)
        if a.report_json:
            Path(a.report_json).write_text(json.dumps({"checkpoint": str(res.checkpoint), "minutes": res.minutes,
                                                       "steps": res.steps, "report": res.report,
                                                       "history": res.history, "speed": res.speed},
                                                      indent=1, default=float))
        print(json.dumps({"checkpoint": str(res.checkpoint),
                          "minutes": {k: round(v, 2) for k, v in res.minutes.items()}, "steps": res.steps}))
        return 0

    return run(body, on_interrupt=f"interrupted: a resumable checkpoint is in {work_dir_for(a.out)}; "
                                  f"run again with --resume")

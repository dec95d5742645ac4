"""The hold-out bar (docs/finetune.md) on real clips: person-specific training, against two baselines.

    python bench/finetune_real.py [--budget-minutes 30] [--jobs 3] [--threads 1] [--clips A.mp4 ...]
                                  [--out docs/finetune_results.md] [--work /tmp/talkformer_finetune_real]

For every clip (``--clips``, default the mp4s of ../shared/media): ``python -m
talkformer_core.finetune --holdout 0.2`` with the CPU defaults (train on the first 80 % of the
frames, score the last 20 % with the clip's own audio), each run in its own process (``--jobs`` at
once; on a shared 2-core machine several 1-thread processes get more CPU than one 2-thread process).
Writes the markdown table (per clip: PSNR, SSIM, LMD, mouth-opening correlation for ours with
test-frame landmarks, ours audio-driven, copy-reference and mean-mouth), the training minutes and
steps per clip, and the verdicts of the quality bar. ``--reuse`` rebuilds the table from the JSON
reports of an earlier run.

The 256 px ruler (every preset scored alike: lower half of the 256 px crop, smaller crops upscaled
bicubic, baselines at 256; ``talkformer_core.eval.ruler``):

    python bench/finetune_real.py --ruler --presets cpu64 gpu256 [--budget-minutes 30] [--device cpu]
    python bench/finetune_real.py --ruler --ruler-results DIR...   # score runs made elsewhere (a GPU box)

preprocesses the clips once at 256 px, trains each (clip, preset) with ``bench/gpu_finetune.py``
(finetune's recipe from a shard; smaller presets get the crops area-resized), then
``bench/score_gpu_finetune.py`` writes docs/finetune_gpu_results.md and the grid
docs/finetune_grid.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MEDIA = ROOT.parent / "shared" / "media"


def run_clips(clips: list[Path], work: Path, a: argparse.Namespace) -> dict[str, dict]:
    work.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[Path, subprocess.Popen, object]] = []
    pending = list(clips)
    done: dict[str, dict] = {}
    while pending or procs:
        while pending and len(procs) < a.jobs:
            c = pending.pop(0)
            cmd = [sys.executable, "-m", "talkformer_core.finetune", "--video", str(c),
                   "--out", str(work / f"{c.stem}.safetensors"), "--budget-minutes", str(a.budget_minutes),
                   "--holdout", str(a.holdout), "--report-json", str(work / f"{c.stem}{a.tag}.json"),
                   "--preset", a.preset, "--eval-every", str(a.eval_every), "--noise-scale", str(a.noise_scale)]
            if a.report_only:
                cmd.append("--report-only")
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            if a.steps:
                cmd += ["--steps", str(a.steps)]
            log = open(work / f"{c.stem}{a.tag}.log", "w")
            print("run:", " ".join(cmd), flush=True)
            procs.append((c, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(2)
        for item in list(procs):
            c, p, log = item
            if p.poll() is not None:
                log.close()
                procs.remove(item)
                if p.returncode != 0:
                    print(f"{c.name}: finetune failed (exit {p.returncode}); see {work / (c.stem + '.log')}")
                    continue
                done[c.name] = json.loads((work / f"{c.stem}{a.tag}.json").read_text())
                print(f"{c.name}: done", flush=True)
    return done


def markdown(results: dict[str, dict], a: argparse.Namespace) -> str:
    from talkformer_core.finetune.holdout import report_table

    reports = {k: v["report"] for k, v in results.items()}
    lines = ["# Person-specific fine-tuning on the real clips: the hold-out bar", "",
             f"`python bench/finetune_real.py --budget-minutes {a.budget_minutes:g} --jobs {a.jobs}"
             f"{' --threads ' + str(a.threads) if a.threads else ''}`: preset `{a.preset}`, trained on the first "
             f"{1 - a.holdout:.0%} of each clip's frames, scored on the last {a.holdout:.0%} with the clip's own "
             f"audio; starting noise x_T scaled by {a.noise_scale:g} (1 = what `sync` does); lower half of the face crop (PSNR, SSIM at the crop size; LMD and mouth-opening "
             "correlation from mediapipe on the crops upscaled to 256 px, LMD in px of a 256 crop).", "",
             report_table(reports), "", "## Training time and the quality bar", "",
             "| clip | test frames | minutes (preprocess / autoencoder / talkformer / report) | steps (AE / TF) | "
             "test-frame landmarks beat both baselines (PSNR / SSIM / LMD) | audio-driven beats both (mouth corr / LMD) |",
             "|---|---|---|---|---|---|"]
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    n_audio = 0
    n_lm = 0
    for clip, r in results.items():
        m, s, rep = r["minutes"], r["steps"], r["report"]
        v = rep["verdict"]
        n_audio += v["audio_all"]
        n_lm += v["landmarks_all"]
        mins = " / ".join(f"{m.get(k, 0.0):.1f}" for k in ("preprocess", "autoencoder", "talkformer", "report"))
        lines.append(f"| {clip} | {rep['test_frames']} | {mins} | {s.get('autoencoder', 0)} / {s.get('talkformer', 0)} | "
                     f"{yes(v['landmarks_psnr'])} / {yes(v['landmarks_ssim'])} / {yes(v['landmarks_lmd'])} | "
                     f"{yes(v['audio_mouth_corr'])} / {yes(v['audio_lmd'])} |")
    lines += ["", f"Renderer with test-frame landmarks beats the better baseline on all three metrics on "
                  f"{n_lm} of {len(results)} clips (bar: every clip); audio-driven beats both baselines on mouth "
                  f"correlation and LMD on {n_audio} of {len(results)} clips (bar: at least two)."]
    return "\n".join(lines) + "\n"


def run_ruler(clips: list[Path], work: Path, a: argparse.Namespace) -> int:
    """Train every (clip, preset) with bench/gpu_finetune.py from 256 px shards, then score on the ruler."""
    import score_gpu_finetune

    shards = work / "shards_256"
    results = [Path(r) for r in a.ruler_results] if a.ruler_results else [work / "ruler"]
    if not a.ruler_results:
        from talkformer_core.data.preprocess import preprocess

        preprocess([str(c) for c in clips], shards, "paper", crop_size=256, progress=False)
        jobs = [(s, p) for s in sorted(shards.glob("*.npz")) for p in a.presets]
        procs: list[tuple[str, subprocess.Popen, object]] = []
        while jobs or procs:
            while jobs and len(procs) < a.jobs:
                s, p = jobs.pop(0)
                out = results[0] / f"{s.stem}.{p}.npz"
                cmd = [sys.executable, str(ROOT / "bench" / "gpu_finetune.py"), "--shard", str(s), "--out", str(out),
                       "--minutes", str(a.budget_minutes), "--preset", p, "--holdout", str(a.holdout),
                       "--threads", str(a.threads or 1), "--work", str(work / "ruler_work" / out.stem)]
                if a.device:
                    cmd += ["--device", a.device]
                if a.steps:
                    cmd += ["--steps", str(a.steps)]
                results[0].mkdir(parents=True, exist_ok=True)
                log = open(results[0] / f"{out.stem}.log", "w")
                print("run:", " ".join(cmd), flush=True)
                procs.append((out.stem, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
            time.sleep(2)
            for item in list(procs):
                if item[1].poll() is not None:
                    item[2].close()
                    procs.remove(item)
                    print(f"{item[0]}: {'done' if item[1].returncode == 0 else f'failed (exit {item[1].returncode})'}",
                          flush=True)
    argv = ["--results", *map(str, results), "--shards", str(a.ruler_shards or shards),
            "--out", str(ROOT / "docs" / "finetune_gpu_results.md"), "--grid", str(ROOT / "docs" / "finetune_grid.png")]
    return score_gpu_finetune.main(argv)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-minutes", type=float, default=30.0)
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--preset", default="cpu64")
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--clips", nargs="*", default=None)
    ap.add_argument("--work", default="/tmp/talkformer_finetune_real")
    ap.add_argument("--out", default=str(ROOT / "docs" / "finetune_results.md"))
    ap.add_argument("--reuse", action="store_true", help="only rebuild the table from WORK/*.json")
    ap.add_argument("--noise-scale", type=float, default=1.0, help="scale of the shared x_T in the report")
    ap.add_argument("--report-only", action="store_true",
                    help="no training: re-score the checkpoints already in WORK (e.g. with another --noise-scale)")
    ap.add_argument("--ruler", action="store_true", help="every preset on the 256 px ruler (see the module doc)")
    ap.add_argument("--presets", nargs="+", default=["cpu64", "gpu256"], help="--ruler: the presets to train")
    ap.add_argument("--device", default=None, help="--ruler: torch device of the training runs")
    ap.add_argument("--ruler-results", nargs="*", default=None,
                    help="--ruler: score these bench/gpu_finetune.py results instead of training")
    ap.add_argument("--ruler-shards", default=None, help="--ruler: the 256 px truth shards (default: WORK/shards_256)")
    a = ap.parse_args()
    work = Path(a.work)
    if a.ruler:
        sys.path.insert(0, str(ROOT / "bench"))
        clips = [Path(c) for c in a.clips] if a.clips else sorted(MEDIA.glob("*.mp4"))
        return run_ruler(clips, work, a)
    a.tag = "" if a.noise_scale == 1.0 else f".ns{a.noise_scale:g}"
    if a.reuse:
        results = {p.name[:-len(a.tag + ".json")] + ".mp4": json.loads(p.read_text())
                   for p in sorted(work.glob(f"*{a.tag}.json")) if a.tag or ".ns" not in p.name}
    else:
        if not MEDIA.is_dir():
            print(f"{MEDIA} not found: nothing to run", file=sys.stderr)
            return 1
        clips = [Path(c) for c in a.clips] if a.clips else sorted(MEDIA.glob("*.mp4"))
        results = run_clips(clips, work, a)
    if not results:
        print("no results", file=sys.stderr)
        return 1
    md = markdown(results, a)
    Path(a.out).write_text(md)
    print(md)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The dubbing protocol on the real clips (docs/dubbing.md): does the mouth follow new audio?

    python bench/dubbing.py [--budget-minutes 30] [--jobs 3] [--threads 1] [--clips A.mp4 ...]
                            [--steps N --ae-steps M] [--turn-augment F] [--context-noise F] [--yaw-augment F]
                            [--autoencoder-warp F] [--autoencoder-edge W] [--seed K]
                            [--work /tmp/talkformer_dubbing] [--out docs/dubbing.md] [--reuse]
                            [--report-only [--noise-scale S] [--tag T]]
    python bench/dubbing.py --stage1 [--transformer-steps 1500] [--threads 1]
    python bench/dubbing.py --lags

Full mode: for every clip (``--clips``, default the mp4s of ../shared/media), ``python -m
talkformer_core.finetune --holdout 0.4 --dubbing`` with the CPU defaults (cpu64, 30 minutes):
trained on frames [0, 0.6); the template frames [0.8, 1.0) driven by the audio of [0.6, 0.8)
(``finetune.dubbing.dubbing_report``, ``talkformer_core.eval.dubbing``), each clip in its own process
(``--jobs`` at once). Writes the dubbing table (stage 1, generated faces, the renderer given the
audio's true landmarks, the loudness model: correlation of the mouth opening with the new audio's
truth and with the template's), the silence check, the self-reconstruction table of the same models
and the bar's verdicts.
``--reuse`` rebuilds the page from the JSON reports of an earlier run. ``--report-only`` scores the
checkpoints of an earlier run again (``finetune --report-only``; e.g. with another ``--noise-scale``,
the JSON reports named CLIP``--tag``.json beside the run's own).

``--stage1``: stage 1 alone, in minutes: the loudness model, the person's mouth model
(``models.mouth_model``) and the landmark transformer trained alone on the clip's training frames
for ``--transformer-steps`` (IP-LAP's per-frame box and the stable box), on both directions of the
held-out part (new audio [0.6, 0.8) on template [0.8, 1.0), and the reverse): the measurements
behind docs/design.md's choice of stage 1 for person models.

``--lags``: stage 1's timing (seconds): the mouth model fitted on [0, 0.6), the lag at which its
opening best matches the truth on the training frames, the held-out frames and the protocol's
(``eval.dubbing.lag_correlations``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MEDIA = ROOT.parent / "shared" / "media"
HOLDOUT = 0.4


# ----------------------------------------------------------------------------------------------
# full mode: finetune + dubbing report per clip

def training_flags(a: argparse.Namespace) -> list[tuple[str, float]]:
    """The finetune options this bench passes through, those given: (flag, value)."""
    given = (("--steps", a.steps), ("--ae-steps", a.ae_steps), ("--turn-augment", a.turn_augment),
             ("--context-noise", a.context_noise), ("--yaw-augment", a.yaw_augment),
             ("--autoencoder-warp", a.autoencoder_warp), ("--autoencoder-edge", a.autoencoder_edge), ("--seed", a.seed))
    return [(f, v) for f, v in given if v is not None]


def run_clips(clips: list[Path], work: Path, a: argparse.Namespace) -> dict[str, dict]:
    work.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[Path, subprocess.Popen, object]] = []
    pending, done = list(clips), {}
    while pending or procs:
        while pending and len(procs) < a.jobs:
            c = pending.pop(0)
            cmd = [sys.executable, "-m", "talkformer_core.finetune", "--video", str(c),
                   "--out", str(work / f"{c.stem}.safetensors"), "--budget-minutes", str(a.budget_minutes),
                   "--holdout", str(HOLDOUT), "--dubbing", "--report-json", str(work / f"{c.stem}{a.tag}.json")]
            if a.report_only:
                cmd += ["--report-only"]
            if a.noise_scale is not None:
                cmd += ["--noise-scale", str(a.noise_scale)]
            if a.decode_refine is not None:
                cmd += ["--decode-refine", str(a.decode_refine)]
            if a.mouth_guidance is not None:
                cmd += ["--mouth-guidance", str(a.mouth_guidance)]
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            if not a.report_only:
                cmd += [str(x) for flag_value in training_flags(a) for x in flag_value]
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
                    print(f"{c.name}: finetune failed (exit {p.returncode}); see {work / (c.stem + a.tag + '.log')}")
                    continue
                done[c.name] = json.loads((work / f"{c.stem}{a.tag}.json").read_text())
                print(f"{c.name}: done", flush=True)
    return done


def _f(v, spec: str = ".3f") -> str:
    from talkformer_core.finetune.holdout import fmt  # the one "n/a"-aware number format

    return fmt(v, spec)


def page(results: dict[str, dict], a: argparse.Namespace) -> str:
    from talkformer_core.finetune.dubbing import DUB_TABLE_HEADER, dubbing_table_rows
    from talkformer_core.finetune.holdout import report_table

    extra = (" --report-only" if a.report_only else "") + \
        (f" --noise-scale {a.noise_scale:g}" if a.noise_scale is not None else "") + (f" --tag {a.tag}" if a.tag else "") + \
        "".join(f" {f} {v:g}" for f, v in training_flags(a))
    lines = [f"`python bench/dubbing.py --budget-minutes {a.budget_minutes:g} --jobs {a.jobs} --threads {a.threads}{extra}`: "
             "per clip `python -m talkformer_core.finetune --holdout 0.4 --dubbing` (preset cpu64), trained on frames "
             "[0, 0.6); the template frames [0.8, 1.0) driven by the audio of [0.6, 0.8). Opening = inner-lip gap over "
             "the nose length (`talkformer_core.eval.dubbing`); generated faces measured by mediapipe on the crops "
             "at 256 px.", "", *DUB_TABLE_HEADER]
    for clip, res in results.items():
        lines += dubbing_table_rows(res["report"]["dubbing"], clip)
    lines += ["", "Lip-shape error: mean distance of the 40 lip points to the new audio's true lips after a "
              "similarity alignment on the upper face, in nose lengths.", "",
              "| clip | frames | audio's truth vs template's truth | stage 1 on the template's own audio | "
              "silence: stage 1 max / closed range | silence: faces max / 90th pct / real closed frames' range / "
              "lowest 10 % of the real readings / the autoencoder's | silence on training frames: faces max | "
              "minutes (pre / AE / TF / report) | steps (AE / TF) |", "|---|---|---|---|---|---|---|---|---|"]
    for clip, res in results.items():
        d = res["report"]["dubbing"]
        s = d.get("silence", {})
        m = res.get("minutes", {})
        st = res.get("steps", {})
        lines.append(f"| {clip} | {d['frames']} | {_f(d['rows']['stage1']['truth_vs_template'])} | "
                     f"{_f(d['rows']['stage1_own_audio']['corr_audio'])} | "
                     f"{_f(s.get('stage1_max'), '.4f')} / {_f(s.get('stage1_closed'), '.4f')} | "
                     f"{_f(s.get('faces_max'), '.4f')} / {_f(s.get('faces_p90'), '.4f')} / "
                     f"{_f(s.get('faces_closed_real'), '.4f')} / {_f(s.get('faces_closed'), '.4f')} / "
                     f"{_f(s.get('faces_closed_autoencoder'), '.4f')} | {_f(s.get('faces_max_seen_template'), '.4f')} | "
                     + " / ".join(f"{m.get(k, 0):.1f}" for k in ("preprocess", "autoencoder", "talkformer", "report"))
                     + f" | {st.get('autoencoder', 0)} / {st.get('talkformer', 0)} |")
    lines += ["", bar(results), "", "Self-reconstruction of the same models (held-out frames [0.6, 1.0) driven by "
              "their own audio, `finetune --holdout 0.4`):", "",
              report_table({c: r["report"] for c, r in results.items()})]
    return "\n".join(lines) + "\n"


def bar(results: dict[str, dict]) -> str:
    """The issue's bar: stage 1 and the faces beat the loudness model on every clip and by >= 0.1 on
    the mean; both correlate <= 0.2 with the template."""
    out = []
    for key, name in (("stage1", "stage 1"), ("faces", "generated faces")):
        ours = [r["report"]["dubbing"]["rows"][key]["corr_audio"] for r in results.values()]
        base = [r["report"]["dubbing"]["rows"]["loudness"]["corr_audio"] for r in results.values()]
        tm = [r["report"]["dubbing"]["rows"][key]["corr_template"] for r in results.values()]
        tg = [r["report"]["dubbing"]["rows"][key].get("corr_template_given_audio") for r in results.values()]
        ok = [o is not None and b is not None and o > b for o, b in zip(ours, base)]
        mo = float(np.mean([o if o is not None else np.nan for o in ours]))
        mb = float(np.mean([b if b is not None else np.nan for b in base]))
        out.append(f"- {name}: corr with the new audio's truth {', '.join(_f(o) for o in ours)} (mean {mo:.3f}) "
                   f"against the loudness model's {', '.join(_f(b) for b in base)} (mean {mb:.3f}): beats it on "
                   f"{sum(ok)} of {len(ok)} clips, mean margin {mo - mb:+.3f} (bar: every clip, >= +0.1); corr with "
                   f"the template {', '.join(_f(t) for t in tm)} (bar: <= 0.2; given the audio's truth "
                   f"{', '.join(_f(t) for t in tg)})")
    sil = [r["report"]["dubbing"].get("silence") for r in results.values()]
    if all(sil):
        out.append("- silence: stage 1 max " + ", ".join(f"{s['stage1_max']:.4f} (<= {s['stage1_closed']:.4f})" for s in sil)
                   + "; faces max " + ", ".join(f"{s['faces_max']:.3f} (<= {s.get('faces_closed_real', float('nan')):.3f})"
                                                for s in sil)
                   + f": closed on {sum(s['stage1_ok'] for s in sil)} / {sum(s['faces_ok'] for s in sil)} of {len(sil)} clips")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# --stage1: stage 1 alone

def protocol_parts(shard: Path):
    """(hold-out data, its FaceAnalysis, the protocol's DubbingSplit, every frame's true opening)."""
    from talkformer_core.eval import dubbing as D
    from talkformer_core.finetune.holdout import load_holdout

    h = load_holdout(shard, HOLDOUT)
    a = h.analysis
    sp = D.split_clip(len(h.crops), a.found, 1 - HOLDOUT, 1 - HOLDOUT / 2)
    return h, a, sp, D.mouth_opening(a.track.points131_filled.astype(np.float64))


def stage1_model(cfg, landmark):
    """A LoadedModel holding only a landmark module: what complete_landmarks needs."""
    import types

    import torch

    from talkformer_core.pipeline import LoadedModel

    return LoadedModel("talkformer", cfg, types.SimpleNamespace(landmark=landmark), None, torch.device("cpu"),
                       torch.float32)


def fitted_mouth_model(shard: Path):
    """cpu64's stage 1 with the mouth model fitted on the clip's frames [0, 0.6)."""
    from talkformer_core.config import person_config
    from talkformer_core.finetune.run import mouth_training_data
    from talkformer_core.models.landmark_completion import LandmarkCompletion

    cfg = person_config(64)
    net = LandmarkCompletion(cfg.model.landmark).eval()
    net.mouth.fit(*mouth_training_data(shard, (0.0, 1 - HOLDOUT)))
    return stage1_model(cfg, net)


def stage1_scores(shard: Path, steps: int, seed: int = 0) -> dict[str, dict[str, list]]:
    """{method: {"A": scores, "B": scores}} for one clip; A = audio [0.6, 0.8) on template [0.8, 1),
    B = the reverse."""
    import torch

    from talkformer_core.config import person_config
    from talkformer_core.data.dataset import TalkingFaceDataset
    from talkformer_core.eval import dubbing as D
    from talkformer_core.face import topology
    from talkformer_core.models.landmark_completion import LandmarkCompletion
    from talkformer_core.pipeline import AudioFeatures, LoadedModel, complete_landmarks, landmarks_to_crop

    h, a, sp, op = protocol_parts(shard)
    dirs = {"A": (sp.audio, sp.template), "B": (sp.template, sp.audio)}
    out: dict[str, dict] = {}
    lm = D.LoudnessModel.fit(D.frame_loudness(h.mels[sp.train]), op[sp.train])
    out["loudness"] = {k: D.dubbing_scores(lm.predict(D.frame_loudness(h.mels[au])), op[au], op[te])
                       for k, (au, te) in dirs.items()}

    def scores(model: LoadedModel, box: str) -> dict:
        refs = a.points_box(sp.train[topology.pick_spread(a.openness[sp.train], model.num_references)], box)
        res = {}
        for k, (au, te) in dirs.items():
            lmb = complete_landmarks(model, a, AudioFeatures(h.mels[au], len(au), 25.0), te, references=refs)
            res[k] = D.dubbing_scores(D.mouth_opening(landmarks_to_crop(a, lmb, te, box)), op[au], op[te])
        return res

    out["mouth model (stable box)"] = scores(fitted_mouth_model(shard), "stable")
    for box in ("per_frame", "stable"):
        c = person_config(64)
        c.model.landmark.mouth_model = False
        c.model.landmark_box = box
        ds = TalkingFaceDataset(shard.parent, c, frames=(0.0, 1 - HOLDOUT), seed=seed)
        wins = [i for i, (ci, _) in enumerate(ds.windows) if ds.clips[ci].path == shard]
        torch.manual_seed(seed)
        tnet = LandmarkCompletion(c.model.landmark)
        opt = torch.optim.Adam(tnet.parameters(), lr=c.train.lr)
        rng = np.random.default_rng(seed)
        for step in range(steps):  # IP-LAP's L1 loss on the content, batches of 4 windows
            items = [ds[(int(i), step)] for i in rng.choice(wins, 4)]
            b = {k: torch.stack([it[k] for it in items]) for k in ("mels", "pose", "ref_landmarks", "target_box")}
            pred = tnet.predict_content(b["mels"], b["pose"], b["ref_landmarks"])
            loss = tnet.l1_loss(pred, b["target_box"][:, :, list(topology.CONTENT_POS)])
            opt.zero_grad()
            loss.backward()
            opt.step()
        tnet.eval()
        pose = a.points_box(np.flatnonzero(a.found), box)[:, list(topology.POSE_POS)]
        r = scores(stage1_model(c, tnet), box)
        r["leak"] = D.linear_leak(pose, op[a.found])
        out[f"transformer, {steps} steps ({box} box)"] = r
    return out


def lag_rows(shard: Path, max_lag: int = 4) -> dict[str, dict[int, float | None]]:
    """The mouth model fitted on frames [0, 0.6): D.lag_correlations of its opening with the truth on
    the training frames, on the held-out frames driven by their own audio, and in the protocol."""
    from talkformer_core.eval import dubbing as D
    from talkformer_core.face import topology
    from talkformer_core.pipeline import AudioFeatures, complete_landmarks, landmarks_to_crop

    h, a, sp, op = protocol_parts(shard)
    model = fitted_mouth_model(shard)
    refs = a.points_box(sp.train[topology.pick_spread(a.openness[sp.train], model.num_references)], "stable")
    held = np.concatenate([sp.audio, sp.template])
    out = {}
    for name, au, te in (("training frames (fitted)", sp.train, sp.train), ("held-out, own audio", held, held),
                         ("the protocol (new audio)", sp.audio, sp.template)):
        lmb = complete_landmarks(model, a, AudioFeatures(h.mels[au], len(au), 25.0), te, references=refs)
        out[name] = D.lag_correlations(D.mouth_opening(landmarks_to_crop(a, lmb, te, "stable")), op[au], max_lag)
    return out


def lag_page(results: dict[str, dict]) -> str:
    lines = ["`python bench/dubbing.py --lags`: the mouth model (cpu64's features) fitted on frames [0, 0.6); "
             "best lag of corr(predicted opening at t, true opening at t + lag), lag > 0 = the prediction leads "
             "(its r; r at lag 0).", ""]
    names = list(next(iter(results.values())))
    lines += ["| clip | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for clip, rows in results.items():
        cells = []
        for n in names:
            r = {k: v for k, v in rows[n].items() if v is not None}
            best = max(r, key=lambda k: r[k])
            cells.append(f"{best:+d} ({r[best]:.2f}; {_f(r.get(0), '.2f')} at 0)")
        lines.append(f"| {clip} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stage1_page(results: dict[str, dict], steps: int) -> str:
    lines = [f"`python bench/dubbing.py --stage1 --transformer-steps {steps}`: stage 1 alone, trained / fitted on "
             "frames [0, 0.6). A: template [0.8, 1.0) driven by the audio of [0.6, 0.8); B: the reverse. "
             "Opening of the predicted landmarks in the crop frame, over the nose length.", "",
             "| clip | stage 1 | A: corr with the audio's truth | A: with the template (given the audio) | "
             "B: corr with the audio's truth | B: with the template (given the audio) | pose -> mouth linear leak |",
             "|---|---|---|---|---|---|---|"]
    for clip, res in results.items():
        for name, r in res.items():
            cells = []
            for k in ("A", "B"):
                s = r[k]
                cells += [_f(s["corr_audio"]), f"{_f(s['corr_template'])} ({_f(s['corr_template_given_audio'])})"]
            lines.append(f"| {clip} | {name} | " + " | ".join(cells) + f" | {_f(r.get('leak'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", nargs="*", default=None)
    ap.add_argument("--budget-minutes", type=float, default=30.0)
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/talkformer_dubbing")
    ap.add_argument("--out", default=None, help="write the markdown here (default: print)")
    ap.add_argument("--reuse", action="store_true", help="rebuild the page from the JSON reports in --work")
    ap.add_argument("--report-only", action="store_true", help="score the checkpoints already in --work again")
    ap.add_argument("--noise-scale", type=float, default=None, help="x_T scale of the reports (default: the model's)")
    ap.add_argument("--decode-refine", type=int, default=None,
                    help="decode passes of the reports (default: the model's)")
    ap.add_argument("--mouth-guidance", type=float, default=None,
                    help="mouth guidance scale of the reports (default: the model's)")
    ap.add_argument("--tag", default="", help="suffix of the JSON reports' names (CLIP{tag}.json)")
    ap.add_argument("--steps", type=int, default=None, help="finetune --steps (fixed TalkFormer steps)")
    ap.add_argument("--ae-steps", type=int, default=None, help="finetune --ae-steps")
    ap.add_argument("--turn-augment", type=float, default=None, help="finetune --turn-augment (default: the preset's)")
    ap.add_argument("--context-noise", type=float, default=None, help="finetune --context-noise (default: the preset's)")
    ap.add_argument("--yaw-augment", type=float, default=None, help="finetune --yaw-augment (default: the preset's)")
    ap.add_argument("--autoencoder-warp", type=float, default=None,
                    help="finetune --autoencoder-warp (default: the preset's)")
    ap.add_argument("--autoencoder-edge", type=float, default=None,
                    help="finetune --autoencoder-edge (default: the preset's)")
    ap.add_argument("--seed", type=int, default=None, help="finetune --seed (default 0)")
    ap.add_argument("--stage1", action="store_true", help="stage 1 alone (minutes), see the module doc")
    ap.add_argument("--transformer-steps", type=int, default=1500)
    ap.add_argument("--lags", action="store_true", help="stage 1's timing: the mouth model's best lag per clip (seconds)")
    a = ap.parse_args(argv)
    clips = [Path(c) for c in a.clips] if a.clips else sorted(MEDIA.glob("*.mp4"))
    if not clips:
        print(f"no clips (looked in {MEDIA})", file=sys.stderr)
        return 2
    work = Path(a.work)
    if a.stage1 or a.lags:
        import torch

        from talkformer_core.data.preprocess import preprocess

        torch.set_num_threads(a.threads)
        shards = work / "shards_64"
        preprocess(clips, shards, "small", crop_size=64)
        res = {}
        for c in clips:
            shard = next(shards.glob(f"{c.stem}-*.npz"))
            if a.lags:
                res[c.name] = lag_rows(shard)
                continue
            res[c.name] = stage1_scores(shard, a.transformer_steps)
            print(stage1_page({c.name: res[c.name]}, a.transformer_steps), flush=True)
        text = lag_page(res) if a.lags else stage1_page(res, a.transformer_steps)
    else:
        if a.reuse:
            results = {c.name: json.loads((work / f"{c.stem}{a.tag}.json").read_text()) for c in clips
                       if (work / f"{c.stem}{a.tag}.json").exists()}
        else:
            results = run_clips(clips, work, a)
        if not results:
            print("no results", file=sys.stderr)
            return 1
        text = page(results, a)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m talkformer_core.eval``: Table I metrics of generated videos against ground truth.

  python -m talkformer_core.eval --generated G.mp4 --truth T.mp4 [--out-dir D] [--crop-size 256]
      [--lpips-backbone alexnet.pth --lpips-heads alex.pth] [--fid-weights pt_inception-...pth]
      [--syncnet-weights syncnet_v2.model] [--csim] [--name NAME]
  python -m talkformer_core.eval --pairs pairs.csv ...     (columns generated,truth[,name])
  python -m talkformer_core.eval --generated A.mp4 --truth A_gt.mp4 --generated B.mp4 --truth B_gt.mp4

Writes D/results.md (markdown table, one row per pair plus the mean; "—" with the reason below
for a metric that was not computed), D/results.json and D/mouth_opening.png. Weight files are
never downloaded: a metric whose weights are not given is skipped and the table says so.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TalkFormerError

COLUMNS = (  # key, header, format
    ("psnr", "PSNR ↑", "{:.2f}"),
    ("ssim", "SSIM ↑", "{:.4f}"),
    ("lmd", "LMD ↓", "{:.3f}"),
    ("mouth_corr", "mouth corr ↑", "{:.3f}"),
    ("lpips", "LPIPS ↓", "{:.4f}"),
    ("fid", "FID ↓", "{:.2f}"),
    ("csim", "CSIM (dlib ResNet) ↑", "{:.4f}"),
    ("sync_conf", "Sync conf ↑", "{:.3f}"),
    ("sync_dist", "Sync dist ↓", "{:.3f}"),
    ("sync_offset", "Sync offset", "{:d}"),
)


def build_parser() -> argparse.ArgumentParser:
    from ..clitools import parser

    p = parser("eval", __doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--generated", action="append", default=[], help="generated video (repeatable)")
    p.add_argument("--truth", action="append", default=[], help="ground-truth video (repeatable, same order)")
    p.add_argument("--pairs", help="CSV with columns generated,truth[,name] (paths relative to the CSV)")
    p.add_argument("--name", action="append", default=[], help="row name(s) (default: the generated file's stem)")
    p.add_argument("--out-dir", default="eval_results", help="output folder (default: eval_results)")
    p.add_argument("--crop-size", type=int, default=256, help="face crop size in px (64..512, default 256)")
    p.add_argument("--fps", type=float, default=25.0, help="both videos are resampled to this rate (default 25)")
    p.add_argument("--max-frames", type=int, default=None, help="score only the first N frames of each video")
    p.add_argument("--face-index", type=int, default=-1,
                   help="which face to track, counting from 0 by size: 0 = the largest, 1 = the second largest, ...; "
                        "-1 = the largest (default)")
    p.add_argument("--lpips-backbone", help="torchvision AlexNet/VGG16 weights (features.N.*) for LPIPS")
    p.add_argument("--lpips-heads", help="LPIPS v0.1 linear heads (lin{k}.model.1.weight), e.g. lpips' weights/v0.1/alex.pth")
    p.add_argument("--lpips-net", choices=("alex", "vgg"), help="backbone kind (default: read from the heads)")
    p.add_argument("--fid-weights", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--syncnet-weights", help="SyncNet v2 weights (syncnet_python's syncnet_v2.model)")
    p.add_argument("--audio", help="speech for SyncScore (default: the generated video's own audio)")
    p.add_argument("--csim", action="store_true", help="CSIM with dlib's face-recognition ResNet (dlib-bin + face_recognition_models)")
    p.add_argument("--csim-models", help="folder with the dlib .dat files (default: face_recognition_models/models)")
    p.add_argument("--csim-stride", type=int, default=1, help="CSIM on every k-th frame (default 1)")
    p.add_argument("--device", default="cpu", help="torch device for the metric networks (default cpu)")
    p.add_argument("--no-plot", action="store_true", help="skip mouth_opening.png")
    return p


def _read_pairs(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    pairs: list[tuple[str, str, str]] = []
    if args.pairs:
        base = Path(args.pairs).resolve().parent
        try:
            with open(args.pairs, newline="") as f:
                rows = list(csv.DictReader(f))
        except OSError as e:
            raise TalkFormerError(f"{args.pairs}: cannot read the pairs CSV ({e})") from e
        for i, r in enumerate(rows):
            if not r.get("generated") or not r.get("truth"):
                raise TalkFormerError(f"{args.pairs}: row {i + 2}: expected columns generated,truth[,name]")
            g, t = (str(p if Path(p).is_absolute() else base / p) for p in (r["generated"].strip(), r["truth"].strip()))
            pairs.append((g, t, (r.get("name") or "").strip() or Path(g).stem))
    if len(args.generated) != len(args.truth):
        raise TalkFormerError(f"got {len(args.generated)} --generated and {len(args.truth)} --truth: expected one --truth per --generated")
    names = list(args.name)
    for i, (g, t) in enumerate(zip(args.generated, args.truth)):
        pairs.append((g, t, names[i] if i < len(names) else Path(g).stem))
    if not pairs:
        raise TalkFormerError("nothing to evaluate: give --generated G --truth T (repeatable) or --pairs CSV")
    return pairs


def _load_networks(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """Networks the user gave weights for; reasons for the ones skipped."""
    nets: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    if args.lpips_backbone:
        from .lpips import load_lpips

        nets["lpips"] = load_lpips(args.lpips_backbone, args.lpips_heads, net=args.lpips_net, device=args.device)
    else:
        skipped["lpips"] = "LPIPS: no weights given (--lpips-backbone and --lpips-heads); nothing is downloaded"
    if args.fid_weights:
        from .fid import load_fid_inception

        nets["fid"] = load_fid_inception(args.fid_weights, device=args.device)
    else:
        skipped["fid"] = "FID: no Inception weights given (--fid-weights pt_inception-2015-12-05-6726825d.pth)"
    if args.syncnet_weights:
        from .syncnet import load_syncnet

        nets["syncnet"] = load_syncnet(args.syncnet_weights, device=args.device)
    else:
        skipped["sync"] = "SyncScore: no SyncNet weights given (--syncnet-weights syncnet_v2.model)"
    if args.csim:
        from .csim import DlibFaceEmbedder, csim_unavailable_reason

        why = csim_unavailable_reason(args.csim_models)
        if why is None:
            nets["csim"] = DlibFaceEmbedder(args.csim_models)
        else:
            skipped["csim"] = f"CSIM skipped: {why}"
    else:
        skipped["csim"] = "CSIM (dlib ResNet): not requested (--csim)"
    return nets, skipped


def _row_values(r: dict[str, Any]) -> dict[str, Any]:
    v = {k: r.get(k) for k in ("psnr", "ssim", "lmd", "mouth_corr", "lpips", "fid", "csim")}
    s = r.get("sync") or {}
    v.update(sync_conf=s.get("confidence"), sync_dist=s.get("min_dist"), sync_offset=s.get("offset"))
    return v


def _fmt(v: Any, fmt: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return fmt.format(v)


def _mean(values: list[Any]) -> Any:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if not k.startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if math.isfinite(f) else ("inf" if f > 0 else "-inf" if f < 0 else None)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_markdown(path: Path, rows: list[dict[str, Any]], mean: dict[str, Any], skipped: dict[str, str],
                   extra: list[str]) -> None:
    cols = [c for c in COLUMNS]
    lines = ["# Evaluation (lower half of the face crop)", "",
             "| pair | frames | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for r in rows:
        v = _row_values(r)
        lines.append(f"| {r['name']} | {r['frames']} | " + " | ".join(_fmt(v[k], f) for k, _, f in cols) + " |")
    if len(rows) > 1:
        lines.append(f"| **mean** | {mean['frames']} | "
                     + " | ".join(_fmt(mean[k], "{:.2f}" if k == "sync_offset" else f) for k, _, f in cols) + " |")
    lines.append("")
    lines.append(f"Crops: {rows[0]['crop_size']} px, boxes from the ground truth's face track; PSNR/SSIM/LPIPS/FID on "
                 "rows [S/2:]; LMD in px of a 256 crop (40 lip points, mediapipe); mouth corr = Pearson r of the "
                 "per-frame inner-lip gap (points 13-14). CSIM uses dlib's face-recognition ResNet on the whole crop "
                 "(not ArcFace). Sync = syncnet_python's confidence / min distance / offset (frames) of the generated video.")
    if skipped:
        lines += ["", "Not computed:"] + [f"- {why}" for why in skipped.values()]
    notes = [f"- {r['name']}: {n}" for r in rows for n in r.get("notes", [])] + [f"- {e}" for e in extra]
    if notes:
        lines += ["", "Notes:"] + notes
    path.write_text("\n".join(lines) + "\n")


def plot_mouth_opening(path: Path, rows: list[dict[str, Any]], max_pairs: int = 12) -> bool:
    """Per-frame mouth opening, generated against truth, one panel per pair (first ``max_pairs``)."""
    shown = [r for r in rows if "mouth_open_gen" in r.get("per_frame", {})][:max_pairs]
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 2.6 * len(shown)), squeeze=False)
    for ax, r in zip(axes[:, 0], shown):
        pf = r["per_frame"]
        x = np.arange(len(pf["mouth_open_gen"]))
        ax.plot(x, pf["mouth_open_truth"], label="ground truth", color="black", lw=1.4)
        ax.plot(x, pf["mouth_open_gen"], label="generated", color="tab:red", lw=1.2)
        corr = r.get("mouth_corr")
        ax.set_title(f"{r['name']}: mouth opening (r = {corr:.3f})" if corr is not None else f"{r['name']}: mouth opening")
        ax.set_xlabel("frame (25 fps)")
        ax.set_ylabel(f"inner-lip gap (px @ {r['crop_size']})")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .metrics import evaluate_pair

    pairs = _read_pairs(args)
    for g, t, _ in pairs:  # every path checked before any long work
        for p in (g, t):
            if not Path(p).is_file():
                raise TalkFormerError(f"{p}: video file not found")
    from ..paths import check_output_dir

    out = check_output_dir(args.out_dir, "--out-dir")  # before the networks and the scoring
    nets, skipped = _load_networks(args)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    rows: list[dict[str, Any]] = []
    for i, (g, t, name) in enumerate(pairs):
        bar = tqdm(desc=f"[{i + 1}/{len(pairs)}] {name}", unit="frame", leave=False) if tqdm else None
        state = {"stage": None}

        def progress(stage: str, done: int, total: int) -> None:
            if bar is None:
                return
            if stage != state["stage"]:
                state["stage"] = stage
                bar.reset(total=total)
                bar.set_postfix_str(stage)
            bar.update(done - bar.n)  # respects tqdm's mininterval

        try:
            r = evaluate_pair(g, t, crop_size=args.crop_size, fps=args.fps, lpips=nets.get("lpips"),
                              fid=nets.get("fid"), syncnet=nets.get("syncnet"), csim=nets.get("csim"),
                              audio=args.audio, csim_stride=args.csim_stride, face_index=args.face_index,
                              max_frames=args.max_frames, progress=progress)
        finally:
            if bar is not None:
                bar.close()
        r["name"] = name
        rows.append(r)
        print(f"{name}: " + ", ".join(f"{k}={_fmt(v, '{:.4g}')}" for k, v in _row_values(r).items() if v is not None))
    mean = {k: _mean([_row_values(r)[k] for r in rows]) for k, _, _ in COLUMNS}
    mean["frames"] = int(sum(r["frames"] for r in rows))
    extra: list[str] = []
    pooled = None
    feats = [r.get("_fid_features") for r in rows]
    if len(rows) > 1 and all(f is not None for f in feats):
        from .fid import fid_from_features

        pooled = fid_from_features(np.concatenate([f[0] for f in feats]), np.concatenate([f[1] for f in feats]))
        extra.append(f"FID pooled over all {mean['frames']} frames of all pairs: {pooled:.2f} (the mean row averages per-pair FIDs)")
    if any(r["frames"] < 2048 for r in rows) and "fid" in nets:
        extra.append("FID from fewer than 2048 frames is biased upwards (rank-deficient covariances); compare like with like")
    write_markdown(out / "results.md", rows, mean, skipped, extra)
    summary = {"pairs": rows, "mean": mean, "fid_pooled": pooled, "skipped": skipped, "notes": extra,
               "crop_size": args.crop_size, "fps": args.fps}
    (out / "results.json").write_text(json.dumps(_jsonable(summary), indent=1))
    if not args.no_plot:
        plot_mouth_opening(out / "mouth_opening.png", rows)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}" + ("" if args.no_plot else f", {out / 'mouth_opening.png'}"))
    for why in skipped.values():
        print(why)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except TalkFormerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0

"""Score the held-out crops of ``bench/gpu_finetune.py`` runs on the 256 px ruler, with the baselines.

    python bench/score_gpu_finetune.py --results DIR_OR_NPZ... --shards .gpu/shards_256_raw \
        [--out docs/finetune_gpu_results.md] [--grid docs/finetune_grid.png]

For every clip (matched by the shard's file name) and every preset that ran on it: the test-frame
landmarks and audio-driven crops, upscaled bicubic to 256 px when smaller (``eval.ruler``), scored
on the lower half against the TRUE 256 px crops of the held-out frames: PSNR, SSIM, LMD (px of a
256 crop) and mouth-opening correlation (mediapipe); the two baselines (copy-reference, mean-mouth;
``finetune.holdout.baselines``) made at 256 px and scored the same way. Writes the markdown (tables, the
quality bar per preset, gpu256 against cpu64, the training numbers of each run) and one grid: per
clip three held-out frames, columns truth / audio-driven / test-frame landmarks per preset /
copy-reference, the lower half of the face at 256 px. Runs made with ``--dubbing`` add their
dubbing report (the protocol and the silence check of docs/dubbing.md, read here with mediapipe).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = ("copy_reference", "mean_mouth")
BASE_NAMES = {"copy_reference": "copy-reference", "mean_mouth": "mean-mouth"}
MODES = (("ours_landmarks", "test-frame landmarks"), ("ours_audio", "audio-driven"))
PRESET_ORDER = ("gpu256", "gpu128", "cpu96", "cpu64", "person64", "person96")


def load_results(paths: list[str]) -> dict[str, dict[str, dict]]:
    """{shard file name: {preset: {"meta", "test_idx", "ours_landmarks", "ours_audio", "dubbing"}}}
    ("dubbing": ``finetune.dubbing.dubbing_inputs`` of a ``--dubbing`` run, read from the
    ``NAME.dubbing.npz`` beside its file, else None)."""
    from talkformer_core.data.packed import decode_images
    from talkformer_core.finetune.dubbing import dubbing_inputs_path, load_dubbing_inputs

    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.npz")) if p.is_dir() else [p]
    out: dict[str, dict[str, dict]] = {}
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            if "meta" not in z.files:
                continue
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in z.files}
        r = {"meta": meta, "file": str(f), "test_idx": arrays["test_idx"], "dubbing": None}
        dub = dubbing_inputs_path(f)
        if dub.exists():
            with np.load(dub, allow_pickle=False) as z:
                r["dubbing"] = load_dubbing_inputs(z)
        for key, _ in MODES:  # lossless WebP (data.packed.encode_images), or plain uint8 arrays
            r[key] = arrays[key] if key in arrays else decode_images(arrays, key, str(f))
        out.setdefault(meta["shard"], {})[meta["preset"]] = r
    return out


def _order(presets) -> list[str]:
    return sorted(presets, key=lambda p: (PRESET_ORDER.index(p) if p in PRESET_ORDER else 99, p))


def truth_shard(shards: Path, name: str, tmp: Path) -> Path:
    """The 256 px truth shard of ``name`` in ``shards`` (plain, or packed: unpacked to ``tmp``)."""
    from talkformer_core.data.packed import PACKED_KEYS, unpack_shard

    p = shards / name
    if not p.is_file():
        raise SystemExit(f"{p}: no such shard; give --shards the folder the results' shards came from")
    with np.load(p, allow_pickle=False) as z:
        packed = all(k in z.files for k in PACKED_KEYS)
    return unpack_shard(p, tmp / name) if packed else p


def score_clip(shard: Path, runs: dict[str, dict], holdout: float, landmarks: bool = True) -> dict:
    from talkformer_core.eval.ruler import RULER, ruler_scores
    from talkformer_core.finetune.holdout import baselines, load_holdout

    h = load_holdout(shard, holdout)
    if h.crops.shape[1] != RULER:
        raise SystemExit(f"{shard}: {h.crops.shape[1]} px crops; the ruler needs the {RULER} px shard")
    truth = h.crops[h.test_idx]
    base = baselines(h)
    rows: dict[str, dict] = {b: ruler_scores(base[b], truth, landmarks=landmarks) for b in BASE}
    crops: dict[str, np.ndarray] = {"truth": truth, **{b: base[b] for b in BASE}}
    for preset, r in runs.items():
        if not np.array_equal(r["test_idx"], h.test_idx):
            raise SystemExit(f"{r['file']}: its held-out frames differ from {shard}'s (holdout {holdout})")
        for key, _ in MODES:
            rows[f"{preset}:{key}"] = ruler_scores(r[key], truth, landmarks=landmarks)
            crops[f"{preset}:{key}"] = r[key]
    return {"rows": rows, "crops": crops, "test_idx": h.test_idx}


def _better(metric: str, a, b) -> bool:
    from talkformer_core.finetune.holdout import _better as better

    return better(metric, a, b)


def verdicts(rows: dict, preset: str) -> dict[str, bool]:
    lm, au = rows[f"{preset}:ours_landmarks"], rows[f"{preset}:ours_audio"]
    v = {f"landmarks_{m}": all(_better(m, lm[m], rows[b][m]) for b in BASE) for m in ("psnr", "ssim", "lmd")}
    v.update({f"audio_{m}": all(_better(m, au[m], rows[b][m]) for b in BASE) for m in ("lmd", "mouth_corr")})
    v["landmarks_all"] = v["landmarks_psnr"] and v["landmarks_ssim"] and v["landmarks_lmd"]
    v["audio_all"] = v["audio_lmd"] and v["audio_mouth_corr"]
    return v


def _f(v, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


def markdown(scored: dict[str, dict], runs: dict[str, dict[str, dict]], a: argparse.Namespace) -> str:
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    lines = ["# Person-specific models on the 256 px ruler", "",
             f"`python bench/score_gpu_finetune.py --results {' '.join(a.results)} --shards {a.shards}`: each clip "
             f"trained on its first {1 - a.holdout:.0%} of frames by `bench/gpu_finetune.py` (the finetune recipe of "
             f"the preset), scored on the last {a.holdout:.0%} with its own audio, on the lower half of the 256 px "
             "face crop (smaller crops upscaled bicubic, as they are pasted): PSNR, SSIM, LMD (px @256) and "
             "mouth-opening correlation (mediapipe); baselines made at 256 px.", "",
             "| clip | method | crop px | PSNR (dB) ↑ | SSIM ↑ | LMD (px @256) ↓ | mouth corr ↑ |",
             "|---|---|---|---|---|---|---|"]
    for clip, sc in scored.items():
        for preset in _order(runs[clip]):
            for key, name in MODES:
                r = sc["rows"][f"{preset}:{key}"]
                lines.append(f"| {clip} | {preset}, {name} | {r['gen_size']} | {_f(r['psnr'], '.2f')} | "
                             f"{_f(r['ssim'], '.4f')} | {_f(r['lmd'], '.2f')} | {_f(r['mouth_corr'], '.3f')} |")
        for b in BASE:
            r = sc["rows"][b]
            lines.append(f"| {clip} | {BASE_NAMES[b]} | 256 | {_f(r['psnr'], '.2f')} | {_f(r['ssim'], '.4f')} | "
                         f"{_f(r['lmd'], '.2f')} | {_f(r['mouth_corr'], '.3f')} |")
    lines += ["", "## Training runs", "",
              "| clip | preset | device | minutes | steps (AE / TF) | batch (AE / TF) | samples/s (AE crops / TF windows) | "
              "share of wall time in the training step (AE / TF) | peak GPU GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for clip in scored:
        for preset in _order(runs[clip]):
            m = runs[clip][preset]["meta"]
            sa, st = m["speed"]["autoencoder"], m["speed"]["talkformer"]
            lines.append(f"| {clip} | {preset} | {m['device_name']} | {m['minutes']:.1f} | {m['steps']['autoencoder']} / "
                         f"{m['steps']['talkformer']} | {int(sa['batch_size'])} / {int(st['batch_size'])} | "
                         f"{sa['samples_per_s']:.1f} / {st['samples_per_s']:.1f} | {100 * sa['busy_share']:.0f} % / "
                         f"{100 * st['busy_share']:.0f} % | {_f(m.get('peak_gpu_gib'), '.1f')} |")
    lines += ["", "## The quality bar", ""]
    presets = _order({p for r in runs.values() for p in r})
    for preset in presets:
        clips = [c for c in scored if preset in runs[c]]
        vs = {c: verdicts(scored[c]["rows"], preset) for c in clips}
        lines.append(f"- **{preset}**: test-frame landmarks beat both baselines on PSNR, SSIM and LMD on "
                     f"{sum(v['landmarks_all'] for v in vs.values())} of {len(clips)} clips; audio-driven beats both on "
                     f"LMD and mouth correlation on {sum(v['audio_all'] for v in vs.values())} of {len(clips)} ("
                     + "; ".join(f"{c}: {yes(v['landmarks_psnr'])}/{yes(v['landmarks_ssim'])}/{yes(v['landmarks_lmd'])}, "
                                 f"{yes(v['audio_lmd'])}/{yes(v['audio_mouth_corr'])}" for c, v in vs.items()) + ")")
    if "gpu256" in presets and "cpu64" in presets:
        both = [c for c in scored if {"gpu256", "cpu64"} <= set(runs[c])]
        for key, name in MODES:
            wins = [c for c in both if all(_better(m, scored[c]["rows"][f"gpu256:{key}"][m], scored[c]["rows"][f"cpu64:{key}"][m])
                                           for m in ("psnr", "ssim"))]
            lines.append(f"- gpu256 beats cpu64 on lower-face PSNR and SSIM at 256 px ({name}) on {len(wins)} of "
                         f"{len(both)} clips")
    if a.grid:
        lines += ["", f"![held-out frames]({Path(a.grid).name}) — per clip three held-out frames (rows), lower half "
                      "of the 256 px crop: truth, then per preset audio-driven and test-frame landmarks, then "
                      "copy-reference."]
    return "\n".join(lines) + "\n"


def grid_rows(scored: dict[str, dict], runs: dict[str, dict[str, dict]], per_clip: int = 3):
    """(rows of lower-half tiles at 256 px, column labels, row labels)."""
    from talkformer_core.eval.ruler import to_ruler

    presets = _order({p for r in runs.values() for p in r})
    modes = ("ours_audio", "ours_landmarks")  # truth / audio-driven / test-frame landmarks / copy-reference
    cols = ["truth"] + [f"{p}:{k}" for p in presets for k in modes] + ["copy_reference"]
    labels = ["truth"] + [f"{p} {'audio' if k == 'ours_audio' else 'landmarks'}" for p in presets for k in modes] \
        + ["copy-reference"]
    rows, row_labels = [], []
    for clip, sc in scored.items():
        n = len(sc["test_idx"])
        for i in np.linspace(0, n - 1, min(per_clip, n)).round().astype(int):
            row = []
            for c in cols:
                if c not in sc["crops"]:
                    row.append(np.full((128, 256, 3), 255, np.uint8))
                    continue
                x = to_ruler(sc["crops"][c][i:i + 1])[0]
                row.append(x[x.shape[0] // 2:])
            rows.append(row)
            row_labels.append(f"{Path(clip).stem.rsplit('-', 1)[0]} t={int(sc['test_idx'][i])}")
    return rows, labels, row_labels


def dubbing_markdown(runs: dict[str, dict[str, dict]], landmarks: bool = True) -> str:
    """The dubbing report (``finetune.dubbing.score_dubbing``, mediapipe) of every ``--dubbing`` run."""
    from talkformer_core.finetune.dubbing import format_dubbing, score_dubbing

    parts = []
    for clip in sorted(runs):
        for preset in _order(runs[clip]):
            inputs = runs[clip][preset].get("dubbing")
            if inputs is not None and landmarks:
                parts.append(f"\n### Dubbing, {clip}, {preset}\n\n" + format_dubbing(score_dubbing(inputs), clip) + "\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", nargs="+", required=True, help="gpu_finetune .npz files or folders of them")
    ap.add_argument("--shards", default=str(ROOT / ".gpu" / "shards_256_raw"), help="the 256 px truth shards")
    ap.add_argument("--holdout", type=float, default=None, help="default: the runs' own")
    ap.add_argument("--out", default=str(ROOT / "docs" / "finetune_gpu_results.md"))
    ap.add_argument("--grid", default=str(ROOT / "docs" / "finetune_grid.png"), help="'' = no picture")
    ap.add_argument("--json", default=None, help="also write the scores here")
    ap.add_argument("--no-landmarks", action="store_true", help="PSNR / SSIM only (no mediapipe)")
    a = ap.parse_args(argv)
    import tempfile

    from talkformer_core.eval.ruler import grid, write_png

    runs = load_results(a.results)
    if not runs:
        print("no gpu_finetune results found", file=sys.stderr)
        return 1
    holdouts = {r["meta"]["holdout"] for c in runs.values() for r in c.values()}
    if a.holdout is None:
        if len(holdouts) != 1:
            print(f"the runs used different --holdout values {sorted(holdouts)}; give --holdout", file=sys.stderr)
            return 2
        a.holdout = holdouts.pop()
    scored = {}
    with tempfile.TemporaryDirectory() as tmp:
        for clip in sorted(runs):
            shard = truth_shard(Path(a.shards), clip, Path(tmp))
            scored[clip] = score_clip(shard, runs[clip], a.holdout, landmarks=not a.no_landmarks)
            print(f"{clip}: scored {sorted(runs[clip])}", flush=True)
    if a.grid:
        rows, labels, row_labels = grid_rows(scored, runs)
        write_png(a.grid, grid(rows, tile=(128, 256), col_labels=labels, row_labels=row_labels))
        print(f"wrote {a.grid}")
    md = markdown(scored, runs, a) + dubbing_markdown(runs, landmarks=not a.no_landmarks)
    Path(a.out).write_text(md)
    print(md)
    if a.json:
        Path(a.json).write_text(json.dumps({c: {"rows": {k: {m: v for m, v in r.items() if not isinstance(v, (list, np.ndarray))}
                                                         for k, r in s["rows"].items()},
                                                "runs": {p: r["meta"] for p, r in runs[c].items()}}
                                            for c, s in scored.items()}, indent=1, default=float))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

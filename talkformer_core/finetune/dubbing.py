"""The dubbing report: the held-out part split into new audio and template, one clip's numbers
for the protocol of ``talkformer_core.eval.dubbing`` (docs/dubbing.md), and their table.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .holdout import fmt, load_holdout, nearest_mouth, paste_lower_face, reference_frame, upscale

SILENCE_SECONDS = 2.0


def points478(crops: np.ndarray) -> np.ndarray:
    """mediapipe (tracking mode, one sequence) on crops upscaled to EVAL_CROP: (B, 478, 2) px, NaN if missed."""
    from ..face.landmarks import LandmarkDetector

    out = []
    with LandmarkDetector(max_num_faces=1) as det:
        for c in upscale(crops):
            p, found = det.detect(c)
            out.append(p[:, :2].astype(np.float64) if found else np.full((478, 2), np.nan))
    return np.stack(out)


def _reconstruct(model: Any, crops: np.ndarray, batch: int = 32) -> np.ndarray:
    """The frozen autoencoder's reconstructions D(E(crop)): (B, S, S, 3) uint8 -> same."""
    import torch

    from ..pixels import to_pixels, to_signed

    out = []
    with torch.no_grad():
        for i in range(0, len(crops), batch):
            x = to_signed(torch.from_numpy(np.ascontiguousarray(crops[i:i + batch])).to(model.device)).permute(0, 3, 1, 2)
            out.append(to_pixels(model.model.decode(model.model.encode(x))).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def _anchor_x(content_box: np.ndarray, template_box: np.ndarray) -> np.ndarray:
    """Slide jaw + lips (T, 57, 2) sideways so the lips' mean x is the template's (as anchor_mouth_x)."""
    from ..face import topology

    lips = list(topology.LIP_POS)
    dx = template_box[:, lips, 0].mean(1) - content_box[:, 17:, 0].mean(1)
    out = content_box.copy()
    out[:, :, 0] += dx[:, None]
    return out


def dubbing_report(checkpoint: str | os.PathLike, shard: str | os.PathLike, holdout: float, *,
                   device: str | None = None, vae: str | os.PathLike | None = None, sampler: str = "ddim",
                   steps: int = 25, seed: int = 0, noise_scale: float | None = None, silence: bool = True,
                   decode_refine: int | None = None, mouth_guidance: float | None = None) -> dict[str, Any]:
    """The dubbing protocol (eval.dubbing) on one clip: ``score_dubbing(dubbing_inputs(...))``, the
    faces made and read in one process. See ``dubbing_inputs`` for what is drawn and
    ``score_dubbing`` for what is measured."""
    return score_dubbing(dubbing_inputs(checkpoint, shard, holdout, device=device, vae=vae, sampler=sampler,
                                        steps=steps, seed=seed, noise_scale=noise_scale, silence=silence,
                                        decode_refine=decode_refine, mouth_guidance=mouth_guidance))


def dubbing_inputs(checkpoint: str | os.PathLike, shard: str | os.PathLike, holdout: float, *,
                   device: str | None = None, vae: str | os.PathLike | None = None, sampler: str = "ddim",
                   steps: int = 25, seed: int = 0, noise_scale: float | None = None, silence: bool = True,
                   decode_refine: int | None = None, mouth_guidance: float | None = None) -> dict[str, Any]:
    """Everything the dubbing report reads, made without mediapipe (so on a GPU machine that lacks it):
    ``{"crops": {name: (n, S, S, 3) uint8}, "series": {name: (n,) float}, "rows": {name: scores},
    "meta": {...}}``. ``score_dubbing`` reads the crops with the ruler.

    Trained on [0, 1 - holdout); the held-out part split in halves, new audio = the first, template =
    the second (holdout 0.4: [0.6, 0.8) drives [0.8, 1.0)). Crops: the generated faces from stage 1
    on the new audio (and, with a fitted mouth model, from the transformer alone and the two
    averaged); the renderer given the new audio's TRUE jaw and lips placed on the template's mouth
    (does stage 2 follow its landmarks and nothing else?); the faces with the last training frames as
    the template (a user who dubs the video the model trained on); the nearest training mouth pasted
    (a non-generative baseline on stage 1's landmarks). Silence: ``SILENCE_SECONDS`` of zeros drive
    the template (and the training frames), with the real training crops and the autoencoder's
    reconstructions of them, which give the ruler's closed range. Series and rows: the landmark-side
    openings (stage 1, the truths, the loudness model) and lip-shape errors."""
    from ..eval import dubbing as D
    from ..face import topology
    from ..face.blend import lower_face_mask
    from ..pipeline import (AudioFeatures, audio_features, complete_landmarks, encode_reference,
                           guidance_neutral_mouth, initial_noise, landmarks_to_crop, load_model, sample_faces)
    from ..sampling import decode_refine_of, mouth_guidance_of, noise_scale_of

    h = load_holdout(shard, holdout)
    T = len(h.crops)
    split = D.split_clip(T, h.analysis.found, 1.0 - holdout, 1.0 - holdout / 2)
    au, te, tr = split.audio, split.template, split.train
    model = load_model(checkpoint, device or "cpu", vae=vae)
    box = model.config.model.landmark_box
    S = h.crops.shape[1]
    refs_idx = tr[topology.pick_spread(h.analysis.openness[tr], model.num_references)]
    refs = h.analysis.points_box(refs_idx, box)
    ref = encode_reference(model, h.crops[reference_frame(h)])
    noise = initial_noise(model, seed, noise_scale)  # None: the model's, as sync
    mask = lower_face_mask(S)

    def render(idx: np.ndarray, lms_crop: np.ndarray) -> np.ndarray:
        gen = sample_faces(model, h.crops[idx], lms_crop, ref, steps=steps, sampler=sampler, seed=seed,
                           batch_size=32, noise=noise, decode_refine=decode_refine, mouth_guidance=mouth_guidance,
                           neutral_mouth=guidance_neutral_mouth(model, h.analysis, np.unique(idx), mouth_guidance))
        return paste_lower_face(gen, h.crops[idx], mask)

    def stage1(idx: np.ndarray, mels: np.ndarray) -> np.ndarray:
        lm_box = complete_landmarks(model, h.analysis, AudioFeatures(mels, len(idx), 25.0), idx, references=refs)
        return landmarks_to_crop(h.analysis, lm_box, idx, model)  # (n, 131, 2) crop frame

    pts = h.analysis.track.points131_filled.astype(np.float64)
    truth, tmpl = D.mouth_opening(pts[au]), D.mouth_opening(pts[te])
    crops: dict[str, np.ndarray] = {}
    series: dict[str, np.ndarray] = {"truth": truth, "template": tmpl}
    rows: dict[str, dict[str, Any]] = {}
    true_lips = h.points_crop[au].astype(np.float64) * S
    lm_cfg = model.landmark.cfg
    fitted = getattr(model.landmark, "mouth", None) is not None and model.landmark.mouth.is_fitted
    # the checkpoint's stage 1 ("stage1"); with a fitted mouth model also the transformer alone and the
    # two averaged, from the same checkpoint (LandmarkConfig.mouth_blend)
    variants = [("", None)] + ([("_transformer", 0.0), ("_blend", 0.5)] if fitted else [])
    own = lm_cfg.mouth_blend
    for suffix, blend in variants:
        lm_cfg.mouth_blend = own if blend is None else blend
        try:
            s1 = stage1(te, h.mels[au])
        finally:
            lm_cfg.mouth_blend = own
        series["stage1" + suffix] = D.mouth_opening(s1)
        rows["stage1" + suffix] = D.dubbing_scores(series["stage1" + suffix], truth, tmpl)
        rows["stage1" + suffix]["lip_shape_error"] = float(np.nanmean(D.lip_shape_error(s1 * S, true_lips)))
        crops["faces" + suffix] = render(te, s1)
        if suffix == "":  # the non-generative baseline on the same landmarks: the nearest training mouth, pasted
            crops["nearest_mouth"] = nearest_mouth(h, te, s1)[0]
    shape_tmpl = D.lip_shape_error(h.points_crop[te].astype(np.float64) * S, true_lips)
    # renderer check: the new audio's true jaw + lips, in the template frame's stable box
    true_box = h.analysis.points_box(au, box)
    tmpl_box = h.analysis.points_box(te, box)
    placed = tmpl_box.copy()
    placed[:, list(topology.CONTENT_POS)] = _anchor_x(true_box[:, list(topology.CONTENT_POS)], tmpl_box)
    placed_crop = landmarks_to_crop(h.analysis, placed, te, model)
    crops["renderer_true_landmarks"] = render(te, placed_crop)
    series["renderer_true_landmarks"] = D.mouth_opening(placed_crop)
    # the same new audio on the last training frames: what a user who dubs the video the model was
    # trained on gets; against the row above, how much is the renderer on frames it never saw
    seen = tr[-len(au):] if len(tr) >= len(au) else None
    if seen is not None:
        s1_seen = stage1(seen, h.mels[au])
        crops["faces_seen_template"] = render(seen, s1_seen)
        series["faces_seen_template"] = D.mouth_opening(s1_seen)
        series["seen_template"] = D.mouth_opening(pts[seen])
    open_tr = D.mouth_opening(pts[tr])  # the training frames' true openings
    series["train"] = open_tr
    loud = D.LoudnessModel.fit(D.frame_loudness(h.mels[tr]), open_tr)
    rows["loudness"] = D.dubbing_scores(loud.predict(D.frame_loudness(h.mels[au])), truth, tmpl)
    rows["template_lips"] = {"lip_shape_error": float(np.nanmean(shape_tmpl))}
    # self-reconstruction of the template frames (their own audio), stage 1 only
    rows["stage1_own_audio"] = D.dubbing_scores(D.mouth_opening(stage1(te, h.mels[te])), tmpl, tmpl)
    meta: dict[str, Any] = {"frames": int(len(te)), "train_frames": int(len(tr)),
                            "audio_frames": [int(au[0]), int(au[-1]) + 1], "template_frames": [int(te[0]), int(te[-1]) + 1],
                            "landmark_box": box, "sampler": sampler, "sampler_steps": steps,
                            "noise_scale": noise_scale_of(model, noise_scale),
                            "decode_refine": decode_refine_of(model, decode_refine),
                            "mouth_guidance": mouth_guidance_of(model, mouth_guidance), "mouth_model": bool(fitted)}
    if silence:
        sil = audio_features(np.zeros(int(16000 * SILENCE_SECONDS), np.float32))
        idx = np.resize(te, sil.num_frames)
        s1_sil = stage1(idx, sil.windows)
        series["silence_stage1"] = D.mouth_opening(s1_sil)
        crops["silence"] = render(idx, s1_sil)
        crops["silence_nearest_mouth"] = nearest_mouth(h, idx, s1_sil)[0]
        crops["train"] = h.crops[tr]
        # the autoencoder's reconstructions of the training frames: the most closed mouth the
        # renderer's decoder draws (a diagnostic beside the bar, which stays the real frames')
        crops["train_autoencoder"] = paste_lower_face(_reconstruct(model, h.crops[tr]), h.crops[tr], mask)
        if seen is not None:  # silence on training frames (see "faces_seen_template")
            idx_seen = np.resize(seen, sil.num_frames)
            crops["silence_seen_template"] = render(idx_seen, stage1(idx_seen, sil.windows))
    return {"crops": crops, "series": series, "rows": rows, "meta": meta}


def score_dubbing(inputs: dict[str, Any], ruler: Callable[[np.ndarray], np.ndarray] = points478) -> dict[str, Any]:
    """The dubbing report from ``dubbing_inputs``: ``ruler`` (crops -> (n, 478, 2) points, mediapipe)
    reads the mouth opening of every crop set; each series is correlated with the new audio's truth
    and with the template (``eval.dubbing.dubbing_scores``); the faces also with the landmarks they
    were drawn from. Silence: stage 1's openings against the lowest 10 % of the training frames'
    true openings; the faces' against what the same ruler reads on the real training frames the
    tracker finds closed (``eval.dubbing.closed_range``)."""
    from ..eval import dubbing as D

    c, s = inputs["crops"], inputs["series"]
    truth, tmpl = s["truth"], s["template"]
    read = {k: D.mouth_opening(ruler(v)) for k, v in c.items()}
    rows = {k: dict(v) for k, v in inputs["rows"].items()}
    for key in ("faces", "faces_transformer", "faces_blend"):
        if key in read:  # does stage 2 follow the landmarks it was given? (apart from whether they follow the audio)
            rows[key] = D.dubbing_scores(read[key], truth, tmpl)
            rows[key]["corr_landmarks"] = D.pearson(read[key], s["stage1" + key[len("faces"):]])
    rows["nearest_mouth"] = D.dubbing_scores(read["nearest_mouth"], truth, tmpl)
    rows["nearest_mouth"]["corr_landmarks"] = D.pearson(read["nearest_mouth"], s["stage1"])
    rows["renderer_true_landmarks"] = D.dubbing_scores(read["renderer_true_landmarks"], truth, tmpl)
    rows["renderer_true_landmarks"]["corr_landmarks"] = D.pearson(read["renderer_true_landmarks"],
                                                                  s["renderer_true_landmarks"])
    if "faces_seen_template" in read:
        rows["faces_seen_template"] = D.dubbing_scores(read["faces_seen_template"], truth, s["seen_template"])
        rows["faces_seen_template"]["corr_landmarks"] = D.pearson(read["faces_seen_template"], s["faces_seen_template"])
    m = inputs["meta"]
    rep: dict[str, Any] = {"rows": rows, **m}
    if "silence" in read:
        o1, o2, open_tr = s["silence_stage1"], read["silence"], s["train"]
        thr1 = D.closed_threshold(open_tr)
        real_tr = read["train"]
        o_seen = read.get("silence_seen_template")
        rep["silence"] = {"frames": len(o1), "stage1_max": float(np.nanmax(o1)), "stage1_closed": thr1,
                          "faces_max_seen_template": float(np.nanmax(o_seen)) if o_seen is not None else None,
                          "faces_max": float(np.nanmax(o2)), "faces_p90": float(np.nanquantile(o2, 0.9)),
                          "faces_closed": D.closed_threshold(real_tr),
                          # the bar: what the same ruler reads on the real frames the tracker finds closed
                          "faces_closed_real": D.closed_range(real_tr, open_tr),
                          "faces_closed_autoencoder": D.closed_threshold(read["train_autoencoder"]),
                          "faces_missed": int(np.isnan(o2).sum()),
                          "nearest_mouth_max": float(np.nanmax(read["silence_nearest_mouth"])),
                          "stage1_ok": bool(np.nanmax(o1) <= thr1)}
        rep["silence"]["faces_ok"] = bool(rep["silence"]["faces_max"] <= rep["silence"]["faces_closed_real"])
    return rep


def dubbing_inputs_path(results: str | os.PathLike) -> Path:
    """Where a results file's dubbing inputs go, beside it: ``NAME.npz`` -> ``NAME.dubbing.npz`` (a file
    of their own: ``bench/gpu_finetune.py --dubbing`` writes it, ``bench/score_gpu_finetune.py`` reads it)."""
    p = Path(results)
    return p.with_name(p.stem + ".dubbing.npz")


def save_dubbing_inputs(inputs: dict[str, Any], prefix: str = "dub") -> dict[str, np.ndarray]:
    """``dubbing_inputs`` as npz arrays under ``prefix``: crops losslessly (``data.packed.encode_images``),
    series as float64, rows and meta as JSON. ``load_dubbing_inputs`` reads them back exactly."""
    import json

    from ..data.packed import encode_images

    out: dict[str, np.ndarray] = {f"{prefix}.json": np.array(json.dumps(
        {"rows": inputs["rows"], "meta": inputs["meta"], "crops": sorted(inputs["crops"]),
         "series": sorted(inputs["series"])}, default=float))}
    for k, v in inputs["crops"].items():
        out.update(encode_images(np.ascontiguousarray(v, np.uint8), f"{prefix}.crops.{k}"))
    for k, v in inputs["series"].items():
        out[f"{prefix}.series.{k}"] = np.asarray(v, np.float64)
    return out


def load_dubbing_inputs(arrays: Any, prefix: str = "dub") -> dict[str, Any] | None:
    """Inverse of ``save_dubbing_inputs`` on an npz (or a dict of its arrays); None if it holds none."""
    import json

    from ..data.packed import decode_images

    if f"{prefix}.json" not in getattr(arrays, "files", arrays):
        return None
    head = json.loads(str(arrays[f"{prefix}.json"]))
    data = {k: arrays[k] for k in getattr(arrays, "files", arrays) if k.startswith(f"{prefix}.")}
    return {"rows": head["rows"], "meta": head["meta"],
            "crops": {k: decode_images(data, f"{prefix}.crops.{k}") for k in head["crops"]},
            "series": {k: np.asarray(data[f"{prefix}.series.{k}"]) for k in head["series"]}}


DUB_ROWS = (("stage1", "stage 1 (predicted landmarks)"), ("faces", "generated faces"),
            ("stage1_transformer", "stage 1, transformer alone"), ("faces_transformer", "faces, transformer alone"),
            ("stage1_blend", "stage 1, mouth model + transformer averaged"),
            ("faces_blend", "faces, mouth model + transformer averaged"),
            ("renderer_true_landmarks", "renderer, the audio's true landmarks"),
            ("faces_seen_template", "faces, the template taken from the training frames"),
            ("nearest_mouth", "nearest training mouth pasted (baseline, stage 1's landmarks)"), ("loudness", "loudness model"))


DUB_TABLE_HEADER = ("| clip | opening of | corr with the audio's truth ↑ | corr with the template | same, given the "
                    "audio | template's weight, the audio held fixed | faces: corr with the landmarks drawn | "
                    "lip-shape error (x nose length) ↓ |", "|---|---|---|---|---|---|---|---|")


def dubbing_table_rows(rep: dict[str, Any], clip: str) -> list[str]:
    """One clip's rows of the dubbing table (DUB_TABLE_HEADER): each method of DUB_ROWS the report has,
    then the template's own lips."""
    lines = []
    for key, name in DUB_ROWS:
        if key not in rep["rows"]:
            continue
        r = rep["rows"][key]
        lines.append(f"| {clip} | {name} | {fmt(r['corr_audio'], '.3f')} | {fmt(r['corr_template'], '.3f')} | "
                     f"{fmt(r['corr_template_given_audio'], '.3f')} | {fmt(r.get('template_weight'), '.3f')} | "
                     f"{fmt(r.get('corr_landmarks'), '.3f')} | {fmt(r.get('lip_shape_error'), '.3f')} |")
    lines.append(f"| {clip} | template's own lips | | | | | | {fmt(rep['rows']['template_lips']['lip_shape_error'], '.3f')} |")
    return lines


def format_dubbing(rep: dict[str, Any], clip: str = "this clip") -> str:
    """Markdown: one row per method (corr with the audio's truth, with the template, the latter given
    the audio, the template's weight), lip-shape error, and the silence check."""
    lines = [f"[finetune] dubbing: template frames {rep['template_frames']} driven by the audio of "
             f"{rep['audio_frames']} ({rep['frames']} frames; {rep['train_frames']} training frames; "
             f"box {rep['landmark_box']}; mouth model {'on' if rep['mouth_model'] else 'off'}; {rep['sampler']} "
             f"{rep['sampler_steps']} steps, x_T scale {rep.get('noise_scale', 1.0):g}, decode passes {rep.get('decode_refine', 0)}, "
             f"mouth guidance {rep.get('mouth_guidance', 0.0):g})",
             *DUB_TABLE_HEADER, *dubbing_table_rows(rep, clip)]
    lines.append(f"audio's truth vs template truth: {fmt(rep['rows']['stage1']['truth_vs_template'], '.3f')}; "
                 f"stage 1 on the template's own audio: {fmt(rep['rows']['stage1_own_audio']['corr_audio'], '.3f')}")
    if "silence" in rep:
        s = rep["silence"]
        lines.append(f"silence ({s['frames']} frames): stage 1 max opening {s['stage1_max']:.4f} (closed range <= "
                     f"{s['stage1_closed']:.4f}: {s['stage1_ok']}); faces max {s['faces_max']:.4f}, 90th pct "
                     f"{s['faces_p90']:.4f} (the real closed frames read <= {s.get('faces_closed_real', float('nan')):.4f}: "
                     f"{s['faces_ok']}; lowest 10 % of the real frames' readings <= {s['faces_closed']:.4f}; of the "
                     f"autoencoder's reconstructions <= {s.get('faces_closed_autoencoder', float('nan')):.4f}; "
                     f"on training frames as the template: max {fmt(s.get('faces_max_seen_template'), '.4f')}; "
                     f"the nearest training mouth pasted: max {fmt(s.get('nearest_mouth_max'), '.4f')})")
    return "\n".join(lines)

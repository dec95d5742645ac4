"""Scoring a person model on the frames it did not train on, against two baselines.

Hold-out (``--holdout F``): train on the first 1 - F of the frames, and score the last F with the
clip's own audio (``holdout_report``, docs/finetune.md), on the lower half of the face crop with
``talkformer_core.eval``:
  ours (test-frame landmarks)  the renderer driven by the landmarks detected on the test frames;
  ours (audio-driven)          landmarks completed from the audio (stage 1), then the renderer;
  copy-reference               each test crop with its lower face replaced by that of the training
                               frame with the median mouth opening, aligned (similarity fitted on
                               the 74 upper-face points) and feather-blended;
  mean-mouth                   the lower face of the pixel mean of the training crops (aligned with
                               the mean training landmarks), pasted the same way.
Every method's crop is pasted onto the test crop through the same feathered lower-face mask as
the pipeline's blend (face.blend.lower_face_mask). PSNR and SSIM on the crop at its own size;
LMD and mouth-opening correlation from mediapipe on the crops upscaled to 256 px (mediapipe finds
no face in a 64 px crop), LMD in pixels of a 256 crop as eval reports it. ``QuickEval`` is the
cheap version of the same scoring that a run prints while it trains.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TalkFormerConfig
from ..errors import InputError

EVAL_CROP = 256  # crops are upscaled to this for mediapipe (LMD, mouth opening)
METHODS = ("ours_landmarks", "ours_audio", "copy_reference", "mean_mouth")
METHOD_NAMES = {"ours_landmarks": "ours, test-frame landmarks", "ours_audio": "ours, audio-driven",
                "copy_reference": "copy-reference", "mean_mouth": "mean-mouth"}


@dataclass
class HoldoutData:
    """One shard split into training and test frames, and what every method needs."""

    crops: np.ndarray  # (T, S, S, 3) uint8
    points_crop: np.ndarray  # (T, 131, 2) crop frame
    train_idx: np.ndarray  # found training frames
    test_idx: np.ndarray  # found test frames
    analysis: Any  # pipeline.FaceAnalysis of the whole clip
    mels: np.ndarray  # (T, 80, 16) float32


def load_holdout(shard: str | os.PathLike, holdout: float) -> HoldoutData:
    from ..data.dataset import load_shard
    from ..face.landmarks import FaceLandmarks
    from ..face.topology import FULL_131
    from ..pipeline import analyze_landmarks

    d = load_shard(shard)
    T = int(d["num_frames"])
    found = d["found"].astype(bool)
    p478 = d["points478_px"].astype(np.float32)
    H, W = (int(v) for v in d["frame_size"])
    lms = FaceLandmarks(points478=p478, points131=np.ascontiguousarray(p478[:, list(FULL_131)]), found=found,
                        size=(H, W))
    S = d["crops"].shape[1]
    analysis = analyze_landmarks(lms, S)  # the same track as preprocess (same points, same smoothing)
    split = int(round((1.0 - holdout) * T)) if holdout > 0 else T
    idx = np.arange(T)
    train_idx = idx[(idx < split) & found]
    test_idx = idx[(idx >= split) & found] if holdout > 0 else train_idx[-max(1, min(len(train_idx), 16)):]
    return HoldoutData(d["crops"], d["points131_crop"].astype(np.float32), train_idx, test_idx, analysis,
                       d["mels"].astype(np.float32))


def _similarity(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """2x3 similarity (rotation, uniform scale, shift) taking src points to dst points (least squares)."""
    import cv2

    m, _ = cv2.estimateAffinePartial2D(src_pts.astype(np.float32), dst_pts.astype(np.float32), method=cv2.LMEDS)
    if m is None:
        m = np.array([[1, 0, 0], [0, 1, 0]], np.float64)
    return m


def paste_lower_face(cand: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Feathered lower-face paste in the crop (the pipeline's blend mask): (B, S, S, 3) uint8."""
    a = mask[None, :, :, None]
    return np.clip(np.round(a * cand.astype(np.float32) + (1 - a) * truth.astype(np.float32)), 0, 255).astype(np.uint8)


def baselines(h: HoldoutData) -> dict[str, np.ndarray]:
    """copy-reference and mean-mouth crops (pasted) for the test frames: {name: (B, S, S, 3) uint8}."""
    from ..face.blend import lower_face_mask

    S = h.crops.shape[1]
    mask = lower_face_mask(S)
    # copy-reference donor: the training frame with the median mouth opening
    opn = h.analysis.openness[h.train_idx]
    donor = int(h.train_idx[np.argsort(opn, kind="stable")[len(opn) // 2]])
    mean_crop = h.crops[h.train_idx].astype(np.float32).mean(0)  # (S, S, 3)
    mean_pts = h.points_crop[h.train_idx].mean(0)  # (131, 2)
    out: dict[str, list[np.ndarray]] = {"copy_reference": [], "mean_mouth": []}
    for t in h.test_idx:
        for name, img, pts in (("copy_reference", h.crops[donor], h.points_crop[donor]),
                               ("mean_mouth", mean_crop, mean_pts)):
            out[name].append(_moved_onto(img, pts, h.points_crop[t]))
    truth = h.crops[h.test_idx]
    return {k: paste_lower_face(np.stack(v), truth, mask) for k, v in out.items()} | {"_donor": np.array(donor)}


def _moved_onto(img: np.ndarray, pts: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """A crop (S, S, 3) whose landmarks are ``pts`` (131, 2, crop fractions) moved by the similarity
    taking its pose points onto ``dst``'s: (S, S, 3) uint8."""
    import cv2

    from ..face import topology

    S = img.shape[0]
    pose = list(topology.POSE_POS)
    m = _similarity(pts[pose] * S, dst[pose] * S)
    warped = cv2.warpAffine(img.astype(np.float32), m, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return np.clip(np.round(warped), 0, 255).astype(np.uint8)


def nearest_mouth(h: HoldoutData, frames: np.ndarray, landmarks_crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A non-generative renderer, the baseline of the dubbing report: for each frame of ``frames``
    (the template) with target landmarks ``landmarks_crop`` (n, 131, 2, crop fractions), the training
    frame whose jaw and lips (each centred on its own mean) are nearest the target's, moved onto the
    template frame's pose points and its lower face pasted in. -> (crops (n, S, S, 3) uint8, the
    training frames used (n,))."""
    from ..face import topology
    from ..face.blend import lower_face_mask

    content = list(topology.CONTENT_POS)

    def shape(p: np.ndarray) -> np.ndarray:
        c = np.asarray(p, np.float64)[:, content]
        return (c - c.mean(1, keepdims=True)).reshape(len(c), -1)

    pool = shape(h.points_crop[h.train_idx])
    want = shape(landmarks_crop)
    d2 = (want ** 2).sum(1)[:, None] - 2 * want @ pool.T + (pool ** 2).sum(1)[None]
    donors = h.train_idx[np.argmin(d2, 1)]
    moved = np.stack([_moved_onto(h.crops[j], h.points_crop[j], h.points_crop[t]) for j, t in zip(donors, frames)])
    return paste_lower_face(moved, h.crops[frames], lower_face_mask(h.crops.shape[1])), donors


def reference_frame(h: HoldoutData) -> int:
    """The R-Align reference among the training frames: pipeline.choose_reference_frame's rule
    (most open and most frontal mouth), restricted to frames the model trained on."""
    o = h.analysis.openness[h.train_idx]
    f = h.analysis.frontalness[h.train_idx]
    top = np.nanmax(o)
    score = np.nan_to_num((o / top if top > 0 else np.ones_like(o)) * f, nan=-1.0)
    return int(h.train_idx[int(np.argmax(score))])


def generate(model: Any, h: HoldoutData, *, audio_driven: bool, steps: int = 25, sampler: str = "ddim",
             seed: int = 0, frames: np.ndarray | None = None, noise_scale: float | None = None,
             decode_refine: int | None = None, mouth_guidance: float | None = None) -> np.ndarray:
    """Our crops for the test frames (pipeline stages), pasted like the baselines: (B, S, S, 3) uint8.

    ``noise_scale`` multiplies the shared x_T (pipeline.initial_noise(seed)); None = the model's, what
    ``sync`` does; ``decode_refine`` and ``mouth_guidance`` likewise (sampling.decode_faces,
    sampling.MouthGuidance)."""
    from ..face import topology
    from ..face.blend import lower_face_mask
    from ..pipeline import (AudioFeatures, complete_landmarks, encode_reference, guidance_neutral_mouth,
                           initial_noise, landmarks_to_crop, sample_faces)

    idx = h.test_idx if frames is None else frames
    S = h.crops.shape[1]
    ref = encode_reference(model, h.crops[reference_frame(h)])
    if audio_driven:
        refs_idx = h.train_idx[topology.pick_spread(h.analysis.openness[h.train_idx], model.num_references)]
        refs = h.analysis.points_box(refs_idx, model.config.model.landmark_box)
        audio = AudioFeatures(h.mels[idx], len(idx), 25.0)
        lm_box = complete_landmarks(model, h.analysis, audio, idx, references=refs)
        lms = landmarks_to_crop(h.analysis, lm_box, idx, model)
    else:
        lms = h.points_crop[idx]
    noise = initial_noise(model, seed, noise_scale)
    gen = sample_faces(model, h.crops[idx], lms, ref, steps=steps, sampler=sampler, seed=seed, batch_size=32,
                       noise=noise, decode_refine=decode_refine, mouth_guidance=mouth_guidance,
                       neutral_mouth=guidance_neutral_mouth(model, h.analysis, idx, mouth_guidance))
    return paste_lower_face(gen, h.crops[idx], lower_face_mask(S))


def upscale(crops: np.ndarray, size: int = EVAL_CROP) -> np.ndarray:
    import cv2

    if crops.shape[1] == size:
        return crops
    return np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_CUBIC) for c in crops])


def score(gen: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """PSNR / SSIM (lower half, crop size) and LMD / mouth correlation (mediapipe at 256 px)."""
    from ..eval import score_crops

    px = score_crops(gen, truth, landmarks=False)
    lm = score_crops(upscale(gen), upscale(truth), landmarks=True)
    return {"psnr": px["psnr"], "ssim": px["ssim"], "lmd": lm["lmd"], "mouth_corr": lm["mouth_corr"],
            "lmd_frames": lm.get("lmd_frames"), "frames": px["frames"],
            "mouth_open_gen": lm["per_frame"].get("mouth_open_gen"),
            "mouth_open_truth": lm["per_frame"].get("mouth_open_truth")}


def holdout_report(checkpoint: str | os.PathLike, shard: str | os.PathLike, holdout: float, *,
                   device: str | None = None, vae: str | os.PathLike | None = None, sampler: str = "ddim",
                   steps: int = 25, seed: int = 0, noise_scale: float | None = None,
                   decode_refine: int | None = None, mouth_guidance: float | None = None) -> dict[str, Any]:
    """The hold-out report on one clip: {method: metrics} for METHODS, plus the verdicts."""
    from ..pipeline import load_model
    from ..sampling import decode_refine_of, mouth_guidance_of, noise_scale_of

    h = load_holdout(shard, holdout)
    if len(h.test_idx) < 3:
        raise InputError(f"{shard}: {len(h.test_idx)} held-out frames with a face; need at least 3")
    model = load_model(checkpoint, device or "cpu", vae=vae)
    truth = h.crops[h.test_idx]
    kw = dict(steps=steps, sampler=sampler, seed=seed, noise_scale=noise_scale, decode_refine=decode_refine,
              mouth_guidance=mouth_guidance)
    outs = {"ours_landmarks": generate(model, h, audio_driven=False, **kw),
            "ours_audio": generate(model, h, audio_driven=True, **kw)}
    base = baselines(h)
    outs.update({k: v for k, v in base.items() if not k.startswith("_")})
    rows = {k: score(v, truth) for k, v in outs.items()}
    rep: dict[str, Any] = {"rows": rows, "test_frames": int(len(h.test_idx)), "train_frames": int(len(h.train_idx)),
                           "crop_size": int(h.crops.shape[1]), "donor_frame": int(base["_donor"]),
                           "reference_frame": reference_frame(h), "sampler": sampler, "sampler_steps": steps,
                           "noise_scale": noise_scale_of(model, noise_scale), "seed": int(seed),
                           "decode_refine": decode_refine_of(model, decode_refine),
                           "mouth_guidance": mouth_guidance_of(model, mouth_guidance)}
    rep["verdict"] = verdicts(rows)
    return rep


def _better(metric: str, a: float | None, b: float | None) -> bool:
    if a is None or not np.isfinite(a):
        return False
    if b is None or not np.isfinite(b):
        return True
    return a < b if metric == "lmd" else a > b


def verdicts(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The hold-out bar: test-frame landmarks beat the better baseline on PSNR, SSIM, LMD;
    audio-driven beats both baselines on mouth correlation and LMD."""
    base = ("copy_reference", "mean_mouth")
    v = {f"landmarks_{m}": all(_better(m, rows["ours_landmarks"][m], rows[b][m]) for b in base)
         for m in ("psnr", "ssim", "lmd")}
    v.update({f"audio_{m}": all(_better(m, rows["ours_audio"][m], rows[b][m]) for b in base)
              for m in ("mouth_corr", "lmd")})
    v["landmarks_all"] = v["landmarks_psnr"] and v["landmarks_ssim"] and v["landmarks_lmd"]
    v["audio_all"] = v["audio_mouth_corr"] and v["audio_lmd"]
    return v


def fmt(v: Any, spec: str) -> str:
    """A number for a table, "n/a" for None or a non-finite float."""
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def report_table(reports: dict[str, dict[str, Any]]) -> str:
    """Markdown: one block of rows per clip (method, PSNR, SSIM, LMD, mouth correlation)."""
    lines = ["| clip | method | PSNR (dB) ↑ | SSIM ↑ | LMD (px @256) ↓ | mouth corr ↑ |",
             "|---|---|---|---|---|---|"]
    for clip, rep in reports.items():
        for m in METHODS:
            r = rep["rows"][m]
            lines.append(f"| {clip} | {METHOD_NAMES[m]} | {fmt(r['psnr'], '.2f')} | {fmt(r['ssim'], '.4f')} | "
                         f"{fmt(r['lmd'], '.2f')} | {fmt(r['mouth_corr'], '.3f')} |")
    return "\n".join(lines)


def format_report(rep: dict[str, Any]) -> str:
    v = rep["verdict"]
    return (f"[finetune] hold-out: {rep['test_frames']} test frames, {rep['train_frames']} training frames, "
            f"{rep['crop_size']} px crops, {rep['sampler']} {rep['sampler_steps']} steps, "
            f"x_T scale {rep.get('noise_scale', 1.0):g}, decode passes {rep.get('decode_refine', 0)}, "
            f"mouth guidance {rep.get('mouth_guidance', 0.0):g}\n"
            + report_table({"this clip": rep}) + "\n"
            + f"test-frame landmarks beat both baselines on PSNR/SSIM/LMD: {v['landmarks_psnr']}/"
              f"{v['landmarks_ssim']}/{v['landmarks_lmd']}; audio-driven on mouth corr/LMD: "
              f"{v['audio_mouth_corr']}/{v['audio_lmd']}")


class QuickEval:
    """The metrics printed while training: lower-half PSNR/SSIM with test-frame landmarks on up to
    12 held-out frames (10 DDIM steps, no mediapipe), read from the periodic checkpoint, and a
    preview grid (truth / ours / copy-reference). Without a hold-out: the last training frames,
    labelled as such."""

    def __init__(self, shard: Path, holdout: float, cfg: TalkFormerConfig, device: str | None, vae: Any, seed: int):
        from ..eval import lower_half, psnr, ssim

        self.h = load_holdout(shard, holdout)
        sel = self.h.test_idx
        self.frames = sel[np.linspace(0, len(sel) - 1, min(12, len(sel))).round().astype(int)]
        self.label = "held-out" if holdout > 0 else "training-frame (no hold-out)"
        self.device, self.vae, self.seed = device, vae, seed
        self.truth = self.h.crops[self.frames]
        base = baselines(_subset(self.h, self.frames))
        self.copy = base["copy_reference"]
        self.copy_psnr = float(psnr(lower_half(self.copy), lower_half(self.truth)).mean())
        self.copy_ssim = float(ssim(lower_half(self.copy), lower_half(self.truth)).mean())

    def __call__(self, ckpt: Path) -> tuple[dict[str, float], np.ndarray]:
        from ..eval import lower_half, psnr, ssim
        from ..pipeline import load_model

        model = load_model(ckpt, self.device or "cpu", vae=self.vae)
        gen = generate(model, self.h, audio_driven=False, steps=10, seed=self.seed, frames=self.frames)
        m = {"psnr": float(psnr(lower_half(gen), lower_half(self.truth)).mean()),
             "ssim": float(ssim(lower_half(gen), lower_half(self.truth)).mean())}
        n = min(6, len(gen))
        grid = np.concatenate([np.concatenate(list(x[:n]), axis=1) for x in (self.truth, gen, self.copy)], axis=0)
        return m, grid


def _subset(h: HoldoutData, frames: np.ndarray) -> HoldoutData:
    return HoldoutData(h.crops, h.points_crop, h.train_idx, np.asarray(frames), h.analysis, h.mels)

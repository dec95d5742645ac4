"""The paper's Table I metrics on the lower half of the face crop, and the pair evaluator.

Protocol (``evaluate_pair``): both videos are read at 25 fps; a length difference of a few frames
is trimmed to the shorter (and reported); landmarks are detected on the *ground truth*, the face
track is built from them, and both videos are cropped with the SAME boxes at ``crop_size``
(default 256). Scores, per frame then averaged over frames:
  PSNR   on the lower half (rows [S // 2:]) of the crops, RGB, peak 255; a frame with zero error
         is +inf (identical videos score inf);
  SSIM   Gaussian-window SSIM (Wang et al. 2004: sigma 1.5, window 11, K1 0.01, K2 0.03, L 255,
         population covariances) per RGB channel, averaged over channels and over the valid
         (unpadded) positions of the lower half; equals skimage's structural_similarity(
         gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1);
  LMD    mean Euclidean distance between the 40 lip landmarks (IP-LAP's lips_40) that mediapipe
         (our LandmarkDetector, tracking mode, one detector per sequence) finds on the generated
         crops and on the ground-truth crops, in crop pixels scaled to a 256 crop; frames where
         either detection fails are left out (counted);
  mouth opening per frame: distance of mediapipe points 13 and 14 (inner lip midpoints) in crop
         pixels, for both, and the Pearson correlation of the two series;
  LPIPS, FID on the lower halves, CSIM (dlib ResNet) on the whole crop (a face-recognition
         network needs the whole face), when the caller gives the networks;
  SyncScore (syncnet_python's offset / confidence) on the generated video's 224x224 crops.
Landmarks are detected on the full crops (mediapipe needs a face), then only lip points are used.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.ndimage import gaussian_filter

from ..errors import FaceError, InputError
from ..face.topology import LIPS_40

LMD_REFERENCE_SIZE = 256  # LMD is reported in pixels of a 256 crop
MOUTH_PAIR = (13, 14)  # mediapipe inner-lip midpoints (upper, lower)
SSIM_SIGMA, SSIM_TRUNCATE = 1.5, 3.5  # radius int(3.5 * 1.5 + 0.5) = 5: the 11-tap window


# ----------------------------------------------------------------------------- pixel metrics

def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"metric inputs differ in shape: {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise InputError(f"expected images (T, H, W, 3) or (H, W, 3), got {a.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Per-frame PSNR in dB of (T, H, W, 3) image pairs -> (T,) float64; +inf where identical."""
    a, b = _check_pair(a, b)
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)  # (T,)
    with np.errstate(divide="ignore"):
        return np.where(mse > 0, 10.0 * np.log10(data_range ** 2 / np.maximum(mse, 1e-300)), np.inf)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Per-frame Gaussian-window SSIM, mean over RGB channels -> (T,) float64 (see module doc)."""
    a, b = _check_pair(a, b)
    x, y = a.astype(np.float64), b.astype(np.float64)  # (T, H, W, C)
    sig = (0, SSIM_SIGMA, SSIM_SIGMA, 0)  # blur over H and W only

    def blur(z: np.ndarray) -> np.ndarray:
        return gaussian_filter(z, sig, truncate=SSIM_TRUNCATE, mode="reflect")

    ux, uy = blur(x), blur(y)
    vx = blur(x * x) - ux * ux
    vy = blur(y * y) - uy * uy
    vxy = blur(x * y) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))  # (T, H, W, C)
    r = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # skimage averages over the window-valid interior
    if s.shape[1] > 2 * r and s.shape[2] > 2 * r:
        s = s[:, r:-r, r:-r]
    return s.mean(axis=(1, 2, 3))


def lower_half(crops: np.ndarray) -> np.ndarray:
    """(T, S, S, 3) -> (T, S - S // 2, S, 3): rows [S // 2:], the generated half."""
    return crops[:, crops.shape[1] // 2:]


def lip_distance(gen478: np.ndarray, truth478: np.ndarray, crop_size: int) -> np.ndarray:
    """(T, 478, 2) crop px, both -> (T,) mean distance over the 40 lip points, scaled to a 256 crop."""
    g = gen478[:, list(LIPS_40)].astype(np.float64)
    t = truth478[:, list(LIPS_40)].astype(np.float64)
    return np.linalg.norm(g - t, axis=-1).mean(axis=-1) * (LMD_REFERENCE_SIZE / crop_size)


def mouth_opening(points478: np.ndarray) -> np.ndarray:
    """(T, 478, 2) -> (T,) inner-lip gap |p13 - p14| in the points' units (crop px here)."""
    p = points478.astype(np.float64)
    return np.linalg.norm(p[:, MOUTH_PAIR[0]] - p[:, MOUTH_PAIR[1]], axis=-1)


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson r over frames where both are finite; None with < 3 frames or a constant series."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return None
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else None


def _nanmean(x: list[float] | np.ndarray) -> float | None:
    v = np.asarray(x, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else None


# ----------------------------------------------------------------------------- streaming scorer

class CropScorer:
    """Accumulates the crop metrics over batches of aligned crops; ``result()`` summarises.

    gen/truth crops: uint8 (B, S, S, 3) RGB, cut with the same boxes. Networks are optional:
    ``lpips`` (eval.lpips.LPIPS), ``fid`` (eval.fid.FIDInception), ``csim``
    (eval.csim.DlibFaceEmbedder, needs ``landmarks`` for the face rectangle, or ``rects``).
    Holds per-frame numbers and FID features, never the crops.
    """

    def __init__(self, crop_size: int, *, landmarks: bool = True, lpips: Any = None, fid: Any = None,
                 csim: Any = None, csim_stride: int = 1, face_index: int | None = None):
        self.crop_size = int(crop_size)
        self.lpips, self.fid, self.csim = lpips, fid, csim
        self.csim_stride = max(1, int(csim_stride))
        self.num_frames = 0
        self.per: dict[str, list] = {k: [] for k in ("psnr", "ssim", "lpips", "csim")}
        self.points: dict[str, list[np.ndarray]] = {"gen": [], "truth": []}
        self.fid_feats: dict[str, list[np.ndarray]] = {"gen": [], "truth": []}
        self._det = None
        if landmarks:
            from ..face.landmarks import LandmarkDetector

            # one tracking-mode detector per sequence, so both get the same treatment
            self._det = {k: LandmarkDetector(max_num_faces=1, face_index=face_index).open() for k in ("gen", "truth")}

    def __enter__(self) -> "CropScorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._det is not None:
            for d in self._det.values():
                d.close()

    def update(self, gen: np.ndarray, truth: np.ndarray, rects: np.ndarray | None = None) -> None:
        """Add a batch of aligned crops (B, S, S, 3); rects (B, 4) x1 y1 x2 y2 crop px for CSIM."""
        gen, truth = _check_pair(gen, truth)
        if gen.shape[1] != self.crop_size or gen.shape[2] != self.crop_size:
            raise InputError(f"crops are {gen.shape[1:3]}, the scorer was made for {self.crop_size}")
        g_low, t_low = lower_half(gen), lower_half(truth)  # (B, S/2, S, 3)
        self.per["psnr"] += psnr(g_low, t_low).tolist()
        self.per["ssim"] += ssim(g_low, t_low).tolist()
        if self.lpips is not None:
            self.per["lpips"] += self.lpips.distance_uint8(g_low, t_low).tolist()
        if self.fid is not None:
            self.fid_feats["gen"].append(self.fid.features_uint8(g_low))
            self.fid_feats["truth"].append(self.fid.features_uint8(t_low))
        if self._det is not None:
            for key, crops in (("gen", gen), ("truth", truth)):
                for c in crops:
                    p, found = self._det[key].detect(c)
                    self.points[key].append(p[:, :2] if found else np.full((478, 2), np.nan, np.float32))
        if self.csim is not None:
            for i in range(len(gen)):
                t = self.num_frames + i
                if t % self.csim_stride:
                    continue
                r = rects[i] if rects is not None else self._rect_from_truth(t)
                if r is None or not np.all(np.isfinite(r)):
                    self.per["csim"].append(float("nan"))
                    continue
                from .csim import cosine

                self.per["csim"].append(cosine(self.csim.embed(gen[i], r), self.csim.embed(truth[i], r)))
        self.num_frames += len(gen)

    def _rect_from_truth(self, t: int) -> np.ndarray | None:
        if t >= len(self.points["truth"]):
            return None
        p = self.points["truth"][t]
        return np.array([p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()])

    def result(self) -> dict[str, Any]:
        """Summary numbers (None where not computed) and per-frame series."""
        out: dict[str, Any] = {"frames": self.num_frames, "crop_size": self.crop_size}
        p = np.asarray(self.per["psnr"])
        out["psnr"] = float(p.mean()) if p.size else None  # inf when any frame is identical
        out["ssim"] = _nanmean(self.per["ssim"])
        per: dict[str, Any] = {"psnr": self.per["psnr"], "ssim": self.per["ssim"]}
        out["lmd"] = out["mouth_corr"] = None
        if self._det is not None and self.num_frames:
            g, t = np.stack(self.points["gen"]), np.stack(self.points["truth"])  # (T, 478, 2)
            lmd = lip_distance(g, t, self.crop_size)  # NaN where either is missing
            out["lmd"] = _nanmean(lmd)
            out["lmd_frames"] = int(np.isfinite(lmd).sum())
            out["landmarks_missing"] = {"gen": int(np.isnan(g[:, 0, 0]).sum()), "truth": int(np.isnan(t[:, 0, 0]).sum())}
            mg, mt = mouth_opening(g), mouth_opening(t)
            out["mouth_corr"] = pearson(mg, mt)
            per.update(lmd=lmd.tolist(), mouth_open_gen=mg.tolist(), mouth_open_truth=mt.tolist())
        out["lpips"] = _nanmean(self.per["lpips"]) if self.lpips is not None else None
        if self.lpips is not None:
            per["lpips"] = self.per["lpips"]
            out["lpips_net"] = self.lpips.net_name
        out["fid"] = None
        if self.fid is not None:
            fg, ft = np.concatenate(self.fid_feats["gen"]), np.concatenate(self.fid_feats["truth"])
            if len(fg) >= 2:
                from .fid import fid_from_features

                out["fid"] = fid_from_features(fg, ft)
        out["csim"] = _nanmean(self.per["csim"]) if self.csim is not None else None
        if self.csim is not None:
            per["csim"] = self.per["csim"]
        out["per_frame"] = per
        return out

    def fid_features(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(gen (T, 2048), truth (T, 2048)) Inception features, for a FID pooled over pairs."""
        if self.fid is None or not self.fid_feats["gen"]:
            return None
        return np.concatenate(self.fid_feats["gen"]), np.concatenate(self.fid_feats["truth"])


def score_crops(gen_crops: np.ndarray, truth_crops: np.ndarray, *, landmarks: bool = True, lpips: Any = None,
                fid: Any = None, csim: Any = None, csim_stride: int = 1, batch: int = 32) -> dict[str, Any]:
    """Metrics of aligned face crops (T, S, S, 3) uint8 RGB (same boxes) -> the dict of ``CropScorer.result``.

    For bench scripts and holdout metrics that already hold crops (e.g. the pipeline's generated
    crops against the ground-truth crops). Scores the lower half; LMD needs ``landmarks``.
    """
    g, t = _check_pair(gen_crops, truth_crops)
    if g.shape[1] != g.shape[2]:
        raise InputError(f"expected square crops (T, S, S, 3), got {g.shape}")
    with CropScorer(g.shape[1], landmarks=landmarks, lpips=lpips, fid=fid, csim=csim, csim_stride=csim_stride) as s:
        for i in range(0, len(g), batch):
            s.update(g[i:i + batch], t[i:i + batch])
        return s.result()


# ----------------------------------------------------------------------------- videos

def _scaled_boxes(boxes: np.ndarray, truth_hw: tuple[int, int], gen_hw: tuple[int, int], gen_path: Path) -> np.ndarray:
    """Truth-frame boxes mapped to the generated video's frame size (same aspect ratio required)."""
    if tuple(gen_hw) == tuple(truth_hw):
        return boxes
    sx, sy = gen_hw[1] / truth_hw[1], gen_hw[0] / truth_hw[0]
    if abs(sx - sy) > 0.01 * max(sx, sy):
        raise InputError(
            f"{gen_path}: frame size {gen_hw[1]}x{gen_hw[0]} has a different aspect ratio from the ground "
            f"truth's {truth_hw[1]}x{truth_hw[0]}; expected the same framing"
        )
    return boxes * np.array([sx, sy, sx])


def evaluate_pair(generated: str | Path, truth: str | Path, crop_size: int = 256, *, fps: float = 25.0,
                  lpips: Any = None, fid: Any = None, syncnet: Any = None, csim: Any = None,
                  audio: str | Path | None = None, sync_truth: bool = True, csim_stride: int = 1,
                  face_index: int | None = None, max_length_mismatch: float = 0.1, batch: int = 16,
                  max_frames: int | None = None, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Score a generated video against its ground truth (see the module doc) -> dict.

    Networks are loaded by the caller (``eval.lpips.load_lpips``, ``eval.fid.load_fid_inception``,
    ``eval.syncnet.load_syncnet``, ``eval.csim.DlibFaceEmbedder``) and reused across pairs.
    ``audio`` overrides the speech used for SyncScore (default: the generated video's own track,
    else the ground truth's). Lengths that differ by more than ``max_length_mismatch`` (fraction
    of the longer) raise InputError; smaller differences are trimmed and reported in "notes".
    ``max_frames`` scores only the first frames of both (quick checks). ``progress(stage, done,
    total)`` is called per frame.
    """
    from ..face.landmarks import LandmarkDetector
    from ..face.track import build_track, crop_frame
    from ..video import iter_frames, probe_video

    gp, tp = Path(generated), Path(truth)
    gi, ti = probe_video(gp), probe_video(tp)  # clear errors before any long work
    ng_est, nt_est = gi.frames_at(fps), ti.frames_at(fps)
    if max_frames is not None:
        ng_est, nt_est = min(ng_est, max_frames), min(nt_est, max_frames)
    longer = max(ng_est, nt_est)
    if abs(ng_est - nt_est) > max(3, max_length_mismatch * longer):
        raise InputError(
            f"{gp} ({ng_est} frames at {fps:g} fps) and {tp} ({nt_est} frames) differ in length by more "
            f"than {max_length_mismatch:.0%}: expected a generated video made from this ground truth"
        )
    notes: list[str] = []

    # 1. landmarks and the face track of the ground truth
    def _tick(stage: str, total: int):
        return None if progress is None else (lambda n: progress(stage, n, total))

    with LandmarkDetector(face_index=face_index) as det:
        lm = det.detect_sequence(iter_frames(tp, fps, max_frames=max_frames), progress=_tick("truth landmarks", nt_est))
    if not lm.found.any():
        raise FaceError(f"{tp}: mediapipe found no face in any of its {len(lm)} frames")
    if lm.num_missing:
        notes.append(f"ground truth: no face in {lm.num_missing} of {len(lm)} frames (boxes interpolated)")
    track = build_track(lm, crop_size=crop_size)
    boxes_t = track.boxes  # (Tt, 3)
    boxes_g = _scaled_boxes(boxes_t, (ti.height, ti.width), (gi.height, gi.width), gp)

    # 2. stream both videos, crop with the same boxes, score
    from .syncnet import SyncScorer

    sync_g = SyncScorer(syncnet) if syncnet is not None else None
    sync_t = SyncScorer(syncnet) if syncnet is not None and sync_truth else None
    n_truth = len(lm)
    scorer = CropScorer(crop_size, lpips=lpips, fid=fid, csim=csim, csim_stride=csim_stride, face_index=None)
    try:
        gen_it = iter_frames(gp, fps, max_frames=max_frames)
        tru_it = iter_frames(tp, fps, max_frames=max_frames)
        gb: list[np.ndarray] = []
        tb: list[np.ndarray] = []
        t = 0
        for t_frame in tru_it:
            g_frame = next(gen_it, None)
            if g_frame is None:
                break
            if t_frame.shape[:2] != (ti.height, ti.width) or g_frame.shape[:2] != (gi.height, gi.width):
                raise InputError(f"{gp} / {tp}: frame size changes mid-video at frame {t}")
            gb.append(crop_frame(g_frame, boxes_g[t], crop_size))
            tb.append(crop_frame(t_frame, boxes_t[t], crop_size))
            if sync_g is not None:
                sync_g.add([crop_frame(g_frame, boxes_g[t], 224)])
            if sync_t is not None:
                sync_t.add([crop_frame(t_frame, boxes_t[t], 224)])
            t += 1
            if len(gb) == batch:
                scorer.update(np.stack(gb), np.stack(tb))
                gb, tb = [], []
            if progress is not None:
                progress("scoring", t, min(ng_est, nt_est))
        if gb:
            scorer.update(np.stack(gb), np.stack(tb))
        n_gen = t + sum(1 for _ in gen_it)  # frames of the generated video left over (if it is longer)
        res = scorer.result()
        fid_feats = scorer.fid_features()
    finally:
        scorer.close()
    if n_gen != n_truth:
        notes.append(f"lengths differ: generated {n_gen} frames, ground truth {n_truth} at {fps:g} fps; "
                     f"both trimmed to the shorter, {t}")
    if t == 0:
        raise InputError(f"{gp} / {tp}: no frames to compare")

    # 3. SyncScore on the generated crops with the speech
    sync: dict[str, Any] | None = None
    if sync_g is not None:
        from ..audio import load_audio
        from ..errors import AudioError

        src = Path(audio) if audio is not None else (gp if gi.has_audio else tp)
        if audio is None and not gi.has_audio:
            notes.append(f"{gp} has no audio track: SyncScore uses the ground truth's audio")
        try:
            wav = load_audio(src)
            sync = {"audio": str(src), **sync_g.result(wav).as_dict()}
            if sync_t is not None:
                wav_t = load_audio(tp) if ti.has_audio else wav
                sync["truth"] = sync_t.result(wav_t).as_dict()
        except (AudioError, ValueError) as e:
            sync = None
            notes.append(f"SyncScore skipped: {e}")
    res.update(
        generated=str(gp), truth=str(tp), fps=fps, frames_generated=n_gen, frames_truth=n_truth,
        sync=sync, notes=notes, crop_boxes_from="ground truth",
    )
    res["_fid_features"] = fid_feats  # for a FID pooled over pairs (dropped from JSON)
    return res

"""The dubbing protocol: does the mouth follow the audio it is given, or the video it replaces?

Self-reconstruction (test frames driven by their own audio) cannot tell the two apart: the
template frame's own mouth and the audio's mouth are the same mouth. Here a clip is split in three
(``split_clip``): the model trains on frames [0, 0.6); the **template** is frames [0.8, 1.0), whose
mouths are replaced; the **new audio** is the audio of frames [0.6, 0.8), never trained on, whose
true mouth opening those frames show. Driving the template with the new audio, a mouth opening
series is scored by its correlation with the new audio's truth ("follows the audio") and with the
template's own opening ("leaks the template"; ``dubbing_scores``).

Opening = inner-lip gap (mediapipe 13 to 14) over the nose length (nasion 168 to the midpoint of
the alar points 48 and 278): scale-free, so predicted landmarks in any frame and mediapipe on
generated crops of any size compare directly. Not over the inter-ocular distance: that shrinks
when the head turns, and a denominator shared by a template frame and the mouth generated on it
correlates the two by head pose alone (measured: 0.2-0.5 on the real clips for a mouth model that
never sees the template). Baseline to beat: the **loudness model** (``LoudnessModel``), opening =
a * loudness + b with loudness the mean log-mel energy of the frame's mel window, fitted on the
training frames. ``lip_shape_error``: the lips against the audio's true lips after a similarity
alignment on the upper face (eyes, brows, nose), so head pose does not count.

Pure numpy (no mediapipe, no torch): the pipeline-facing run lives in ``finetune.dubbing.dubbing_report``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..face.topology import FULL_131, LIPS_40, UPPER_FACE, nose_length
from .metrics import pearson

INNER_PAIR = (13, 14)  # inner-lip midpoints, upper and lower (mediapipe ids)
_POS = {m: i for i, m in enumerate(FULL_131)}
UPPER_FACE_478: tuple[int, ...] = UPPER_FACE  # alignment points: eyes, brows, nose (rigid with the skull)


def _ids(k: int, ids: tuple[int, ...]) -> list[int]:
    if k == 478:
        return list(ids)
    if k == 131:
        return [_POS[m] for m in ids]
    raise ValueError(f"expected 478 (mediapipe) or 131 (FULL_131) points, got {k}")


def mouth_opening(points: Any) -> np.ndarray:
    """(..., K, 2) with K = 478 or 131 -> (...): inner-lip gap / nose length."""
    p = np.asarray(points, np.float64)
    a, b = _ids(p.shape[-2], INNER_PAIR)
    gap = np.linalg.norm(p[..., a, :] - p[..., b, :], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return gap / nose_length(p)


@dataclass(frozen=True)
class DubbingSplit:
    """Frame indices of the three parts; ``audio`` and ``template`` have the same length."""

    train: np.ndarray
    audio: np.ndarray  # frames whose audio drives the template (and whose mouths are the truth)
    template: np.ndarray  # frames whose mouths are replaced


def split_clip(num_frames: int, found: Any = None, train_end: float = 0.6, audio_end: float = 0.8) -> DubbingSplit:
    """[0, train_end) / [train_end, audio_end) / [audio_end, 1) of ``num_frames`` (rounded as the
    dataset does). The audio and template parts are cut to the shorter of the two; frames without
    a face (``found`` False) are dropped from the training part and, pairwise, from the other two."""
    T = int(num_frames)
    if not 0.0 < train_end < audio_end < 1.0:
        raise ValueError(f"split_clip: expected 0 < train_end < audio_end < 1, got {train_end}, {audio_end}")
    a, b = int(round(train_end * T)), int(round(audio_end * T))
    n = min(b - a, T - b)
    if n < 3 or a < 1:
        raise ValueError(f"split_clip: {T} frames leave {n} frames per part; need at least 3")
    ok = np.ones(T, bool) if found is None else np.asarray(found, bool)
    tr = np.flatnonzero(ok[:a])
    au, te = np.arange(a, a + n), np.arange(b, b + n)
    keep = ok[au] & ok[te]
    return DubbingSplit(tr, au[keep], te[keep])


def frame_loudness(mel_windows: Any) -> np.ndarray:
    """(T, 80, 16) per-frame mel windows (log scale, audio.mel) -> (T,) their mean log-mel energy."""
    m = np.asarray(mel_windows, np.float64)
    return m.reshape(m.shape[0], -1).mean(axis=1)


@dataclass
class LoudnessModel:
    """opening = a * loudness + b, least squares on the training frames (the baseline to beat)."""

    a: float = 0.0
    b: float = 0.0

    @classmethod
    def fit(cls, loudness: Any, opening: Any) -> "LoudnessModel":
        x, y = np.asarray(loudness, np.float64), np.asarray(opening, np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 2:
            raise ValueError("LoudnessModel.fit: need at least 2 frames with finite values")
        x, y = x[ok], y[ok]
        vx = float(((x - x.mean()) ** 2).sum())
        a = float(((x - x.mean()) * (y - y.mean())).sum() / vx) if vx > 0 else 0.0
        return cls(a, float(y.mean() - a * x.mean()))

    def predict(self, loudness: Any) -> np.ndarray:
        return self.a * np.asarray(loudness, np.float64) + self.b


def similarity_align(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (Umeyama) taking src (K, 2) onto dst (K, 2): (scale, R (2, 2), t (2,))
    with dst ~ scale * src @ R.T + t."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d0.T @ s0)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    D = np.diag([1.0, d])
    R = u @ D @ vt
    var = float((s0 ** 2).sum())
    scale = float((sig * np.diag(D)).sum() / var) if var > 0 else 1.0
    return scale, R, mu_d - scale * mu_s @ R.T


def upper_face_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """One face's points src and dst (K, 2), K = 478 or 131 -> the 2x3 similarity [scale * R | t]
    taking src's upper face (eyes, brows, nose: rigid with the skull) onto dst's, least squares."""
    ids = _ids(src.shape[0], UPPER_FACE_478)
    s, R, t = similarity_align(src[ids], dst[ids])
    return np.concatenate([s * R, t[:, None]], 1)


def lip_shape_error(pred: Any, truth: Any) -> np.ndarray:
    """(T, K, 2) predicted and (T, K, 2) true points (K = 478 or 131, any pixel frames) -> (T,):
    mean distance of the 40 lip points after aligning each predicted frame onto its true frame by
    a similarity fitted on the upper face (``UPPER_FACE_478``), over the true frame's nose length
    (the opening's unit)."""
    p, q = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    if p.shape != q.shape or p.ndim != 3:
        raise ValueError(f"lip_shape_error: expected two (T, K, 2) arrays of one shape, got {p.shape}, {q.shape}")
    lips = _ids(p.shape[1], LIPS_40)
    nose = nose_length(q)
    out = np.full(len(p), np.nan)
    for t in range(len(p)):
        if not (np.all(np.isfinite(p[t])) and np.all(np.isfinite(q[t]))):
            continue
        m = upper_face_similarity(p[t], q[t])
        moved = p[t, lips] @ m[:, :2].T + m[:, 2]
        out[t] = np.linalg.norm(moved - q[t, lips], axis=-1).mean() / nose[t]
    return out


def partial_corr(x: Any, y: Any, z: Any) -> float | None:
    """Pearson r of x and y after removing from each its least-squares line on z."""
    x, y, z = (np.asarray(v, np.float64) for v in (x, y, z))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    if ok.sum() < 4:
        return None
    A = np.stack([z[ok], np.ones(int(ok.sum()))], 1)
    res = [v[ok] - A @ np.linalg.lstsq(A, v[ok], rcond=None)[0] for v in (x, y)]
    return pearson(*res)


def template_weight(opening: Any, truth: Any, template: Any) -> float | None:
    """The template's weight in the least-squares fit of the opening on the audio's truth and the
    template's opening, all three standardised: how far one std of the template's opening moves the
    output, in output stds, the audio held fixed (0: none of it; 1: a copy of an uncorrelated
    template). Where the output follows the audio closely, the partial correlation divides by the
    little variance left over and reads noise (0.22 on a leak of 0.05 here); the weight does not."""
    x, t, a = (np.asarray(v, np.float64) for v in (opening, template, truth))
    ok = np.isfinite(x) & np.isfinite(t) & np.isfinite(a)
    if ok.sum() < 4 or min(v[ok].std() for v in (x, t, a)) == 0:
        return None
    zs = lambda v: (v[ok] - v[ok].mean()) / v[ok].std()  # noqa: E731
    A = np.stack([zs(a), zs(t), np.ones(int(ok.sum()))], 1)
    return float(np.linalg.lstsq(A, zs(x), rcond=None)[0][1])


def dubbing_scores(opening: Any, truth: Any, template: Any) -> dict[str, float | None]:
    """Correlation of an opening series with the new audio's true opening and with the template's;
    ``corr_template_given_audio``: the latter with the audio's truth partialled out. On a few dozen
    frames the audio's and the template's true openings correlate by chance (0.56 on one real clip),
    so a mouth that follows the audio perfectly correlates that much with the template too; the
    partial correlation is what the template adds beyond that; ``template_weight`` how much it adds."""
    return {"corr_audio": pearson(opening, truth), "corr_template": pearson(opening, template),
            "corr_template_given_audio": partial_corr(opening, template, truth),
            "template_weight": template_weight(opening, truth, template),
            "truth_vs_template": pearson(truth, template)}


def lag_correlations(pred: Any, truth: Any, max_lag: int = 4) -> dict[int, float | None]:
    """{lag: Pearson r of pred[t] and truth[t + lag]} for lag in [-max_lag, max_lag]: lag > 0 means
    the prediction leads the truth. A window placed off centre shows as the same best lag on every clip."""
    p, t = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    if p.shape != t.shape or p.ndim != 1:
        raise ValueError(f"pred {p.shape} and truth {t.shape}: expected two series of one length")
    out = {}
    for lag in range(-int(max_lag), int(max_lag) + 1):
        a, b = (p[: len(p) - lag], t[lag:]) if lag >= 0 else (p[-lag:], t[:lag])
        out[lag] = pearson(a, b) if len(a) >= 4 else None
    return out


def closed_threshold(openings: Any, q: float = 0.1) -> float:
    """The person's closed-mouth range: the ``q`` quantile of their openings (lowest 10 %)."""
    v = np.asarray(openings, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        raise ValueError("closed_threshold: no finite openings")
    return float(np.quantile(v, q))


def closed_range(measured: Any, truth: Any, q: float = 0.1) -> float:
    """The person's closed-mouth range under a noisier ruler: the largest ``measured`` opening among
    the frames whose ``truth`` opening is in its lowest ``q`` (the tracker's closed frames). On 64 px
    crops mediapipe reads a closed mouth anywhere from 0 to ~0.08; the ``q`` quantile of the
    measured openings themselves is a bar half of the real closed frames fail (docs/dubbing.md)."""
    m, t = np.asarray(measured, np.float64), np.asarray(truth, np.float64)
    ok = np.isfinite(m) & np.isfinite(t)
    if not ok.any():
        raise ValueError("closed_range: no frame with both openings")
    closed = ok & (t <= closed_threshold(t[ok], q))
    return float(m[closed].max())


def linear_leak(pose: Any, opening: Any, fit_frac: float = 0.6, ridge: float = 1e-3) -> float | None:
    """How much of the mouth a linear map from the pose input predicts: ridge least squares from the
    flattened pose points (T, P, 2) to the opening (T,) fitted on the first ``fit_frac`` of the frames,
    Pearson r on the rest. A pose input that carries the mouth scores high."""
    X = np.asarray(pose, np.float64).reshape(len(pose), -1)
    y = np.asarray(opening, np.float64)
    n = int(round(fit_frac * len(y)))
    mu, sd = X[:n].mean(0), X[:n].std(0) + 1e-9
    Xs = (X - mu) / sd
    A = np.concatenate([Xs, np.ones((len(y), 1))], 1)
    w = np.linalg.solve(A[:n].T @ A[:n] + ridge * n * np.eye(A.shape[1]), A[:n].T @ y[:n])
    return pearson(A[n:] @ w, y[n:])


__all__ = ["DubbingSplit", "LoudnessModel", "UPPER_FACE_478", "closed_threshold", "dubbing_scores", "frame_loudness",
           "lag_correlations",
           "linear_leak", "lip_shape_error", "mouth_opening", "partial_corr", "similarity_align", "split_clip",
           "template_weight", "upper_face_similarity"]

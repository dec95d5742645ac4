"""A low-dimensional mouth model of one person, driven by audio (stage 1 for person models).

The paper's landmark completion transformer (``landmark_completion``) learns audio -> lips from
hours of many speakers. Trained on the seconds of speech one user has, it does not generalise to
audio it has not heard: on the real clips' dubbing test (docs/dubbing.md) its opening follows new
audio at -0.3..0.7 and leans on the template. This model is what those seconds can fit:

    opening o (the inner-lip gap 13-14 in the stable box frame, ``face.topology.stable_landmark_boxes``)
        o = o_mean + s * (loudness - loudness_mean)       prior: louder voice, wider mouth (s > 0,
                                                          calibrated so o keeps its training spread)
          + ridge(mel features over a temporal window)    what this person's frames add; the ridge
                                                          strength chosen by blocked cross-validation
                                                          (infinite = prior only)
        clamped to the person's range
    jaw 17 + lips 40 = a linear function of o (least squares on the training frames)
                       + K PCA modes of what o does not explain (rounding, spreading), each a ridge
                       function of the same features, clamped to its training range;
                       below the quietest training frame's loudness: the person's own closed mouth
                       (the mean jaw and lips of their 10 % most closed training frames), so
                       silence closes the mouth.

Features: the mel window of each frame (80 x 16, audio.mel's log scale) averaged into ``BANDS``
bands x ``TIME_STEPS`` steps, with the neighbouring frames' (``CONTEXT`` on each side) beside it.
Closed-form fitting (seconds on a CPU), no gradient steps. Its tensors are buffers of the landmark
module (``LandmarkCompletion.mouth``), so checkpoints carry them; ``fitted`` is 0 until ``fit``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..face.topology import LIPS_40

BANDS, TIME_STEPS, CONTEXT = 8, 4, 1
N_CONTENT = 57
_GAP = (17 + LIPS_40.index(13), 17 + LIPS_40.index(14))  # inner-lip midpoints in the content's order
LAMBDAS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, float("inf"))


def mel_features(mels: np.ndarray) -> np.ndarray:
    """(T, 80, 16) mel windows -> (T, F) features: band x time averages, neighbours beside."""
    m = np.asarray(mels, np.float64)
    T = m.shape[0]
    x = m.reshape(T, BANDS, 80 // BANDS, TIME_STEPS, 16 // TIME_STEPS).mean(axis=(2, 4)).reshape(T, -1)
    parts = [x]
    for c in range(1, CONTEXT + 1):
        idx = np.arange(T)
        parts += [x[np.clip(idx - c, 0, T - 1)], x[np.clip(idx + c, 0, T - 1)]]
    return np.concatenate(parts, axis=1)


def num_features() -> int:
    return BANDS * TIME_STEPS * (2 * CONTEXT + 1)


def content_gap(content: np.ndarray) -> np.ndarray:
    """(T, 57, 2) jaw + lips -> (T,) inner-lip gap (Euclidean, the content's frame)."""
    c = np.asarray(content, np.float64)
    return np.linalg.norm(c[:, _GAP[0]] - c[:, _GAP[1]], axis=-1)


def _ridge(A: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Least squares of y on [A, 1] with ridge ``lam * n`` on A's (standardised) columns."""
    n, f = A.shape
    B = np.concatenate([A, np.ones((n, 1))], axis=1)
    if not np.isfinite(lam):
        w = np.zeros((f + 1,) + y.shape[1:])
        w[f] = y.mean(axis=0)
        return w
    R = lam * n * np.eye(f + 1)
    R[f, f] = 0.0
    return np.linalg.solve(B.T @ B + R, B.T @ y)


def _predict(A: np.ndarray, w: np.ndarray) -> np.ndarray:
    return A @ w[:-1] + w[-1]


def choose_lambda(A: np.ndarray, y: np.ndarray, lambdas: Sequence[float] = LAMBDAS, folds: int = 5) -> float:
    """The ridge strength with the least squared error over ``folds`` contiguous blocks (blocks, not
    shuffled frames: neighbouring frames are near copies and would reward memorising)."""
    n = len(y)
    blocks = np.array_split(np.arange(n), min(folds, n))
    best, best_err = float("inf"), float("inf")
    for lam in lambdas:
        err = 0.0
        for b in blocks:
            tr = np.setdiff1d(np.arange(n), b)
            err += float(((_predict(A[b], _ridge(A[tr], y[tr], lam)) - y[b]) ** 2).sum())
        if err < best_err - 1e-12:
            best, best_err = lam, err
    return best


class MouthModel(nn.Module):
    """See the module docstring. ``forward(mels (T, 80, 16)) -> content (T, 57, 2)`` in the stable
    box frame (jaw 17 then lips 40, as ``LandmarkCompletion.predict_content``)."""

    def __init__(self, shape_modes: int = 3):
        super().__init__()
        F, K, C = num_features(), int(shape_modes), N_CONTENT * 2
        self.shape_modes = K
        self.register_buffer("fitted", torch.zeros(()))
        self.register_buffer("feat_mean", torch.zeros(F))
        self.register_buffer("feat_std", torch.ones(F))
        self.register_buffer("prior", torch.zeros(4))  # loudness mean, opening mean, slope, quietest loudness
        self.register_buffer("open_range", torch.zeros(2))
        self.register_buffer("w_open", torch.zeros(F + 1))
        self.register_buffer("content_w", torch.zeros(2, C))  # content = o * row 0 + row 1
        self.register_buffer("modes", torch.zeros(K, C))
        self.register_buffer("w_modes", torch.zeros(F + 1, K))
        self.register_buffer("mode_range", torch.zeros(2, K))
        self.register_buffer("closed", torch.zeros(C))  # mean content of the most closed 10 % of frames
        self.register_buffer("lambdas", torch.zeros(2))  # chosen ridge strengths (opening, modes); inf = prior only

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted.item() > 0)

    def fit(self, mels: np.ndarray, content: np.ndarray) -> "MouthModel":
        """Fit on a person's training frames: mels (T, 80, 16), their jaw + lips (T, 57, 2) in the
        stable box frame. Frames in time order (the cross-validation blocks are contiguous)."""
        mels, content = np.asarray(mels, np.float64), np.asarray(content, np.float64)
        T = len(mels)
        if T < 10 or content.shape != (T, N_CONTENT, 2):
            raise ValueError(f"MouthModel.fit: expected >= 10 frames of mels (T, 80, 16) and content (T, 57, 2), "
                             f"got {mels.shape} and {content.shape}")
        X = mel_features(mels)
        mu, sd = X.mean(0), X.std(0) + 1e-6
        A = (X - mu) / sd
        loud = mels.reshape(T, -1).mean(1)
        o = content_gap(content)
        slope = o.std() / max(loud.std(), 1e-6)  # positive by construction: the prior's sign is physics
        prior = o.mean() + slope * (loud - loud.mean())
        lam_o = choose_lambda(A, o - prior)
        w_o = _ridge(A, o - prior, lam_o)
        C = content.reshape(T, -1)
        B = np.stack([o, np.ones(T)], 1)
        W = np.linalg.lstsq(B, C, rcond=None)[0]  # (2, 114)
        R = C - B @ W
        K = self.shape_modes
        _, _, vt = np.linalg.svd(R - R.mean(0), full_matrices=False)
        modes = np.zeros((K, C.shape[1]))
        modes[:min(K, len(vt))] = vt[:K]
        coef = R @ modes.T  # (T, K)
        lam_m = choose_lambda(A, coef)
        w_m = _ridge(A, coef, lam_m)
        closed = C[o <= np.quantile(o, 0.1)].mean(0)
        t = lambda a: torch.as_tensor(np.asarray(a, np.float64), dtype=torch.float32)  # noqa: E731
        with torch.no_grad():
            self.feat_mean.copy_(t(mu))
            self.feat_std.copy_(t(sd))
            self.prior.copy_(t([loud.mean(), o.mean(), slope, loud.min()]))
            self.open_range.copy_(t([o.min(), o.max()]))
            self.w_open.copy_(t(w_o))
            self.content_w.copy_(t(W))
            self.modes.copy_(t(modes))
            self.w_modes.copy_(t(w_m))
            self.mode_range.copy_(t(np.stack([coef.min(0), coef.max(0)])))
            self.lambdas.copy_(t([lam_o, lam_m]))
            self.closed.copy_(t(closed))
            self.fitted.fill_(1.0)
        return self

    @torch.no_grad()
    def mean_content(self) -> np.ndarray:
        """(57, 2) the jaw and lips at the person's mean opening: the training frames' mean content
        (the least-squares fit has an intercept, so its residuals and their modes average to 0)."""
        if not self.is_fitted:
            raise RuntimeError("MouthModel: not fitted (fit it on the person's training frames first)")
        W = self.content_w.detach().cpu().double().numpy()
        return (float(self.prior[1]) * W[0] + W[1]).reshape(N_CONTENT, 2)

    @torch.no_grad()
    def opening(self, mels: np.ndarray | torch.Tensor) -> np.ndarray:
        """(T, 80, 16) -> (T,) the predicted inner-lip gap (stable box frame)."""
        return self._predict(mels)[0]

    @torch.no_grad()
    def _predict(self, mels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m = mels.detach().cpu().double().numpy() if isinstance(mels, torch.Tensor) else np.asarray(mels, np.float64)
        m = m.reshape(-1, 80, 16)
        g = lambda b: b.detach().cpu().double().numpy()  # noqa: E731
        A = (mel_features(m) - g(self.feat_mean)) / g(self.feat_std)
        loud = m.reshape(len(m), -1).mean(1)
        l_mean, o_mean, slope, l_min = g(self.prior)
        o = o_mean + slope * (loud - l_mean) + _predict(A, g(self.w_open))
        lo, hi = g(self.open_range)
        quiet = loud < l_min
        o = np.where(quiet, lo, np.clip(o, lo, hi))
        rng = g(self.mode_range)
        coef = np.clip(_predict(A, g(self.w_modes)), rng[0], rng[1])
        return o, coef, quiet

    @torch.no_grad()
    def forward(self, mels: np.ndarray | torch.Tensor) -> torch.Tensor:
        if not self.is_fitted:
            raise RuntimeError("MouthModel: not fitted (fit it on the person's training frames first)")
        o, coef, quiet = self._predict(mels)
        g = lambda b: b.detach().cpu().double().numpy()  # noqa: E731
        W = g(self.content_w)
        C = o[:, None] * W[0] + W[1] + coef @ g(self.modes)
        C[quiet] = g(self.closed)
        return torch.as_tensor(C.reshape(-1, N_CONTENT, 2), dtype=torch.float32, device=self.fitted.device)

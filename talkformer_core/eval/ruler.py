"""One ruler for fidelity across crop sizes: the lower half of a 256 px face crop.

A model trained at 64 or 128 px is pasted into the user's video upscaled; a 256 px model is not.
Scoring each at its own crop size hides that (a 64 px crop's PSNR says nothing about how soft its
mouth looks at 256). So every method is scored here at ``RULER`` px: smaller crops are upscaled
bicubic (what a user sees pasted), then PSNR, SSIM (lower half), LMD and mouth-opening correlation
(mediapipe) against the TRUE 256 px crops of the same frames (``eval.score_crops``).

``grid`` lays crops out as a picture (rows x columns of tiles, optional labels) for docs/.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError

RULER = 256  # px: the paper's crop


def to_ruler(crops: np.ndarray, size: int = RULER) -> np.ndarray:
    """(T, S, S, 3) uint8 -> (T, size, size, 3) uint8: bicubic up (as a pasted crop is scaled),
    area-averaged down, unchanged at ``size``."""
    import cv2

    c = np.asarray(crops)
    if c.ndim != 4 or c.shape[1] != c.shape[2] or c.shape[3] != 3 or c.dtype != np.uint8:
        raise InputError(f"expected square RGB uint8 crops (T, S, S, 3), got {c.shape} {c.dtype}")
    S = c.shape[1]
    if S == size:
        return c
    interp = cv2.INTER_CUBIC if S < size else cv2.INTER_AREA
    return np.stack([cv2.resize(x, (size, size), interpolation=interp) for x in c])  # cubic output is clipped to uint8


def ruler_scores(gen: np.ndarray, truth: np.ndarray, *, landmarks: bool = True, size: int = RULER) -> dict[str, Any]:
    """Scores of generated crops (any size) against the truth at ``size`` px (pass the true 256 px
    crops; smaller truth is upscaled too). PSNR / SSIM on the lower half (dB, [0, 1]; identical
    crops: inf / 1), and with ``landmarks`` LMD (px of a 256 crop) and mouth-opening correlation
    from mediapipe. {"psnr", "ssim", "lmd", "mouth_corr", "frames", "gen_size", "ruler", ...}."""
    from .metrics import score_crops

    g, t = to_ruler(gen, size), to_ruler(truth, size)
    if len(g) != len(t):
        raise InputError(f"{len(g)} generated crops vs {len(t)} truth crops: expected the same frames")
    r = score_crops(g, t, landmarks=landmarks)
    out = {"psnr": r["psnr"], "ssim": r["ssim"], "lmd": r.get("lmd"), "mouth_corr": r.get("mouth_corr"),
           "frames": r["frames"], "gen_size": int(np.asarray(gen).shape[1]), "ruler": int(size)}
    if landmarks:
        out["lmd_frames"] = r.get("lmd_frames")
        pf = r.get("per_frame", {})
        out["mouth_open_gen"], out["mouth_open_truth"] = pf.get("mouth_open_gen"), pf.get("mouth_open_truth")
    return out


def grid(rows: Sequence[Sequence[np.ndarray]], *, tile: int | tuple[int, int] = 128, pad: int = 2,
         col_labels: Sequence[str] = (), row_labels: Sequence[str] = (), background: int = 255) -> np.ndarray:
    """A picture of ``rows`` (each a sequence of (h, w, 3) uint8 images, any size) as tiles of
    ``tile`` px (or (th, tw)), row-major, ``pad`` px apart; tile (r, c) at y = top + pad + r (th +
    pad), x = left + pad + c (tw + pad), where top / left are the label strips (0 without labels).
    -> (H, W, 3) uint8."""
    import cv2

    if not rows or not all(len(r) for r in rows):
        raise InputError("grid: expected at least one row of at least one crop")
    th, tw = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
    n_cols = max(len(r) for r in rows)
    top = 22 if col_labels else 0
    left = 7 * max((len(s) for s in row_labels), default=0) + 8 if row_labels else 0
    H = top + pad + len(rows) * (th + pad)
    W = left + pad + n_cols * (tw + pad)
    img = np.full((H, W, 3), background, np.uint8)
    for r, row in enumerate(rows):
        for c, x in enumerate(row):
            x = np.asarray(x)
            if x.ndim != 3 or x.shape[2] != 3:
                raise InputError(f"grid: tile ({r}, {c}) has shape {x.shape}; expected (S, S, 3)")
            if x.shape[:2] != (th, tw):
                interp = cv2.INTER_AREA if x.shape[0] > th else cv2.INTER_CUBIC
                x = cv2.resize(x.astype(np.uint8), (tw, th), interpolation=interp)
            y0, x0 = top + pad + r * (th + pad), left + pad + c * (tw + pad)
            img[y0:y0 + th, x0:x0 + tw] = x
    font = cv2.FONT_HERSHEY_SIMPLEX
    for c, s in enumerate(col_labels):
        cv2.putText(img, str(s), (left + pad + c * (tw + pad) + 2, 15), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    for r, s in enumerate(row_labels):
        cv2.putText(img, str(s), (2, top + pad + r * (th + pad) + th // 2), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def write_png(path: str | os.PathLike, img: np.ndarray) -> Path:
    """RGB uint8 (H, W, 3) -> a PNG file (folders made)."""
    import cv2

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(p), np.ascontiguousarray(np.asarray(img, np.uint8)[..., ::-1]),
                       [cv2.IMWRITE_PNG_COMPRESSION, 9]):  # docs/ pictures live in git: smallest lossless
        raise InputError(f"{p}: could not write the PNG")
    return p

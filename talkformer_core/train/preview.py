"""Preview images written while training: a stage-2 sample grid or autoencoder reconstructions."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..config import TalkFormerConfig
from ..pixels import to_pixels
from .log import Logger


@torch.no_grad()
def preview_grid(model: nn.Module, batch: Mapping[str, Tensor], cfg: TalkFormerConfig, steps: int = 10,
                 seed: int = 0, end_to_end: bool = True) -> np.ndarray:
    """reference | masked input | generated (DDIM, ``steps``) | ground truth, one row per frame of
    the batch's first sample, landmarks drawn (predicted on the generated, truth on the truth)."""
    import cv2

    from ..diffusion import NoiseSchedule, sample_ddim, upper_half_mask
    from ..face.draw import draw_landmarks
    from ..face.topology import box_to_crop

    b = {k: v[:1] for k, v in batch.items()}
    L = b["crops"].shape[1]
    lm_box = model.landmark.complete(b["mels"], b["pose"], b["ref_landmarks"])  # (1, L, 131, 2)
    pred_crop = box_to_crop(lm_box, b["landmark_box"], b["crop_box"])[0]  # (L, 131, 2)
    lms = pred_crop if end_to_end else b["target_crop"][0]
    ctx = model.encode(b["masked"][0])  # (L, C, h, w)
    ref = model.prepare_reference(model.encode(b["reference"]))
    lmc = model.prepare_landmarks(lms)
    sched = NoiseSchedule(cfg.model.diffusion)
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    noise = torch.randn(ctx.shape, generator=g, device=ctx.device)
    h, w = ctx.shape[-2:]
    z = sample_ddim(lambda x, t: model.unet(x, t, lmc, ref, num_frames=L), noise, sched, steps,
                    known=ctx, known_mask=upper_half_mask(h, w, ctx.device))
    z = torch.where(upper_half_mask(h, w, ctx.device), model.encode(b["crops"][0]), z)  # decode under E(crop)'s upper half, as the pipeline does
    gen = model.decode(z)  # (L, 3, S, S)

    def img(x: Tensor) -> np.ndarray:
        return to_pixels(x).permute(1, 2, 0).cpu().numpy()

    S = b["crops"].shape[-1]
    up = max(1, 128 // S)
    rows = []
    for i in range(L):
        cells = [img(b["reference"][0]), img(b["masked"][0, i]), img(gen[i]), img(b["crops"][0, i])]
        cells = [cv2.resize(c, (S * up, S * up), interpolation=cv2.INTER_NEAREST) for c in cells]
        cells[2] = draw_landmarks(cells[2], lms[i].float().cpu().numpy() * S * up, (255, 80, 80), 1)
        cells[3] = draw_landmarks(cells[3], b["target_crop"][0, i].float().cpu().numpy() * S * up, (80, 220, 80), 1)
        rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows, axis=0)


@torch.no_grad()
def autoencoder_preview(ae: nn.Module, batch: Mapping[str, Tensor], n: int = 4) -> np.ndarray:
    x = batch["crops"][:n]
    rec = ae.decode(ae.encode(x).mode())
    to = lambda t: to_pixels(t).permute(0, 2, 3, 1).cpu().numpy()
    return np.concatenate([np.concatenate(list(to(x)), 1), np.concatenate(list(to(rec)), 1)], 0)


def _write_preview(out: Path, step: int, model, batch, cfg, stage: str, steps: int, seed: int, logger: Logger) -> None:
    import cv2

    model.eval()
    try:
        if stage == "autoencoder":
            img = autoencoder_preview(model, batch)
        else:
            img = preview_grid(model, batch, cfg, steps=steps, seed=seed, end_to_end=cfg.train.end_to_end)
    finally:
        model.train()
    d = out / "previews"
    d.mkdir(exist_ok=True)
    cv2.imwrite(str(d / f"step_{step:07d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    logger.image(step, "preview", img)

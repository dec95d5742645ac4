"""One micro-batch of each stage's loss (the modules DDP wraps) and the pieces only they use:
the sideways latent shift, the mouth weighting of eq. 1, gradient checkpointing (the turn and
context-noise augmentations live in ``augment``).

Stage ``talkformer`` (paper eq. 6, docs/architecture.md "The U-Net contract"):
    L_total = L_ldm + lambda * L1,  lambda = cfg.train.landmark_loss_weight (10)
    L1    = LandmarkCompletion.l1_loss(predicted jaw+lips, ground truth)  (box frame, IP-LAP's nn.L1Loss)
    L_ldm = diffusion.ldm_loss (eq. 1, lower half) with z0 = E(crop), context = E(masked crop),
            z_r = E(reference crop); the U-Net's M-Align gets the completion module's PREDICTED
            landmarks mapped box -> crop (topology.box_to_crop, differentiable), so L_ldm reaches the
            completion module (end_to_end=True); end_to_end=False feeds the ground truth (crop frame).
    The autoencoder is frozen.
Stage ``autoencoder``: L1 + KL (LDM's weighting: KL weight relative to the per-pixel-summed
    reconstruction loss); the L1 optionally weighted on the lips' box (autoencoder_mouth_weight),
    optionally plus an L1 on pixel differences weighted the same way (autoencoder_edge_weight).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..config import TalkFormerConfig
from .latents import LatentCache


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Recompute ResBlocks and TalkFormer blocks in the backward pass (non-reentrant, RNG-exact)."""
    from torch.utils.checkpoint import checkpoint

    from ..models.talkformer import TalkFormerBlock
    from ..models.unet import ResBlock

    n = 0
    for m in model.modules():
        if isinstance(m, (ResBlock, TalkFormerBlock)) and not getattr(m, "_tf_ckpt", False):
            orig = m.forward

            def fwd(*a, _orig=orig, **k):
                if torch.is_grad_enabled():
                    return checkpoint(_orig, *a, use_reentrant=False, **k)
                return _orig(*a, **k)

            m.forward = fwd
            m._tf_ckpt = True
            n += 1
    return n


def shift_columns(z: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Shift each latent sideways by whole cells: z (N, C, h, w), k (N,) long (+ = right) ->
    (shifted z, valid (N, 1, 1, w) bool). Output column j is input column j - k; the k columns that
    come in from outside repeat the edge column and are marked invalid (no loss target there).
    A whole-cell shift of an f-times-downsampling conv autoencoder's latent is, away from the border,
    the latent of the image shifted by f*k pixels (TrainConfig.shift_augment)."""
    N, C, h, w = z.shape
    src = torch.arange(w, device=z.device)[None] - k[:, None]  # (N, w)
    valid = (src >= 0) & (src < w)
    idx = src.clamp(0, w - 1)[:, None, None, :].expand(N, C, h, w)
    return z.gather(3, idx), valid[:, None, None, :]


def mouth_weight(landmarks: Tensor, hw: tuple[int, int], w_mouth: float, grow: int = 1) -> Tensor:
    """Per-cell weights of eq. 1's error (TrainConfig.mouth_loss_weight) or of the autoencoder's L1
    (autoencoder_mouth_weight, on pixels): ``w_mouth`` on the cells that the lips' box (crop frame,
    ``landmarks`` (N, 131, 2) in [0, 1]) touches, grown by ``grow`` cells, 1 elsewhere. -> (N, 1, h, w)."""
    from ..face.topology import LIP_POS

    h, w = int(hw[0]), int(hw[1])
    lips = landmarks[:, list(LIP_POS)].detach().float()  # (N, 40, 2)
    lo, hi = lips.amin(1), lips.amax(1)  # (N, 2) x, y
    cx = (torch.arange(w, device=lips.device, dtype=lips.dtype) + 0.5) / w  # cell centres
    cy = (torch.arange(h, device=lips.device, dtype=lips.dtype) + 0.5) / h
    in_x = (cx[None] >= lo[:, :1] - grow / w) & (cx[None] <= hi[:, :1] + grow / w)  # (N, w)
    in_y = (cy[None] >= lo[:, 1:] - grow / h) & (cy[None] <= hi[:, 1:] + grow / h)  # (N, h)
    box = in_y[:, :, None] & in_x[:, None, :]  # (N, h, w)
    return (1.0 + (float(w_mouth) - 1.0) * box.to(landmarks.dtype))[:, None]


class TalkFormerStep(nn.Module):
    """One micro-batch of the joint loss (eq. 6). The module DDP wraps (its forward is the step)."""

    def __init__(self, model: nn.Module, cfg: TalkFormerConfig, latents: LatentCache | None = None):
        super().__init__()
        from ..diffusion import NoiseSchedule

        self.model = model
        self.cfg = cfg
        self.schedule = NoiseSchedule(cfg.model.diffusion)
        self.latents = latents  # not a module: never in a state dict, never broadcast by DDP
        from .augment import turn_levels

        self.turns = turn_levels(cfg.train.turn_augment, cfg.model.image_size)  # [0.0] when off
        self.yaws = turn_levels(cfg.train.yaw_augment, cfg.model.image_size)  # [0.0] when off
        if len(self.turns) > 1 and len(self.yaws) > 1:
            raise ValueError("TrainConfig: turn_augment and yaw_augment are exclusive (set one to 0)")

    def forward(self, batch: Mapping[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        parts = self.losses(batch, generator)
        return parts["loss"], {"ldm": parts["ldm"].detach(), "l1": parts["l1"].detach()}

    def losses(self, batch: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """{"loss": L_ldm + lambda * L1, "ldm": L_ldm, "l1": L1}, all with their graphs."""
        from ..diffusion import ldm_loss
        from ..face.topology import CONTENT_POS, box_to_crop
        from .augment import noise_context, turn_landmarks, turn_lower_face, yaw_face, yaw_landmarks

        m, tc = self.model, self.cfg.train
        crops, masked = batch["crops"], batch["masked"]  # (B, L, 3, S, S)
        B, L = crops.shape[:2]
        # stage 1: landmark completion (box frame)
        content = m.landmark.predict_content(batch["mels"], batch["pose"], batch["ref_landmarks"])  # (B, L, 57, 2)
        target = batch["target_box"][:, :, list(CONTENT_POS)]  # (B, L, 57, 2)
        l1 = m.landmark.l1_loss(content, target)
        if tc.end_to_end:  # predicted landmarks -> crop frame, differentiable: L_ldm reaches stage 1
            lm_box = m.landmark.merge(batch["pose"], content)  # (B, L, 131, 2)
            lm_crop = box_to_crop(lm_box, batch["landmark_box"], batch["crop_box"])  # (B, L, 131, 2)
        else:
            lm_crop = batch["target_crop"]
        # turn augmentation: one level per window (its frames turn together); drawn only when on,
        # so runs without it keep their random stream
        turn = None
        if len(self.turns) > 1:
            turn = torch.randint(0, len(self.turns), (B,), generator=generator, device=generator.device).tolist()
            s = torch.tensor([self.turns[i] for i in turn], device=lm_crop.device).repeat_interleave(L)  # (B*L,)
            lm_crop = turn_landmarks(lm_crop.flatten(0, 1), s).view_as(lm_crop)
        yaw = None
        if len(self.yaws) > 1:  # likewise: one level per window, drawn only when on
            yaw = torch.randint(0, len(self.yaws), (B,), generator=generator, device=generator.device).tolist()
            sy = torch.tensor([self.yaws[i] for i in yaw], device=lm_crop.device).repeat_interleave(L)  # (B*L,)
            lm_crop = yaw_landmarks(lm_crop.flatten(0, 1), sy).view_as(lm_crop)
        # stage 2: latents of the frozen autoencoder
        if self.latents is not None:
            z0, ctx, z_r = self.latents.lookup(batch, turn, yaw)
            z0, ctx, z_r = (z.to(crops.dtype) for z in (z0, ctx, z_r))
        else:
            with torch.no_grad():
                x = crops.flatten(0, 1)
                if yaw is not None:  # the context turns with the face: E(masked yawed crop)
                    x = yaw_face(x, sy.to(x.device))
                    ctx = m.encode_masked(x)  # (B*L, C, h, w)
                else:
                    ctx = m.encode(masked.flatten(0, 1))  # (B*L, C, h, w)
                z0 = m.encode(x if turn is None else turn_lower_face(x, s.to(x.device)))  # (B*L, C, h, w)
                z_r = m.encode(batch["reference"])  # (B, C, h, w)
        T = self.schedule.num_timesteps
        t = torch.randint(0, T, (B,), generator=generator, device=generator.device).to(z0.device)
        t = t.repeat_interleave(L)  # one t per clip (Temp-Att sees one noise level)
        noise = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0.device, z0.dtype)
        ref = m.prepare_reference(z_r)  # once per micro-batch, shared by its L frames
        lms = lm_crop.flatten(0, 1)  # (B*L, 131, 2)
        valid = None
        if tc.shift_augment > 0:
            K = int(tc.shift_augment)
            k = torch.randint(-K, K + 1, (B,), generator=generator, device=generator.device).to(z0.device)
            k = k.repeat_interleave(L)  # (B*L,) one shift per window: its frames move together
            z0, valid = shift_columns(z0, k)
            ctx, _ = shift_columns(ctx, k)
            lms = lms + torch.stack([k.to(lms.dtype) / z0.shape[-1], torch.zeros_like(k, dtype=lms.dtype)], -1)[:, None]
        if tc.context_noise > 0:  # drawn only when on: runs without it keep their random stream
            ctx = noise_context(ctx, tc.context_noise, L, generator)

        def model_fn(z_t: Tensor, tt: Tensor) -> Tensor:
            return m.unet(z_t, tt, lms, ref, num_frames=L)

        weight = None
        if tc.mouth_loss_weight != 1.0:
            weight = mouth_weight(lms, z0.shape[-2:], tc.mouth_loss_weight)
        ldm, _ = ldm_loss(model_fn, z0, ctx, self.schedule, t=t, noise=noise, valid=valid, weight=weight)
        return {"loss": ldm + tc.landmark_loss_weight * l1, "ldm": ldm, "l1": l1}


def weighted_l1(diff: Tensor, wmap: Tensor | None) -> Tensor:
    """Mean |diff|, or its mean weighted by ``wmap`` (B, 1, H, W) (same scale as the plain mean)."""
    if wmap is None:
        return diff.abs().mean()
    return (diff.abs() * wmap).mean() / wmap.mean()


def edge_l1(rec: Tensor, x: Tensor, wmap: Tensor | None = None) -> Tensor:
    """L1 between the horizontal and vertical pixel differences of ``rec`` and ``x`` (B, C, H, W),
    each weighted by ``wmap`` at the difference's first pixel: 0 exactly when ``rec - x`` is constant
    on each image, so it adds nothing for a uniform shift and everything for a lost edge."""
    d = rec - x
    dx, dy = d[..., :, 1:] - d[..., :, :-1], d[..., 1:, :] - d[..., :-1, :]
    if wmap is None:
        return 0.5 * (dx.abs().mean() + dy.abs().mean())
    return 0.5 * (weighted_l1(dx, wmap[..., :, :-1]) + weighted_l1(dy, wmap[..., :-1, :]))


class AutoencoderStep(nn.Module):
    """L1 + KL (LDM's weighting), optional edge (autoencoder_edge_weight) and perceptual terms."""

    def __init__(self, ae: nn.Module, cfg: TalkFormerConfig, perceptual: nn.Module | None = None,
                 perceptual_weight: float = 1.0):
        super().__init__()
        self.ae = ae
        self.cfg = cfg
        self.perceptual = perceptual
        self.perceptual_weight = perceptual_weight

    def forward(self, batch: Mapping[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch["crops"]  # (B, 3, S, S)
        lms = batch.get("landmarks")
        if self.cfg.train.autoencoder_warp > 0:  # train.augment: the crops a dubbed video's poses give
            from .augment import similarity_thetas, warp_images, warp_points

            theta = similarity_thetas(x.shape[0], self.cfg.train.autoencoder_warp, generator).to(x.device)
            x = warp_images(x, theta)
            lms = None if lms is None else warp_points(lms.to(theta.dtype), theta)
        post = self.ae.encode(x)
        eps = torch.randn(post.mean.shape, generator=generator, device=generator.device).to(x.device, x.dtype)
        rec = self.ae.decode(post.mean + post.std * eps)
        w_mouth = float(self.cfg.train.autoencoder_mouth_weight)
        wmap = None
        if w_mouth != 1.0 and lms is not None:
            S = x.shape[-1]
            wmap = mouth_weight(lms.to(x.dtype), (S, S), w_mouth, grow=max(S // 16, 1))
            wmap = torch.where(batch["found"].view(-1, 1, 1, 1), wmap, torch.ones_like(wmap))  # (B, 1, S, S)
        l1 = weighted_l1(rec - x, wmap)
        # LDM: nll = sum over pixels / B, loss = nll + kl_weight * kl; here divided by the pixel count
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + self.cfg.train.autoencoder_kl_weight * kl
        logs = {"l1": l1.detach(), "kl": kl.detach()}
        w_edge = float(self.cfg.train.autoencoder_edge_weight)
        if w_edge > 0:
            edge = edge_l1(rec, x, wmap)
            loss = loss + w_edge * edge
            logs["edge"] = edge.detach()
        if self.perceptual is not None:
            p = self.perceptual(rec, x).mean()
            loss = loss + self.perceptual_weight * p
            logs["perceptual"] = p.detach()
        return loss, logs

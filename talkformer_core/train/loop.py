"""The one training loop: autoencoder stage and TalkFormer stage, one process or torchrun (DDP).

Python API (the CLI in ``__main__`` and later ``finetune`` call this; there is no second loop):

    result = train(cfg, stage="talkformer", data="shards/", out="runs/x", steps=1000, ...)
    result.checkpoint  # Path of the final checkpoint (models/checkpoint format, atomic)
    result.metrics     # {"loss": [...], "ldm": [...], "l1": [...], "steps_per_s": ..., ...}

Stage ``talkformer`` (paper eq. 6, docs/architecture.md "The U-Net contract"):
    L_total = L_ldm + lambda * L1,  lambda = cfg.train.landmark_loss_weight (10)
    L1    = LandmarkCompletion.l1_loss(predicted jaw+lips, ground truth)  (box frame, IP-LAP's nn.L1Loss)
    L_ldm = diffusion.ldm_loss (eq. 1, lower half) with z0 = E(crop), context = E(masked crop),
            z_r = E(reference crop); the U-Net's M-Align gets the completion module's PREDICTED
            landmarks mapped box -> crop (topology.box_to_crop, differentiable), so L_ldm reaches the
            completion module (end_to_end=True); end_to_end=False feeds the ground truth (crop frame).
    The autoencoder is frozen. Adam; gradient clipping; optional EMA, bf16 autocast (CUDA only),
    gradient checkpointing (ResBlocks and TalkFormer blocks).
Stage ``autoencoder``: L1 + KL (LDM's weighting: KL weight relative to the per-pixel-summed
    reconstruction loss), saved with scale_factor = 1 / std of the training latents (LDM).

Determinism (bit-identical ``--resume``, DDP = gradient accumulation):
  - batches: ``StepBatchSampler`` is a pure function of (seed, step): step s takes the slice
    [s*G, (s+1)*G) of seeded permutations of the dataset, G = micro_batch * world * accum, and
    micro-batch m = rank * accum + a takes its m-th part. Sample randomness is keyed by
    (seed, epoch, index) inside the dataset;
  - diffusion t and noise of micro-batch m at step s come from a generator seeded with (seed, s, m);
  - dropout uses torch's global RNG, saved with the optimizer, EMA and step in the training state.
So a two-process run sees the same micro-batches and noise as one process accumulating over the
two, and a resumed run the same as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import TalkFormerConfig, preset
from ..errors import CheckpointError, InputError
from ..signals import defer_sigint

CHECKPOINT_NAME = "last.safetensors"
STATE_NAME = "last.state.safetensors"
STAGES = ("autoencoder", "talkformer")


# ----------------------------------------------------------------------------------------------
# distributed helpers

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; then init the process group (nccl on CUDA, gloo
    otherwise). One process without them: no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(dev.type, local)  # one GPU per local rank
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return Dist(rank, world, local), dev
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Dist(), torch.device(device)


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]) >> 1


class StepBatchSampler:
    """Yields, for steps start..total-1, ``accum`` micro-batches of (index, epoch) pairs for this rank.

    Pure function of (seed, step): see the module docstring.
    """

    def __init__(self, n: int, micro_batch: int, world: int = 1, rank: int = 0, accum: int = 1,
                 seed: int = 0, start_step: int = 0, total_steps: int = 1):
        if n <= 0:
            raise InputError("the dataset is empty")
        self.n, self.B, self.world, self.rank, self.accum = n, micro_batch, world, rank, accum
        self.seed, self.start, self.total = seed, start_step, total_steps
        self.G = micro_batch * world * accum
        self.per_epoch = max(n // self.G, 1)  # steps per "epoch"
        self._perm: tuple[int, np.ndarray] | None = None

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(_seed_of(self.seed, epoch, 7))
            reps = math.ceil(self.G / self.n)  # a dataset smaller than one global batch repeats
            perm = torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)]).numpy()
            self._perm = (epoch, perm)
        return self._perm[1]

    def micro_batches(self, step: int) -> list[list[tuple[int, int]]]:
        epoch, pos = divmod(step, self.per_epoch)
        perm = self._epoch_perm(epoch)
        glob = perm[pos * self.G:(pos + 1) * self.G]
        out = []
        for a in range(self.accum):
            m = self.rank * self.accum + a
            out.append([(int(i), epoch) for i in glob[m * self.B:(m + 1) * self.B]])
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for s in range(self.start, self.total):
            yield from self.micro_batches(s)

    def __len__(self) -> int:
        return (self.total - self.start) * self.accum


# ----------------------------------------------------------------------------------------------
# model pieces

class EMA:
    """Exponential moving average of the trainable modules' parameters (buffers copied)."""

    def __init__(self, modules: Mapping[str, nn.Module], decay: float):
        self.decay = decay
        self.modules = dict(modules)
        self.shadow = {f"{n}.{k}": v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for n, m in self.modules.items() for k, v in m.state_dict().items()}

    def decay_at(self, step: int | None) -> float:
        """The decay after optimiser step ``step`` (1-based): min(decay, (1 + step) / (10 + step)), the
        usual warm-up, so a short run's average is not dominated by its initial weights (with 0.995
        and no warm-up, 150 steps in the shadow still held 47 % of the initialisation). ``None``:
        the plain decay. A function of the step alone, so a resumed run averages identically."""
        if step is None:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        decay = self.decay_at(step)
        for n, m in self.modules.items():
            params = dict(m.named_parameters())
            for k, v in m.state_dict().items():
                s = self.shadow[f"{n}.{k}"]
                if k in params and v.is_floating_point():
                    s.lerp_(v.float(), 1.0 - decay)
                else:
                    s.copy_(v)

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(sd[k])


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


LATENT_CACHE_MAX_BYTES = 2 * 1024 ** 3  # auto mode caches when every frame's two latents fit in this


class LatentCache:
    """The frozen autoencoder's latents of every frame the training windows can touch, computed once.

    Stage talkformer encodes three images per frame per step (crop, masked crop, reference) with an
    autoencoder that never changes; on a CPU at person-specific sizes that is most of a step
    (measured in docs/finetune.md). ``E`` is the posterior mean, so a cached latent is the value the
    step would compute (up to float rounding of another batch size). Per clip: z and context, each
    (hi - lo, C, h, w) on ``device``, for the clip's frames [lo, hi) (the dataset's ``frames`` part;
    found or not: a crop is an image either way).
    """

    def __init__(self, model: nn.Module, dataset: Any, device: torch.device, batch: int = 64):
        self.lo: list[int] = []
        self.z: list[Tensor] = []
        self.ctx: list[Tensor] = []
        from ..data.dataset import _to_image

        with torch.no_grad():
            for ci, clip in enumerate(dataset.clips):
                crops = dataset.clip_arrays(ci)["crops"]  # (T, S, S, 3) uint8
                zs, cs = [], []
                for a in range(clip.lo, clip.hi, batch):
                    x = _to_image(crops[a:min(a + batch, clip.hi)]).to(device)  # (b, 3, S, S), as the dataset
                    zs.append(model.encode(x).float())
                    cs.append(model.encode_masked(x).float())  # the dataset's masked crop
                self.lo.append(clip.lo)
                self.z.append(torch.cat(zs))
                self.ctx.append(torch.cat(cs))

    @staticmethod
    def estimate_bytes(model: nn.Module, dataset: Any) -> int:
        """Bytes the cache would hold (two float32 latents per frame), from one encoded frame's shape."""
        with torch.no_grad():
            p = next(model.autoencoder.parameters())
            z = model.encode(torch.zeros(1, 3, dataset.S, dataset.S, device=p.device, dtype=p.dtype))
        return int(sum(c.hi - c.lo for c in dataset.clips)) * 2 * z[0].numel() * 4

    def lookup(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(z0 (B*L, C, h, w), context (B*L, C, h, w), z_r (B, C, h, w)) of the batch's frames."""
        clips = batch["clip_index"].tolist()  # (B,)
        frames = batch["frame_index"].tolist()  # (B, L)
        refs = batch["reference_index"].tolist()  # (B,)
        dev = self.z[0].device
        win = [torch.as_tensor([f - self.lo[c] for f in fr], device=dev) for c, fr in zip(clips, frames)]
        z0 = torch.cat([self.z[c][w] for c, w in zip(clips, win)])
        ctx = torch.cat([self.ctx[c][w] for c, w in zip(clips, win)])
        z_r = torch.stack([self.z[c][r - self.lo[c]] for c, r in zip(clips, refs)])
        return z0, ctx, z_r


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


def mouth_weight(landmarks: Tensor, hw: tuple[int, int], w_mouth: float) -> Tensor:
    """Per-cell weights of eq. 1's error (TrainConfig.mouth_loss_weight): ``w_mouth`` on the latent
    cells that the lips' box (crop frame, ``landmarks`` (N, 131, 2) in [0, 1]) touches, grown by one
    cell, 1 elsewhere. -> (N, 1, h, w)."""
    from ..face.topology import LIP_POS

    h, w = int(hw[0]), int(hw[1])
    lips = landmarks[:, list(LIP_POS)].detach().float()  # (N, 40, 2)
    lo, hi = lips.amin(1), lips.amax(1)  # (N, 2) x, y
    cx = (torch.arange(w, device=lips.device, dtype=lips.dtype) + 0.5) / w  # cell centres
    cy = (torch.arange(h, device=lips.device, dtype=lips.dtype) + 0.5) / h
    in_x = (cx[None] >= lo[:, :1] - 1.0 / w) & (cx[None] <= hi[:, :1] + 1.0 / w)  # (N, w)
    in_y = (cy[None] >= lo[:, 1:] - 1.0 / h) & (cy[None] <= hi[:, 1:] + 1.0 / h)  # (N, h)
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

    def forward(self, batch: Mapping[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        parts = self.losses(batch, generator)
        return parts["loss"], {"ldm": parts["ldm"].detach(), "l1": parts["l1"].detach()}

    def losses(self, batch: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """{"loss": L_ldm + lambda * L1, "ldm": L_ldm, "l1": L1}, all with their graphs."""
        from ..diffusion import ldm_loss
        from ..face.topology import CONTENT_POS, box_to_crop

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
        # stage 2: latents of the frozen autoencoder
        if self.latents is not None:
            z0, ctx, z_r = self.latents.lookup(batch)
            z0, ctx, z_r = (z.to(crops.dtype) for z in (z0, ctx, z_r))
        else:
            with torch.no_grad():
                z0 = m.encode(crops.flatten(0, 1))  # (B*L, C, h, w)
                ctx = m.encode(masked.flatten(0, 1))  # (B*L, C, h, w)
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

        def model_fn(z_t: Tensor, tt: Tensor) -> Tensor:
            return m.unet(z_t, tt, lms, ref, num_frames=L)

        weight = None
        if tc.mouth_loss_weight != 1.0:
            weight = mouth_weight(lms, z0.shape[-2:], tc.mouth_loss_weight)
        ldm, _ = ldm_loss(model_fn, z0, ctx, self.schedule, t=t, noise=noise, valid=valid, weight=weight)
        return {"loss": ldm + tc.landmark_loss_weight * l1, "ldm": ldm, "l1": l1}


class AutoencoderStep(nn.Module):
    """L1 + KL (LDM's weighting), optional perceptual term."""

    def __init__(self, ae: nn.Module, cfg: TalkFormerConfig, perceptual: nn.Module | None = None,
                 perceptual_weight: float = 1.0):
        super().__init__()
        self.ae = ae
        self.cfg = cfg
        self.perceptual = perceptual
        self.perceptual_weight = perceptual_weight

    def forward(self, batch: Mapping[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch["crops"]  # (B, 3, S, S)
        post = self.ae.encode(x)
        eps = torch.randn(post.mean.shape, generator=generator, device=generator.device).to(x.device, x.dtype)
        rec = self.ae.decode(post.mean + post.std * eps)
        l1 = (rec - x).abs().mean()
        # LDM: nll = sum over pixels / B, loss = nll + kl_weight * kl; here divided by the pixel count
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + self.cfg.train.autoencoder_kl_weight * kl
        logs = {"l1": l1.detach(), "kl": kl.detach()}
        if self.perceptual is not None:
            p = self.perceptual(rec, x).mean()
            loss = loss + self.perceptual_weight * p
            logs["perceptual"] = p.detach()
        return loss, logs


# ----------------------------------------------------------------------------------------------
# checkpoints

def _trainable(model: nn.Module, stage: str) -> dict[str, nn.Module]:
    if stage == "autoencoder":
        return {"autoencoder": model}
    mods = {"landmark": model.landmark, "unet": model.unet}
    if model.appearance is not None:
        mods["appearance"] = model.appearance
    return mods


def load_autoencoder_file(path: str | Path, cfg: TalkFormerConfig) -> tuple[dict[str, Tensor], Any]:
    """Our autoencoder checkpoint (autoencoder.* tensors + config with its scale factor)."""
    from ..models.checkpoint import checkpoint_config, read_checkpoint

    tensors, meta = read_checkpoint(path)
    ae_cfg = checkpoint_config(meta, path).model.autoencoder
    if not any(k.startswith("autoencoder.") for k in tensors):
        raise CheckpointError(f"{path}: holds no autoencoder.* tensors; expected a checkpoint of the "
                              "autoencoder stage (or give an SD VAE with --vae)")
    return tensors, ae_cfg


def init_landmarks_from(model: nn.Module, path: str | Path) -> None:
    """Start the completion module from an IP-LAP checkpoint converted by
    ``talkformer_core.convert`` (kind "iplap", tensors under ``landmark.``) or any of ours."""
    from ..models.checkpoint import load_model_state, read_checkpoint

    tensors, meta = read_checkpoint(path)
    if not any(k.startswith("landmark.") for k in tensors):
        raise CheckpointError(f"{path}: has no landmark.* tensors; expected a checkpoint made by "
                              "`python -m talkformer_core.convert iplap` (kind 'iplap') or a TalkFormer checkpoint")
    load_model_state(model.landmark, tensors, "landmark", source=path)


# ----------------------------------------------------------------------------------------------
# preview

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
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()

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
    to = lambda t: ((t.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return np.concatenate([np.concatenate(list(to(x)), 1), np.concatenate(list(to(rec)), 1)], 0)


# ----------------------------------------------------------------------------------------------
# logging

class Logger:
    """CSV (always, rank 0) and TensorBoard (if importable)."""

    def __init__(self, out: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.csv_path = out / "log.csv"
        self.fields: list[str] | None = None
        self.tb = None
        if not enabled:
            return
        if resume_step > 0 and self.csv_path.exists():  # drop rows past the resumed step
            with open(self.csv_path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            if rows:
                self.fields = list(rows[0].keys())
                with open(self.csv_path, "w", newline="") as f:
                    w = csv.DictWriter(f, self.fields)
                    w.writeheader()
                    w.writerows(rows)
        elif self.csv_path.exists():
            self.csv_path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except Exception as e:  # tensorboard missing: CSV only
            warnings.warn(f"TensorBoard logging off ({e})", stacklevel=2)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: f"{v:.9g}" if isinstance(v, float) else v for k, v in values.items()}}
        new = self.fields is None
        if new:
            self.fields = list(row.keys())
        with open(self.csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def image(self, step: int, name: str, img: np.ndarray) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(name, img, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------
# the loop

@dataclass
class TrainResult:
    checkpoint: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def _to(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# Training works for any caller: hosts such as ComfyUI run every node under torch.inference_mode(),
# where no tensor records a graph and backward() fails.
@torch.inference_mode(False)
@torch.enable_grad()
def train(cfg: TalkFormerConfig | str, *, stage: str, data: str | Path, out: str | Path, steps: int,
          batch_size: int | None = None, lr: float | None = None, grad_accum: int = 1,
          autoencoder: str | Path | None = None, vae: str | Path | None = None,
          init_landmarks: str | Path | None = None, lpips: str | Path | None = None,
          resume: bool = False, device: str | None = None, bf16: bool = False,
          grad_checkpointing: bool = False, ema: bool = False, preview_every: int = 0,
          preview_steps: int = 10, save_every: int = 0, seed: int = 0, frames: tuple[float, float] = (0.0, 1.0),
          num_workers: int = 0, budget_minutes: float | None = None,
          callback: Callable[[int, int, dict[str, float]], None] | None = None,
          progress: bool = True, log_every: int = 1, cache_latents: bool | None = None,
          channels_last: bool | None = None) -> TrainResult:
    """Train one stage; returns the final checkpoint path and the metrics (per-step losses).

    ``batch_size`` is per process and micro-batch; the global batch is batch_size x world x
    grad_accum. ``callback(step, steps, metrics)`` runs after every optimiser step (rank 0);
    raising from it stops training after a checkpoint is written (interrupt), and the exception
    propagates. ``budget_minutes`` stops cleanly (checkpoint written) when the wall clock runs out.
    ``cache_latents`` (stage talkformer): encode every training frame with the frozen autoencoder
    once (``LatentCache``) instead of three encodes per frame per step; None = when the cache fits
    in LATENT_CACHE_MAX_BYTES. ``bf16``: autocast to bfloat16 (CUDA, or a CPU that asks for it).
    ``channels_last`` (None = on CUDA): NHWC weights, cuDNN's tensor-core layout for bf16 convs.
    The metrics also say where the wall time went: ``compute_seconds`` (forward, backward and
    optimiser step; CUDA synchronised, so it is the GPU's busy time up to the launch gaps),
    ``data_seconds`` (batch assembly and transfer), ``busy_share`` and ``samples_per_s``.
    """
    from tqdm import tqdm

    from ..data.dataset import FrameDataset, TalkingFaceDataset
    from ..models.autoencoder import AutoencoderKL
    from ..models.checkpoint import (capture_rng_state, checkpoint_config, external_vae_spec,
                                     load_model_state, load_training_state, read_checkpoint,
                                     resolve_external_vae, restore_rng_state, save_checkpoint,
                                     save_training_state)
    from ..models.model import TalkFormer

    if stage not in STAGES:
        raise InputError(f"stage {stage!r}: expected one of {STAGES}")
    cfg = copy.deepcopy(preset(cfg) if isinstance(cfg, str) else cfg)
    if batch_size is not None:
        cfg.train.batch_size = int(batch_size)
    if lr is not None:
        if stage == "autoencoder":
            cfg.train.autoencoder_lr = float(lr)
        else:
            cfg.train.lr = float(lr)
    out = Path(out)
    dd, dev = init_distributed(device)
    if dd.main:
        from ..paths import check_output_dir

        check_output_dir(out)  # a run folder it cannot write: an error now, not at the first save
        out.mkdir(parents=True, exist_ok=True)
    ck_path, st_path = out / CHECKPOINT_NAME, out / STATE_NAME
    start_step = 0
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP also broadcasts them)
    np.random.seed(seed % 2**32)

    # ---- model
    external = None
    resume_tensors = None
    if resume:
        if not (ck_path.exists() and st_path.exists()):
            raise CheckpointError(f"--resume: {ck_path} and {st_path} are needed; found "
                                  f"{[p.name for p in (ck_path, st_path) if p.exists()]}")
        resume_tensors, meta = read_checkpoint(ck_path)
        saved = checkpoint_config(meta, ck_path)
        if saved.to_json() != cfg.to_json():
            warnings.warn(f"--resume: using the config stored in {ck_path}", stacklevel=2)
        cfg = saved
        if stage == "talkformer":
            external = resolve_external_vae(meta, vae, checkpoint_path=ck_path)
    if stage == "autoencoder":
        model = AutoencoderKL(cfg.model.autoencoder)
        model.requires_grad_(True)
        if resume_tensors is not None:
            load_model_state(model, resume_tensors, "autoencoder", source=ck_path)
    else:
        ae_state = None
        if resume_tensors is None:
            if autoencoder is not None and vae is not None:
                raise InputError("give --autoencoder (ours) or --vae (an SD VAE), not both")
            if autoencoder is not None:
                ae_state, cfg.model.autoencoder = load_autoencoder_file(autoencoder, cfg)
            elif vae is not None:
                from ..models.checkpoint import read_vae_file

                sd = read_vae_file(vae)
                ae_state = {f"autoencoder.{k}": v for k, v in sd.items()}
                external = external_vae_spec(sd, cfg.model.autoencoder)
                external = {"path": vae, **external}
            else:
                raise InputError("stage talkformer needs a frozen autoencoder: --autoencoder AE.safetensors "
                                 "(from --stage autoencoder) or --vae SD_VAE.safetensors")
        model = TalkFormer(cfg)
        if resume_tensors is not None:
            allow = ("autoencoder.",) if external is not None else ()
            load_model_state(model, resume_tensors, "", source=ck_path, allow_missing=allow)
            if external is not None:
                model.autoencoder.load_ldm_state_dict(external.state_dict, source=vae)
                external = {"path": vae, "config": dataclasses.asdict(external.config),
                            "scale_factor": external.scale_factor, "sha256": external.sha256}
        else:
            load_model_state(model.autoencoder, ae_state, "autoencoder", source=autoencoder or vae)
            if init_landmarks is not None:
                init_landmarks_from(model, init_landmarks)
        model.autoencoder.eval()
    model.to(dev)
    if channels_last if channels_last is not None else dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if grad_checkpointing and stage == "talkformer":
        enable_grad_checkpointing(model.unet)
        if model.appearance is not None:
            enable_grad_checkpointing(model.appearance)

    perceptual = None
    if lpips is not None and stage == "autoencoder":
        try:
            from ..eval.lpips import load_lpips  # the eval helper's LPIPS module, weights from the user
        except ImportError:
            raise InputError("--lpips: talkformer_core.eval.lpips is not available in this version") from None
        perceptual = load_lpips(lpips).to(dev).eval().requires_grad_(False)

    step_module: nn.Module = (AutoencoderStep(model, cfg, perceptual) if stage == "autoencoder"
                              else TalkFormerStep(model, cfg))
    trainable = _trainable(model, stage)
    params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.train.autoencoder_lr if stage == "autoencoder" else cfg.train.lr)
    ema_obj = EMA(trainable, cfg.train.ema_decay) if ema else None
    wrapped = step_module
    if dd.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(step_module, device_ids=[dev.index] if dev.type == "cuda" else None)

    # ---- data
    if stage == "autoencoder":
        dataset = FrameDataset(data, cfg, frames=frames)
    else:
        dataset = TalkingFaceDataset(data, cfg, split="train", frames=frames, seed=seed)

    if stage == "talkformer" and cache_latents is not False:
        need = LatentCache.estimate_bytes(model, dataset)
        if cache_latents or need <= LATENT_CACHE_MAX_BYTES:
            step_module.latents = LatentCache(model, dataset, dev)
            metrics_cache = need
            if not preview_every:  # the step reads latents only: no image tensors per sample
                dataset.images = False
        else:
            metrics_cache = 0
    else:
        metrics_cache = 0

    if resume:
        st = load_training_state(st_path)
        if st.get("stage") != stage:
            raise CheckpointError(f"{st_path}: a {st.get('stage')!r} run, not {stage!r}")
        opt.load_state_dict(st["optimizer"])
        if ema_obj is not None:
            if "ema" not in st:
                raise CheckpointError(f"{st_path}: the run had no EMA; resume without --ema")
            ema_obj.load_state_dict(st["ema"])
        start_step = int(st["step"])
        restore_rng_state(st["rng"])
        if st.get("world", 1) != dd.world or st.get("grad_accum", 1) != grad_accum or \
                st.get("batch_size") != cfg.train.batch_size:
            warnings.warn("--resume with a different world size / batch size / grad_accum: the batch "
                          "sequence differs from the original run's", stacklevel=2)

    sampler = StepBatchSampler(len(dataset), cfg.train.batch_size, dd.world, dd.rank, grad_accum, seed,
                               start_step, steps)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         pin_memory=dev.type == "cuda", persistent_workers=False,
                                         # its own generator: creating the iterator must not draw
                                         # from the global RNG (dropout's), or a resume would differ
                                         generator=torch.Generator().manual_seed(seed))
    logger = Logger(out, start_step, dd.main)
    metrics: dict[str, Any] = {"loss": [], "steps": [], "start_step": start_step, "latent_cache_bytes": metrics_cache}
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16 and dev.type in ("cuda", "cpu"))
    sync_dev = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t_compute = t_data = 0.0

    def save(step: int) -> None:
        if not dd.main:
            return
        with defer_sigint():  # a second Ctrl-C must not leave a checkpoint and a state of different steps
            _save(step)

    def _save(step: int) -> None:
        save_cfg = cfg
        if stage == "autoencoder":
            modules = {"autoencoder": model}
        else:
            modules = {"autoencoder": model.autoencoder, **trainable}
        if ema_obj is not None:
            modules["ema"] = ema_obj.state_dict()
        ext = None if external is None else {k: v for k, v in external.items() if k != "path"}
        save_checkpoint(ck_path, modules, save_cfg, external_vae=ext,
                        extra_metadata={"training_state": {"step": step, "stage": stage}})
        state = {"optimizer": opt.state_dict(), "rng": capture_rng_state(), "step": step, "stage": stage,
                 "world": dd.world, "grad_accum": grad_accum, "batch_size": cfg.train.batch_size}
        if ema_obj is not None:
            state["ema"] = ema_obj.state_dict()
        save_training_state(st_path, state)

    t_start = time.time()
    step = start_step
    bar = tqdm(total=steps, initial=start_step, desc=f"train {stage}", disable=not (progress and dd.main))
    it = iter(loader)
    step_module.train()
    if stage == "talkformer":
        model.autoencoder.eval()
    n_done = 0
    # Exact resume after an interrupt: nothing of an unfinished step may reach the saved state. The
    # forward changes BatchNorm buffers and draws dropout masks from the global RNG before the
    # optimiser step, so both are snapshotted at each step boundary and restored if the step is cut
    # short; the optimiser step and its bookkeeping run with Ctrl-C held (signals.defer_sigint).
    buffers = _buffers(trainable)
    in_step = False
    try:
        while step < steps:
            snap_buffers = [b.detach().clone() for b in buffers]
            snap_rng = capture_rng_state()
            in_step = True
            opt.zero_grad(set_to_none=True)
            logs_sum: dict[str, float] = {}
            loss_sum = 0.0
            last_batch = None
            for a in range(grad_accum):
                t0 = time.perf_counter()
                batch = _to(next(it), dev)
                t1 = time.perf_counter()
                t_data += t1 - t0
                last_batch = batch
                g = torch.Generator(device=dev).manual_seed(_seed_of(seed, step, dd.rank * grad_accum + a))
                sync = dd.world == 1 or a == grad_accum - 1
                ctx = wrapped.no_sync() if (not sync and hasattr(wrapped, "no_sync")) else contextlib.nullcontext()
                with ctx:
                    with autocast:
                        loss, logs = wrapped(batch, g)
                    (loss / grad_accum).backward()
                loss_sum += float(loss.detach()) / grad_accum
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + float(v) / grad_accum
                t_compute += time.perf_counter() - t1
            t1 = time.perf_counter()
            with defer_sigint():
                gnorm = (torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip) if cfg.train.grad_clip > 0
                         else None)
                opt.step()
                step += 1
                if ema_obj is not None:
                    ema_obj.update(step)
                in_step = False
            sync_dev()
            t_compute += time.perf_counter() - t1
            n_done += 1
            vals = {"loss": loss_sum, **logs_sum}
            if dd.world > 1:  # log the mean over processes
                v = torch.tensor(list(vals.values()), dtype=torch.float64, device=dev)
                dist.all_reduce(v)
                vals = dict(zip(vals.keys(), (v / dd.world).tolist()))
            if gnorm is not None:
                vals["grad_norm"] = float(gnorm)
            vals["lr"] = opt.param_groups[0]["lr"]
            metrics["steps"].append(step)
            for k, v in vals.items():
                metrics.setdefault(k, []).append(v)
            if dd.main and (step % log_every == 0 or step == steps):
                logger.log(step, vals)
            if dd.main and preview_every and step % preview_every == 0:
                _write_preview(out, step, model, last_batch, cfg, stage, preview_steps, seed, logger)
                step_module.train()
                if stage == "talkformer":
                    model.autoencoder.eval()
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in vals.items() if k in ("loss", "ldm", "l1", "kl")})
            if save_every and step % save_every == 0 and step < steps:
                save(step)
            if dd.main and callback is not None:
                callback(step, steps, vals)
            stop = budget_minutes is not None and (time.time() - t_start) > 60.0 * budget_minutes
            if dd.world > 1:
                f = torch.tensor([float(stop)], device=dev)
                dist.all_reduce(f)
                stop = bool(f.item() > 0)
            if stop:
                metrics["stopped_by_budget"] = True
                break
    except BaseException:
        bar.close()
        if in_step:  # cut inside a step: back to the state at its start
            with torch.no_grad():
                for b, v in zip(buffers, snap_buffers):
                    b.copy_(v)
            restore_rng_state(snap_rng)
        if step > start_step:
            save(step)  # an interrupt keeps what was learned; --resume continues from here
        logger.close()
        raise
    bar.close()
    elapsed = time.time() - t_start
    metrics["steps_per_s"] = n_done / elapsed if elapsed > 0 else float("nan")
    per_step = cfg.train.batch_size * dd.world * grad_accum
    metrics.update(compute_seconds=t_compute, data_seconds=t_data, wall_seconds=elapsed,
                   busy_share=t_compute / elapsed if elapsed > 0 else float("nan"),
                   samples_per_s=n_done * per_step / elapsed if elapsed > 0 else float("nan"),
                   batch_size=cfg.train.batch_size)
    metrics["final_step"] = step

    if stage == "autoencoder":  # LDM: scale factor = 1 / std of the training latents
        sf = latent_scale_factor(model, dataset, dev, seed)
        cfg.model.autoencoder.scale_factor = sf
        model.scale_factor = sf
        metrics["scale_factor"] = sf
    save(step)
    logger.close()
    if dd.world > 1:
        dist.barrier()
    return TrainResult(ck_path, metrics)


def _buffers(modules: Mapping[str, nn.Module]) -> list[Tensor]:
    """Every buffer a training forward may change in place (BatchNorm running statistics and
    num_batches_tracked), of the trainable modules."""
    seen: dict[int, Tensor] = {}
    for m in modules.values():
        for b in m.buffers():
            seen.setdefault(id(b), b)
    return list(seen.values())


@torch.no_grad()
def latent_scale_factor(ae: nn.Module, dataset, device: torch.device, seed: int = 0, max_frames: int = 512,
                        batch: int = 32) -> float:
    """1 / std of posterior samples of up to ``max_frames`` training crops (LDM's rule)."""
    ae.eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:max_frames].tolist()
    zs = []
    for i in range(0, len(idx), batch):
        x = torch.stack([dataset[j]["crops"] for j in idx[i:i + batch]]).to(device)
        post = ae.encode(x)
        eps = torch.randn(post.mean.shape, generator=g).to(device)
        zs.append((post.mean + post.std * eps).flatten().cpu())
    std = float(torch.cat(zs).std())
    ae.train()
    return 1.0 / max(std, 1e-8)


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

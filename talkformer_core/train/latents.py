"""The frozen autoencoder's latents as training reads them: cached once per run for stage
talkformer, and the scale factor stage autoencoder ends with."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

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

    def __init__(self, model: nn.Module, dataset: Any, device: torch.device, batch: int = 64,
                 turns: list[float] | None = None, yaws: list[float] | None = None):
        self.lo: list[int] = []
        self.z: list[Tensor] = []
        self.ctx: list[Tensor] = []
        # turns: the turn augmentation's levels (train.augment.turn_levels); z_turn[c][i] holds the
        # latents of the crops turned by turns[i] (the context's lower half is blank: never turned)
        self.turns = [float(v) for v in (turns or [])]
        self.z_turn: list[Tensor] = []
        # yaws: the yaw augmentation's levels; z_yaw / ctx_yaw[c][:, i] hold E(crop) and E(masked crop)
        # of the crops yawed by yaws[i] (the context turns with the face)
        self.yaws = [float(v) for v in (yaws or [])]
        self.z_yaw: list[Tensor] = []
        self.ctx_yaw: list[Tensor] = []
        from ..data.dataset import _to_image
        from .augment import turn_lower_face, yaw_face

        with torch.no_grad():
            for ci, clip in enumerate(dataset.clips):
                crops = dataset.clip_arrays(ci)["crops"]  # (T, S, S, 3) uint8
                zs, cs, ts, yz, yc = [], [], [], [], []
                for a in range(clip.lo, clip.hi, batch):
                    x = _to_image(crops[a:min(a + batch, clip.hi)]).to(device)  # (b, 3, S, S), as the dataset
                    zs.append(model.encode(x).float())
                    cs.append(model.encode_masked(x).float())  # the dataset's masked crop
                    if self.turns:
                        ts.append(torch.stack([zs[-1] if v == 0 else model.encode(
                            turn_lower_face(x, torch.full((len(x),), v, device=device))).float()
                            for v in self.turns], 1))  # (b, levels, C, h, w)
                    if self.yaws:
                        xv = [x if v == 0 else yaw_face(x, torch.full((len(x),), v, device=device)) for v in self.yaws]
                        yz.append(torch.stack([model.encode(xi).float() for xi in xv], 1))  # (b, levels, C, h, w)
                        yc.append(torch.stack([model.encode_masked(xi).float() for xi in xv], 1))
                self.lo.append(clip.lo)
                self.z.append(torch.cat(zs))
                self.ctx.append(torch.cat(cs))
                if self.turns:
                    self.z_turn.append(torch.cat(ts))
                if self.yaws:
                    self.z_yaw.append(torch.cat(yz))
                    self.ctx_yaw.append(torch.cat(yc))

    @staticmethod
    def estimate_bytes(model: nn.Module, dataset: Any, levels: int = 0) -> int:
        """Bytes the cache would hold (two float32 latents per frame, and ``levels`` more: one per turn
        level, two per yaw level), from one encoded frame's shape."""
        with torch.no_grad():
            p = next(model.autoencoder.parameters())
            z = model.encode(torch.zeros(1, 3, dataset.S, dataset.S, device=p.device, dtype=p.dtype))
        return int(sum(c.hi - c.lo for c in dataset.clips)) * (2 + levels) * z[0].numel() * 4

    def lookup(self, batch: Mapping[str, Tensor], turn: list[int] | None = None,
               yaw: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(z0 (B*L, C, h, w), context (B*L, C, h, w), z_r (B, C, h, w)) of the batch's frames;
        ``turn`` (B,) indices into ``turns``: z0 of each window's crops turned by that level;
        ``yaw`` (B,) indices into ``yaws``: z0 and context of each window's crops yawed by that level."""
        clips = batch["clip_index"].tolist()  # (B,)
        frames = batch["frame_index"].tolist()  # (B, L)
        refs = batch["reference_index"].tolist()  # (B,)
        dev = self.z[0].device
        win = [torch.as_tensor([f - self.lo[c] for f in fr], device=dev) for c, fr in zip(clips, frames)]
        if turn is not None:
            z0 = torch.cat([self.z_turn[c][w, i] for c, w, i in zip(clips, win, turn)])
        elif yaw is not None:
            z0 = torch.cat([self.z_yaw[c][w, i] for c, w, i in zip(clips, win, yaw)])
        else:
            z0 = torch.cat([self.z[c][w] for c, w in zip(clips, win)])
        if yaw is not None:
            ctx = torch.cat([self.ctx_yaw[c][w, i] for c, w, i in zip(clips, win, yaw)])
        else:
            ctx = torch.cat([self.ctx[c][w] for c, w in zip(clips, win)])
        z_r = torch.stack([self.z[c][r - self.lo[c]] for c, r in zip(clips, refs)])
        return z0, ctx, z_r


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

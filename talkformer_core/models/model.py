"""TalkFormer: the four modules of the paper's Fig. 2 in one container.

    autoencoder  AutoencoderKL        frozen first stage: face crop <-> latent (B, C, h, w)
    landmark     LandmarkCompletion   stage 1: mel + pose + N references -> 131 landmarks
    appearance   AppearanceEncoder    z_r -> F_a^i at every scale (None when nothing reads it:
                                      r_align=False without temporal attention)
    unet         TalkFormerUNet       epsilon_theta(z_t, t, landmarks, reference[, motion])

The state dict is these four prefixes. The U-Net holds an unregistered handle on ``appearance``
so it can take z_r directly (``unet.prepare_reference(z_r)``). Training and sampling loops live in
``train/`` and ``diffusion/``; this module only wires the parts.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import TalkFormerConfig, preset
from ..pixels import mask_lower_face
from .appearance import AppearanceEncoder
from .autoencoder import AutoencoderKL
from .landmark_completion import LandmarkCompletion
from .talkformer import TalkFormerBlock
from .unet import LandmarkCache, MotionCache, ReferenceCache, TalkFormerUNet


class TalkFormer(nn.Module):
    def __init__(self, cfg: TalkFormerConfig):
        super().__init__()
        self.config = cfg
        m = cfg.model
        self.autoencoder = AutoencoderKL(m.autoencoder)
        self.autoencoder.requires_grad_(False)  # frozen first stage (docs/architecture.md); its own stage trains it
        self.landmark = LandmarkCompletion(m.landmark)
        self.appearance = AppearanceEncoder(m) if (m.r_align or m.temporal_attention) else None
        self.unet = TalkFormerUNet(m, appearance=self.appearance)

    @classmethod
    def from_config(cls, cfg: TalkFormerConfig | str) -> "TalkFormer":
        """Build from a TalkFormerConfig or a preset name ('tiny', 'small', 'paper')."""
        return cls(preset(cfg) if isinstance(cfg, str) else cfg)

    # ------------------------------------------------------------------ latents
    def encode(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latent (B, C, h, w) (posterior mean)."""
        return self.autoencoder.encode_latent(x)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent (B, C, h, w) -> images (B, 3, H, W), nominally [-1, 1]."""
        return self.autoencoder.decode_latent(z)

    def encode_masked(self, crops: Tensor) -> Tensor:
        """Face crops (B, 3, H, W) in [-1, 1] with rows [H//2:] set to -1 (black) -> E(masked face).

        Its upper latent half [:h//2] is the known context in training and sampling alike.
        """
        return self.encode(mask_lower_face(crops))

    @staticmethod
    def known_mask(h: int, w: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
        """(1, 1, h, w): 1 on the known upper half (rows [:h//2]), 0 on the generated lower half."""
        mask = torch.zeros(1, 1, h, w, device=device, dtype=dtype)
        mask[:, :, : h // 2] = 1
        return mask

    # ------------------------------------------------------------------ denoiser (delegates to unet)
    def prepare_reference(self, reference) -> ReferenceCache:
        return self.unet.prepare_reference(reference)

    def prepare_landmarks(self, landmarks: Tensor) -> LandmarkCache:
        return self.unet.prepare_landmarks(landmarks)

    def prepare_motion(self, motion: Tensor) -> MotionCache | None:
        return self.unet.prepare_motion(motion)

    def forward(self, z_t: Tensor, t, landmarks, reference, motion=None, num_frames: int = 1) -> Tensor:
        """epsilon_theta: see TalkFormerUNet.forward."""
        return self.unet(z_t, t, landmarks, reference, motion=motion, num_frames=num_frames)


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def parameter_counts(cfg: TalkFormerConfig | str) -> dict[str, int]:
    """Parameters per module of a config, built on the meta device (no memory, no weights).

    Keys: autoencoder, landmark, appearance, unet, unet.talkformer (the TalkFormer blocks and the
    landmark embedding, i.e. what the paper adds to an LDM U-Net), trainable (all but the frozen
    autoencoder), total.
    """
    cfg = preset(cfg) if isinstance(cfg, str) else cfg
    with torch.device("meta"):
        model = TalkFormer(cfg)
    tf = sum(_count(m) for m in model.unet.modules() if isinstance(m, TalkFormerBlock))
    counts = {
        "autoencoder": _count(model.autoencoder),
        "landmark": _count(model.landmark),
        "appearance": _count(model.appearance),
        "unet": _count(model.unet),
        "unet.talkformer": tf + _count(model.unet.landmark_embed),
    }
    counts["trainable"] = counts["landmark"] + counts["appearance"] + counts["unet"]
    counts["total"] = counts["trainable"] + counts["autoencoder"]
    return counts

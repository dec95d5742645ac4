"""IP-LAP's video renderer, in IP-LAP's exact state-dict layout, for IP-LAP's public weights.

Source: Weizhi-Zhong/IP_LAP (CVPR 2023, Apache-2.0) at commit 9b9dc03, ``models/video_renderer.py``
(cited below as ``vr.py:LINE``). The architecture is theirs; this is a re-implementation. Every
parameter and buffer name and shape equals IP-LAP's ``Renderer`` minus the ``perceptual.*`` keys,
the ImageNet VGG19 of its training loss, which takes no part in inference (vr.py:343-345, 364-367).
252 tensors, 18,963,235 parameters (layout in ``iplap_layouts/renderer.json``).

Two parts (vr.py:334-370):
  1. ``flow_module`` (DenseFlowNetwork, vr.py:183-262): for each reference, a conv encoder on
     cat(reference image, reference sketch) and SPADE blocks modulated by the 5 target sketches
     predict a dense pixel flow and a sigmoid weight; the reference's features and pixels are warped
     with ``grid_sample`` and averaged over references with those weights.
  2. ``translation`` (TranslationNetwork, vr.py:265-332): encodes cat(face with the lower half zeroed,
     5 target sketches) and decodes it with SPADE on the warped features/pixels and AdaIN on a 512-d
     audio feature from a mel encoder, ending in a sigmoid.

Images are IP-LAP's: BGR, float in [0, 1], 128x128. ``IPLAPRenderer.forward`` returns what IP-LAP's
``Renderer.forward`` returns minus the two VGG loss values.

One computational difference, not a numerical one: SPADE's gamma and beta depend only on the
modulation input. In the flow module that is the target sketches, identical for every reference,
so they are computed once per frame instead of once per reference (IP-LAP recomputes them inside
its loop over references, vr.py:220-242); about 70 % of the flow module's work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..pixels import mask_lower_face

N_TARGET_SKETCHES = 5  # T: the window of target frames whose sketches condition both nets
IMAGE_SIZE = 128


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class ConvBN(nn.Module):
    """Conv2d + BatchNorm2d + ReLU, optional residual before the ReLU (IP-LAP ``Conv2d``, vr.py:106-120).

    Keys: ``conv_block.0`` (conv), ``conv_block.1`` (batch norm).
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride, padding: int, residual: bool = False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_block(x)
        if self.residual:
            y = y + x
        return F.relu(y)


def mel_encoder() -> nn.Sequential:
    """(B, 1, 80, 16) mel window -> (B, 512, 1, 1) (vr.py:268-285).

    Same stack as the landmark generator's mel encoder but ending in ReLU (ConvBN) instead of Tanh.
    Spatial sizes: 80x16 -> (3,1) stride 27x16 -> stride 3 9x6 -> (3,2) stride 3x3 -> 3x3 unpadded 1x1.
    """
    spec = [  # (cin, cout, kernel, stride, padding, residual)
        (1, 32, 3, 1, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True),
        (32, 64, 3, (3, 1), 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),
        (64, 128, 3, 3, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),
        (128, 256, 3, (3, 2), 1, False), (256, 256, 3, 1, 1, True),
        (256, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False),
    ]
    return nn.Sequential(*[ConvBN(*s) for s in spec])


class SPADELayer(nn.Module):
    """Spatially-adaptive normalisation (vr.py:65-83): IN(x) * (1 + gamma(m)) + beta(m).

    The instance norm has no affine parameters and no running statistics (so no keys).
    gamma/beta come from one hidden 3x3 conv on the modulation map m; there is no activation
    between the hidden conv and gamma/beta in IP-LAP (vr.py:78-81), so none here.
    """

    def __init__(self, channels: int, mod_channels: int, hidden: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(mod_channels, hidden, 3, 1, 1)
        self.gamma = nn.Conv2d(hidden, channels, 3, 1, 1)
        self.beta = nn.Conv2d(hidden, channels, 3, 1, 1)

    def modulation(self, m: Tensor) -> tuple[Tensor, Tensor]:
        """(B, Cm, H, W) -> gamma, beta (B, C, H, W); depends on the modulation map only."""
        h = self.conv1(m)
        return self.gamma(h), self.beta(h)

    def forward(self, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        # x (B*N, C, H, W); gamma/beta (B, C, H, W), shared by the N feature maps of one batch item.
        n = F.instance_norm(x)  # eps 1e-5 as nn.InstanceNorm2d
        if n.shape[0] != gamma.shape[0]:
            b = gamma.shape[0]
            n = n.view(b, -1, *n.shape[1:])  # (B, N, C, H, W)
            out = n + n * gamma.unsqueeze(1) + beta.unsqueeze(1)  # same arithmetic order as vr.py:83
            return out.flatten(0, 1)
        return n + n * gamma + beta


class SPADE(nn.Module):
    """SPADE residual-free block (vr.py:86-104): [SPADE, LeakyReLU(0.2), conv3x3] x 2."""

    def __init__(self, num_channel: int, num_channel_modulation: int, hidden_size: int = 256):
        super().__init__()
        self.conv_1 = nn.Conv2d(num_channel, num_channel, 3, 1, 1)
        self.conv_2 = nn.Conv2d(num_channel, num_channel, 3, 1, 1)
        self.spade_layer_1 = SPADELayer(num_channel, num_channel_modulation, hidden_size)
        self.spade_layer_2 = SPADELayer(num_channel, num_channel_modulation, hidden_size)

    def modulation(self, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (*self.spade_layer_1.modulation(m), *self.spade_layer_2.modulation(m))

    def forward(self, x: Tensor, m: Tensor | None = None, mod: tuple[Tensor, ...] | None = None) -> Tensor:
        """x (B*N, C, H, W); either the modulation map m (B, Cm, H, W) or its precomputed ``modulation``."""
        g1, b1, g2, b2 = self.modulation(m) if mod is None else mod
        x = self.conv_1(F.leaky_relu(self.spade_layer_1(x, g1, b1), 0.2))
        return self.conv_2(F.leaky_relu(self.spade_layer_2(x, g2, b2), 0.2))


class AdaINLayer(nn.Module):
    """Adaptive instance norm on a vector (vr.py:8-39): IN(x) * (1 + gamma(a)) + beta(a)."""

    def __init__(self, channels: int, mod_features: int, hidden: int = 128):
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Linear(mod_features, hidden), nn.ReLU())
        self.mlp_gamma = nn.Linear(hidden, channels)
        self.mlp_beta = nn.Linear(hidden, channels)

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        # x (B, C, H, W); a (B, F)
        h = self.mlp_shared(a)
        gamma = self.mlp_gamma(h)[:, :, None, None]  # (B, C, 1, 1)
        beta = self.mlp_beta(h)[:, :, None, None]
        return F.instance_norm(x) * (1 + gamma) + beta


class AdaIN(nn.Module):
    """[AdaIN, LeakyReLU(0.2), conv3x3] x 2 (vr.py:41-60)."""

    def __init__(self, input_channel: int, modulation_channel: int):
        super().__init__()
        self.conv_1 = nn.Conv2d(input_channel, input_channel, 3, 1, 1)
        self.conv_2 = nn.Conv2d(input_channel, input_channel, 3, 1, 1)
        self.adain_layer_1 = AdaINLayer(input_channel, modulation_channel)
        self.adain_layer_2 = AdaINLayer(input_channel, modulation_channel)

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        x = self.conv_1(F.leaky_relu(self.adain_layer_1(x, a), 0.2))
        return self.conv_2(F.leaky_relu(self.adain_layer_2(x, a), 0.2))


# ---------------------------------------------------------------------------------------------
# Warping (vr.py:122-180)
# ---------------------------------------------------------------------------------------------


def flow_to_grid(flow: Tensor) -> Tensor:
    """Pixel flow (B, 2, H, W) -> sampling grid (B, H, W, 2) in [-1, 1] (vr.py:129-163).

    Identity grid from the pixel centres with the corner convention x_i = 2 i / (W - 1) - 1, plus the
    flow scaled by 2 / (W - 1) (x) and 2 / (H - 1) (y).
    """
    b, _, h, w = flow.shape
    xs = 2 * (torch.arange(w).to(flow) / (w - 1)) - 1  # (W,)
    ys = 2 * (torch.arange(h).to(flow) / (h - 1)) - 1  # (H,)
    grid = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)], dim=-1)  # (H, W, 2)
    scaled = 2 * torch.cat([flow[:, :1] / (w - 1), flow[:, 1:] / (h - 1)], dim=1)  # (B, 2, H, W)
    return grid.unsqueeze(0) + scaled.permute(0, 2, 3, 1)


def warp(source: Tensor, grid: Tensor) -> Tensor:
    """grid_sample with torch's defaults (bilinear, zeros, align_corners=False), as vr.py:166-180.

    A grid of another resolution is first resized bilinearly (align_corners=False) to the source's.
    """
    h, w = source.shape[-2:]
    if grid.shape[1:3] != (h, w):
        grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False)
        grid = grid.permute(0, 2, 3, 1)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def nearest_64(x: Tensor) -> Tensor:
    """Nearest-neighbour resize to 64x64 (IP-LAP ``downsample``, vr.py:122-126)."""
    return F.interpolate(x, size=(64, 64), mode="nearest")


# ---------------------------------------------------------------------------------------------
# The two networks
# ---------------------------------------------------------------------------------------------


class DenseFlowNetwork(nn.Module):
    """Per-reference flow and weight, weighted average of warped features (vr.py:183-262)."""

    def __init__(self, num_channel: int = 6, num_channel_modulation: int = 3 * N_TARGET_SKETCHES, hidden_size: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(num_channel, 32, 7, 1, 3)
        self.conv1_bn = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 256, 3, 2, 1)
        self.conv2_bn = nn.BatchNorm2d(256)
        self.spade_layer_1 = SPADE(256, num_channel_modulation, hidden_size)
        self.spade_layer_2 = SPADE(256, num_channel_modulation, hidden_size)
        self.spade_layer_4 = SPADE(64, num_channel_modulation, hidden_size)
        self.conv_4 = nn.Conv2d(64, 2, 7, 1, 3)  # flow in pixels
        self.conv_5 = nn.Sequential(  # per-pixel confidence of this reference
            nn.Conv2d(64, 32, 7, 1, 3), nn.ReLU(), nn.Conv2d(32, 1, 7, 1, 3), nn.Sigmoid()
        )

    def forward(
        self, ref_img: Tensor, ref_sketch: Tensor, target_sketches: Tensor, ref_chunk: int = 8
    ) -> tuple[Tensor, Tensor, Tensor]:
        """ref_img, ref_sketch (B, N, 3, H, W); target_sketches (B, 5, 3, H, W).

        Returns the weighted averages of the warped h1 (B, 32, H, W), h2 (B, 256, H/2, W/2) and
        reference pixels (B, 3, H, W). References run in chunks of ``ref_chunk`` (memory bound);
        the sums accumulate in reference order as IP-LAP's loop does (vr.py:220-256).
        """
        b, n = ref_img.shape[:2]
        driving = target_sketches.flatten(1, 2)  # (B, 15, H, W): frame-major channels, vr.py:215
        driving_64 = nearest_64(driving)  # (B, 15, H/2, W/2)
        # SPADE gamma/beta depend on the target sketches only: once per frame, not per reference.
        mod_1 = self.spade_layer_1.modulation(driving_64)
        mod_2 = self.spade_layer_2.modulation(driving_64)
        mod_4 = self.spade_layer_4.modulation(driving)

        h1_sum = h2_sum = ref_sum = weight_sum = None
        for start in range(0, n, ref_chunk):
            k = min(ref_chunk, n - start)
            img = ref_img[:, start:start + k].flatten(0, 1)  # (B*k, 3, H, W), batch-major
            x = torch.cat([img, ref_sketch[:, start:start + k].flatten(0, 1)], dim=1)  # (B*k, 6, H, W)
            h1 = F.relu(self.conv1_bn(self.conv1(x)))  # (B*k, 32, H, W)
            h2 = F.relu(self.conv2_bn(self.conv2(h1)))  # (B*k, 256, H/2, W/2)
            y = self.spade_layer_1(h2, mod=mod_1)
            y = self.spade_layer_2(y, mod=mod_2)  # (B*k, 256, H/2, W/2)
            y = F.pixel_shuffle(y, 2)  # (B*k, 64, H, W)
            y = self.spade_layer_4(y, mod=mod_4)
            grid = flow_to_grid(self.conv_4(y))  # (B*k, H, W, 2)
            weight = self.conv_5(y)  # (B*k, 1, H, W) in (0, 1)

            # warp, weight, then add reference by reference (IP-LAP's summation order)
            wh1 = (warp(h1, grid) * weight).view(b, k, *h1.shape[1:])
            wh2 = (warp(h2, grid) * nearest_64(weight)).view(b, k, *h2.shape[1:])
            wref = (warp(img, grid) * weight).view(b, k, *img.shape[1:])
            weight = weight.view(b, k, *weight.shape[1:])
            for j in range(k):
                if weight_sum is None:
                    weight_sum, h1_sum, h2_sum, ref_sum = weight[:, j], wh1[:, j], wh2[:, j], wref[:, j]
                else:
                    weight_sum = weight_sum + weight[:, j]
                    h1_sum = h1_sum + wh1[:, j]
                    h2_sum = h2_sum + wh2[:, j]
                    ref_sum = ref_sum + wref[:, j]

        weight_sum = weight_sum + 1e-5  # vr.py:258
        return h1_sum / weight_sum, h2_sum / nearest_64(weight_sum), ref_sum / weight_sum


class TranslationNetwork(nn.Module):
    """Masked face + sketches -> face, SPADE on warped features, AdaIN on audio (vr.py:265-332)."""

    def __init__(self):
        super().__init__()
        self.audio_encoder = mel_encoder()
        self.conv1 = nn.Conv2d(3 + 3 * N_TARGET_SKETCHES, 32, 7, 1, 3, bias=False)
        self.conv1_bn = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 256, 3, 2, 1, bias=False)
        self.conv2_bn = nn.BatchNorm2d(256)
        self.spade_1 = SPADE(256, 256)  # modulated by warped h2
        self.adain_1 = AdaIN(256, 512)
        self.spade_2 = SPADE(64, 32)  # modulated by warped h1
        self.adain_2 = AdaIN(64, 512)
        self.spade_4 = SPADE(64, 3)  # modulated by the warped reference pixels
        self.conv_last = nn.Conv2d(64, 3, 7, 1, 3, bias=False)

    def forward(self, x: Tensor, warped_ref: Tensor, warped_h1: Tensor, warped_h2: Tensor, mel: Tensor) -> Tensor:
        """x (B, 18, H, W); warped_* from the flow module; mel (B, 1, 80, 16) -> face (B, 3, H, W) in (0, 1)."""
        x = F.relu(self.conv1_bn(self.conv1(x)))  # (B, 32, H, W)
        x = F.relu(self.conv2_bn(self.conv2(x)))  # (B, 256, H/2, W/2)
        audio = self.audio_encoder(mel).flatten(1)  # (B, 512)
        x = self.adain_1(self.spade_1(x, warped_h2), audio)  # (B, 256, H/2, W/2)
        x = F.pixel_shuffle(x, 2)  # (B, 64, H, W)
        x = self.adain_2(self.spade_2(x, warped_h1), audio)
        x = self.spade_4(x, warped_ref)
        x = self.conv_last(F.leaky_relu(x, 0.01))  # nn.LeakyReLU() default slope, vr.py:307
        return torch.sigmoid(x)


class IPLAPRenderer(nn.Module):
    """IP-LAP's ``Renderer`` (vr.py:334-370) without its VGG19 training loss.

    Inputs (IP-LAP's conventions, ``inference_single.py:477-502``; all BGR float in [0, 1], 128x128):
      face_frame_img     (B, 1, 3, H, W)  the middle frame's face crop; its lower half is zeroed here
      target_sketches    (B, 5, 3, H, W)  sketches of the 5 window frames (detected pose + predicted content)
      ref_N_frame_img    (B, N, 3, H, W)  reference face crops (IP-LAP uses N = 25)
      ref_N_frame_sketch (B, N, 3, H, W)  their sketches from detected landmarks
      audio_mels         (B, 1, 1, 80, 16) the middle frame's mel window
    Outputs: generated face (B, 3, H, W) in (0, 1), BGR; warped reference (B, 3, H, W).
    """

    def __init__(self, ref_chunk: int = 8):
        super().__init__()
        self.flow_module = DenseFlowNetwork()
        self.translation = TranslationNetwork()
        self.ref_chunk = ref_chunk  # references per flow-module pass in eval mode; memory/speed only

    def forward(
        self,
        face_frame_img: Tensor,
        target_sketches: Tensor,
        ref_N_frame_img: Tensor,
        ref_N_frame_sketch: Tensor,
        audio_mels: Tensor,
    ) -> tuple[Tensor, Tensor]:
        if face_frame_img.shape[1] != 1 or audio_mels.shape[1] != 1:
            raise InputError("IPLAPRenderer renders one frame per batch item: face_frame_img (B, 1, 3, H, W), "
                             f"audio_mels (B, 1, 1, 80, 16); got {tuple(face_frame_img.shape)}, {tuple(audio_mels.shape)}")
        # In training mode BatchNorm normalises over the batch: one reference per pass, as IP-LAP's
        # loop (vr.py:220), keeps its batch statistics. In eval mode chunking changes nothing.
        chunk = 1 if self.training else self.ref_chunk
        warped_h1, warped_h2, warped_ref = self.flow_module(ref_N_frame_img, ref_N_frame_sketch, target_sketches, chunk)
        face = face_frame_img[:, 0]  # (B, 3, H, W)
        masked = mask_lower_face(face, black=0.0)  # images in [0, 1]: black is 0
        x = torch.cat([masked, target_sketches.flatten(1, 2)], dim=1)  # (B, 3 + 15, H, W), vr.py:354-361
        generated = self.translation(x, warped_ref, warped_h1, warped_h2, audio_mels[:, 0])
        return generated, warped_ref


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

"""Stage 2's one batch loop (paper §III-C): face crops + target landmarks + the reference cache ->
generated face crops. ``pipeline.sample_faces``, ``pipeline.lipsync`` (the ``sync`` CLI) and the
TalkFormer Sampler node all run ``FaceSampler``; speed work lands here.

Without temporal attention every frame is independent: batches of ``batch_size`` frames, one
sampler run each (masked encode -> sampler with the step-invariant caches -> decode).

With temporal attention (paper "Ours + TempAttn") a frame's clip of L attends to the M = 2 latents
generated just before it (the motion frames), which makes the video one serial chain of clips.
Parallel chains: the frames are cut into segments; each segment's chain carries its own motion
frames and all chains advance together, one clip per chain per sampler run (batch = chains x L),
in groups of at most ``batch_size // L`` chains so memory is bounded for any length. A chain
other than the first starts ``overlap`` frames before its segment with no motion frames (the rule
of a video's first clip); by default those frames only warm its motion frames up and are dropped
(2 clips: seams measured as smooth as the serial chain there, docs/speed.md), or they are
cross-faded with the previous chain's in latent space. Frames the first chain covers are exactly
the serial chain's: a video no longer than one segment equals it bit for bit.

State across calls (``lipsync`` streams chunks): the last M latents of a call are the next call's
first motion frames, as in the serial chain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .errors import InputError
from .loaded_model import LoadedModel
from .pixels import mask_lower_face, to_pixels, to_signed

StepCallback = Callable[[int, int], None]

# The default sampler of the CLI, SyncOptions and the nodes: DPM-Solver++(2M) at 10 steps was
# within 2 % of 200-step DDIM on lower-face PSNR and LMD on a person model's held-out frames, with
# every larger step count, and closer to 200-step DDIM's output (45.6 dB) than DDIM at 25 steps
# (40.9 dB) (bench/fast_sampler.py, docs/speed.md).
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_STEPS = 10

CPU_BATCH = 8  # frames per sampler run on the CPU (the value every recorded CPU number used)
MIN_SEGMENT_CLIPS = 4  # a chain's segment is at least 4 clips: the warm-up costs at most half more work
# Temp-Att chains after the first start this many clips early and drop them (warm-up): measured on
# a cpu64 Temp-Att person model (bench/seam_jitter.py, docs/speed.md), 2 clips of warm-up left the
# lower face's frame-to-frame second difference at the seams equal to the serial chain's there
# (0.78 vs 0.78 grey levels; inside segments 0.82); 1 clip left it 8 % above, a 1-clip cross-fade
# 2.3x inside.
WARMUP_CLIPS = 2


def crops_to_tensor(crops: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(crops), device=device)
    return to_signed(x.permute(0, 3, 1, 2))


def tensor_to_crops(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return to_pixels(x).permute(0, 2, 3, 1).cpu().numpy()


def _check_scale(value: float | None, what: str, meaning: str) -> None:
    """InputError unless ``value`` is None (the model's own) or a finite number >= 0."""
    if value is not None and not (math.isfinite(float(value)) and float(value) >= 0):
        raise InputError(f"{what} {value}: expected a number >= 0 ({meaning})")


def _diffusion_default(model: LoadedModel, name: str, default: float) -> float:
    """The checkpoint's DiffusionConfig.<name>; ``default`` for configs saved before it existed or
    models without a config."""
    cfg = getattr(model, "config", None)
    return getattr(cfg.model.diffusion, name, default) if cfg is not None else default


def check_noise_scale(scale: float | None) -> None:
    """InputError unless ``scale`` is None (the model's own) or a finite number >= 0; callers run it
    before any long work."""
    _check_scale(scale, "noise scale", "1 = the paper's x_T, 0 = no noise")


def noise_scale_of(model: LoadedModel, scale: float | None = None) -> float:
    """``scale`` (checked), or the model's own (``DiffusionConfig.noise_scale``: 0.5 for person models,
    else 1)."""
    check_noise_scale(scale)
    return float(model.config.model.diffusion.noise_scale if scale is None else scale)


def initial_noise(model: LoadedModel, seed: int, scale: float | None = None) -> torch.Tensor:
    """The clip's fixed x_T (1, C, h, w), drawn on the CPU from ``seed`` (the same on every device),
    times ``noise_scale_of(model, scale)``."""
    m = model.config.model
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((1, m.latent_channels, m.latent_size, m.latent_size), generator=g) * noise_scale_of(model, scale)


@torch.no_grad()
def decode_latents(model: LoadedModel, z: torch.Tensor) -> np.ndarray:
    with _net_ctx(model):
        return tensor_to_crops(model.model.decode(_in(model, z)))


def check_decode_refine(refine: int | None) -> None:
    """InputError unless ``refine`` is None (the model's own) or a count of passes >= 0; callers run it
    before any long work."""
    if refine is not None and int(refine) < 0:
        raise InputError(f"decode refine {refine}: expected >= 0 passes")


def decode_refine_of(model: LoadedModel, refine: int | None = None) -> int:
    """The re-encoding passes a decode makes: ``refine`` (checked) if given, else the checkpoint's
    (DiffusionConfig.decode_refine; 0 for models without it)."""
    check_decode_refine(refine)
    return int(refine) if refine is not None else int(_diffusion_default(model, "decode_refine", 0))


@torch.no_grad()
def decode_faces(model: LoadedModel, z: torch.Tensor, crops: np.ndarray, refine: int = 0) -> np.ndarray:
    """Generated latents (B, C, h, w) (lower half generated, upper half E(crop)[:h/2], see
    ``sample_latents``) of the template crops (B, S, S, 3) uint8 -> faces (B, S, S, 3) uint8.

    E(crop)'s upper rows near the middle see the template's own mouth through the encoder's receptive
    field, and the decoder draws it back into the lower face: on face_5 a closed lower latent decoded
    under an open frame's upper half reads 0.070 where under its own it reads 0.036 (docs/dubbing.md).
    Each of ``refine`` passes re-encodes the crop with its lower half (rows [S/2:]) replaced by the
    decoded one and decodes the generated lower half under that upper half instead."""
    faces = decode_latents(model, z)
    h, S = z.shape[2] // 2, crops.shape[1]
    for _ in range(int(refine)):
        comp = np.array(crops, copy=True)
        comp[:, S // 2:] = faces[:, S // 2:]
        with _net_ctx(model):
            upper = model.model.encode(_in(model, crops_to_tensor(comp, model.device))).float()
        z = torch.cat([upper[:, :, :h], z[:, :, h:]], 2)
        faces = decode_latents(model, z)
    return faces


def check_mouth_guidance(scale: float | None) -> None:
    """InputError unless ``scale`` is None (the model's own) or a finite number >= 0; callers run it
    before any long work."""
    _check_scale(scale, "mouth guidance", "0 = off")


def mouth_guidance_of(model: LoadedModel, scale: float | None = None) -> float:
    """``scale`` (checked) if given, else the checkpoint's (DiffusionConfig.mouth_guidance; 0 for
    models without it and for renderers that are not the diffusion stage)."""
    check_mouth_guidance(scale)
    return float(scale) if scale is not None else float(_diffusion_default(model, "mouth_guidance", 0.0))


def neutral_mouth(points_crop: np.ndarray) -> np.ndarray:
    """Landmarks (T, 131, 2) (crop frame [0, 1]; rows with NaN skipped) -> (57, 2): their mean
    jaw-and-lips shape about its own centroid, the "unconditional" mouth of mouth guidance (what
    pipeline.stage1_neutral_mouth reduces stage 1's average mouth with). One shape for the whole
    video: it carries none of a frame's own mouth."""
    from .face import topology

    pts = np.asarray(points_crop, dtype=np.float64)
    if pts.ndim != 3 or pts.shape[1:] != (131, 2):
        raise InputError(f"neutral mouth: expected landmarks (T, 131, 2), got {pts.shape}")
    c = pts[:, list(topology.CONTENT_POS)]  # (T, 57, 2)
    c = c[np.isfinite(c).all(axis=(1, 2))]
    if len(c) == 0:
        raise InputError("neutral mouth: no frame of the template has tracked landmarks")
    return (c - c.mean(1, keepdims=True)).mean(0).astype(np.float32)


def neutral_landmarks(landmarks: torch.Tensor, neutral: torch.Tensor) -> torch.Tensor:
    """Target landmarks (N, 131, 2) with the jaw and lips (the 57 content points) replaced by the
    neutral mouth (57, 2), placed on each frame's own content centroid: the pose stays the frame's."""
    from .face import topology

    idx = torch.as_tensor(topology.CONTENT_POS, device=landmarks.device)
    out = landmarks.clone()
    own = landmarks[:, idx]  # (N, 57, 2)
    out[:, idx] = neutral.to(landmarks)[None] + own.mean(1, keepdim=True)
    return out


@dataclass(frozen=True)
class MouthGuidance:
    """Classifier-free guidance on the mouth (Ho & Salimans 2022, eq. 6, with the unconditional input
    replaced by the person's neutral mouth): eps = eps(L) + scale * (eps(L) - eps(L_neutral)), where
    L_neutral is L with its jaw and lips replaced by ``neutral`` (``neutral_landmarks``). It amplifies
    what the target mouth asks beyond the person's average one, against the template's upper face
    (which pulls the U-Net's lower latent toward the template's own mouth, docs/dubbing.md). Two U-Net
    passes a step, one after the other: the batch (and its memory) stays what auto_batch_size chose."""

    scale: float
    neutral: torch.Tensor  # (57, 2) crop frame, about its centroid


def make_guidance(model: LoadedModel, scale: float | None, neutral: np.ndarray | None) -> MouthGuidance | None:
    """The sampler's MouthGuidance, or None when the scale (``scale``, else the model's) is 0. A scale
    > 0 needs the ``neutral`` mouth (pipeline.stage1_neutral_mouth): InputError without it."""
    w = mouth_guidance_of(model, scale) if model.kind == "talkformer" else 0.0
    if w == 0:
        return None
    if neutral is None:
        raise InputError(f"mouth guidance {w:g} needs the neutral mouth (pipeline.stage1_neutral_mouth of the "
                         "template's face analysis); pass it, or set the guidance to 0")
    n = np.asarray(neutral, dtype=np.float32)
    if n.shape != (57, 2) or not np.isfinite(n).all():
        raise InputError(f"neutral mouth: expected finite (57, 2), got {n.shape}")
    return MouthGuidance(w, torch.as_tensor(n, device=model.device))


def _fmt(model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    """x in channels_last when the model runs so (LoadedModel.channels_last), else untouched: the
    CPU path's convolutions see exactly the strides they always saw (its numbers stay bit-equal)."""
    return x.to(memory_format=torch.channels_last) if getattr(model, "channels_last", False) else x


# ----------------------------------------------------------------------------------------------
# GPU speed knobs (every one off on the CPU, whose numbers they would change)

@dataclass
class SpeedOptions:
    """How the stage-2 networks run. None = automatic: on for CUDA, off elsewhere.

    channels_last: NHWC convolutions (cuDNN's tensor-core layout; NCHW bf16 convs pay transposes),
        and tokens() of an NHWC map is a free view for the attention layers.
    half_weights: the U-Net, appearance encoder and autoencoder weights in the compute dtype
        (bf16 / fp16) and no autocast around them: GroupNorm / LayerNorm / SiLU then run in bf16
        instead of autocast's fp32 (which reads and writes every activation in 4 bytes, twice).
        The landmark network stays fp32 (coordinates want the precision; it is tiny).
    compile: ``torch.compile`` the U-Net (fuses the norms and elementwise ops; minutes of compile
        time per new batch shape, so off unless asked; falls back to eager if it fails).
    fused_encode: the masked and the whole crops through the encoder as one batch of 2B (a fuller
        GPU batch; on the CPU a different batch size rounds differently).
    """

    channels_last: bool | None = None
    half_weights: bool | None = None
    compile: bool = False
    fused_encode: bool | None = None


def apply_speed(model: LoadedModel, options: SpeedOptions | None = None) -> LoadedModel:
    """Set up ``model`` for speed once (idempotent per option set); returns it."""
    o = options or SpeedOptions()
    cuda = model.device.type == "cuda"
    cl = cuda if o.channels_last is None else bool(o.channels_last)
    half = (cuda and model.dtype != torch.float32) if o.half_weights is None else bool(o.half_weights)
    if model.kind != "talkformer":
        return model
    fused = cuda if o.fused_encode is None else bool(o.fused_encode)
    key = (cl, half, bool(o.compile), fused)
    if getattr(model, "speed_key", None) == key or (key == (False, False, False, False) and
                                                     getattr(model, "speed_key", None) is None):
        return model  # (the CPU default touches nothing)
    tf = model.model
    parts = [m for m in (tf.unet, tf.appearance, tf.autoencoder) if m is not None]
    for m in parts:
        m.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        if half and model.dtype != torch.float32:
            m.to(model.dtype)
    model.channels_last, model.half_weights = cl, half and model.dtype != torch.float32
    model.fused_encode = fused
    model.compiled_unet = None
    if o.compile and hasattr(torch, "compile"):
        model.compiled_unet = _safe_compile(tf.unet)
    model.speed_key = key
    return model


def _safe_compile(module: torch.nn.Module) -> Callable:
    """torch.compile'd ``module``; on the first failure (no triton, an unsupported op) it warns
    once and runs eagerly from then on."""
    import warnings

    compiled = torch.compile(module, dynamic=False)
    state = {"ok": True}

    def call(*args, **kwargs):
        if state["ok"]:
            try:
                return compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001  (any backend failure: eager is always correct)
                state["ok"] = False
                warnings.warn(f"torch.compile of the U-Net failed ({type(e).__name__}: {e}); running eagerly")
        return module(*args, **kwargs)

    return call


def _net_ctx(model: LoadedModel):
    """The context the stage-2 networks run in: autocast, or none when their weights are already
    in the compute dtype (SpeedOptions.half_weights)."""
    import contextlib

    return contextlib.nullcontext() if getattr(model, "half_weights", False) else model.autocast()


def _in(model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    """A network input: the weights' dtype when they are half, the memory format when channels_last."""
    if getattr(model, "half_weights", False):
        x = x.to(model.dtype)
    return _fmt(model, x)


# ----------------------------------------------------------------------------------------------
# batch size from free device memory

def frame_bytes(model: LoadedModel) -> int:
    """Peak activation bytes one frame needs in a sampler run (an upper estimate from the config).

    The autoencoder dominates at full resolution (encoder and decoder hold ~6 maps of ch x S x S
    at their first level); the U-Net holds its skips (~3 maps per block) and, where SDPA has no
    fused kernel, the R-Align score matrix (HW x HW per head at scale 2). fp32 norms under autocast
    count 4 bytes a value.
    """
    m = model.config.model
    ae = m.autoencoder
    S = int(m.image_size)
    ae_values = 6 * ae.ch * max(ae.ch_mult[:2]) * S * S
    u = m.unet
    s = int(m.latent_size)
    unet_values = 0
    for i, mult in enumerate(u.channel_mult):
        hw = (s >> i) ** 2
        unet_values += 3 * (2 * u.num_res_blocks + 1) * mult * u.model_channels * hw
    hw2 = (s >> 1) ** 2
    attn_values = (u.model_channels * u.channel_mult[1] // u.head_channels) * hw2 * hw2
    return int(4 * (ae_values + unet_values + attn_values))


def auto_batch_size(model: LoadedModel, free_bytes: int | None = None, fraction: float = 0.5,
                    cap: int = 256) -> int:
    """Frames per sampler run: ``CPU_BATCH`` on the CPU (its recorded numbers), else the largest
    batch whose estimated activations (``frame_bytes``) fit ``fraction`` of the device's free
    memory (``free_bytes``; default: torch.cuda.mem_get_info), a multiple of 8 (of L with
    temporal attention: whole clips), between 1 and ``cap``."""
    if free_bytes is None:
        if model.device.type != "cuda":
            return CPU_BATCH
        free_bytes = int(torch.cuda.mem_get_info(model.device)[0])
    n = int(fraction * float(free_bytes) // frame_bytes(model))
    n = max(1, min(int(cap), n))
    unit = model.sequence_length if model.config.model.temporal_attention else 8
    return max(min(n, unit), n // unit * unit)


# ----------------------------------------------------------------------------------------------
# one sampler run over a batch of frames (the serial Temp-Att chain lives here too)

def _encode_known(model: LoadedModel, crops: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (E(masked crop), E(crop)) fp32 (B, C, h, w): the sampler's fixed upper half and the
    decoder's upper half (see ``sample_latents``)."""
    tf = model.model
    with _net_ctx(model):
        x_crops = _in(model, crops_to_tensor(crops, model.device))
        if getattr(model, "fused_encode", False):  # one encoder pass of 2B crops: a fuller GPU batch
            masked = mask_lower_face(x_crops)  # as TalkFormer.encode_masked
            known, upper = tf.encode(torch.cat([masked, x_crops])).float().chunk(2)
            return known.contiguous(), upper.contiguous()
        known = tf.encode_masked(x_crops).float()  # (B, C, h, w)
        upper = tf.encode(x_crops).float()
    return known, upper  # strides as the encoder made them: the CPU numbers depend on them


def _landmark_caches(model: LoadedModel, lms: torch.Tensor, guidance: MouthGuidance | None) -> tuple[Any, Any]:
    """The step-invariant M-Align caches of the target landmarks and, with guidance, of their neutral
    twins (None without)."""
    tf = model.model
    with _net_ctx(model):
        lc = tf.prepare_landmarks(lms)
        lcn = None if guidance is None else tf.prepare_landmarks(neutral_landmarks(lms, guidance.neutral))
    return lc, lcn


def _model_fn(model: LoadedModel, lc: Any, reference: Any, mc: Any = None, num_frames: int = 1,
              lc_neutral: Any = None, guidance: MouthGuidance | None = None):
    unet = getattr(model, "compiled_unet", None) or model.model.unet

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with _net_ctx(model):
            xi = _in(model, x)
            eps = unet(xi, t, lc, reference, motion=mc, num_frames=num_frames).float()
            if guidance is not None:  # MouthGuidance: eps(L) + w (eps(L) - eps(L_neutral))
                eps_n = unet(xi, t, lc_neutral, reference, motion=mc, num_frames=num_frames).float()
                eps = eps + guidance.scale * (eps - eps_n)
            return eps

    return model_fn


@torch.no_grad()
def sample_latents(model: LoadedModel, crops: np.ndarray, landmarks_crop: np.ndarray, reference: Any,
                   steps: int, sampler: str, noise: torch.Tensor, eta: float,
                   step_callback: StepCallback | None, generator: torch.Generator | None,
                   motion: torch.Tensor | None, guidance: MouthGuidance | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch -> (x0 latents (B, C, h, w) fp32, the motion latents for the next call or None).

    The returned latents are what ``decode_latents`` decodes: the generated lower half under the
    upper half of E(crop), the template crop itself. The sampler's fixed upper half is
    E(masked crop)[:h/2] (docs/architecture.md), but that is no latent the decoder ever saw with a
    face below it: its rows near the middle carry the black mask, and the decoder's receptive field
    spreads it into the mouth (measured on real clips: decoding E(masked)[:h/2] over E(crop)[h/2:]
    loses 3.0 dB lower-face PSNR and 1.2 px LMD against decoding E(crop); docs/finetune.md).
    E(crop)[:h/2] over a perfect lower half is exactly E(crop), the autoencoder's own reconstruction.

    With temporal attention the B frames are ONE serial chain of clips of L (the last padded by
    repeating its last frame), ``motion`` (M, C, h, w) the first clip's motion frames (None: the
    video's first clip); ``FaceSampler`` runs many such chains in parallel. ``guidance``: MouthGuidance
    or None.
    """
    known, upper = _encode_known(model, crops)
    lms = torch.as_tensor(landmarks_crop, dtype=torch.float32, device=model.device)
    if not model.config.model.temporal_attention:
        return _run_independent(model, known, upper, lms, reference, steps, sampler, noise, eta,
                                step_callback, generator, guidance), None
    chain = _Chain(list(range(crops.shape[0])), motion, model.sequence_length)
    runner = _ChainRunner(model, known, upper, lms, reference, steps, sampler, noise, eta, step_callback,
                          generator, guidance)
    while not chain.done:
        runner.advance([chain])
    return chain.latents(), chain.motion


# kind -> (crops, landmarks, reference, ...) -> latents: what FaceSampler runs per batch without
# temporal attention. The IP-LAP renderer plugs in here.
_RENDERERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    "talkformer": sample_latents,
    "iplap": lambda model, *a, **k: model.model.encode(),  # IPLAPModel: a clear "no diffusion stage" error
}


def _run_independent(model, known, upper, lms, reference, steps, sampler, noise, eta, step_callback, generator,
                     guidance=None):
    from .diffusion import get_sampler

    fn = get_sampler(sampler)
    B, dev = known.shape[0], model.device
    h, w = known.shape[2:]
    mask = model.model.known_mask(h, w, device=dev).bool()  # (1, 1, h, w) upper half
    cb = None if step_callback is None else (lambda i, n, x, x0: step_callback(i, n))
    lc, lcn = _landmark_caches(model, lms, guidance)  # step-invariant M-Align K/V, once per frame
    x_T = noise.to(dev, torch.float32).expand(B, -1, -1, -1).contiguous()
    out = fn(_model_fn(model, lc, reference, lc_neutral=lcn, guidance=guidance), x_T, model.schedule, steps,
             known=known, known_mask=mask, eta=eta, callback=cb, generator=generator)
    return torch.where(mask, upper, out)


@dataclass
class _Chain:
    """One serial Temp-Att chain: frame indices (into the call's frames) in order, its motion frames."""

    frames: list[int]
    motion: torch.Tensor | None  # (M, C, h, w) or None (no motion frames: a video's first clip)
    L: int
    clip: int = 0  # clips done
    out: list = field(default_factory=list)  # x0 latents of its real frames, clip by clip

    @property
    def num_clips(self) -> int:
        return math.ceil(len(self.frames) / self.L)

    @property
    def done(self) -> bool:
        return self.clip >= self.num_clips

    def latents(self) -> torch.Tensor:
        return torch.cat(self.out)  # (len(frames), C, h, w)


def _runs(chains: list[_Chain]) -> list[list[_Chain]]:
    """The sampler runs that advance every live chain by one clip: chains without motion frames in
    one run, chains with them in another (a MotionCache covers every clip of a run or none)."""
    live = [c for c in chains if not c.done]
    return [g for g in ([c for c in live if c.motion is None], [c for c in live if c.motion is not None]) if g]


class _ChainRunner:
    """Runs one sampler run over a group of chains (one clip each), batch = len(group) x L."""

    def __init__(self, model, known, upper, lms, reference, steps, sampler, noise, eta, step_callback, generator,
                 guidance=None):
        from .diffusion import get_sampler

        self.model, self.known, self.upper, self.lms, self.reference = model, known, upper, lms, reference
        self.steps, self.fn, self.eta, self.generator = steps, get_sampler(sampler), eta, generator
        self.L = model.sequence_length
        self.M = model.config.model.unet.num_motion_frames
        h, w = known.shape[2:]
        self.mask = model.model.known_mask(h, w, device=model.device).bool()  # (1, 1, h, w) upper half
        self.x_T = noise.to(model.device, torch.float32)
        self.cb = None if step_callback is None else (lambda i, n, x, x0: step_callback(i, n))
        self.guidance = guidance

    def advance(self, chains: list[_Chain]) -> None:
        for group in _runs(chains):
            self.run(group)

    def run(self, group: list[_Chain]) -> None:
        tf, L, M = self.model.model, self.L, self.M
        sel, n_real = [], []
        for c in group:  # clip-major: L frames of chain 0, then chain 1, ...
            s = c.frames[c.clip * L:(c.clip + 1) * L]
            n_real.append(len(s))
            sel += s + [s[-1]] * (L - len(s))  # the last clip padded by repeating its last frame
        lc, lcn = _landmark_caches(self.model, self.lms[sel], self.guidance)
        with _net_ctx(self.model):
            mc = (None if group[0].motion is None
                  else tf.prepare_motion(torch.stack([c.motion for c in group]).to(self.model.device)))
        x_T = self.x_T.expand(len(sel), -1, -1, -1).contiguous()
        x0 = self.fn(_model_fn(self.model, lc, self.reference, mc, L, lcn, self.guidance), x_T, self.model.schedule,
                     self.steps, known=self.known[sel], known_mask=self.mask, eta=self.eta, callback=self.cb,
                     generator=self.generator)
        for j, c in enumerate(group):
            n = n_real[j]
            xj = x0[j * L:(j + 1) * L]
            real = c.frames[c.clip * L:c.clip * L + n]
            c.out.append(torch.where(self.mask, self.upper[real], xj[:n]))
            # the next clip's motion frames: the last M generated (fewer than M real: the first repeated)
            c.motion = xj[n - M:n] if n >= M else torch.cat([xj[:1]] * (M - n) + [xj[:n]])
            c.clip += 1


# ----------------------------------------------------------------------------------------------
# the one batch loop

def chain_segments(T: int, L: int, segment: int, overlap: int) -> list[tuple[int, int]]:
    """Frames [a, b) of each parallel chain over T frames: segments of ``segment`` frames (a
    multiple of L), every chain but the first starting ``overlap`` frames early."""
    if T <= segment:
        return [(0, T)]
    return [(max(0, s - (overlap if s else 0)), min(T, s + segment)) for s in range(0, T, segment)]


def crossfade_weights(overlap: int) -> np.ndarray:
    """(overlap,) weight of the later chain at each overlap frame: linear, never 0 or 1."""
    return np.arange(1, overlap + 1, dtype=np.float64) / (overlap + 1)


class FaceSampler:
    """Stage 2 over any number of frames, in batches; one per video (it carries the Temp-Att motion
    frames from one call to the next, and the one x_T every frame shares).

    ``batch_size``: frames per sampler run (None: all of a call's frames at once; see
    ``auto_batch_size``). Temp-Att: ``segment`` frames per parallel chain (None: enough chains to
    fill a batch, at least ``MIN_SEGMENT_CLIPS`` clips each; a call with no more frames than that
    is one serial chain). Each later chain starts ``overlap`` frames early (None: ``WARMUP_CLIPS``
    clips). By default (``crossfade`` False) those frames only warm its motion frames up and are
    dropped: the seam is a cut between two chains that both have motion context. ``crossfade``
    True blends them with the previous chain's instead (linear weights in latent space).
    ``step_callback(i, n)`` after every sampler step of every run; raise from it to stop.
    ``speed``: SpeedOptions (default: automatic, i.e. on for CUDA; nothing changes on the CPU).
    ``mouth_guidance``: the MouthGuidance scale (None = the model's, DiffusionConfig.mouth_guidance);
    a scale > 0 needs ``neutral_mouth`` (57, 2), pipeline.stage1_neutral_mouth of the template.
    """

    def __init__(self, model: LoadedModel, reference: Any, *, steps: int = 25, sampler: str = "ddim",
                 seed: int = 0, eta: float = 0.0, noise: torch.Tensor | None = None, noise_scale: float | None = None,
                 batch_size: int | None = None, segment: int | None = None, overlap: int | None = None,
                 crossfade: bool = False, step_callback: StepCallback | None = None,
                 speed: SpeedOptions | None = None, decode_refine: int | None = None,
                 mouth_guidance: float | None = None, neutral_mouth: np.ndarray | None = None):
        from .diffusion import get_sampler

        get_sampler(sampler)  # unknown names fail here
        if int(steps) < 1:
            raise InputError(f"steps {steps}: expected >= 1")
        if batch_size is not None and int(batch_size) < 1:
            raise InputError(f"batch size {batch_size}: expected >= 1")
        self.model, self.reference = apply_speed(model, speed), reference
        self.steps, self.sampler, self.eta = int(steps), sampler, float(eta)
        self.seed = int(seed)
        self.noise = initial_noise(model, seed, noise_scale) if noise is None else noise
        self.decode_refine = decode_refine_of(model, decode_refine) if model.kind == "talkformer" else 0
        self.guidance = make_guidance(model, mouth_guidance, neutral_mouth)
        self.generator = torch.Generator(device=model.device).manual_seed(self.seed) if eta > 0 else None
        self.batch_size = None if batch_size is None else int(batch_size)
        self.temporal = model.kind == "talkformer" and bool(model.config.model.temporal_attention)
        L = model.sequence_length
        if segment is not None and int(segment) < 1:
            raise InputError(f"segment {segment}: expected >= 1 frame")
        self.segment = None if segment is None else math.ceil(int(segment) / L) * L
        self.overlap = WARMUP_CLIPS * L if overlap is None else int(overlap)
        if overlap is not None and (self.overlap < 0 or (self.segment is not None and self.overlap >= self.segment)):
            raise InputError(f"overlap {self.overlap}: expected 0 <= overlap < segment ({self.segment})")
        self.crossfade = bool(crossfade)
        self.step_callback = step_callback
        self.motion: torch.Tensor | None = None  # (M, C, h, w): the last M latents generated

    # -------------------------------------------------------------- planning (pure Python)
    def _bs(self, T: int) -> int:
        return max(1, self.batch_size or T)

    def segments(self, T: int) -> list[tuple[int, int]]:
        """The parallel chains a call of T frames runs (Temp-Att), as frame ranges [a, b)."""
        L = self.model.sequence_length
        per_run = max(1, self._bs(T) // L)
        seg = self.segment
        if seg is None:
            seg = max(MIN_SEGMENT_CLIPS * L, math.ceil(math.ceil(T / per_run) / L) * L)
        return chain_segments(T, L, seg, min(self.overlap, seg - 1))

    def num_runs(self, T: int) -> int:
        """Sampler runs a call of T frames makes (each calls ``step_callback`` ``steps`` times)."""
        if T <= 0:
            return 0
        if not self.temporal:
            return math.ceil(T / self._bs(T))
        L = self.model.sequence_length
        segs = self.segments(T)
        per_run = max(1, self._bs(T) // L)
        n = 0
        for g0 in range(0, len(segs), per_run):
            clips = [math.ceil((b - a) / L) for a, b in segs[g0:g0 + per_run]]
            # the first chain of a call with motion frames runs apart from the fresh ones at clip 0
            split = 1 if (g0 == 0 and self.motion is not None and len(clips) > 1) else 0
            n += max(clips) + split
        return n

    # -------------------------------------------------------------- sampling
    @torch.no_grad()
    def latents(self, crops: np.ndarray, landmarks_crop: np.ndarray) -> torch.Tensor:
        """(T, S, S, 3) uint8 + (T, 131, 2) -> x0 latents (T, C, h, w) fp32 (Temp-Att only)."""
        T = crops.shape[0]
        model, bs, L = self.model, self._bs(crops.shape[0]), self.model.sequence_length
        enc = [_encode_known(model, crops[b0:b0 + bs]) for b0 in range(0, T, bs)]
        known = torch.cat([k for k, _ in enc]) if len(enc) > 1 else enc[0][0]
        upper = torch.cat([u for _, u in enc]) if len(enc) > 1 else enc[0][1]
        del enc
        lms = torch.as_tensor(landmarks_crop, dtype=torch.float32, device=model.device)
        runner = _ChainRunner(model, known, upper, lms, self.reference, self.steps, self.sampler, self.noise,
                              self.eta, self.step_callback, self.generator, self.guidance)
        segs = self.segments(T)
        per_run = max(1, bs // L)
        out = torch.empty_like(known)
        for g0 in range(0, len(segs), per_run):  # groups of chains: memory bounded for any length
            chains = [_Chain(list(range(a, b)), self.motion if j == 0 else None, L)
                      for j, (a, b) in enumerate(segs[g0:g0 + per_run], start=g0)]
            while not all(c.done for c in chains):
                runner.advance(chains)
            for j, c in enumerate(chains, start=g0):
                self._place(out, c.latents(), segs, j)
            if g0 + per_run >= len(segs):
                self.motion = chains[-1].motion
        return out

    def _place(self, out: torch.Tensor, z: torch.Tensor, segs: list[tuple[int, int]], j: int) -> None:
        a, b = segs[j]
        K = segs[j - 1][1] - a if j else 0  # frames shared with the previous chain
        if K <= 0:
            out[a:b] = z
            return
        if self.crossfade:
            w = torch.as_tensor(crossfade_weights(K), dtype=z.dtype, device=z.device)[:, None, None, None]
            out[a:a + K] = (1 - w) * out[a:a + K] + w * z[:K]
        out[a + K:b] = z[K:]

    @torch.no_grad()
    def __call__(self, crops: np.ndarray, landmarks_crop: np.ndarray,
                 on_faces: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
        """Generated crops (T, S, S, 3) uint8 of the frames' crops (T, S, S, 3) uint8 and target
        landmarks (T, 131, 2) (crop frame). ``on_faces(start, faces)`` after each decoded batch."""
        crops = np.asarray(crops)
        model = self.model
        S = model.crop_size
        if crops.ndim != 4 or crops.shape[1:] != (S, S, 3) or crops.dtype != np.uint8:
            raise InputError(f"sample_faces: crops must be uint8 (B, {S}, {S}, 3), got {crops.dtype} {crops.shape}")
        T = crops.shape[0]
        if np.shape(landmarks_crop) != (T, 131, 2):
            raise InputError(f"sample_faces: landmarks must be ({T}, 131, 2), got {np.shape(landmarks_crop)}")
        if T == 0:
            return np.zeros((0, S, S, 3), np.uint8)
        bs = self._bs(T)
        out = []
        if self.temporal:
            z = self.latents(crops, landmarks_crop)
            for b0 in range(0, T, bs):
                out.append(decode_faces(model, z[b0:b0 + bs], crops[b0:b0 + bs], self.decode_refine))
                if on_faces is not None:
                    on_faces(b0, out[-1])
            return np.concatenate(out)
        render = _RENDERERS[model.kind]
        for b0 in range(0, T, bs):
            z, _ = render(model, crops[b0:b0 + bs], landmarks_crop[b0:b0 + bs], self.reference, self.steps,
                          self.sampler, self.noise, self.eta, self.step_callback, self.generator, None,
                          guidance=self.guidance)
            out.append(decode_faces(model, z, crops[b0:b0 + bs], self.decode_refine))
            if on_faces is not None:
                on_faces(b0, out[-1])
        return np.concatenate(out)

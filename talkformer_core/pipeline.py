"""Video (or one image) + audio + checkpoint -> a lip-synced video: the ONE path CLI and nodes share.

Stages are plain functions over in-memory arrays (the ComfyUI stage nodes call them on IMAGE
batches); ``lipsync`` strings them together over a video file in bounded memory:

    load_model               checkpoint -> LoadedModel (kind from the metadata; errors before long work)
    analyze_frames           frames -> FaceAnalysis: mediapipe landmarks, found flags, smoothed crop
                             boxes (face.track), IP-LAP landmark boxes, lip openness, frontalness
    audio_features           audio -> AudioFeatures: per-video-frame mel windows (T, 80, 16)
    choose_reference_frame   the most open and most frontal mouth (the R-Align reference image)
    reference_landmark_sets  N full-face landmark sets spread over lip openness (IP-LAP ranks)
    complete_landmarks       stage 1 (paper §III-B) over windows of L frames -> (T, 131, 2) box frame
    encode_reference         z_r = E(reference crop) -> the step-invariant R-Align cache
    sample_faces             stage 2 (paper §III-C): masked crop -> E -> known upper half; the lower
                             half denoised with the landmark and reference caches; decode
    blend_faces              paste the generated lower face back (face.blend, Gaussian-feathered)
    lipsync                  the streaming orchestrator (two passes over the video, see below)

``lipsync`` pass 1 streams the template once at 25 fps through the face tracker (memory: the
landmarks, O(T * 478 * 2) floats, never the frames). The output length comes from the audio
(``length_mode``: pingpong (default, as IP-LAP), loop or trim: ``video.match_length_indices``).
Pass 2 walks the output in chunks: each chunk is a piece of one monotone run of template indices
(ping-pong runs forward then backward), read with ``iter_frames(start, max_frames)`` (which seeks)
and reversed when the run descends; crop, sample, decode, blend, watermark, write. At most
``chunk_size`` frames are held at once, so peak memory does not grow with the video's length.

Temporal continuity without temporal attention: one noise tensor x_T (1, C, h, w), drawn once
from ``seed``, is shared by every frame of the video, so the same face, landmarks and audio give
the same mouth in every chunk (no flicker from independent noise). With
``cfg.model.temporal_attention`` the frames go in clips of L with the 2 latents generated just
before each clip as Temp-Att motion frames (paper "+ TempAttn"), in parallel chains of segments
(sampling.FaceSampler, the one stage-2 batch loop; docs/speed.md).

Device and dtype are arguments: fp32 on CPU; bf16 / fp16 run the networks under ``torch.autocast``
with fp32 weights and an fp32 sampler state.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .analysis import (FaceAnalysis, analyze_frames, analyze_landmarks,  # stage 0 (re-exported)
                       choose_reference_frame, frontalness, reference_landmark_sets)
from .errors import AudioError, CheckpointError, InputError, TalkFormerError, VideoError
from .face import topology
from .loaded_model import LoadedModel, parse_device, parse_dtype  # LoadedModel re-exported
from .sampling import (DEFAULT_SAMPLER, DEFAULT_STEPS, FaceSampler, check_decode_refine, check_mouth_guidance,
                       check_noise_scale, crops_to_tensor, initial_noise,
                       tensor_to_crops)
from .sampling import sample_latents as _sample_latents_talkformer  # noqa: F401  (the name tests and tools use)

FPS = 25.0  # the model's frame rate (IP-LAP / paper: video resampled to 25 fps)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}

ProgressFn = Callable[[int, int, "np.ndarray | None"], None]


# ----------------------------------------------------------------------------------------------
# model loading (dispatch by checkpoint kind)

def _load_talkformer(path: Path, meta: dict[str, str], device: torch.device, dtype: torch.dtype,
                     vae: str | os.PathLike | None, use_ema: bool) -> LoadedModel:
    from .diffusion import NoiseSchedule
    from .models.checkpoint import checkpoint_config, load_model_state, load_safetensors, resolve_external_vae
    from .models.model import TalkFormer

    cfg = checkpoint_config(meta, path)
    ext = resolve_external_vae(meta, vae, checkpoint_path=path)  # before reading any tensor
    tensors = load_safetensors(path)
    if use_ema and any(k.startswith("ema.") for k in tensors):
        # train/loop.py stores the EMA shadow as "ema.<module>.<key>": it replaces the live weights
        tensors = {**tensors, **{k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}}
    try:
        model = TalkFormer(cfg)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its config does not build a TalkFormer model ({e})") from None
    load_model_state(model, tensors, "", source=path, allow_missing=("autoencoder.",) if ext else ())
    if ext is not None:
        model.autoencoder.load_ldm_state_dict(ext.state_dict, source=ext.path)
        model.autoencoder.scale_factor = float(ext.scale_factor)
    del tensors
    model.to(device).eval().requires_grad_(False)
    return LoadedModel("talkformer", cfg, model, NoiseSchedule(cfg.model.diffusion), device, dtype,
                       Path(path), dict(meta))


def _load_iplap(path: Path, meta: dict[str, str], device: torch.device, dtype: torch.dtype,
                vae: str | os.PathLike | None, use_ema: bool) -> LoadedModel:
    from .iplap_pipeline import load_iplap_model  # IP-LAP's public weights (convert.py)

    return load_iplap_model(path, meta, device, dtype, vae, use_ema)


# kind -> loader. The IP-LAP renderer ("iplap", convert.py) plugs in here, in _FRAME_RENDERERS below and in
# sampling._RENDERERS.
_LOADERS: dict[str, Callable[..., LoadedModel]] = {"talkformer": _load_talkformer, "iplap": _load_iplap}


def load_model(path: str | os.PathLike, device: torch.device | str | None = "cpu",
               dtype: torch.dtype | str | None = None, vae: str | os.PathLike | None = None,
               use_ema: bool = True) -> LoadedModel:
    """A checkpoint -> LoadedModel on ``device``; every check (format, kind, config, each tensor's
    shape, the external VAE's hash) happens here, before any long work. CheckpointError names the
    file and what was expected. ``use_ema``: prefer the EMA weights when the file has them."""
    from .models.checkpoint import DemoCheckpointWarning, purpose_warning, read_metadata

    p = Path(path)
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    meta = read_metadata(p)
    why = purpose_warning(meta)  # e.g. the demo checkpoint on a real person: say so before the work
    if why is not None:
        warnings.warn(f"{p.name}: {why}", DemoCheckpointWarning, stacklevel=2)
    kind = meta["kind"]
    loader = _LOADERS.get(kind)
    if loader is None:
        raise CheckpointError(f"{p}: a checkpoint of kind {kind!r}; the lip-sync pipeline runs kinds "
                              f"{sorted(_LOADERS)}")
    return loader(p, meta, dev, dt, vae, use_ema)


# ----------------------------------------------------------------------------------------------
# audio

@dataclass
class AudioFeatures:
    windows: np.ndarray  # (T, 80, 16) float32 mel windows, one per video frame
    num_frames: int  # T
    fps: float
    waveform: np.ndarray | None = None  # (C, n) float32 at ``sample_rate``: what gets muxed
    sample_rate: int = 16000
    source: str = "audio"

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


MIN_AUDIO_FRAMES = 5  # one stage-1 window (IP-LAP's T = 5 frames): less audio cannot drive a lip-sync
MIN_AUDIO_SECONDS = MIN_AUDIO_FRAMES / 25.0  # 0.2 s: shorter audio is an AudioError
SHORT_AUDIO_SECONDS = 0.5  # shorter (but >= the minimum) works, with a warning naming the output length


def audio_features(audio: str | os.PathLike | np.ndarray | tuple[Any, int], fps: float = FPS,
                   num_frames: int | None = None) -> AudioFeatures:
    """Audio -> per-video-frame mel windows (IP-LAP's, ``audio.mel``).

    ``audio``: a file path (any audio file, or a video's audio track), a (waveform, sample_rate)
    pair (shapes as ``audio.to_16k_mono``), or a 16 kHz mono float array. T defaults to
    ceil(duration * fps). AudioError for a missing / unreadable file, no audio stream, audio shorter
    than MIN_AUDIO_SECONDS; a warning below SHORT_AUDIO_SECONDS.
    The original waveform (at most 2 channels, at its own rate) is kept for muxing.
    """
    from .audio import audio_windows, num_video_frames, read_audio, to_16k_mono

    if isinstance(audio, (str, os.PathLike)):
        source = str(audio)
        data, sr = read_audio(audio)  # (C, n), errors name the file
        if not np.all(np.isfinite(data)):
            raise AudioError(f"{source}: audio contains NaN or infinite samples")
    elif isinstance(audio, tuple) and len(audio) == 2:
        source = "audio waveform"
        wav, sr = audio
        # to (C, n) for muxing, by the rules of audio.to_16k_mono (which validates it below)
        from .audio.io import _to_float32

        data = _to_float32(np.asarray(wav.detach().cpu().float().numpy() if hasattr(wav, "detach") else wav))
        if data.ndim == 3:
            data = data[0]
        if data.ndim == 2 and data.shape[0] > 64 and data.shape[1] <= 8:
            data = data.T
        if data.ndim == 1:
            data = data[None]
    else:
        source = "audio waveform"
        data, sr = np.asarray(audio, dtype=np.float32).reshape(1, -1), 16000
    try:
        wav16 = to_16k_mono(data, sr)
    except AudioError as e:
        raise AudioError(str(e).replace("waveform", source, 1)) from None
    n = num_video_frames(len(wav16), fps)
    if n <= 0:
        raise AudioError(f"{source}: zero-length audio")
    seconds = len(wav16) / 16000.0
    if seconds < MIN_AUDIO_SECONDS - 1e-9:
        raise AudioError(f"{source}: {seconds:.3f} s of audio is too short; expected at least {MIN_AUDIO_SECONDS} s "
                         f"(stage 1 predicts the lips of {MIN_AUDIO_FRAMES} frames at a time)")
    if seconds < SHORT_AUDIO_SECONDS:
        warnings.warn(f"{source}: only {seconds:.2f} s of audio: the output has {n} frames", stacklevel=2)
    if num_frames is None:
        num_frames = n
    _, windows = audio_windows(wav16, num_frames, fps)
    mux = data if data.shape[0] <= 2 else data.mean(axis=0, keepdims=True)
    return AudioFeatures(windows, int(num_frames), float(fps), np.ascontiguousarray(mux, dtype=np.float32),
                         int(sr), source)


# ----------------------------------------------------------------------------------------------
# stage 1: landmark completion

@torch.no_grad()
def complete_landmarks(model: LoadedModel, analysis: FaceAnalysis, audio: AudioFeatures,
                       frame_indices: Sequence[int] | np.ndarray, references: np.ndarray | None = None,
                       batch_windows: int = 64) -> np.ndarray:
    """Target landmarks of every output frame, (T, 131, 2) in each template frame's box frame:
    the box of the config's ``landmark_box`` (``FaceAnalysis.stage1_boxes``; pass the same to
    ``landmarks_to_crop``). Pose and references are given in that box too, as in training.

    Output frame k shows template frame ``frame_indices[k]`` and hears mel window k. The output is
    cut into NON-overlapping windows of the config's L frames (the L of batched sequential training,
    paper §III-B); the last window, when T is not a multiple of L, is padded by repeating its last
    frame (mel and pose) and the padded predictions are dropped. Windows run in batches. The pose
    74 points are copied through unchanged; jaw 17 and lips 40 are predicted (with the config's
    ``anchor_mouth_x``, then slid sideways onto the template frame's detected lips' mean x). A person
    model whose landmark module holds a fitted mouth model (``LandmarkConfig.mouth_model``,
    models.mouth_model) takes jaw and lips from it, over the whole sequence at once.
    """
    from .models.landmark_completion import LandmarkCompletion  # noqa: F401  (type of model.landmark)

    idx = np.asarray(frame_indices, dtype=np.int64)
    T = len(idx)
    if audio.num_frames < T:
        raise InputError(f"{audio.source}: {audio.num_frames} audio frames for {T} output frames")
    L = model.sequence_length
    box = model.config.model.landmark_box
    refs = reference_landmark_sets(analysis, model.num_references, box) if references is None else references
    template = analysis.points_box(idx, box)  # (T, 131, 2) the template frames' detected landmarks
    pose_all = template[:, list(topology.POSE_POS)]  # (T, 74, 2)
    mels_all = audio.windows[:T]  # (T, 80, 16)
    n_win = math.ceil(T / L)
    pad = n_win * L - T
    if pad:
        pose_all = np.concatenate([pose_all, np.repeat(pose_all[-1:], pad, 0)])
        mels_all = np.concatenate([mels_all, np.repeat(mels_all[-1:], pad, 0)])
    dev = model.device
    net = model.landmark
    mouth = getattr(net, "mouth", None)
    ref_t = torch.as_tensor(refs, dtype=torch.float32, device=dev)[None]  # (1, N, 131, 2)
    out = np.empty((n_win * L, 131, 2), np.float32)
    blend = float(getattr(net.cfg, "mouth_blend", 1.0)) if mouth is not None and mouth.is_fitted else 0.0
    if blend >= 1.0:  # the person's mouth model alone: a whole sequence at once, no transformer
        n_win = 0
    for w0 in range(0, n_win, batch_windows):
        w1 = min(n_win, w0 + batch_windows)
        B = w1 - w0
        sl = slice(w0 * L, w1 * L)
        mels = torch.as_tensor(mels_all[sl], device=dev).view(B, L, 1, 80, 16)
        pose = torch.as_tensor(pose_all[sl], device=dev).view(B, L, 74, 2)
        # fp32: 13.7 M parameters, negligible next to the U-Net, and coordinates want the precision
        pred = net.complete(mels, pose, ref_t.expand(B, -1, -1, -1))  # (B, L, 131, 2)
        out[sl] = pred.reshape(B * L, 131, 2).float().cpu().numpy()
    out = out[:T]
    if blend > 0.0:
        content = mouth(audio.windows[:T]).cpu().numpy()  # (T, 57, 2)
        cp = list(topology.CONTENT_POS)
        if blend >= 1.0:
            out[:] = template
            out[:, cp] = content
        else:
            out[:, cp] = blend * content + (1.0 - blend) * out[:, cp]
    if model.config.model.anchor_mouth_x:
        lips, content = list(topology.LIP_POS), list(topology.CONTENT_POS)
        dx = template[:, lips, 0].mean(1) - out[:, lips, 0].mean(1)  # (T,)
        out[:, content, 0] += dx[:, None]
    return out


def landmarks_to_crop(analysis: FaceAnalysis, landmarks_box: np.ndarray,
                      frame_indices: Sequence[int] | np.ndarray, box: str | LoadedModel = "stable") -> np.ndarray:
    """Box-frame landmarks of output frames (T, 131, 2) -> the crop frame [0, 1] of the template
    frame each shows (what M-Align sees; face.topology.box_to_crop). ``box``: the box frame they are
    in, the model's ``landmark_box`` (a LoadedModel gives its own; default "stable", the configs'
    default). The stable box does not grow with the template's jaw, so the mouth keeps the opening
    stage 1 gave it."""
    idx = np.asarray(frame_indices, dtype=np.int64)
    if isinstance(box, LoadedModel):
        box = box.config.model.landmark_box
    return topology.box_to_crop(landmarks_box.astype(np.float64), analysis.stage1_boxes(box)[idx].astype(np.float64),
                                analysis.boxes[idx]).astype(np.float32)


def stage1_neutral_mouth(model: LoadedModel, analysis: FaceAnalysis,
                         frame_indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """The unconditional mouth of mouth guidance (sampling.MouthGuidance), (57, 2) crop frame about its
    centroid: stage 1's own average mouth, so that target minus neutral is only what stage 1 asked
    beyond it. The fitted mouth model's jaw and lips at the person's mean opening (its training
    frames' mean), else the template's tracked mean, in the box frame; placed on the template frames'
    poses (``landmarks_to_crop``, as stage 1's output is) and averaged (sampling.neutral_mouth). Not the
    template's tracked mouths in the crop frame: their shape differs from stage 1's (face_4's held-out
    template: lips 6 % narrower, jaw 7 % longer), and guidance amplified that (docs/dubbing.md)."""
    from .sampling import neutral_mouth

    box = model.config.model.landmark_box
    idx = np.arange(analysis.num_frames) if frame_indices is None else np.asarray(frame_indices, np.int64)
    idx = idx[analysis.found[idx]]
    if len(idx) == 0:
        raise InputError("mouth guidance: no template frame has a face to place the neutral mouth on")
    content = list(topology.CONTENT_POS)
    mouth = getattr(getattr(model, "landmark", None), "mouth", None)
    if mouth is not None and mouth.is_fitted:
        mean = mouth.mean_content()
    else:
        mean = analysis.points_box(np.flatnonzero(analysis.found), box)[:, content].mean(0)
    lm_box = analysis.points_box(idx, box).copy()
    lm_box[:, content] = mean
    return neutral_mouth(landmarks_to_crop(analysis, lm_box, idx, box))


def guidance_neutral_mouth(model: LoadedModel, analysis: FaceAnalysis, frame_indices: Any,
                           scale: float | None) -> np.ndarray | None:
    """``stage1_neutral_mouth`` when mouth guidance is on (``scale``, else the model's, > 0, on the
    diffusion renderer), else None: what FaceSampler's ``neutral_mouth`` takes."""
    from .sampling import mouth_guidance_of

    on = model.kind == "talkformer" and mouth_guidance_of(model, scale) > 0
    return stage1_neutral_mouth(model, analysis, frame_indices) if on else None


# ----------------------------------------------------------------------------------------------
# stage 2: diffusion inpainting of the lower face

@torch.no_grad()
def encode_reference(model: LoadedModel, crop: np.ndarray) -> Any:
    """The reference face crop (S, S, 3) uint8 (whole face, unmasked) -> the U-Net's ReferenceCache:
    z_r = E(crop), its appearance features and every R-Align block's K/V (once per video)."""
    S = model.crop_size
    if crop.shape != (S, S, 3):
        raise InputError(f"reference crop: expected ({S}, {S}, 3) uint8, got {crop.shape}")
    with model.autocast():
        z_r = model.model.encode(crops_to_tensor(crop[None], model.device))  # (1, C, h, w)
        return model.model.prepare_reference(z_r)


def _iplap_frame_renderer() -> Any:
    from .iplap_pipeline import IPLAPFrameRenderer

    return IPLAPFrameRenderer


# kind -> (a factory of) a renderer of whole frames that lipsync calls per chunk instead of the
# latent sampler: cls.check(model) before long work; cls(model, analysis, audio, plan, read_frame,
# options)(frames, k0, k1, found, step_callback) -> (frames, preview face, watermark boxes).
_FRAME_RENDERERS: dict[str, Callable[[], Any]] = {"iplap": _iplap_frame_renderer}


@torch.no_grad()
def sample_faces(model: LoadedModel, crops: np.ndarray, landmarks_crop: np.ndarray, reference: Any,
                 steps: int = 25, sampler: str = "ddim", seed: int = 0, eta: float = 0.0,
                 callback: Callable[[int, int], None] | None = None, noise: torch.Tensor | None = None,
                 batch_size: int | None = None, motion: torch.Tensor | None = None, noise_scale: float | None = None,
                 decode_refine: int | None = None, mouth_guidance: float | None = None,
                 neutral_mouth: np.ndarray | None = None, **chains: Any) -> np.ndarray:
    """Generate the lower face of each crop. crops (B, S, S, 3) uint8 (the template's face crops),
    landmarks_crop (B, 131, 2) target landmarks in the crop frame, reference: ``encode_reference``'s
    cache -> (B, S, S, 3) uint8 generated crops (upper half: the autoencoder's reconstruction).

    The upper latent half is E(masked crop)[:h/2], fixed by the sampler at every step (the U-Net contract).
    ``noise`` (1, C, h, w): the shared x_T (default: drawn from ``seed`` and scaled by ``noise_scale``,
    default the model's; every frame gets the same, so identical inputs give identical faces). ``callback(step, num_steps)`` runs after every
    sampler step; raise from it to stop. ``batch_size`` splits B (default: all at once).
    ``decode_refine``: re-encoding passes of the decode (sampling.decode_faces; None = the model's).
    ``mouth_guidance``: the MouthGuidance scale (None = the model's); > 0 needs ``neutral_mouth``
    (``stage1_neutral_mouth``). With
    temporal attention: ``motion`` the first clip's motion frames, ``chains`` (segment, overlap,
    crossfade) the parallel chains (sampling.FaceSampler, the one batch loop this calls).
    """
    fs = FaceSampler(model, reference, steps=steps, sampler=sampler, seed=seed, eta=eta, noise=noise,
                     noise_scale=noise_scale, batch_size=batch_size, step_callback=callback,
                     decode_refine=decode_refine, mouth_guidance=mouth_guidance, neutral_mouth=neutral_mouth,
                     **chains)
    fs.motion = motion
    return fs(crops, landmarks_crop)


def blend_faces(frames: Sequence[np.ndarray], crops: np.ndarray, boxes: np.ndarray, found: np.ndarray,
                feather: int | None = None) -> list[np.ndarray]:
    """Paste each generated crop's lower face into its frame (Gaussian-feathered alpha,
    face.blend.paste_back). Frames with found False come back unchanged (copies); pixels outside
    each crop box are bit-identical to the input."""
    from .face.blend import lower_face_mask, paste_back

    out = []
    mask = None
    for i, frame in enumerate(frames):
        if not bool(found[i]):
            out.append(np.array(frame, copy=True))
            continue
        if mask is None:
            mask = lower_face_mask(crops.shape[1], feather)
        out.append(paste_back(frame, crops[i], boxes[i], mask=mask))
    return out


# ----------------------------------------------------------------------------------------------
# the streaming orchestrator

@dataclass
class SyncOptions:
    steps: int = DEFAULT_STEPS  # sampling.DEFAULT_STEPS / DEFAULT_SAMPLER (docs/speed.md, fast sampler)
    sampler: str = DEFAULT_SAMPLER
    eta: float = 0.0
    seed: int = 0
    noise_scale: float | None = None  # x_T's scale; None = the model's (DiffusionConfig.noise_scale)
    decode_refine: int | None = None  # re-encoding passes of the decode; None = the model's (DiffusionConfig.decode_refine)
    mouth_guidance: float | None = None  # MouthGuidance's scale; None = the model's (DiffusionConfig.mouth_guidance)
    reference_frame: int | None = None  # template frame (25 fps) for the R-Align reference; None = auto
    face_index: int | None = None  # None = largest face
    length_mode: str = "pingpong"  # pingpong | loop | trim
    feather: int | None = None  # crop pixels; None = face.blend.default_feather
    batch_size: int | None = None  # frames denoised together; None = sampling.auto_batch_size (8 on the CPU)
    chunk_size: int | None = None  # frames held in memory at once in pass 2; None = auto_chunk_size
    watermark: bool = True  # invisible rivaGan mark in the face box (provenance.py)
    crf: int = 18
    num_references: int | None = None  # N; None = the config's
    iplap_references: int = 25  # IP-LAP checkpoints: the renderer's reference frames (IP-LAP: 25)
    prefetch: bool | None = None  # read the next chunk's frames while this one samples; None = on a GPU
    c2pa_cert: str | None = None  # PEM certificate chain: sign C2PA content credentials (content_credentials.py)
    c2pa_key: str | None = None  # its PEM private key


@dataclass
class SyncResult:
    out_path: Path
    num_frames: int  # output frames (25 fps)
    template_frames: int
    num_faceless: int  # output frames passed through unchanged (no face in their template frame)
    reference_frame: int
    fps: float
    seconds: float
    warnings: list[str] = field(default_factory=list)


def _is_image(video: Any) -> bool:
    return isinstance(video, np.ndarray) or (isinstance(video, (str, os.PathLike))
                                             and Path(video).suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB; InputError naming the file if unreadable."""
    import cv2

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: image file not found")
    img = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(f"{p}: not a readable image (expected png, jpg, bmp, webp or tiff)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _check_image_array(a: Any) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise InputError(f"template image: expected uint8 (H, W, 3) RGB, got {a.dtype} {a.shape}")
    return a


CPU_CHUNK = 32  # lipsync's frames per chunk on the CPU (every recorded CPU number used it)


def auto_chunk_size(model: LoadedModel, batch_size: int, frame_size: tuple[int, int],
                    frame_budget: int = 2 ** 30) -> int:
    """Frames lipsync holds per chunk: ``CPU_CHUNK`` on the CPU; on a GPU enough for full sampler
    batches (4 batches with temporal attention, so its parallel chains fill a batch,
    sampling.FaceSampler), at most ``frame_budget`` bytes of decoded frames, at least CPU_CHUNK."""
    if model.device.type == "cpu":
        return CPU_CHUNK
    temporal = model.kind == "talkformer" and bool(model.config.model.temporal_attention)
    want = int(batch_size) * (4 if temporal else 1)
    h, w = frame_size
    return max(CPU_CHUNK, min(want, int(frame_budget // max(1, 3 * int(h) * int(w)))))


def runs(plan: np.ndarray, max_len: int) -> list[tuple[int, int, int]]:
    """Cut an index plan into pieces of monotone runs: (output start, template start, step) with
    step +1 (forward), -1 (backward) or 0 (one frame repeated), each at most ``max_len`` long.
    -> list of (k0, k1, step): output indices [k0, k1)."""
    out = []
    k, n = 0, len(plan)
    while k < n:
        j = k + 1
        step = 0 if j >= n else int(plan[j] - plan[k])
        if step not in (-1, 0, 1):
            step = 0
        while j < n and j - k < max_len and int(plan[j] - plan[j - 1]) == step:
            j += 1
        out.append((k, j, step))
        k = j
    return out


def prefetched(fn: Callable[[Any], Any], items: Sequence[Any], enabled: bool = True) -> Iterator[Any]:
    """fn(item) for each item, in order; with ``enabled`` the next item's fn runs in a background
    thread while the caller works on the current one (video decoding overlaps GPU sampling).
    At most two results are held; an exception in fn is raised where its result is taken."""
    if not enabled:
        for it in items:
            yield fn(it)
        return
    from concurrent.futures import ThreadPoolExecutor

    ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="talkformer-prefetch")
    try:
        nxt = ex.submit(fn, items[0]) if len(items) else None
        for i in range(len(items)):
            cur = nxt
            nxt = ex.submit(fn, items[i + 1]) if i + 1 < len(items) else None
            yield cur.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


class _Finisher:
    """Runs each chunk's CPU tail (blend, watermark, write) in one background thread while the next
    chunk samples, in order, one chunk behind at most; ``enabled`` False runs it inline. ``close``
    waits for the running task (call it before the writer closes, also on errors)."""

    def __init__(self, enabled: bool):
        self.ex = None
        if enabled:
            from concurrent.futures import ThreadPoolExecutor

            self.ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="talkformer-finish")
        self.pending = None

    def submit(self, fn: Callable[[], None]) -> None:
        self.wait()
        if self.ex is None:
            fn()
        else:
            self.pending = self.ex.submit(fn)

    def wait(self) -> None:
        if self.pending is not None:
            p, self.pending = self.pending, None
            p.result()  # re-raises the task's exception here

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=True)


def _chunk_frames(video: Any, image: np.ndarray | None, plan: np.ndarray, chunk: tuple[int, int, int]) -> list:
    """The template frames of output frames [k0, k1) of one monotone run (``runs``), in output order."""
    k0, k1, step = chunk
    t_idx = plan[k0:k1]
    lo = int(t_idx.min())
    frames = _read_template(video, image, lo, int(t_idx.max()) - lo + 1)
    if step < 0:
        frames = frames[::-1]
    elif step == 0:
        frames = frames[:1] * (k1 - k0)
    return frames


def _read_template(video: Any, image: np.ndarray | None, t_lo: int, count: int) -> list[np.ndarray]:
    """Template frames t_lo .. t_lo + count - 1 (25 fps), streamed from the file."""
    from .video import iter_frames

    if image is not None:
        return [image] * count
    frames = list(iter_frames(video, FPS, start=t_lo, max_frames=count))
    if len(frames) != count:
        raise VideoError(f"{video}: expected frames {t_lo}..{t_lo + count - 1} at 25 fps, the file gave "
                         f"{len(frames)} (it changed or is truncated)")
    return frames


def lipsync(video: str | os.PathLike | np.ndarray, audio: Any, model: LoadedModel | str | os.PathLike,
            out_path: str | os.PathLike, options: SyncOptions | None = None,
            callback: ProgressFn | None = None, device: Any = "cpu", dtype: Any = None,
            vae: str | os.PathLike | None = None) -> SyncResult:
    """Lip-sync ``video`` (a video file, an image file, or an image array (H, W, 3) uint8) to
    ``audio`` (a file or (waveform, sample_rate)) and write ``out_path`` (mp4, h264 + AAC).

    ``model``: a LoadedModel, or a checkpoint path (loaded on ``device`` / ``dtype`` with ``vae``).
    ``callback(done_frames, total_frames, preview_crop_or_None)``: after each chunk (with its last
    generated crop) and after each sampler step (preview None); raise from it to stop the run
    (out_path is then left untouched: the writer is atomic). Every input is checked before the
    long work: VideoError / AudioError / CheckpointError / FaceError / InputError name the input.
    """
    from .diffusion import get_sampler
    from .face.blend import lower_face_mask
    from .face.track import crop_frame
    from .provenance import Watermarker, generator_tag
    from .video import PLAN_MODES, VideoWriter, iter_frames, match_length_indices, probe_video

    t_start = time.time()
    opt = dataclasses.replace(options) if options is not None else SyncOptions()
    out_path = Path(out_path)
    # ---- checks, cheapest first, before any long work
    if opt.length_mode not in PLAN_MODES:
        raise InputError(f"length mode {opt.length_mode!r}: expected one of {PLAN_MODES}")
    get_sampler(opt.sampler)
    if int(opt.steps) < 1:
        raise InputError(f"steps {opt.steps}: expected >= 1")
    check_noise_scale(opt.noise_scale)
    check_decode_refine(opt.decode_refine)
    check_mouth_guidance(opt.mouth_guidance)
    if (opt.batch_size is not None and opt.batch_size < 1) or (opt.chunk_size is not None and opt.chunk_size < 1):
        raise InputError(f"batch_size and chunk_size must be >= 1, got {opt.batch_size}, {opt.chunk_size}")
    if out_path.suffix.lower() not in ("", ".mp4", ".m4v", ".mov", ".mkv"):
        raise InputError(f"{out_path}: expected an .mp4 output path")
    from .paths import check_output_file

    check_output_file(out_path, "output")  # unwritable folder, a file as parent, a full disk: now
    image: np.ndarray | None = None
    if _is_image(video):
        image = _check_image_array(video if isinstance(video, np.ndarray) else read_image(video))
        source = "template image" if isinstance(video, np.ndarray) else str(video)
    else:
        probe_video(video)  # VideoError for missing / corrupt / truncated / no video stream
        source = str(video)
        if out_path.exists() and out_path.resolve() == Path(video).resolve():
            raise InputError(f"{out_path}: the output would overwrite the template video; choose another path")
    aud = audio_features(audio, FPS)
    if not isinstance(model, LoadedModel):
        model = load_model(model, device=device, dtype=dtype, vae=vae)
    frame_renderer = _FRAME_RENDERERS[model.kind]() if model.kind in _FRAME_RENDERERS else None
    if frame_renderer is not None:
        frame_renderer.check(model)  # e.g. an IP-LAP file converted without its renderer
    S = model.crop_size
    lower_face_mask(S, opt.feather)  # checks the feather width
    marker = Watermarker() if opt.watermark else None
    if marker is not None:
        marker.load()  # onnxruntime missing -> a clear error now, not after the sampling
    from .content_credentials import load_credentials

    credentials = load_credentials(opt.c2pa_cert, opt.c2pa_key)  # bad cert / key: an error now
    if credentials is not None and out_path.suffix.lower() not in ("", ".mp4", ".m4v"):
        raise InputError(f"{out_path}: C2PA content credentials are signed into .mp4 files only")
    warn: list[str] = []

    # ---- pass 1: face analysis (streamed; landmarks only)
    if image is not None:
        analysis = analyze_frames([image], S, opt.face_index, source=source)
    else:
        analysis = analyze_frames(iter_frames(video, FPS), S, opt.face_index, source=source)
    n_video = analysis.num_frames
    ref_idx = choose_reference_frame(analysis, opt.reference_frame)

    # ---- the output plan and stage 1 for every output frame (O(T * 131 * 2) floats)
    plan = match_length_indices(n_video, aud.num_frames, opt.length_mode)  # template index per output frame
    T = len(plan)
    if frame_renderer is None:  # (a frame renderer runs stage 1 itself, per window)
        n_refs = opt.num_references or model.num_references
        refs = reference_landmark_sets(analysis, n_refs, model.config.model.landmark_box)
        lm_box = complete_landmarks(model, analysis, aud, plan, references=refs)  # (T, 131, 2)
        lm_crop = landmarks_to_crop(analysis, lm_box, plan, model)  # (T, 131, 2)
    found_out = analysis.found[plan]
    n_faceless = int((~found_out).sum())
    if n_faceless:
        msg = (f"{source}: no face in {analysis.num_missing} of {n_video} template frames; "
               f"{n_faceless} of {T} output frames pass through unchanged")
        warn.append(msg)
        warnings.warn(msg, stacklevel=2)

    if frame_renderer is None:
        ref_frame = image if image is not None else _read_template(video, None, ref_idx, 1)[0]
        reference = encode_reference(model, crop_frame(ref_frame, analysis.boxes[ref_idx], S))
        del ref_frame
        from .sampling import auto_batch_size

        bs = opt.batch_size or auto_batch_size(model)
        neutral = guidance_neutral_mouth(model, analysis, plan, opt.mouth_guidance)
        face_sampler = FaceSampler(model, reference, steps=int(opt.steps), sampler=opt.sampler, seed=opt.seed,
                                   eta=float(opt.eta), noise_scale=opt.noise_scale, batch_size=bs,
                                   step_callback=lambda i, n: step_cb(i, n), decode_refine=opt.decode_refine,
                                   mouth_guidance=opt.mouth_guidance, neutral_mouth=neutral)
    else:  # whole-frame renderer (IP-LAP): reads its reference frames once, here
        render_frames = frame_renderer(model, analysis, aud, plan,
                                       lambda t: _read_template(video, image, int(t), 1)[0], opt)

    done = 0

    def step_cb(i: int, n: int) -> None:
        if callback is not None:
            callback(done, T, None)

    # ---- pass 2: chunks of monotone runs; crop, sample, decode, blend, mark, write
    metadata = {"comment": generator_tag(marker is not None)}  # the tag says whether frames are marked
    sign = credentials.finalizer(out_path.name) if credentials is not None else None
    with VideoWriter(out_path, FPS, audio=aud.waveform, audio_rate=aud.sample_rate, crf=opt.crf,
                     metadata=metadata, finalize=sign) as writer:
        chunks = runs(plan, opt.chunk_size or auto_chunk_size(model, bs if frame_renderer is None else 1,
                                                               analysis.frame_size))
        ahead = model.device.type != "cpu" if opt.prefetch is None else bool(opt.prefetch)
        # with ``ahead`` the CPU work around the sampler overlaps it: the next chunk's frames are
        # decoded (prefetched) and the previous chunk blended, marked and written (_Finisher)
        finisher = _Finisher(ahead)

        def finish(out_frames: Any, mark_boxes: Any, found: np.ndarray, blend: tuple | None = None) -> None:
            if blend is not None:
                out_frames = blend_faces(*blend, found, opt.feather)
            if marker is not None:  # batched through the ONNX encoder (provenance.MARK_BATCH)
                out_frames = marker.embed_regions(out_frames, mark_boxes, found)
            for f in out_frames:
                writer.write(f)

        try:
            for (k0, k1, step), frames in zip(chunks, prefetched(lambda c: _chunk_frames(video, image, plan, c),
                                                                 chunks, ahead)):
                t_idx = plan[k0:k1]
                found = found_out[k0:k1]
                if frame_renderer is not None:
                    def frame_cb(i: int, n: int, k0: int = k0, k1: int = k1) -> None:  # batch i of n: per-frame progress
                        if callback is not None:
                            callback(done + (k1 - k0) * i // max(n, 1), T, None)

                    out_frames, preview, mark_boxes = render_frames(frames, k0, k1, found, frame_cb)
                    finisher.submit(lambda o=out_frames, b=mark_boxes, f=found: finish(o, b, f))
                else:
                    boxes = analysis.boxes[t_idx]
                    sel = np.flatnonzero(found)
                    gen_crops = np.zeros((k1 - k0, S, S, 3), np.uint8)
                    if len(sel):  # the chunk's faces in one call: batches (and Temp-Att chains) inside
                        crops = np.stack([crop_frame(frames[i], boxes[i], S) for i in sel])
                        gen_crops[sel] = face_sampler(crops, lm_crop[k0 + sel])
                    preview = gen_crops[sel[-1]] if len(sel) else None
                    finisher.submit(lambda b=boxes, f=found, blend=(frames, gen_crops, boxes): finish(None, b, f, blend))
                del frames
                done = k1
                if callback is not None:
                    callback(done, T, preview)
            finisher.wait()
        finally:
            finisher.close()  # before the writer closes (or aborts on an error)
    return SyncResult(out_path, T, n_video, n_faceless, ref_idx, FPS, time.time() - t_start, warn)


__all__ = [
    "FPS", "LoadedModel", "load_model", "parse_device", "FaceAnalysis", "analyze_frames", "analyze_landmarks",
    "frontalness", "choose_reference_frame", "reference_landmark_sets", "AudioFeatures", "audio_features",
    "complete_landmarks", "landmarks_to_crop", "encode_reference", "initial_noise", "sample_faces",
    "blend_faces", "SyncOptions", "SyncResult", "lipsync", "runs", "read_image", "crops_to_tensor",
    "tensor_to_crops", "TalkFormerError",
]

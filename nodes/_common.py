"""Shared plumbing of the node pack: ComfyUI types <-> core types, progress, interrupt, models folder.

Everything ComfyUI-specific is reached through ``comfy_module`` and is optional: inside a running
ComfyUI the host has already imported ``comfy.*`` and ``folder_paths``, and we use them; in plain
Python (tests, scripts) they are absent and the nodes run the same, without a progress bar. We
never import ComfyUI ourselves: importing ``comfy.model_management`` on a CPU-only torch without
``--cpu`` already set raises, and a node must not start a second ComfyUI by accident.

Light at import time: torch, numpy and talkformer_core are imported inside the functions.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any

CATEGORY = "TalkFormer"
MODEL_FOLDER = "talkformer"  # models/talkformer/, folder_paths name
MODEL_EXTENSIONS = {".safetensors"}  # safetensors only: nothing is unpickled
PREVIEW_MAX = 512  # longest side of a progress preview (ComfyUI's --preview-size default)
# Custom types that flow between our nodes (names shown on the sockets).
TALKFORMER_MODEL = "TALKFORMER_MODEL"
TALKFORMER_AUDIO = "TALKFORMER_AUDIO"
TALKFORMER_FACE_TRACK = "TALKFORMER_FACE_TRACK"
TALKFORMER_LANDMARKS = "TALKFORMER_LANDMARKS"
TALKFORMER_REFERENCE = "TALKFORMER_REFERENCE"


# ---------------------------------------------------------------------------------------------
# ComfyUI, when it is the host

def comfy_module(name: str) -> Any | None:
    """The ComfyUI module ``name`` (e.g. "comfy.utils", "folder_paths") when ComfyUI is running in
    this process, else None. 'Running' = the host has imported comfy.model_management already."""
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    if "comfy.model_management" not in sys.modules:
        return None
    try:
        return importlib.import_module(name)
    except Exception:  # an old ComfyUI without that module: run without it
        return None


PACK_CHECKPOINTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")


def register_model_folder() -> list[str]:
    """Register models/talkformer/ with folder_paths (keeping paths from extra_model_paths.yaml,
    which ComfyUI reads before it imports custom nodes), create it, add the pack's own checkpoints/
    (the demo model, listed with no copying) last, and restrict the folder to .safetensors.
    Returns the folder's paths; [] outside ComfyUI."""
    fp = comfy_module("folder_paths")
    if fp is None:
        return []
    default = os.path.join(fp.models_dir, MODEL_FOLDER)
    paths = list(fp.folder_names_and_paths.get(MODEL_FOLDER, ([], set()))[0])
    if default not in paths:
        paths.append(default)  # after user-configured paths; is_default ones were put first already
    try:
        os.makedirs(default, exist_ok=True)  # so users see where their models go
    except OSError:  # a read-only install still lists the other folders
        pass
    if os.path.isdir(PACK_CHECKPOINTS) and PACK_CHECKPOINTS not in paths:
        paths.append(PACK_CHECKPOINTS)  # last: the first path stays where trained models are saved
    fp.folder_names_and_paths[MODEL_FOLDER] = (paths, set(MODEL_EXTENSIONS))
    return paths


def model_file_list() -> list[str]:
    """Checkpoint names for the loader's combo: files in models/talkformer/ (ComfyUI), else []."""
    fp = comfy_module("folder_paths")
    if fp is None:
        return []
    try:
        return list(fp.get_filename_list(MODEL_FOLDER))
    except Exception:
        return []


def resolve_model_file(name: str) -> str:
    """A combo value -> the file's full path. Inside ComfyUI through folder_paths (all the folder's
    paths, extra_model_paths honoured); in plain Python ``name`` is a file path."""
    from talkformer_core.errors import CheckpointError

    fp = comfy_module("folder_paths")
    if fp is not None:
        path = fp.get_full_path(MODEL_FOLDER, name)
        if path is not None:
            return path
        where = ", ".join(fp.get_folder_paths(MODEL_FOLDER)) or "models/talkformer"
        raise CheckpointError(f"{name}: no such TalkFormer checkpoint in {where}; expected a "
                              f".safetensors file there")
    if not os.path.isfile(name):
        raise CheckpointError(f"{name}: no such checkpoint file (outside ComfyUI, ckpt_name is a path)")
    return name


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel (no-op outside)."""
    mm = comfy_module("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class Progress:
    """comfy.utils.ProgressBar when ComfyUI runs us, else nothing. Every update is also an
    interrupt point (check_interrupt), inside and outside the server's progress hook."""

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        cu = comfy_module("comfy.utils")
        self.bar = cu.ProgressBar(self.total) if cu is not None else None

    def update(self, value: int, preview: Any = None) -> None:
        """``value`` of ``total`` done; ``preview`` an RGB uint8 (H, W, 3) array or None."""
        check_interrupt()
        if self.bar is None:
            return
        pv = None
        if preview is not None:
            from PIL import Image

            pv = ("JPEG", Image.fromarray(preview), PREVIEW_MAX)
        self.bar.update_absolute(min(int(value), self.total), self.total, pv)


def torch_device_and_dtype(dtype_name: str = "auto"):
    """(device, dtype) for our model: the device from comfy.model_management inside ComfyUI (its
    --cpu, --gpu-only flags apply), else the first CUDA device or the CPU. ``dtype_name``: auto |
    fp32 | fp16 | bf16, by the core's policy (talkformer_core.loaded_model.parse_dtype), except
    that "auto" inside ComfyUI is ComfyUI's own choice (its --bf16-unet... flags apply)."""
    import torch

    from talkformer_core.loaded_model import parse_dtype

    mm = comfy_module("comfy.model_management")
    if mm is not None:
        device = mm.get_torch_device()
        if dtype_name == "auto":
            return device, mm.unet_dtype(device=device, supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])
    else:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return device, parse_dtype(dtype_name, device)


def intermediate_device():
    """Where IMAGE tensors live between nodes (ComfyUI: CPU unless --gpu-only)."""
    import torch

    mm = comfy_module("comfy.model_management")
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Type conversions (the only place where ComfyUI's IMAGE meets the core's uint8 frames)

def image_to_uint8(image: Any, what: str = "images"):
    """ComfyUI IMAGE [B, H, W, C] float 0..1 -> numpy uint8 (B, H, W, 3) RGB.

    A single [H, W, C] image is taken as B = 1; alpha (C = 4) is dropped, grey (C = 1) repeated.
    """
    import numpy as np
    import torch

    from talkformer_core.errors import InputError

    if isinstance(image, torch.Tensor):
        x = image.detach()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3, 4) or x.shape[0] == 0:
            raise InputError(f"{what}: expected a ComfyUI IMAGE [B, H, W, 3] with B >= 1, got {tuple(image.shape)}")
        x = x[..., :3] if x.shape[-1] >= 3 else x.expand(*x.shape[:-1], 3)
        out = (x.float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
        return np.ascontiguousarray(out)
    a = np.asarray(image)
    if a.dtype == np.uint8 and a.ndim == 4 and a.shape[-1] == 3:
        return a
    raise InputError(f"{what}: expected a ComfyUI IMAGE tensor [B, H, W, 3], got {type(image).__name__}")


def uint8_to_image(frames: Any):
    """numpy uint8 (B, H, W, 3) (or a list of (H, W, 3)) -> ComfyUI IMAGE [B, H, W, 3] float32 0..1."""
    import numpy as np
    import torch

    a = np.ascontiguousarray(np.stack(frames) if isinstance(frames, (list, tuple)) else frames)
    if a.ndim == 3:
        a = a[None]
    t = torch.from_numpy(a).to(torch.float32).div_(255.0)
    return t.to(intermediate_device())


# ---------------------------------------------------------------------------------------------
# Choice lists the core defines (read when ComfyUI lists the nodes' inputs)

def sampler_inputs() -> dict:
    """The steps, sampler and seed inputs of the nodes that run stage 2 (TalkFormer Sampler,
    TalkFormer Lip Sync (Video)), with the core's samplers (talkformer_core.diffusion.SAMPLERS) and
    defaults (talkformer_core.sampling)."""
    from talkformer_core.diffusion import SAMPLERS
    from talkformer_core.sampling import DEFAULT_SAMPLER, DEFAULT_STEPS

    return {
        "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": 1000,
                          "tooltip": "Denoising steps (the paper: 200 DDIM steps; dpmpp_2m at 10 is within "
                                     "2 % of those, docs/speed.md)."}),
        "sampler": (list(SAMPLERS), {"default": DEFAULT_SAMPLER,
                                     "tooltip": "dpmpp_2m (fewest steps), ddim (the paper's), ddpm."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                         "tooltip": "Seed of the starting noise (one noise for the whole video keeps it "
                                    "temporally steady)."}),
    }


# inputs several nodes take, spelled once
MODEL_INPUT = (TALKFORMER_MODEL, {"tooltip": "Load TalkFormer Model."})
FACE_TRACK_INPUT = (TALKFORMER_FACE_TRACK, {"tooltip": "Detect Face Landmarks' track of the frames."})

# the width of Blend Face's and Lip Sync (Video)'s mask edge
FEATHER_INPUT = ("INT", {"default": -1, "min": -1, "max": 128,
                         "tooltip": "Width in crop pixels of the soft mask edge; -1 = a tenth of the crop side, "
                                    "0 = hard edge."})

# stage 2's starting-noise scale (an optional input: workflows saved without it keep their widgets)
NOISE_SCALE_INPUT = ("FLOAT", {"default": -1.0, "min": -1.0, "max": 2.0, "step": 0.05,
                               "tooltip": "Scale of the starting noise; -1 = the model's own (0.5 for person "
                                          "models from finetune, 1 otherwise). Lower follows the landmarks "
                                          "more closely and keeps the mouth closed in silence (docs/dubbing.md)."})


def noise_scale_option(value: Any) -> float | None:
    """The node's noise_scale widget -> the core's (None = the model's own)."""
    return None if value is None or float(value) < 0 else float(value)


# the decode's re-encoding passes (an optional input, as noise_scale)
DECODE_PASSES_INPUT = ("INT", {"default": -1, "min": -1, "max": 16,
                               "tooltip": "Re-encoding passes of the decode; -1 = the model's own (4 for person "
                                          "models from finetune, 0 otherwise). Each pass keeps more of the "
                                          "template's own mouth out of the face (docs/dubbing.md)."})


def decode_passes_option(value: Any) -> int | None:
    """The node's decode_passes widget -> the core's decode_refine (None = the model's own)."""
    return None if value is None or int(value) < 0 else int(value)


# mouth guidance (an optional input, as noise_scale): -1 = the model's own
MOUTH_GUIDANCE_INPUT = ("FLOAT", {"default": -1.0, "min": -1.0, "max": 8.0, "step": 0.25,
                                  "tooltip": "Guidance of the mouth toward its target landmarks, away from stage "
                                             "1's average mouth; -1 = the model's own (0 = off for every preset). "
                                             "Above 0 each sampler step runs the U-Net twice; it closed some "
                                             "silent mouths and cost 1-2 dB on others (docs/dubbing.md)."})


def mouth_guidance_option(value: Any) -> float | None:
    """The node's mouth_guidance widget -> the core's (None = the model's own)."""
    return None if value is None or float(value) < 0 else float(value)


def dtype_names() -> list[str]:
    """The compute dtypes the loader offers (talkformer_core.loaded_model.DTYPE_CHOICES)."""
    from talkformer_core.loaded_model import DTYPE_CHOICES

    return list(DTYPE_CHOICES)


def length_modes() -> list[str]:
    """How frames are fitted to the audio's length (talkformer_core.video.PLAN_MODES)."""
    from talkformer_core.video import PLAN_MODES

    return list(PLAN_MODES)


# ---------------------------------------------------------------------------------------------
# AUDIO (the only place that reads ComfyUI's AUDIO dict)

def _audio_parts(audio: Any) -> tuple[Any, int]:
    """ComfyUI AUDIO {"waveform": [B, C, T] tensor, "sample_rate": int} -> (waveform as given, rate)."""
    from talkformer_core.errors import AudioError

    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise AudioError(f"audio: expected ComfyUI AUDIO {{'waveform': [B, C, T], 'sample_rate': int}}, "
                         f"got {type(audio).__name__}")
    try:
        rate = int(audio["sample_rate"])
    except (TypeError, ValueError) as e:
        raise AudioError(f"audio: expected an integer sample_rate ({e})") from None
    if rate <= 0:
        raise AudioError(f"audio: expected a positive sample_rate, got {rate}")
    return audio["waveform"], rate


def audio_input(audio: Any) -> tuple[Any, int]:
    """ComfyUI AUDIO -> (float32 (C, T) numpy, rate) for the core, keeping the channels and rate
    (the first item of a batch). AudioError for anything else or an empty waveform."""
    import numpy as np

    from talkformer_core.errors import AudioError

    raw, rate = _audio_parts(audio)
    w = raw.detach().float().cpu().numpy() if hasattr(raw, "detach") else raw
    w = np.asarray(w, dtype=np.float32)
    if w.ndim == 3:
        w = w[0]  # the first item of the batch
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2 or w.shape[-1] == 0:
        raise AudioError(f"audio: expected a waveform [B, C, T] with T > 0, got shape {tuple(np.shape(raw))}")
    return np.ascontiguousarray(w), rate


def audio_seconds(audio: Any) -> float:
    """Duration of a ComfyUI AUDIO in seconds."""
    raw, rate = _audio_parts(audio)
    return float(raw.shape[-1]) / float(rate)


def trim_audio(audio: Any, seconds: float) -> Any:
    """A ComfyUI AUDIO cut to at most ``seconds`` (the same dict when it is not longer)."""
    raw, rate = _audio_parts(audio)
    keep = int(round(float(seconds) * rate))
    return {**audio, "waveform": raw[..., :keep]} if raw.shape[-1] > keep else audio


def tooltips_complete(cls) -> list[str]:
    """Names of inputs of a node class that lack a tooltip (for tests and the docs generator)."""
    missing = []
    for section in ("required", "optional"):
        for name, spec in cls.INPUT_TYPES().get(section, {}).items():
            opts = spec[1] if len(spec) > 1 else {}
            if not opts.get("tooltip"):
                missing.append(name)
    return missing

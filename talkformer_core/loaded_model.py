"""A checkpoint's networks ready for inference (``LoadedModel``), and the device and compute-dtype
policy they run under (``parse_device``, ``parse_dtype``).

``pipeline.load_model`` builds a LoadedModel for each checkpoint kind (``iplap_pipeline`` builds
the IP-LAP one); the sampler, the stages and the nodes read it. It lives apart from the pipeline
so that those modules can name it without importing the pipeline back.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TalkFormerConfig
from .errors import InputError


@dataclass
class LoadedModel:
    """A checkpoint's networks ready for inference.

    kind: the checkpoint's ``kind`` metadata; ``sample_faces`` picks the renderer by it.
    """

    kind: str
    config: TalkFormerConfig
    model: torch.nn.Module  # models.model.TalkFormer for kind "talkformer"
    schedule: Any  # diffusion.NoiseSchedule
    device: torch.device
    dtype: torch.dtype  # compute dtype (autocast when not float32)
    path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def crop_size(self) -> int:
        return int(self.config.model.image_size)

    @property
    def sequence_length(self) -> int:
        return int(self.config.model.sequence_length)

    @property
    def num_references(self) -> int:
        return int(self.config.model.num_reference_landmarks)

    @property
    def landmark(self) -> torch.nn.Module:
        return self.model.landmark

    def autocast(self):
        """torch.autocast for a reduced compute dtype, else a no-op context."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")  # the names the CLI and the loader node offer


def parse_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The compute dtype for ``device``: a name of DTYPE_CHOICES (also float32 / bfloat16 / float16)
    or a torch dtype. "auto" / None: bf16 on a GPU that has it, else fp16 there; fp32 on a CPU.
    InputError for any other name, and for fp16 on the CPU."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        d = dtype
    else:
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if str(dtype) not in names:
            raise InputError(f"dtype {dtype!r}: expected one of fp32, bf16, fp16 (or auto)")
        d = names[str(dtype)]
    if d not in (torch.float32, torch.bfloat16, torch.float16):
        raise InputError(f"dtype {d}: expected float32, bfloat16 or float16")
    if d == torch.float16 and device.type == "cpu":
        raise InputError("dtype fp16 is not supported on the CPU; use fp32 (or bf16)")
    return d


def parse_device(device: torch.device | str | None) -> torch.device:
    """A torch.device the user named, checked to exist (clear error for e.g. 'cuda' without a GPU)."""
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {device!r}: not a torch device name ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"device {device!r}: MPS is not available on this machine; use --device cpu")
    return dev

"""The presets a person-specific run offers, and the config one of them names on a device.

person_config (cpu64, cpu96) and gpu_person_config (gpu128, gpu256) live in config.py with every
other preset; this module only resolves a name (``auto`` included) to a config for finetune.
"""
from __future__ import annotations

from typing import Any

from ..config import (PRESET_NAMES, TalkFormerConfig, gpu_person_config, person_config, preset as named_preset,
                      resolve_preset, sd_vae_config)
from ..errors import InputError

PRESETS = PRESET_NAMES  # config's one list of names ("auto": cpu64 on a CPU, gpu256 on CUDA)


def finetune_config(name: str, *, full_landmarks: bool = False, vae: bool = False, device: Any = None) -> TalkFormerConfig:
    """cpu64 / cpu96: ``person_config``; gpu128 / gpu256: ``gpu_person_config``; small / paper /
    tiny: the named presets; auto: resolved for ``device`` (config.resolve_preset)."""
    name = resolve_preset(name, device)
    if name in ("cpu64", "cpu96"):
        return person_config(int(name[3:]), full_landmarks=full_landmarks, vae=vae)
    if name in ("gpu128", "gpu256"):
        return gpu_person_config(int(name[3:]), full_landmarks=full_landmarks, vae=vae)
    if name in ("small", "paper", "tiny"):
        cfg = named_preset(name)
        if vae:
            cfg.model.autoencoder = sd_vae_config()
            cfg.model.autoencoder.resolution = cfg.model.image_size
        return cfg
    raise InputError(f"--preset {name!r}: expected one of {PRESETS}")

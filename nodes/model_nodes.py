"""Load TalkFormer Model: a checkpoint from models/talkformer/ -> TALKFORMER_MODEL.

The model is wrapped in ComfyUI's ModelPatcher so that ComfyUI's memory manager can offload and
free it like its own models (comfy/clip_vision.py:66 does the same for a plain torch module); every
node that runs it calls ``TalkFormerModel.load()`` first, which is ``load_models_gpu(...,
force_full_load=True)``: our layers are plain torch layers, which ComfyUI's partial ("lowvram")
loading would leave on the offload device.
"""
from __future__ import annotations

from typing import Any

from ._common import (
    CATEGORY,
    TALKFORMER_MODEL,
    comfy_module,
    dtype_names,
    model_file_list,
    resolve_model_file,
    torch_device_and_dtype,
)


class TalkFormerModel:
    """What flows on a TALKFORMER_MODEL socket: the loaded core model and, inside ComfyUI, the
    ModelPatcher that owns its placement. The torch module is reachable only through ``loaded``
    (held here and by the patcher), so ComfyUI's weak references see it die with this object."""

    def __init__(self, loaded: Any, path: str, patcher: Any = None):
        self.loaded = loaded  # talkformer_core.pipeline.LoadedModel
        self.path = path
        self.patcher = patcher

    @property
    def config(self):
        return self.loaded.config

    @property
    def image_size(self) -> int:
        return int(self.loaded.config.model.image_size)

    def load(self, memory_required: int = 0):
        """Make sure the weights are on the compute device (ComfyUI may have offloaded them) and
        return the LoadedModel to run."""
        mm = comfy_module("comfy.model_management")
        if self.patcher is not None and mm is not None:
            mm.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=True)
        return self.loaded

    def __repr__(self) -> str:
        return f"TalkFormerModel({self.path!r}, {self.loaded.config.name}, {self.loaded.device}, {self.loaded.dtype})"


def _vae_state_dict(vae: Any):
    """ComfyUI's VAE object (comfy.sd.VAE) -> its LDM-layout state dict."""
    fsm = getattr(vae, "first_stage_model", None)
    if fsm is not None and hasattr(fsm, "state_dict"):
        return fsm.state_dict()
    if hasattr(vae, "get_sd"):
        return vae.get_sd()
    if isinstance(vae, dict):
        return vae
    from talkformer_core.errors import InputError

    raise InputError(f"vae: expected ComfyUI's VAE (from Load VAE), got {type(vae).__name__}")


class LoadTalkFormerModel:
    DESCRIPTION = ("Loads a TalkFormer checkpoint (.safetensors from models/talkformer/): landmark "
                   "completion, appearance encoder, denoising U-Net and the autoencoder. A checkpoint "
                   "trained in a Stable Diffusion VAE's latent space needs that VAE on the vae input; "
                   "it is checked against the checkpoint's record (SHA-256) before anything runs. "
                   "Also loads IP-LAP's published weights converted by `python -m talkformer_core.convert iplap` "
                   "(for Complete Landmarks and TalkFormer Lip Sync (Video); docs/iplap.md).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (TALKFORMER_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded TalkFormer model (ComfyUI offloads and frees it like its own models).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (model_file_list(), {
                    "tooltip": "TalkFormer checkpoint in models/talkformer/ (or a folder named 'talkformer' "
                               "in extra_model_paths.yaml). Safetensors only."}),
                "dtype": (dtype_names(), {
                    "default": "auto",
                    "tooltip": "Weights and compute precision. auto: ComfyUI's choice for the device "
                               "(bf16/fp16 on GPU, fp32 on CPU)."}),
            },
            "optional": {
                "vae": ("VAE", {
                    "tooltip": "Only for checkpoints that name an external VAE (trained in that VAE's "
                               "latent space): connect Load VAE with that file. Must match the "
                               "checkpoint's SHA-256, else a clear error. Ignored (with a warning) "
                               "when the checkpoint embeds its own autoencoder."}),
            },
        }

    def load(self, ckpt_name: str, dtype: str = "auto", vae: Any = None):
        import warnings

        import torch

        from talkformer_core import pipeline
        from talkformer_core.errors import VAEMismatchError
        from talkformer_core.models.checkpoint import external_vae_record, read_metadata

        path = resolve_model_file(ckpt_name)
        device, torch_dtype = torch_device_and_dtype(dtype)
        mm = comfy_module("comfy.model_management")
        mp = comfy_module("comfy.model_patcher")
        vae_sd = None
        if vae is not None:
            if external_vae_record(read_metadata(path)) is None:
                warnings.warn(f"{path} embeds its autoencoder; the VAE input is not used", stacklevel=2)
            else:
                vae_sd = _vae_state_dict(vae)
        # Inside ComfyUI the weights start on the offload device; the patcher moves them to the
        # compute device whenever a node calls TalkFormerModel.load().
        load_device = mm.unet_offload_device() if mm is not None and mp is not None else device
        try:
            loaded = pipeline.load_model(path, load_device, torch_dtype, vae=vae_sd)
        except VAEMismatchError as e:
            dt = next((v.dtype for v in (vae_sd or {}).values()), None)
            if dt is not None and dt != torch.float32:
                raise VAEMismatchError(f"{e}. ComfyUI holds this VAE in {dt}; the checkpoint records the fp32 "
                                      f"weights' hash: start ComfyUI with --fp32-vae") from None
            raise
        from pathlib import Path

        from talkformer_core.models.checkpoint import purpose_warning

        why = purpose_warning(loaded.metadata)  # the core's warning (e.g. the demo checkpoint), in the log
        if why is not None:
            print(f"[TalkFormer] Load TalkFormer Model: {Path(path).name}: {why}")
        patcher = None
        if mm is not None and mp is not None:
            patcher = mp.ModelPatcher(loaded.model, load_device=device, offload_device=load_device)
            loaded.device = device  # where the stages run (after load())
        return (TalkFormerModel(loaded, path, patcher),)


NODE_CLASS_MAPPINGS = {"TalkFormerModelLoader": LoadTalkFormerModel}
NODE_DISPLAY_NAME_MAPPINGS = {"TalkFormerModelLoader": "Load TalkFormer Model"}

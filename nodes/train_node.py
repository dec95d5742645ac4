"""Train TalkFormer on Video: a person-specific model from the user's own clip.

A thin adapter over ``talkformer_core.finetune.run.finetune`` (preprocess -> autoencoder stage unless a
VAE is connected -> TalkFormer stage; the training loop is ``talkformer_core.train``'s). The file
is saved as ``models/talkformer/<name>.safetensors`` with a training key (``talkformer_core.
training_key``): asked again for the same clip and settings, the node loads that file at once
instead of training, so "train, then lip-sync with new audio" costs one training. Work files
(shards, run folders) go to ComfyUI's output folder under ``talkformer_train/<name>/``. Progress:
ComfyUI's bar runs over the time budget (or the step cap), with a preview grid (held-out truth /
ours / copy-reference) at every evaluation. Cancel stops after a checkpoint is written; queue again
with ``resume`` on to continue from there. A run that fails before its first checkpoint leaves no
work files.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ._common import CATEGORY, MODEL_FOLDER, TALKFORMER_MODEL, Progress, comfy_module, model_file_list

def presets() -> list[str]:
    """config's one preset list (tiny: tests only); read when the node is described, so importing the
    pack stays light."""
    from talkformer_core.config import PRESET_NAMES

    return [p for p in PRESET_NAMES if p != "tiny"]
NONE = "none"


def models_directory() -> Path:
    """models/talkformer/ (ComfyUI: the folder's first path), else $TALKFORMER_MODELS or ./models/talkformer."""
    fp = comfy_module("folder_paths")
    if fp is not None:
        try:
            return Path(fp.get_folder_paths(MODEL_FOLDER)[0])
        except Exception:
            return Path(fp.models_dir) / MODEL_FOLDER
    return Path(os.environ.get("TALKFORMER_MODELS", os.path.join("models", MODEL_FOLDER)))


def work_directory(name: str) -> Path:
    fp = comfy_module("folder_paths")
    base = Path(fp.get_output_directory()) if fp is not None else Path(os.environ.get("TALKFORMER_WORK", "output"))
    return base / "talkformer_train" / name


def _check_name(name: str) -> str:
    from talkformer_core.errors import InputError

    n = str(name).strip()
    if n.endswith(".safetensors"):
        n = n[: -len(".safetensors")]
    if not n or any(c in n for c in '/\\:*?"<>|') or n.startswith("."):
        raise InputError(f"name {name!r}: expected a plain file name (letters, digits, - and _), no folders")
    return n


def clip_audio(audio: Any) -> tuple[Any, int]:
    """The AUDIO that comes with IMAGE frames -> (waveform, rate); an error when none is connected."""
    from talkformer_core.errors import AudioError

    from ._common import audio_input

    if audio is None:
        raise AudioError("audio: IMAGE frames need the AUDIO of the same clip (the model learns from its speech)")
    return audio_input(audio)


def frames_to_video(images: Any, audio: Any, fps: float, path: Path) -> Path:
    """IMAGE frames + AUDIO -> an mp4 (h264 + AAC) the preprocessing reads."""
    from talkformer_core.video import VideoWriter

    from ._common import image_to_uint8

    wav, rate = clip_audio(audio)
    frames = image_to_uint8(images, "images")
    path.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(path, float(fps), audio=wav, audio_rate=rate) as w:
        for f in frames:
            w.write(f)
    return path


def _vae_file(vae: Any, folder: Path) -> Path:
    """ComfyUI's VAE -> an fp32 safetensors file of its LDM state dict (train reads VAEs by path;
    the checkpoint records the fp32 weights' hash, as the loader checks it)."""
    from safetensors.torch import save_file

    from .model_nodes import _vae_state_dict

    sd = {k: v.detach().float().cpu().contiguous() for k, v in _vae_state_dict(vae).items()}
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "vae.safetensors"
    save_file(sd, str(p))
    return p


class TrainTalkFormerOnVideo:
    DESCRIPTION = ("Trains a TalkFormer lip-sync model of ONE person from a clip of them talking (5-10 s is "
                   "enough to start; more is better): face tracking, an autoencoder on the clip (skipped when "
                   "you connect your Stable Diffusion VAE), then the TalkFormer U-Net and landmark module with "
                   "the paper's joint loss, within the time budget. Saves models/talkformer/<name>.safetensors "
                   "and outputs the model for the lip-sync nodes. Cancel keeps a resumable checkpoint.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = (TALKFORMER_MODEL, "STRING")
    RETURN_NAMES = ("model", "checkpoint")
    OUTPUT_TOOLTIPS = ("The trained model, loaded (as Load TalkFormer Model gives it).",
                       "Path of the saved checkpoint.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "name": ("STRING", {"default": "person",
                                    "tooltip": "File name of the model: models/talkformer/<name>.safetensors."}),
                "budget_minutes": ("FLOAT", {
                    "default": 30.0, "min": 0.5, "max": 10000.0, "step": 0.5,
                    "tooltip": "Wall-clock time for the whole training (the main quality knob). 30 min fits a "
                               "5-10 s clip on a small CPU; on a GPU give the same or more for a better model."}),
                "preset": (presets(), {
                    "default": "auto",
                    "tooltip": "Model size: auto (cpu64 on a CPU, gpu256 on a GPU), cpu64 (64 px face crops, "
                               "CPU-sized), cpu96, gpu128 (128 px, one GPU), gpu256 (256 px, the paper's crop, one "
                               "GPU), small / paper (the paper's recipe, large datasets)."}),
                "resume": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Continue an earlier run of this name that was cancelled or ran out of budget "
                               "(from its last checkpoint); off = start over."}),
                "holdout": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 0.5, "step": 0.05,
                    "tooltip": "Fraction of the clip's end kept out of training and scored against two "
                               "baselines (printed in the console); 0 = train on every frame."}),
            },
            "optional": {
                "video": ("VIDEO", {"tooltip": "The person talking (Load Video), with its audio track."}),
                "images": ("IMAGE", {"tooltip": "Instead of VIDEO: the clip's frames (needs AUDIO and fps)."}),
                "audio": ("AUDIO", {"tooltip": "The speech of the IMAGE frames (not used with VIDEO)."}),
                "fps": ("FLOAT", {"default": 25.0, "min": 1.0, "max": 240.0,
                                  "tooltip": "Frame rate of the IMAGE frames (resampled to 25 fps)."}),
                "vae": ("VAE", {"tooltip": "Your Stable Diffusion VAE (Load VAE): no autoencoder training; the "
                                           "model then needs this VAE when loaded (checked by hash)."}),
                "max_steps": ("INT", {
                    "default": 0, "min": 0, "max": 10 ** 7,
                    "tooltip": "Cap on the optimiser steps of each stage (0 = the time budget alone). With a cap "
                               "the model no longer depends on the machine's speed."}),
                "iplap_checkpoint": ([NONE] + model_file_list(), {
                    "default": NONE,
                    "tooltip": "IP-LAP weights converted by python -m talkformer_core.convert (in "
                               "models/talkformer/): start the landmark module from them."}),
            },
        }

    def train(self, name: str, budget_minutes: float = 30.0, preset: str = "auto", resume: bool = True,
              holdout: float = 0.0, video: Any = None, images: Any = None, audio: Any = None, fps: float = 25.0,
              vae: Any = None, iplap_checkpoint: str = NONE, max_steps: int = 0):
        from contextlib import ExitStack

        from talkformer_core.errors import InputError
        from talkformer_core.finetune.run import finetune, state_path, work_dir_for
        from talkformer_core.models.checkpoint import copy_with_metadata, state_dict_sha256
        from talkformer_core.training_key import (KEY_FIELD, RUN_FIELD, arrays_sha256, file_sha256, stored_key,
                                                  training_keys)

        from ._common import resolve_model_file
        from .model_nodes import _vae_state_dict
        from .video_node import video_source

        stem = _check_name(name)
        from talkformer_core.config import resolve_preset

        preset = resolve_preset(preset)  # auto -> the device's preset, which the training key records
        if video is None and images is None:
            raise InputError("connect a VIDEO, or IMAGE frames with their AUDIO")
        out = models_directory() / f"{stem}.safetensors"
        work_parent = work_directory(stem)
        work = work_dir_for(work_parent / "run.safetensors")
        init = None if iplap_checkpoint in (None, "", NONE) else resolve_model_file(iplap_checkpoint)
        max_steps = int(max_steps or 0)
        with ExitStack() as stack:
            if video is not None:
                src = stack.enter_context(video_source(video))
                clip_sha = file_sha256(src)
            else:
                wav, rate = clip_audio(audio)
                clip_sha, src = arrays_sha256(images, wav, [rate, float(fps)]), None
            settings = {"preset": preset, "budget_minutes": float(budget_minutes), "holdout": float(holdout),
                        "max_steps": max_steps, "seed": 0,
                        "vae": None if vae is None else state_dict_sha256(_vae_state_dict(vae)),
                        "init_landmarks": None if init is None else file_sha256(init)}
            key, run_key = training_keys(clip_sha, settings)
            if stored_key(out) == key:  # this clip, these settings: the model exists already
                logging.getLogger("talkformer").info(
                    f"[TalkFormer] {out} was trained on this clip with these settings: using it (no training)")
                return self._loaded(out, vae)

            run_file = work_parent / "run_key.txt"
            can_resume = (bool(resume) and state_path(work).exists() and run_file.is_file()
                          and run_file.read_text().strip() == run_key)
            if not can_resume and work_parent.exists():
                shutil.rmtree(work_parent)  # another clip or other settings: start over
            work_parent.mkdir(parents=True, exist_ok=True)
            run_file.write_text(run_key)
            try:
                if src is None:
                    src = frames_to_video(images, audio, fps, work_parent / "input.mp4")
                vae_path = _vae_file(vae, work_parent) if vae is not None else None
                bar, t0 = Progress(1000), time.time()

                def progress(stage: str, step: int, total: int, info: dict[str, Any]) -> None:
                    frac = (time.time() - t0) / (60.0 * float(budget_minutes))
                    if max_steps:  # the step cap may end training before the budget does
                        frac = max(frac, (step + (max_steps if stage == "talkformer" else 0)) / (2.0 * max_steps))
                    bar.update(int(1000 * min(frac, 0.999)), info.get("preview"))  # also raises on Cancel

                res = finetune(src, work_parent / "run.safetensors", budget_minutes=float(budget_minutes),
                               vae=vae_path, init_landmarks=init, holdout=float(holdout), preset=preset,
                               steps=max_steps or None, resume=can_resume, progress=progress, tqdm_bar=True)
            except BaseException as e:
                # Cancel keeps what a later run resumes; any other failure before the first
                # checkpoint leaves nothing behind
                if not _is_interrupt(e) and not _resumable(work):
                    shutil.rmtree(work_parent, ignore_errors=True)
                raise
        copy_with_metadata(res.checkpoint, out, {KEY_FIELD: key, RUN_FIELD: run_key, "purpose": f"person:{stem}"})
        bar.update(1000)
        return self._loaded(out, vae)

    @staticmethod
    def _loaded(out: Path, vae: Any):
        from .model_nodes import LoadTalkFormerModel

        ckpt = out.name if comfy_module("folder_paths") is not None else str(out)
        (model,) = LoadTalkFormerModel().load(ckpt, "auto", vae)
        return (model, str(out))


def _is_interrupt(e: BaseException) -> bool:
    return isinstance(e, KeyboardInterrupt) or type(e).__name__ == "InterruptProcessingException"


def _resumable(work: Path) -> bool:
    """A training state was written: a later run with resume on continues from it."""
    from talkformer_core.train.loop import STATE_NAME

    return any((work / stage / STATE_NAME).exists() for stage in ("ae", "talkformer"))


NODE_CLASS_MAPPINGS = {"TalkFormerTrainOnVideo": TrainTalkFormerOnVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"TalkFormerTrainOnVideo": "Train TalkFormer on Video"}

"""Train TalkFormer on Video: a person-specific model from the user's own clip (issue 11 item 2).

A thin adapter over ``talkformer_core.finetune.finetune`` (preprocess -> autoencoder stage unless a
VAE is connected -> TalkFormer stage; the training loop is ``talkformer_core.train``'s). The file
is saved as ``models/talkformer/<name>.safetensors``; the node returns it loaded, as Load
TalkFormer Model would. Work files (shards, run folders) go to ComfyUI's output folder under
``talkformer_train/<name>/`` (not into models/talkformer/, whose loader lists every
.safetensors in subfolders). Progress: ComfyUI's bar runs over the time budget, with a preview
grid (held-out truth / ours / copy-reference) at every evaluation. Cancel stops after a
checkpoint is written; queue again with ``resume`` on to continue from there.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ._common import CATEGORY, MODEL_FOLDER, TALKFORMER_MODEL, Progress, comfy_module, model_file_list

PRESETS = ["cpu64", "cpu96", "small", "paper"]
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


def frames_to_video(images: Any, audio: Any, fps: float, path: Path) -> Path:
    """IMAGE frames + AUDIO -> an mp4 (h264 + AAC) the preprocessing reads."""
    from talkformer_core.errors import AudioError
    from talkformer_core.video import VideoWriter

    from ._common import image_to_uint8
    from .video_node import audio_input

    if audio is None:
        raise AudioError("audio: IMAGE frames need the AUDIO of the same clip (the model learns from its speech)")
    frames = image_to_uint8(images, "images")
    wav, rate = audio_input(audio)
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
                "preset": (PRESETS, {
                    "default": "cpu64",
                    "tooltip": "Model size: cpu64 (64 px face crops, CPU-sized), cpu96, small (128 px, GPU), "
                               "paper (256 px, GPU)."}),
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
                "iplap_checkpoint": ([NONE] + model_file_list(), {
                    "default": NONE,
                    "tooltip": "IP-LAP weights converted by python -m talkformer_core.convert (in "
                               "models/talkformer/): start the landmark module from them."}),
            },
        }

    def train(self, name: str, budget_minutes: float = 30.0, preset: str = "cpu64", resume: bool = True,
              holdout: float = 0.0, video: Any = None, images: Any = None, audio: Any = None, fps: float = 25.0,
              vae: Any = None, iplap_checkpoint: str = NONE):
        from contextlib import ExitStack

        from talkformer_core.errors import InputError
        from talkformer_core.finetune import _state_path, finetune, work_dir_for

        from ._common import resolve_model_file
        from .model_nodes import LoadTalkFormerModel
        from .video_node import video_source

        stem = _check_name(name)
        if video is None and images is None:
            raise InputError("connect a VIDEO, or IMAGE frames with their AUDIO")
        out = models_directory() / f"{stem}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        work_parent = work_directory(stem)
        work = work_dir_for(work_parent / "run.safetensors")
        init = None if iplap_checkpoint in (None, "", NONE) else resolve_model_file(iplap_checkpoint)
        bar = Progress(1000)
        t0 = time.time()

        def progress(stage: str, step: int, total: int, info: dict[str, Any]) -> None:
            frac = min((time.time() - t0) / (60.0 * float(budget_minutes)), 0.999)
            bar.update(int(1000 * frac), info.get("preview"))  # also raises on Cancel

        with ExitStack() as stack:
            if video is not None:
                src = stack.enter_context(video_source(video))
            elif images is not None:
                src = frames_to_video(images, audio, fps, work_parent / "input.mp4")
            else:
                raise InputError("connect a VIDEO, or IMAGE frames with their AUDIO")
            vae_path = _vae_file(vae, work_parent) if vae is not None else None
            res = finetune(src, work_parent / "run.safetensors", budget_minutes=float(budget_minutes),
                           vae=vae_path, init_landmarks=init, holdout=float(holdout), preset=preset,
                           resume=bool(resume) and _state_path(work).exists(), progress=progress, tqdm_bar=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        import shutil

        shutil.copyfile(res.checkpoint, tmp)
        os.replace(tmp, out)
        bar.update(1000)
        ckpt = out.name if comfy_module("folder_paths") is not None else str(out)
        (model,) = LoadTalkFormerModel().load(ckpt, "auto", vae)
        return (model, str(out))


NODE_CLASS_MAPPINGS = {"TalkFormerTrainOnVideo": TrainTalkFormerOnVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"TalkFormerTrainOnVideo": "Train TalkFormer on Video"}

"""Person-specific lip-sync from the user's own video: one command over data/ and train/.

    python -m talkformer_core.finetune --video V.mp4 --out person.safetensors \
        [--budget-minutes 30] [--vae SD_VAE.safetensors] [--init-landmarks IPLAP.safetensors] \
        [--holdout 0.2] [--device cpu] [--resume] [--preset cpu64] [--steps N]

What it does (no second training loop: ``data.preprocess`` and ``train.train`` do the work):
  1. preprocess the clip into one shard at the preset's crop size (``data.preprocess``);
  2. stage ``autoencoder`` on the clip's frames, only when no ``--vae`` is given;
  3. stage ``talkformer`` with the joint loss (eq. 6), the autoencoder frozen;
  4. copy the result to ``--out``: a checkpoint ``sync``, the loader node and ``pipeline.load_model``
     take like any other (with ``--vae`` it names that VAE by hash).
The time budget is the main knob: preprocessing is paid first, then the autoencoder gets
the preset's ``autoencoder_share`` (0.3) of what is left and TalkFormer the rest (less a reserve for
the hold-out report). ``--preset auto`` (the default) is cpu64 on a CPU and gpu256 on CUDA; on CUDA the
batches shrink to the free memory if needed, and each stage prints samples/s and the share of the
wall time spent in the training step (docs/finetune.md).
``--steps`` caps the TalkFormer steps as well, ``--ae-steps`` the autoencoder's (default: ``--steps``);
with a generous budget the two make a run step-driven, the same on any machine (tests). Work files live in ``OUT.work/``
(shards, both run folders); ``--resume`` continues a run stopped by Ctrl-C, an interrupt or the
budget from there (train's bit-exact resume), with the budget's unspent part.

Hold-out (``--holdout F``): train on the first 1 - F of the frames, and score the last F with the
clip's own audio (``holdout_report``, docs/finetune.md), on the lower half of the face crop with
``talkformer_core.eval``:
  ours (test-frame landmarks)  the renderer driven by the landmarks detected on the test frames;
  ours (audio-driven)          landmarks completed from the audio (stage 1), then the renderer;
  copy-reference               each test crop with its lower face replaced by that of the training
                               frame with the median mouth opening, aligned (similarity fitted on
                               the 74 upper-face points) and feather-blended;
  mean-mouth                   the lower face of the pixel mean of the training crops (aligned with
                               the mean training landmarks), pasted the same way.
Every method's crop is pasted onto the test crop through the same feathered lower-face mask as
the pipeline's blend (face.blend.lower_face_mask). PSNR and SSIM on the crop at its own size;
LMD and mouth-opening correlation from mediapipe on the crops upscaled to 256 px (mediapipe finds
no face in a 64 px crop), LMD in pixels of a 256 crop as eval reports it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import (PRESET_NAMES, AutoencoderConfig, LandmarkConfig, ModelConfig, TalkFormerConfig,  # noqa: F401
                     TrainConfig, UNetConfig, gpu_person_config, person_config, preset as named_preset,
                     resolve_preset, sd_vae_config)
from .errors import CheckpointError, FaceError, InputError, TalkFormerError, VideoError

AE_SHARE = 0.3  # of the budget after preprocessing, when the autoencoder is trained on the clip
REPORT_RESERVE_MIN = 1.5  # minutes kept for the hold-out report (sampling + mediapipe)
EVAL_CROP = 256  # crops are upscaled to this for mediapipe (LMD, mouth opening)
MAX_HOLDOUT = 0.5
METHODS = ("ours_landmarks", "ours_audio", "copy_reference", "mean_mouth")
METHOD_NAMES = {"ours_landmarks": "ours, test-frame landmarks", "ours_audio": "ours, audio-driven",
                "copy_reference": "copy-reference", "mean_mouth": "mean-mouth"}


# ----------------------------------------------------------------------------------------------
# presets for one person on one machine

# person_config (cpu64, cpu96) and gpu_person_config (gpu128, gpu256) live in config.py with every
# other preset; PRESETS is config's one list of names ("auto": cpu64 on a CPU, gpu256 on CUDA)
PRESETS = PRESET_NAMES


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


# ----------------------------------------------------------------------------------------------
# the run

@dataclass
class FinetuneResult:
    checkpoint: Path
    minutes: dict[str, float] = field(default_factory=dict)  # preprocess / autoencoder / talkformer / report
    steps: dict[str, int] = field(default_factory=dict)
    report: dict[str, Any] | None = None  # holdout_report's result when --holdout
    history: list[dict[str, Any]] = field(default_factory=list)  # the held-out metrics printed while training
    speed: dict[str, dict[str, float]] = field(default_factory=dict)  # per stage: samples/s, busy share, batch


ProgressFn = Callable[[str, int, int, dict[str, Any]], None]  # (stage, step, total, info incl. "preview")


def validate_inputs(video: str | os.PathLike, out: str | os.PathLike, *, budget_minutes: float, holdout: float,
                    vae: str | os.PathLike | None, init_landmarks: str | os.PathLike | None,
                    steps: int | None, preset: str, ae_steps: int | None = None, dubbing: bool = False) -> None:
    """Every bad argument, before any long work (clear errors naming the file)."""
    from .video import probe_video

    v = Path(video)
    if not v.is_file():
        raise VideoError(f"{v}: no such video file; expected a video of the person talking (5 s or more)")
    info = probe_video(v)  # VideoError for an unreadable / non-video file
    if not info.has_audio:
        raise VideoError(f"{v}: the video has no audio track; the lip-sync model learns from the clip's own speech")
    if not (budget_minutes > 0 and math.isfinite(budget_minutes)):
        raise InputError(f"--budget-minutes {budget_minutes}: expected a positive number of minutes")
    if not 0.0 <= holdout <= MAX_HOLDOUT:
        raise InputError(f"--holdout {holdout}: expected a fraction in [0, {MAX_HOLDOUT}] (0 = train on all frames)")
    if dubbing and holdout <= 0:
        raise InputError("--dubbing needs --holdout (e.g. 0.4: new audio = frames [0.6, 0.8), template = [0.8, 1.0))")
    if steps is not None and steps < 1:
        raise InputError(f"--steps {steps}: expected >= 1")
    if ae_steps is not None and ae_steps < 1:
        raise InputError(f"--ae-steps {ae_steps}: expected >= 1")
    if preset not in PRESETS:
        raise InputError(f"--preset {preset!r}: expected one of {PRESETS}")
    for name, p in (("--vae", vae), ("--init-landmarks", init_landmarks)):
        if p is not None and not Path(p).is_file():
            raise InputError(f"{name} {p}: no such file; expected a .safetensors file")
    if Path(out).suffix != ".safetensors":
        raise InputError(f"--out {out}: expected a .safetensors file name")
    from .paths import check_output_file

    check_output_file(out, "--out")  # OUT and OUT.work/ share its folder


def work_dir_for(out: str | os.PathLike) -> Path:
    o = Path(out)
    return o.with_name(o.stem + ".work")


def _reject_to_error(video: Path, reason: str, detail: str) -> TalkFormerError:
    if reason == "no_face":
        return FaceError(f"{video}: expected one face visible in most frames; {detail}")
    if reason == "too_short":
        return VideoError(f"{video}: too short to learn from ({detail}); give at least 2 s, ideally 5-10 s")
    if reason == "no_audio":
        return VideoError(f"{video}: {detail}; expected a video with its audio track")
    return VideoError(f"{video}: could not be read ({detail})")


def state_path(work: Path) -> Path:
    """The file in a work folder that records a run's stages (it exists once a run has started)."""
    return work / "finetune.json"


def _load_state(work: Path) -> dict[str, Any]:
    p = state_path(work)
    return json.loads(p.read_text()) if p.exists() else {}


def _save_state(work: Path, st: dict[str, Any]) -> None:
    p = state_path(work)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(st, indent=1, sort_keys=True))
    os.replace(tmp, p)


def _speed_dict(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(m[k]) for k in ("samples_per_s", "steps_per_s", "busy_share", "batch_size", "compute_seconds",
                                     "data_seconds", "wall_seconds") if k in m}


def _speed(m: dict[str, Any], unit: str) -> str:
    """The printed throughput: samples/s and the share of the wall time inside the training step
    (forward, backward, optimiser; CUDA synchronised: the GPU's busy share up to launch gaps)."""
    return (f"{m.get('samples_per_s', float('nan')):.1f} {unit}/s (batch {int(m.get('batch_size', 0))}, "
            f"{m.get('steps_per_s', float('nan')):.2f} steps/s), {100 * m.get('busy_share', float('nan')):.0f} % of "
            f"the wall time in the training step, {100 * m.get('data_seconds', 0.0) / max(m.get('wall_seconds', 0.0), 1e-9):.0f} % "
            "in the data path")


def finetune(video: str | os.PathLike, out: str | os.PathLike, *, budget_minutes: float = 30.0,
             vae: str | os.PathLike | None = None, init_landmarks: str | os.PathLike | None = None,
             holdout: float = 0.0, device: str | None = None, resume: bool = False, preset: str = "auto",
             steps: int | None = None, ae_steps: int | None = None, crop_size: int | None = None, lr: float | None = None,
             batch_size: int | None = None, bf16: bool = False, seed: int = 0, eval_every: int = 250,
             sampler: str = "ddim", sampler_steps: int = 25, noise_scale: float = 1.0, threads: int | None = None,
             dubbing: bool = False, progress: ProgressFn | None = None, tqdm_bar: bool = True,
             print_fn: Callable[[str], None] | None = print) -> FinetuneResult:
    """Train a person-specific TalkFormer on one clip (see the module doc). Returns the result.

    ``steps`` / ``ae_steps`` cap the TalkFormer / autoencoder steps (``ae_steps`` defaults to
    ``steps``); the budget still applies, so a step-driven run gives it room.
    ``progress(stage, step, total, info)`` runs after every optimiser step (info: losses; every
    ``eval_every`` steps also "metrics" and "preview", an RGB uint8 grid); raising from it stops
    training after a resumable checkpoint is written, and the exception propagates.
    """
    import torch

    from .data.preprocess import options_for, process_clip, Rejected, save_shard, shard_name
    from .train import train

    video, out = Path(video), Path(out)
    validate_inputs(video, out, budget_minutes=budget_minutes, holdout=holdout, vae=vae,
                    init_landmarks=init_landmarks, steps=steps, preset=preset, ae_steps=ae_steps, dubbing=dubbing)
    if ae_steps is None:
        ae_steps = steps
    if threads:
        torch.set_num_threads(int(threads))
    from .train.device import fit_batches, resolve_device

    dev = resolve_device(device)  # --device cuda without a GPU: an error now, not after preprocessing
    device, preset = str(dev), resolve_preset(preset, dev)
    cfg = finetune_config(preset, full_landmarks=init_landmarks is not None, vae=vae is not None)
    if crop_size:
        cfg.model.image_size = cfg.model.autoencoder.resolution = int(crop_size)
    if lr:
        cfg.train.lr = float(lr)
    if batch_size:
        cfg.train.batch_size = int(batch_size)
    def say(msg: str) -> None:
        if print_fn is print:  # above the tqdm bars, not glued to them
            from tqdm import tqdm

            tqdm.write(msg)
        elif print_fn is not None:
            print_fn(msg)

    # the preset's bf16 on CUDA only (the CPU presets train in fp32); batches sized to the GPU's free
    # memory, or an error naming the preset that fits, before any long work
    bf16 = bool(bf16 or (cfg.train.bf16 and dev.type == "cuda"))
    ae_batch = cfg.train.autoencoder_batch_size
    if dev.type == "cuda":
        cfg.train.batch_size, fit_ae = fit_batches(cfg, dev, bf16, train_autoencoder=vae is None, name=preset)
        ae_batch = fit_ae if vae is None else ae_batch
    say(f"[finetune] preset {preset} on {device}: {cfg.model.image_size} px crops, batch {cfg.train.batch_size} "
        f"windows" + (f", autoencoder batch {ae_batch}" if vae is None else "") + (", bf16" if bf16 else ""))

    work = work_dir_for(out)
    st = _load_state(work) if resume else {}
    if resume and not st:
        raise CheckpointError(f"--resume: no earlier run in {work} (expected {state_path(work).name}); start without --resume")
    if not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    spent = dict(st.get("minutes", {}))
    st.setdefault("video", str(video.resolve()))
    st.setdefault("holdout", holdout)
    if resume and (st["video"] != str(video.resolve()) or float(st["holdout"]) != float(holdout)):
        raise CheckpointError(f"--resume: {work} holds a run on {st['video']} with --holdout {st['holdout']}; "
                              f"give the same video and --holdout")

    # 1. preprocess (the data module's own code; a shard already there is reused on --resume)
    shards = work / f"shards_{cfg.model.image_size}"
    shard = shards / shard_name(video)
    t0 = time.time()
    if not shard.exists():
        say(f"[finetune] preprocessing {video} (face tracking, {cfg.model.image_size} px crops, mel windows)")
        opts = options_for(cfg)
        try:
            arrays = process_clip(video, opts)
        except Rejected as e:
            raise _reject_to_error(video, e.reason, e.detail) from None
        save_shard(shard, arrays)
    n_frames = int(np.load(shard)["num_frames"])
    frames = (0.0, 1.0 - holdout)
    n_train = int(round(frames[1] * n_frames))
    min_train = cfg.model.sequence_length + cfg.model.num_reference_landmarks + 2
    if n_train < min_train:
        raise VideoError(f"{video}: {n_train} training frames (of {n_frames} at 25 fps, --holdout {holdout}) "
                         f"< {min_train}; give a longer clip (5-10 s) or a smaller --holdout")
    spent["preprocess"] = spent.get("preprocess", 0.0) + (time.time() - t0) / 60.0
    say(f"[finetune] {n_frames} frames at 25 fps; training on frames [0, {n_train})"
        + (f", holding out [{n_train}, {n_frames})" if holdout > 0 else ""))

    remaining = budget_minutes - sum(spent.values())
    reserve = min(REPORT_RESERVE_MIN * (2 if dubbing else 1), 0.15 * budget_minutes) if holdout > 0 else 0.0
    train_minutes = max(remaining - reserve, 0.05)
    result = FinetuneResult(out)

    # 2. autoencoder on the clip (only without --vae)
    ae_ck = None
    if vae is None:
        ae_dir = work / "ae"
        if not st.get("ae_done"):
            ae_budget = st.get("ae_budget") or cfg.train.autoencoder_share * train_minutes
            st["ae_budget"] = ae_budget
            _save_state(work, {**st, "minutes": spent})
            left = ae_budget - spent.get("autoencoder", 0.0)
            say(f"[finetune] stage autoencoder: {max(left, 0):.1f} min")
            t0 = time.time()

            bar = _BudgetBar("autoencoder", left, ae_steps, enabled=tqdm_bar)

            def ae_cb(step: int, total: int, vals: dict[str, float]) -> None:
                bar.step(step, vals)
                if progress is not None:
                    progress("autoencoder", step, total, dict(vals))

            try:
                res = train(cfg, stage="autoencoder", data=shards, out=ae_dir, steps=10 ** 7 if ae_steps is None else
                            ae_steps, batch_size=ae_batch, frames=frames, budget_minutes=max(left, 0.05),
                            resume=(ae_dir / "last.state.safetensors").exists(), device=device, bf16=bf16, seed=seed,
                            callback=ae_cb, progress=False, log_every=10)
            finally:
                bar.close()
                spent["autoencoder"] = spent.get("autoencoder", 0.0) + (time.time() - t0) / 60.0
                _save_state(work, {**st, "minutes": spent})
            st["ae_done"] = True
            st["ae_steps"] = res.metrics["final_step"]
            _save_state(work, {**st, "minutes": spent})
            say(f"[finetune] autoencoder: {res.metrics['final_step']} steps, L1 {res.metrics['l1'][-1]:.4f}, "
                f"latent scale {res.metrics['scale_factor']:.3f}; {_speed(res.metrics, 'crops')}")
            result.speed["autoencoder"] = _speed_dict(res.metrics)
        ae_ck = ae_dir / "last.safetensors"
    result.steps["autoencoder"] = int(st.get("ae_steps", 0))

    # 3. TalkFormer, joint loss (eq. 6); held-out quick metrics from the periodic checkpoint
    tf_dir = work / "talkformer"
    tf_left = budget_minutes - sum(spent.values()) - reserve
    say(f"[finetune] stage talkformer: {max(tf_left, 0):.1f} min")
    quick = _QuickEval(shard, holdout, cfg, device=device, vae=vae, seed=seed) if eval_every else None

    bar = _BudgetBar("talkformer", tf_left, steps, enabled=tqdm_bar)

    def tf_cb(step: int, total: int, vals: dict[str, float]) -> None:
        bar.step(step, vals)
        info: dict[str, Any] = dict(vals)
        if quick is not None and step % eval_every == 0:
            m, preview = quick(tf_dir / "last.safetensors")
            m["step"] = step
            result.history.append(m)
            info["metrics"], info["preview"] = m, preview
            say(f"[finetune] step {step}: {quick.label} PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f} "
                f"(copy-reference {quick.copy_psnr:.2f} / {quick.copy_ssim:.4f}), L1 landmarks {vals.get('l1', float('nan')):.4f}")
        if progress is not None:
            progress("talkformer", step, total, info)

    t0 = time.time()
    try:
        res = train(cfg, stage="talkformer", data=shards, out=tf_dir, steps=10 ** 7 if steps is None else steps,
                    autoencoder=ae_ck if vae is None else None, vae=vae, init_landmarks=init_landmarks,
                    frames=frames, budget_minutes=max(tf_left, 0.05), ema=True,
                    resume=(tf_dir / "last.state.safetensors").exists(), device=device, bf16=bf16, seed=seed,
                    save_every=eval_every if eval_every else 0, callback=tf_cb, progress=False, log_every=10)
    finally:
        bar.close()
        spent["talkformer"] = spent.get("talkformer", 0.0) + (time.time() - t0) / 60.0
        _save_state(work, {**st, "minutes": spent})
    result.steps["talkformer"] = int(res.metrics["final_step"])
    result.speed["talkformer"] = _speed_dict(res.metrics)
    say(f"[finetune] talkformer: {_speed(res.metrics, 'windows')}")
    if cfg.model.landmark.mouth_model:
        lam = fit_mouth_model(res.checkpoint, shard, frames)
        say(f"[finetune] mouth model fitted on the training frames (ridge strengths {lam[0]:g} / {lam[1]:g})")
    from .models.checkpoint import PURPOSE_KEY, copy_with_metadata

    copy_with_metadata(res.checkpoint, out, {PURPOSE_KEY: f"person:{video.stem}"})  # atomic
    say(f"[finetune] wrote {out} ({result.steps['talkformer']} TalkFormer steps, "
        f"{sum(spent.values()):.1f} min so far)")

    # 4. the hold-out report
    if holdout > 0:
        t0 = time.time()
        result.report = holdout_report(out, shard, holdout, device=device, vae=vae, sampler=sampler,
                                       steps=sampler_steps, seed=seed, noise_scale=noise_scale)
        say(format_report(result.report))
        if dubbing:
            result.report["dubbing"] = dubbing_report(out, shard, holdout, device=device, vae=vae, sampler=sampler,
                                                      steps=sampler_steps, seed=seed, noise_scale=noise_scale)
            say(format_dubbing(result.report["dubbing"]))
        spent["report"] = (time.time() - t0) / 60.0
    result.minutes = dict(spent)
    st.update(minutes=spent, done=True)
    _save_state(work, st)
    return result


def mouth_training_data(shard: str | os.PathLike, frames: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(mels (M, 80, 16), jaw + lips (M, 57, 2) in the stable box frame) of the found frames in
    ``frames`` of a shard, in time order: what ``MouthModel.fit`` takes."""
    from .data.dataset import load_shard, stage1_box_frame
    from .face import topology

    d = load_shard(shard)
    T = len(d["found"])
    lo, hi = int(round(frames[0] * T)), int(round(frames[1] * T))
    d = stage1_box_frame(d, lo, hi)
    idx = np.arange(lo, hi)[d["found"][lo:hi].astype(bool)]
    return d["mels"][idx].astype(np.float32), d["points131_box"][idx][:, list(topology.CONTENT_POS)]


def fit_mouth_model(checkpoint: str | os.PathLike, shard: str | os.PathLike,
                    frames: tuple[float, float]) -> tuple[float, float]:
    """Fit the checkpoint's mouth model (its live and EMA copies) on the shard's training frames,
    in place. Returns the ridge strengths cross-validation chose (opening, shape modes)."""
    from .models.checkpoint import checkpoint_config, read_metadata, replace_tensors, safetensors_keys
    from .models.mouth_model import MouthModel

    cfg = checkpoint_config(read_metadata(checkpoint), checkpoint)
    mels, content = mouth_training_data(shard, frames)
    mm = MouthModel(cfg.model.landmark.mouth_shape_modes).fit(mels, content)
    sd = mm.state_dict()
    keys = safetensors_keys(checkpoint)
    new = {f"{pre}landmark.mouth.{k}": v for pre in ("", "ema.") for k, v in sd.items()
           if f"{pre}landmark.mouth.{k}" in keys}
    replace_tensors(checkpoint, new)
    return float(mm.lambdas[0]), float(mm.lambdas[1])


class _BudgetBar:
    """tqdm over optimiser steps whose total is the number of steps the budget allows at the rate
    measured so far (capped by --steps), so its ETA is the time the stage will really take."""

    def __init__(self, stage: str, minutes: float, cap: int | None, enabled: bool = True):
        from tqdm import tqdm

        self.t0, self.seconds, self.cap = time.time(), max(minutes, 0.0) * 60.0, cap
        self.first: int | None = None
        self.bar = tqdm(total=cap or 1, desc=f"finetune {stage}", unit="step", disable=not enabled,
                        dynamic_ncols=True)

    def step(self, step: int, vals: dict[str, float]) -> None:
        if self.first is None:
            self.first = step - 1
            self.bar.n = self.first
        done = step - self.first
        rate = done / max(time.time() - self.t0, 1e-6)
        total = self.first + max(done, int(rate * self.seconds))
        if self.cap:
            total = min(total, self.cap)
        self.bar.total = max(total, step)
        self.bar.n = step
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in vals.items() if k in ("loss", "ldm", "l1")}, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------------------------
# evaluation on held-out frames

@dataclass
class HoldoutData:
    """One shard split into training and test frames, and what every method needs."""

    crops: np.ndarray  # (T, S, S, 3) uint8
    points_crop: np.ndarray  # (T, 131, 2) crop frame
    train_idx: np.ndarray  # found training frames
    test_idx: np.ndarray  # found test frames
    analysis: Any  # pipeline.FaceAnalysis of the whole clip
    mels: np.ndarray  # (T, 80, 16) float32


def load_holdout(shard: str | os.PathLike, holdout: float) -> HoldoutData:
    from .data.dataset import load_shard
    from .face.landmarks import FaceLandmarks
    from .face.topology import FULL_131
    from .pipeline import analyze_landmarks

    d = load_shard(shard)
    T = int(d["num_frames"])
    found = d["found"].astype(bool)
    p478 = d["points478_px"].astype(np.float32)
    H, W = (int(v) for v in d["frame_size"])
    lms = FaceLandmarks(points478=p478, points131=np.ascontiguousarray(p478[:, list(FULL_131)]), found=found,
                        size=(H, W))
    S = d["crops"].shape[1]
    analysis = analyze_landmarks(lms, S)  # the same track as preprocess (same points, same smoothing)
    split = int(round((1.0 - holdout) * T)) if holdout > 0 else T
    idx = np.arange(T)
    train_idx = idx[(idx < split) & found]
    test_idx = idx[(idx >= split) & found] if holdout > 0 else train_idx[-max(1, min(len(train_idx), 16)):]
    return HoldoutData(d["crops"], d["points131_crop"].astype(np.float32), train_idx, test_idx, analysis,
                       d["mels"].astype(np.float32))


def _similarity(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """2x3 similarity (rotation, uniform scale, shift) taking src points to dst points (least squares)."""
    import cv2

    m, _ = cv2.estimateAffinePartial2D(src_pts.astype(np.float32), dst_pts.astype(np.float32), method=cv2.LMEDS)
    if m is None:
        m = np.array([[1, 0, 0], [0, 1, 0]], np.float64)
    return m


def _paste(cand: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Feathered lower-face paste in the crop (the pipeline's blend mask): (B, S, S, 3) uint8."""
    a = mask[None, :, :, None]
    return np.clip(np.round(a * cand.astype(np.float32) + (1 - a) * truth.astype(np.float32)), 0, 255).astype(np.uint8)


def baselines(h: HoldoutData) -> dict[str, np.ndarray]:
    """copy-reference and mean-mouth crops (pasted) for the test frames: {name: (B, S, S, 3) uint8}."""
    import cv2

    from .face import topology
    from .face.blend import lower_face_mask

    S = h.crops.shape[1]
    mask = lower_face_mask(S)
    pose = list(topology.POSE_POS)
    # copy-reference donor: the training frame with the median mouth opening
    opn = h.analysis.openness[h.train_idx]
    donor = int(h.train_idx[np.argsort(opn, kind="stable")[len(opn) // 2]])
    mean_crop = h.crops[h.train_idx].astype(np.float32).mean(0)  # (S, S, 3)
    mean_pts = h.points_crop[h.train_idx].mean(0)  # (131, 2)
    out: dict[str, list[np.ndarray]] = {"copy_reference": [], "mean_mouth": []}
    for t in h.test_idx:
        dst = h.points_crop[t, pose] * S
        for name, img, pts in (("copy_reference", h.crops[donor].astype(np.float32), h.points_crop[donor]),
                               ("mean_mouth", mean_crop, mean_pts)):
            m = _similarity(pts[pose] * S, dst)
            warped = cv2.warpAffine(img, m, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            out[name].append(np.clip(np.round(warped), 0, 255).astype(np.uint8))
    truth = h.crops[h.test_idx]
    return {k: _paste(np.stack(v), truth, mask) for k, v in out.items()} | {"_donor": np.array(donor)}


def reference_frame(h: HoldoutData) -> int:
    """The R-Align reference among the training frames: pipeline.choose_reference_frame's rule
    (most open and most frontal mouth), restricted to frames the model trained on."""
    o = h.analysis.openness[h.train_idx]
    f = h.analysis.frontalness[h.train_idx]
    top = np.nanmax(o)
    score = np.nan_to_num((o / top if top > 0 else np.ones_like(o)) * f, nan=-1.0)
    return int(h.train_idx[int(np.argmax(score))])


def generate(model: Any, h: HoldoutData, *, audio_driven: bool, steps: int = 25, sampler: str = "ddim",
             seed: int = 0, frames: np.ndarray | None = None, noise_scale: float = 1.0) -> np.ndarray:
    """Our crops for the test frames (pipeline stages), pasted like the baselines: (B, S, S, 3) uint8.

    ``noise_scale`` multiplies the shared x_T (pipeline.initial_noise(seed)); 1 is what ``sync`` does."""
    from .face import topology
    from .face.blend import lower_face_mask
    from .pipeline import (AudioFeatures, complete_landmarks, encode_reference, initial_noise, landmarks_to_crop,
                           sample_faces)

    idx = h.test_idx if frames is None else frames
    S = h.crops.shape[1]
    ref = encode_reference(model, h.crops[reference_frame(h)])
    if audio_driven:
        refs_idx = h.train_idx[topology.pick_spread(h.analysis.openness[h.train_idx], model.num_references)]
        refs = h.analysis.points_box(refs_idx, model.config.model.landmark_box)
        audio = AudioFeatures(h.mels[idx], len(idx), 25.0)
        lm_box = complete_landmarks(model, h.analysis, audio, idx, references=refs)
        lms = landmarks_to_crop(h.analysis, lm_box, idx, model)
    else:
        lms = h.points_crop[idx]
    noise = initial_noise(model, seed) * float(noise_scale)
    gen = sample_faces(model, h.crops[idx], lms, ref, steps=steps, sampler=sampler, seed=seed, batch_size=32,
                       noise=noise)
    return _paste(gen, h.crops[idx], lower_face_mask(S))


def _upscale(crops: np.ndarray, size: int = EVAL_CROP) -> np.ndarray:
    import cv2

    if crops.shape[1] == size:
        return crops
    return np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_CUBIC) for c in crops])


def score(gen: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """PSNR / SSIM (lower half, crop size) and LMD / mouth correlation (mediapipe at 256 px)."""
    from .eval import score_crops

    px = score_crops(gen, truth, landmarks=False)
    lm = score_crops(_upscale(gen), _upscale(truth), landmarks=True)
    return {"psnr": px["psnr"], "ssim": px["ssim"], "lmd": lm["lmd"], "mouth_corr": lm["mouth_corr"],
            "lmd_frames": lm.get("lmd_frames"), "frames": px["frames"],
            "mouth_open_gen": lm["per_frame"].get("mouth_open_gen"),
            "mouth_open_truth": lm["per_frame"].get("mouth_open_truth")}


def holdout_report(checkpoint: str | os.PathLike, shard: str | os.PathLike, holdout: float, *,
                   device: str | None = None, vae: str | os.PathLike | None = None, sampler: str = "ddim",
                   steps: int = 25, seed: int = 0, noise_scale: float = 1.0) -> dict[str, Any]:
    """The hold-out report on one clip: {method: metrics} for METHODS, plus the verdicts."""
    from .pipeline import load_model

    h = load_holdout(shard, holdout)
    if len(h.test_idx) < 3:
        raise InputError(f"{shard}: {len(h.test_idx)} held-out frames with a face; need at least 3")
    model = load_model(checkpoint, device or "cpu", vae=vae)
    truth = h.crops[h.test_idx]
    kw = dict(steps=steps, sampler=sampler, seed=seed, noise_scale=noise_scale)
    outs = {"ours_landmarks": generate(model, h, audio_driven=False, **kw),
            "ours_audio": generate(model, h, audio_driven=True, **kw)}
    base = baselines(h)
    outs.update({k: v for k, v in base.items() if not k.startswith("_")})
    rows = {k: score(v, truth) for k, v in outs.items()}
    rep: dict[str, Any] = {"rows": rows, "test_frames": int(len(h.test_idx)), "train_frames": int(len(h.train_idx)),
                           "crop_size": int(h.crops.shape[1]), "donor_frame": int(base["_donor"]),
                           "reference_frame": reference_frame(h), "sampler": sampler, "sampler_steps": steps,
                           "noise_scale": float(noise_scale), "seed": int(seed)}
    rep["verdict"] = verdicts(rows)
    return rep


# ----------------------------------------------------------------------------------------------
# dubbing: the held-out part split into new audio and template (talkformer_core.eval.dubbing)

SILENCE_SECONDS = 2.0


def _points478(crops: np.ndarray) -> np.ndarray:
    """mediapipe (tracking mode, one sequence) on crops upscaled to EVAL_CROP: (B, 478, 2) px, NaN if missed."""
    from .face.landmarks import LandmarkDetector

    out = []
    with LandmarkDetector(max_num_faces=1) as det:
        for c in _upscale(crops):
            p, found = det.detect(c)
            out.append(p[:, :2].astype(np.float64) if found else np.full((478, 2), np.nan))
    return np.stack(out)


def _anchor_x(content_box: np.ndarray, template_box: np.ndarray) -> np.ndarray:
    """Slide jaw + lips (T, 57, 2) sideways so the lips' mean x is the template's (as anchor_mouth_x)."""
    from .face import topology

    lips = list(topology.LIP_POS)
    dx = template_box[:, lips, 0].mean(1) - content_box[:, 17:, 0].mean(1)
    out = content_box.copy()
    out[:, :, 0] += dx[:, None]
    return out


def dubbing_report(checkpoint: str | os.PathLike, shard: str | os.PathLike, holdout: float, *,
                   device: str | None = None, vae: str | os.PathLike | None = None, sampler: str = "ddim",
                   steps: int = 25, seed: int = 0, noise_scale: float = 1.0, silence: bool = True) -> dict[str, Any]:
    """The dubbing protocol (eval.dubbing) on one clip: trained on [0, 1 - holdout); the held-out part
    split in halves, new audio = the first, template = the second (holdout 0.4: [0.6, 0.8) drives
    [0.8, 1.0)). Opening series of stage 1 (predicted landmarks, crop frame), of the generated faces
    (mediapipe on the crops at 256 px), of the renderer given the new audio's TRUE jaw and lips (placed
    on the template's mouth: does stage 2 follow its landmarks and nothing else?), and the loudness
    model; each correlated with the new audio's truth and with the template. Lip-shape error of
    stage 1 and of the template's own lips against the truth after upper-face alignment. Silence:
    ``SILENCE_SECONDS`` of zeros drive the template; their openings against the person's closed range
    (lowest 10 % of the training frames, measured the same way)."""
    from .eval import dubbing as D
    from .face import topology
    from .face.blend import lower_face_mask
    from .pipeline import (AudioFeatures, audio_features, complete_landmarks, encode_reference, initial_noise,
                           landmarks_to_crop, load_model, sample_faces)

    h = load_holdout(shard, holdout)
    T = len(h.crops)
    split = D.split_clip(T, h.analysis.found, 1.0 - holdout, 1.0 - holdout / 2)
    au, te, tr = split.audio, split.template, split.train
    model = load_model(checkpoint, device or "cpu", vae=vae)
    box = model.config.model.landmark_box
    S = h.crops.shape[1]
    refs_idx = tr[topology.pick_spread(h.analysis.openness[tr], model.num_references)]
    refs = h.analysis.points_box(refs_idx, box)
    ref = encode_reference(model, h.crops[reference_frame(h)])
    noise = initial_noise(model, seed) * float(noise_scale)
    mask = lower_face_mask(S)

    def render(idx: np.ndarray, lms_crop: np.ndarray) -> np.ndarray:
        gen = sample_faces(model, h.crops[idx], lms_crop, ref, steps=steps, sampler=sampler, seed=seed,
                           batch_size=32, noise=noise)
        return _paste(gen, h.crops[idx], mask)

    def stage1(idx: np.ndarray, mels: np.ndarray) -> np.ndarray:
        lm_box = complete_landmarks(model, h.analysis, AudioFeatures(mels, len(idx), 25.0), idx, references=refs)
        return landmarks_to_crop(h.analysis, lm_box, idx, model)  # (n, 131, 2) crop frame

    pts = h.analysis.track.points131_filled.astype(np.float64)
    truth, tmpl = D.mouth_opening(pts[au]), D.mouth_opening(pts[te])
    rows: dict[str, dict[str, Any]] = {}
    true_lips = h.points_crop[au].astype(np.float64) * S
    lm_cfg = model.landmark.cfg
    fitted = getattr(model.landmark, "mouth", None) is not None and model.landmark.mouth.is_fitted
    # the checkpoint's stage 1 ("stage1"); with a fitted mouth model also the transformer alone and the
    # two averaged, from the same checkpoint (LandmarkConfig.mouth_blend)
    variants = [("", None)] + ([("_transformer", 0.0), ("_blend", 0.5)] if fitted else [])
    own = lm_cfg.mouth_blend
    for suffix, blend in variants:
        lm_cfg.mouth_blend = own if blend is None else blend
        try:
            s1 = stage1(te, h.mels[au])
        finally:
            lm_cfg.mouth_blend = own
        rows["stage1" + suffix] = D.dubbing_scores(D.mouth_opening(s1), truth, tmpl)
        rows["stage1" + suffix]["lip_shape_error"] = float(np.nanmean(D.lip_shape_error(s1 * S, true_lips)))
        rows["faces" + suffix] = D.dubbing_scores(D.mouth_opening(_points478(render(te, s1))), truth, tmpl)
    shape_tmpl = D.lip_shape_error(h.points_crop[te].astype(np.float64) * S, true_lips)
    # renderer check: the new audio's true jaw + lips, in the template frame's stable box
    true_box = h.analysis.points_box(au, box)
    tmpl_box = h.analysis.points_box(te, box)
    placed = tmpl_box.copy()
    placed[:, list(topology.CONTENT_POS)] = _anchor_x(true_box[:, list(topology.CONTENT_POS)], tmpl_box)
    gen_true = render(te, landmarks_to_crop(h.analysis, placed, te, model))
    rows["renderer_true_landmarks"] = D.dubbing_scores(D.mouth_opening(_points478(gen_true)), truth, tmpl)
    loud = D.LoudnessModel.fit(D.frame_loudness(h.mels[tr]), D.mouth_opening(pts[tr]))
    rows["loudness"] = D.dubbing_scores(loud.predict(D.frame_loudness(h.mels[au])), truth, tmpl)
    rows["template_lips"] = {"lip_shape_error": float(np.nanmean(shape_tmpl))}
    # self-reconstruction of the template frames (their own audio), stage 1 only
    rows["stage1_own_audio"] = D.dubbing_scores(D.mouth_opening(stage1(te, h.mels[te])), tmpl, tmpl)
    rep: dict[str, Any] = {"rows": rows, "frames": int(len(te)), "train_frames": int(len(tr)),
                           "audio_frames": [int(au[0]), int(au[-1]) + 1], "template_frames": [int(te[0]), int(te[-1]) + 1],
                           "landmark_box": box, "sampler": sampler, "sampler_steps": steps,
                           "mouth_model": bool(getattr(model.landmark, "mouth", None) is not None
                                               and model.landmark.mouth.is_fitted)}
    if silence:
        sil = audio_features(np.zeros(int(16000 * SILENCE_SECONDS), np.float32))
        idx = np.resize(te, sil.num_frames)
        s1_sil = stage1(idx, sil.windows)
        o1 = D.mouth_opening(s1_sil)
        o2 = D.mouth_opening(_points478(render(idx, s1_sil)))
        thr1 = D.closed_threshold(D.mouth_opening(pts[tr]))
        thr2 = D.closed_threshold(D.mouth_opening(_points478(h.crops[tr])))
        rep["silence"] = {"frames": int(sil.num_frames), "stage1_max": float(np.nanmax(o1)), "stage1_closed": thr1,
                          "faces_max": float(np.nanmax(o2)), "faces_p90": float(np.nanquantile(o2, 0.9)),
                          "faces_closed": thr2, "faces_missed": int(np.isnan(o2).sum()),
                          "stage1_ok": bool(np.nanmax(o1) <= thr1), "faces_ok": bool(np.nanmax(o2) <= thr2)}
    return rep


DUB_ROWS = (("stage1", "stage 1 (predicted landmarks)"), ("faces", "generated faces"),
            ("stage1_transformer", "stage 1, transformer alone"), ("faces_transformer", "faces, transformer alone"),
            ("stage1_blend", "stage 1, mouth model + transformer averaged"),
            ("faces_blend", "faces, mouth model + transformer averaged"),
            ("renderer_true_landmarks", "renderer, the audio's true landmarks"), ("loudness", "loudness model"))


def format_dubbing(rep: dict[str, Any], clip: str = "this clip") -> str:
    """Markdown: one row per method (corr with the audio's truth, with the template, the latter given
    the audio), lip-shape error, and the silence check."""
    lines = [f"[finetune] dubbing: template frames {rep['template_frames']} driven by the audio of "
             f"{rep['audio_frames']} ({rep['frames']} frames; {rep['train_frames']} training frames; "
             f"box {rep['landmark_box']}; mouth model {'on' if rep['mouth_model'] else 'off'})",
             "| clip | opening of | corr with the audio's truth ↑ | corr with the template | same, given the audio | "
             "lip-shape error (x nose length) ↓ |", "|---|---|---|---|---|---|"]
    for key, name in DUB_ROWS:
        if key not in rep["rows"]:
            continue
        r = rep["rows"][key]
        lse = r.get("lip_shape_error")
        lines.append(f"| {clip} | {name} | {_f(r['corr_audio'], '.3f')} | {_f(r['corr_template'], '.3f')} | "
                     f"{_f(r['corr_template_given_audio'], '.3f')} | {_f(lse, '.3f')} |")
    lines.append(f"| {clip} | template's own lips | | | | {_f(rep['rows']['template_lips']['lip_shape_error'], '.3f')} |")
    lines.append(f"audio's truth vs template truth: {_f(rep['rows']['stage1']['truth_vs_template'], '.3f')}; "
                 f"stage 1 on the template's own audio: {_f(rep['rows']['stage1_own_audio']['corr_audio'], '.3f')}")
    if "silence" in rep:
        s = rep["silence"]
        lines.append(f"silence ({s['frames']} frames): stage 1 max opening {s['stage1_max']:.4f} (closed range <= "
                     f"{s['stage1_closed']:.4f}: {s['stage1_ok']}); faces max {s['faces_max']:.4f}, 90th pct "
                     f"{s['faces_p90']:.4f} (closed range <= {s['faces_closed']:.4f}: {s['faces_ok']})")
    return "\n".join(lines)


def _better(metric: str, a: float | None, b: float | None) -> bool:
    if a is None or not np.isfinite(a):
        return False
    if b is None or not np.isfinite(b):
        return True
    return a < b if metric == "lmd" else a > b


def verdicts(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The hold-out bar: test-frame landmarks beat the better baseline on PSNR, SSIM, LMD;
    audio-driven beats both baselines on mouth correlation and LMD."""
    base = ("copy_reference", "mean_mouth")
    v = {f"landmarks_{m}": all(_better(m, rows["ours_landmarks"][m], rows[b][m]) for b in base)
         for m in ("psnr", "ssim", "lmd")}
    v.update({f"audio_{m}": all(_better(m, rows["ours_audio"][m], rows[b][m]) for b in base)
              for m in ("mouth_corr", "lmd")})
    v["landmarks_all"] = v["landmarks_psnr"] and v["landmarks_ssim"] and v["landmarks_lmd"]
    v["audio_all"] = v["audio_mouth_corr"] and v["audio_lmd"]
    return v


def _f(v: Any, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


def report_table(reports: dict[str, dict[str, Any]]) -> str:
    """Markdown: one block of rows per clip (method, PSNR, SSIM, LMD, mouth correlation)."""
    lines = ["| clip | method | PSNR (dB) ↑ | SSIM ↑ | LMD (px @256) ↓ | mouth corr ↑ |",
             "|---|---|---|---|---|---|"]
    for clip, rep in reports.items():
        for m in METHODS:
            r = rep["rows"][m]
            lines.append(f"| {clip} | {METHOD_NAMES[m]} | {_f(r['psnr'], '.2f')} | {_f(r['ssim'], '.4f')} | "
                         f"{_f(r['lmd'], '.2f')} | {_f(r['mouth_corr'], '.3f')} |")
    return "\n".join(lines)


def format_report(rep: dict[str, Any]) -> str:
    v = rep["verdict"]
    return (f"[finetune] hold-out: {rep['test_frames']} test frames, {rep['train_frames']} training frames, "
            f"{rep['crop_size']} px crops, {rep['sampler']} {rep['sampler_steps']} steps, "
            f"x_T scale {rep.get('noise_scale', 1.0):g}\n"
            + report_table({"this clip": rep}) + "\n"
            + f"test-frame landmarks beat both baselines on PSNR/SSIM/LMD: {v['landmarks_psnr']}/"
              f"{v['landmarks_ssim']}/{v['landmarks_lmd']}; audio-driven on mouth corr/LMD: "
              f"{v['audio_mouth_corr']}/{v['audio_lmd']}")


class _QuickEval:
    """The metrics printed while training: lower-half PSNR/SSIM with test-frame landmarks on up to
    12 held-out frames (10 DDIM steps, no mediapipe), read from the periodic checkpoint, and a
    preview grid (truth / ours / copy-reference). Without a hold-out: the last training frames,
    labelled as such."""

    def __init__(self, shard: Path, holdout: float, cfg: TalkFormerConfig, device: str | None, vae: Any, seed: int):
        from .eval import lower_half, psnr, ssim

        self.h = load_holdout(shard, holdout)
        sel = self.h.test_idx
        self.frames = sel[np.linspace(0, len(sel) - 1, min(12, len(sel))).round().astype(int)]
        self.label = "held-out" if holdout > 0 else "training-frame (no hold-out)"
        self.device, self.vae, self.seed = device, vae, seed
        self.truth = self.h.crops[self.frames]
        base = baselines(_subset(self.h, self.frames))
        self.copy = base["copy_reference"]
        self.copy_psnr = float(psnr(lower_half(self.copy), lower_half(self.truth)).mean())
        self.copy_ssim = float(ssim(lower_half(self.copy), lower_half(self.truth)).mean())

    def __call__(self, ckpt: Path) -> tuple[dict[str, float], np.ndarray]:
        from .eval import lower_half, psnr, ssim
        from .pipeline import load_model

        model = load_model(ckpt, self.device or "cpu", vae=self.vae)
        gen = generate(model, self.h, audio_driven=False, steps=10, seed=self.seed, frames=self.frames)
        m = {"psnr": float(psnr(lower_half(gen), lower_half(self.truth)).mean()),
             "ssim": float(ssim(lower_half(gen), lower_half(self.truth)).mean())}
        n = min(6, len(gen))
        grid = np.concatenate([np.concatenate(list(x[:n]), axis=1) for x in (self.truth, gen, self.copy)], axis=0)
        return m, grid


def _subset(h: HoldoutData, frames: np.ndarray) -> HoldoutData:
    return HoldoutData(h.crops, h.points_crop, h.train_idx, np.asarray(frames), h.analysis, h.mels)


# ----------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    from .clitools import parser

    ap = parser("finetune", "Train a person-specific TalkFormer on one video of that person.")
    ap.add_argument("--video", required=True, help="a video of the person talking (5-10 s or more, with its audio)")
    ap.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    ap.add_argument("--budget-minutes", type=float, default=30.0,
                    help="wall-clock budget for everything (default 30: a 5-10 s clip on a 2-core CPU)")
    ap.add_argument("--vae", default=None, help="your Stable Diffusion VAE (.safetensors): no autoencoder training; "
                                                "the checkpoint names it by hash and sync / the loader need it")
    ap.add_argument("--init-landmarks", default=None,
                    help="start the landmark module from IP-LAP's weights converted by python -m talkformer_core.convert")
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="train on the first 1-F of the frames and report the hold-out metrics on the rest")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--resume", action="store_true", help="continue the run in OUT.work/ (after Ctrl-C or a budget stop)")
    ap.add_argument("--preset", default="auto", choices=PRESETS,
                    help="auto (default: cpu64 on a CPU, gpu256 on a GPU); cpu64, cpu96: 64 / 96 px, CPU-sized; "
                         "gpu128, gpu256: 128 / 256 px, one GPU; small, paper: the paper's recipe; tiny: tests")
    ap.add_argument("--steps", type=int, default=None, help="cap on TalkFormer steps (the budget still applies)")
    ap.add_argument("--ae-steps", type=int, default=None,
                    help="cap on autoencoder steps (default: --steps; the budget still applies)")
    ap.add_argument("--crop-size", type=int, default=None, help="override the preset's crop size")
    ap.add_argument("--lr", type=float, default=None, help="TalkFormer learning rate (default: the preset's)")
    ap.add_argument("--batch-size", type=int, default=None, help="windows of L frames per step")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast (on by itself with the gpu presets on CUDA; on a CPU only when asked)")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between the printed held-out metrics (0: off)")
    ap.add_argument("--sampler-steps", type=int, default=25, help="sampler steps of the hold-out report")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a busy machine)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and noise")
    ap.add_argument("--report-json", default=None, help="write the result (minutes, steps, hold-out report) here")
    ap.add_argument("--noise-scale", type=float, default=1.0,
                    help="hold-out report: scale of the shared starting noise x_T (1 = what sync does)")
    ap.add_argument("--dubbing", action="store_true",
                    help="with --holdout F: also the dubbing report, the held-out part's second half driven by the "
                         "audio of its first (F = 0.4: frames [0.8, 1) by the audio of [0.6, 0.8); docs/dubbing.md)")
    ap.add_argument("--report-only", action="store_true",
                    help="no training: score the existing --out checkpoint on the hold-out of OUT.work/")
    return ap


def _report_only(a: argparse.Namespace) -> int:
    from .data.preprocess import shard_name

    work = work_dir_for(a.out)
    st = _load_state(work)
    shards = sorted(work.glob(f"shards_*/{shard_name(Path(a.video))}"))
    if not st or not shards or not Path(a.out).is_file():
        print(f"error: --report-only: no finished run in {work} for {a.video}", file=sys.stderr)
        return 2
    holdout = float(st["holdout"]) if not a.holdout else a.holdout
    rep = holdout_report(a.out, shards[0], holdout, device=a.device, vae=a.vae, steps=a.sampler_steps,
                         seed=a.seed, noise_scale=a.noise_scale)
    print(format_report(rep))
    if a.dubbing:
        rep["dubbing"] = dubbing_report(a.out, shards[0], holdout, device=a.device, vae=a.vae, steps=a.sampler_steps,
                                        seed=a.seed, noise_scale=a.noise_scale)
        print(format_dubbing(rep["dubbing"]))
    if a.report_json:
        from .models.checkpoint import read_metadata

        tf_steps = json.loads(read_metadata(a.out).get("training_state", "{}")).get("step", 0)
        Path(a.report_json).write_text(json.dumps({"checkpoint": str(a.out), "minutes": st.get("minutes", {}),
                                                   "steps": {"autoencoder": st.get("ae_steps", 0),
                                                             "talkformer": tf_steps}, "report": rep},
                                                  indent=1, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.report_only:
        return _report_only(a)
    try:
        res = finetune(a.video, a.out, budget_minutes=a.budget_minutes, vae=a.vae, init_landmarks=a.init_landmarks,
                       holdout=a.holdout, device=a.device, resume=a.resume, preset=a.preset, steps=a.steps,
                       ae_steps=a.ae_steps,
                       crop_size=a.crop_size, lr=a.lr, batch_size=a.batch_size, bf16=a.bf16, seed=a.seed,
                       eval_every=a.eval_every, sampler_steps=a.sampler_steps, noise_scale=a.noise_scale,
                       dubbing=a.dubbing, threads=a.threads)
    except TalkFormerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: a resumable checkpoint is in {work_dir_for(a.out)}; run again with --resume",
              file=sys.stderr)
        return 130
    if a.report_json:
        Path(a.report_json).write_text(json.dumps({"checkpoint": str(res.checkpoint), "minutes": res.minutes,
                                                   "steps": res.steps, "report": res.report,
                                                   "history": res.history, "speed": res.speed}, indent=1, default=float))
    print(json.dumps({"checkpoint": str(res.checkpoint), "minutes": {k: round(v, 2) for k, v in res.minutes.items()},
                      "steps": res.steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

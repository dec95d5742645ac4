"""One person-specific run: inputs checked, the clip preprocessed, both stages trained within the
budget (resumable), the mouth model fitted, the checkpoint written, the reports made.

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
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import resolve_preset
from ..errors import CheckpointError, FaceError, InputError, TalkFormerError, VideoError
from .dubbing import dubbing_report, format_dubbing
from .holdout import QuickEval, format_report, holdout_report
from .presets import PRESETS, finetune_config

REPORT_RESERVE_MIN = 1.5  # minutes kept for the hold-out report (sampling + mediapipe)
MAX_HOLDOUT = 0.5
MAX_TURN_AUGMENT = 0.25  # a quarter of the crop: beyond it the "turn" tears the lower face off the upper
MAX_YAW_AUGMENT = 0.125  # an eighth of the crop at its centre: the warp stays one-to-one (|s| * max w' < 1)
MAX_CONTEXT_NOISE = 4.0  # latent units (the latents have about unit std): beyond it the context is noise alone
MAX_AUTOENCODER_EDGE = 20.0  # against the pixel L1 of weight 1
MAX_AUTOENCODER_WARP = 0.25  # a quarter of the crop, 25 % in scale, 14 degrees: well past any pose within a clip


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
                    steps: int | None, preset: str, ae_steps: int | None = None, dubbing: bool = False,
                    noise_scale: float | None = None, turn_augment: float | None = None,
                    context_noise: float | None = None, yaw_augment: float | None = None,
                    autoencoder_warp: float | None = None, autoencoder_edge: float | None = None,
                    decode_refine: int | None = None, mouth_guidance: float | None = None) -> None:
    """Every bad argument, before any long work (clear errors naming the file)."""
    from ..video import probe_video

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
    if turn_augment is not None and not 0.0 <= turn_augment <= MAX_TURN_AUGMENT:
        raise InputError(f"--turn-augment {turn_augment}: expected a fraction of the crop width in "
                         f"[0, {MAX_TURN_AUGMENT}] (0 = off)")
    if yaw_augment is not None and not 0.0 <= yaw_augment <= MAX_YAW_AUGMENT:
        raise InputError(f"--yaw-augment {yaw_augment}: expected a fraction of the crop width in "
                         f"[0, {MAX_YAW_AUGMENT}] (0 = off)")
    if (turn_augment or 0) > 0 and (yaw_augment or 0) > 0:
        raise InputError(f"--turn-augment {turn_augment} with --yaw-augment {yaw_augment}: give one of them (the other 0)")
    if autoencoder_warp is not None and not 0.0 <= autoencoder_warp <= MAX_AUTOENCODER_WARP:
        raise InputError(f"--autoencoder-warp {autoencoder_warp}: expected a fraction of the crop in "
                         f"[0, {MAX_AUTOENCODER_WARP}] (0 = off)")
    if autoencoder_edge is not None and not 0.0 <= autoencoder_edge <= MAX_AUTOENCODER_EDGE:
        raise InputError(f"--autoencoder-edge {autoencoder_edge}: expected a loss weight in "
                         f"[0, {MAX_AUTOENCODER_EDGE}] (0 = off)")
    if context_noise is not None and not 0.0 <= context_noise <= MAX_CONTEXT_NOISE:
        raise InputError(f"--context-noise {context_noise}: expected a noise std in latent units in "
                         f"[0, {MAX_CONTEXT_NOISE}] (0 = off)")
    from ..sampling import check_decode_refine, check_mouth_guidance, check_noise_scale

    check_noise_scale(noise_scale)  # used only by the reports after training: checked now
    check_decode_refine(decode_refine)
    check_mouth_guidance(mouth_guidance)
    for name, p in (("--vae", vae), ("--init-landmarks", init_landmarks)):
        if p is not None and not Path(p).is_file():
            raise InputError(f"{name} {p}: no such file; expected a .safetensors file")
    if Path(out).suffix != ".safetensors":
        raise InputError(f"--out {out}: expected a .safetensors file name")
    from ..paths import check_output_file

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


def load_state(work: Path) -> dict[str, Any]:
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
             sampler: str = "ddim", sampler_steps: int = 25, noise_scale: float | None = None, decode_refine: int | None = None,
             mouth_guidance: float | None = None, threads: int | None = None,
             dubbing: bool = False, turn_augment: float | None = None,
             context_noise: float | None = None, yaw_augment: float | None = None,
             autoencoder_warp: float | None = None, autoencoder_edge: float | None = None,
             progress: ProgressFn | None = None, tqdm_bar: bool = True,
             print_fn: Callable[[str], None] | None = print) -> FinetuneResult:
    """Train a person-specific TalkFormer on one clip (see the module doc). Returns the result.

    ``steps`` / ``ae_steps`` cap the TalkFormer / autoencoder steps (``ae_steps`` defaults to
    ``steps``); the budget still applies, so a step-driven run gives it room.
    ``progress(stage, step, total, info)`` runs after every optimiser step (info: losses; every
    ``eval_every`` steps also "metrics" and "preview", an RGB uint8 grid); raising from it stops
    training after a resumable checkpoint is written, and the exception propagates.
    """
    import torch

    from ..data.preprocess import options_for, process_clip, Rejected, save_shard, shard_name
    from ..train import train
    from ..train.loop import CHECKPOINT_NAME, STATE_NAME

    video, out = Path(video), Path(out)
    validate_inputs(video, out, budget_minutes=budget_minutes, holdout=holdout, vae=vae,
                    init_landmarks=init_landmarks, steps=steps, preset=preset, ae_steps=ae_steps, dubbing=dubbing,
                    noise_scale=noise_scale, turn_augment=turn_augment, context_noise=context_noise,
                    yaw_augment=yaw_augment, autoencoder_warp=autoencoder_warp, autoencoder_edge=autoencoder_edge,
                    decode_refine=decode_refine,
                    mouth_guidance=mouth_guidance)
    if ae_steps is None:
        ae_steps = steps
    if threads:
        torch.set_num_threads(int(threads))
    from ..train.device import fit_batches, resolve_device

    dev = resolve_device(device)  # --device cuda without a GPU: an error now, not after preprocessing
    device, preset = str(dev), resolve_preset(preset, dev)
    cfg = finetune_config(preset, full_landmarks=init_landmarks is not None, vae=vae is not None)
    if crop_size:
        cfg.model.image_size = cfg.model.autoencoder.resolution = int(crop_size)
    if lr:
        cfg.train.lr = float(lr)
    if batch_size:
        cfg.train.batch_size = int(batch_size)
    if turn_augment is not None:
        cfg.train.turn_augment = float(turn_augment)
    if context_noise is not None:
        cfg.train.context_noise = float(context_noise)
    if yaw_augment is not None:
        cfg.train.yaw_augment = float(yaw_augment)
    if autoencoder_warp is not None:
        cfg.train.autoencoder_warp = float(autoencoder_warp)
    if autoencoder_edge is not None:
        cfg.train.autoencoder_edge_weight = float(autoencoder_edge)
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
    st = load_state(work) if resume else {}
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
                            resume=(ae_dir / STATE_NAME).exists(), device=device, bf16=bf16, seed=seed,
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
        ae_ck = ae_dir / CHECKPOINT_NAME
    result.steps["autoencoder"] = int(st.get("ae_steps", 0))

    # 3. TalkFormer, joint loss (eq. 6); held-out quick metrics from the periodic checkpoint
    tf_dir = work / "talkformer"
    tf_left = budget_minutes - sum(spent.values()) - reserve
    say(f"[finetune] stage talkformer: {max(tf_left, 0):.1f} min")
    quick = QuickEval(shard, holdout, cfg, device=device, vae=vae, seed=seed) if eval_every else None

    bar = _BudgetBar("talkformer", tf_left, steps, enabled=tqdm_bar)

    def tf_cb(step: int, total: int, vals: dict[str, float]) -> None:
        bar.step(step, vals)
        info: dict[str, Any] = dict(vals)
        if quick is not None and step % eval_every == 0:
            m, preview = quick(tf_dir / CHECKPOINT_NAME)
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
                    resume=(tf_dir / STATE_NAME).exists(), device=device, bf16=bf16, seed=seed,
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
    from ..models.checkpoint import PURPOSE_KEY, copy_with_metadata

    copy_with_metadata(res.checkpoint, out, {PURPOSE_KEY: f"person:{video.stem}"})  # atomic
    say(f"[finetune] wrote {out} ({result.steps['talkformer']} TalkFormer steps, "
        f"{sum(spent.values()):.1f} min so far)")

    # 4. the hold-out report
    if holdout > 0:
        t0 = time.time()
        result.report = holdout_report(out, shard, holdout, device=device, vae=vae, sampler=sampler,
                                       steps=sampler_steps, seed=seed, noise_scale=noise_scale,
                                       decode_refine=decode_refine, mouth_guidance=mouth_guidance)
        say(format_report(result.report))
        if dubbing:
            result.report["dubbing"] = dubbing_report(out, shard, holdout, device=device, vae=vae, sampler=sampler,
                                                      steps=sampler_steps, seed=seed, noise_scale=noise_scale,
                                                      decode_refine=decode_refine, mouth_guidance=mouth_guidance)
            say(format_dubbing(result.report["dubbing"]))
        spent["report"] = (time.time() - t0) / 60.0
    result.minutes = dict(spent)
    st.update(minutes=spent, done=True)
    _save_state(work, st)
    return result


def mouth_training_data(shard: str | os.PathLike, frames: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(mels (M, 80, 16), jaw + lips (M, 57, 2) in the stable box frame) of the found frames in
    ``frames`` of a shard, in time order: what ``MouthModel.fit`` takes."""
    from ..data.dataset import load_shard, stage1_box_frame
    from ..face import topology

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
    from ..models.checkpoint import checkpoint_config, read_metadata, replace_tensors, safetensors_keys
    from ..models.mouth_model import MouthModel

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

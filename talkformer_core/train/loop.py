"""The one training loop: autoencoder stage and TalkFormer stage, one process or torchrun (DDP).

Python API (the CLI in ``__main__`` and ``finetune`` call this; there is no second loop):

    result = train(cfg, stage="talkformer", data="shards/", out="runs/x", steps=1000, ...)  # TrainOptions
    result.checkpoint  # Path of the final checkpoint (models/checkpoint format, atomic)
    result.metrics     # {"loss": [...], "ldm": [...], "l1": [...], "steps_per_s": ..., ...}

Each optimiser step runs the stage's loss (``steps.TalkFormerStep``: eq. 6, the autoencoder
frozen; ``steps.AutoencoderStep``: L1 + KL) over its micro-batches; Adam; gradient clipping;
optional EMA, bf16 autocast (CUDA only), gradient checkpointing (ResBlocks and TalkFormer blocks).
Stage ``autoencoder`` is saved with scale_factor = 1 / std of the training latents (LDM).

Determinism (bit-identical ``--resume``, DDP = gradient accumulation):
  - batches: ``batching.StepBatchSampler``, a pure function of (seed, step);
  - diffusion t and noise of micro-batch m at step s come from a generator seeded with (seed, s, m);
  - dropout uses torch's global RNG, saved with the optimizer, EMA and step in the training state.
So a two-process run sees the same micro-batches and noise as one process accumulating over the
two, and a resumed run the same as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import TalkFormerConfig, preset
from ..errors import CheckpointError, InputError
from ..signals import defer_sigint
from .batching import StepBatchSampler, _seed_of, balance_weights
from .distributed import init_distributed
from .ema import EMA
from .latents import LATENT_CACHE_MAX_BYTES, LatentCache, latent_scale_factor
from .log import Logger
from .options import STAGES, TrainOptions
from .preview import _write_preview
from .steps import AutoencoderStep, TalkFormerStep, enable_grad_checkpointing
from .weights import init_landmarks_from, load_autoencoder_file

CHECKPOINT_NAME = "last.safetensors"
STATE_NAME = "last.state.safetensors"


def _trainable(model: nn.Module, stage: str) -> dict[str, nn.Module]:
    if stage == "autoencoder":
        return {"autoencoder": model}
    mods = {"landmark": model.landmark, "unet": model.unet}
    if model.appearance is not None:
        mods["appearance"] = model.appearance
    return mods


@dataclass
class TrainResult:
    checkpoint: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def _to(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# Training works for any caller: hosts such as ComfyUI run every node under torch.inference_mode(),
# where no tensor records a graph and backward() fails.
@torch.inference_mode(False)
@torch.enable_grad()
def train(cfg: TalkFormerConfig | str, options: TrainOptions | None = None, **fields: Any) -> TrainResult:
    """Train one stage as ``options`` say; returns the final checkpoint path and the metrics
    (per-step losses). Keywords are TrainOptions fields, alone (``train(cfg, stage=..., data=...,
    out=..., steps=...)``) or overriding those of ``options``.

    The metrics also say where the wall time went: ``compute_seconds`` (forward, backward and
    optimiser step; CUDA synchronised, so it is the GPU's busy time up to the launch gaps),
    ``data_seconds`` (batch assembly and transfer), ``busy_share`` and ``samples_per_s``.
    """
    from tqdm import tqdm

    from ..data.dataset import FrameDataset, TalkingFaceDataset
    from ..models.autoencoder import AutoencoderKL
    from ..models.checkpoint import (capture_rng_state, checkpoint_config, external_vae_spec,
                                     load_model_state, load_training_state, read_checkpoint,
                                     resolve_external_vae, restore_rng_state, save_checkpoint,
                                     save_training_state)
    from ..models.model import TalkFormer

    o = TrainOptions(**fields) if options is None else dataclasses.replace(options, **fields)
    if o.stage not in STAGES:
        raise InputError(f"stage {o.stage!r}: expected one of {STAGES}")
    cfg = copy.deepcopy(preset(cfg) if isinstance(cfg, str) else cfg)
    if o.batch_size is not None:
        cfg.train.batch_size = int(o.batch_size)
    if o.lr is not None:
        if o.stage == "autoencoder":
            cfg.train.autoencoder_lr = float(o.lr)
        else:
            cfg.train.lr = float(o.lr)
    out = Path(o.out)
    dd, dev = init_distributed(o.device)
    if dd.main:
        from ..paths import check_output_dir

        check_output_dir(out)  # a run folder it cannot write: an error now, not at the first save
        out.mkdir(parents=True, exist_ok=True)
    ck_path, st_path = out / CHECKPOINT_NAME, out / STATE_NAME
    start_step = 0
    torch.manual_seed(o.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    np.random.seed(o.seed % 2**32)

    # ---- model
    external = None
    resume_tensors = None
    if o.resume:
        if not (ck_path.exists() and st_path.exists()):
            raise CheckpointError(f"--resume: {ck_path} and {st_path} are needed; found "
                                  f"{[p.name for p in (ck_path, st_path) if p.exists()]}")
        resume_tensors, meta = read_checkpoint(ck_path)
        saved = checkpoint_config(meta, ck_path)
        if saved.to_json() != cfg.to_json():
            warnings.warn(f"--resume: using the config stored in {ck_path}", stacklevel=2)
        cfg = saved
        if o.stage == "talkformer":
            external = resolve_external_vae(meta, o.vae, checkpoint_path=ck_path)
    if o.stage == "autoencoder":
        model = AutoencoderKL(cfg.model.autoencoder)
        model.requires_grad_(True)
        if resume_tensors is not None:
            load_model_state(model, resume_tensors, "autoencoder", source=ck_path)
    else:
        ae_state = None
        if resume_tensors is None:
            if o.autoencoder is not None and o.vae is not None:
                raise InputError("give --autoencoder (ours) or --vae (an SD VAE), not both")
            if o.autoencoder is not None:
                ae_state, cfg.model.autoencoder = load_autoencoder_file(o.autoencoder, cfg)
            elif o.vae is not None:
                from ..models.checkpoint import read_vae_file

                sd = read_vae_file(o.vae)
                ae_state = {f"autoencoder.{k}": v for k, v in sd.items()}
                external = external_vae_spec(sd, cfg.model.autoencoder)
                external = {"path": o.vae, **external}
            else:
                raise InputError("stage talkformer needs a frozen autoencoder: --autoencoder AE.safetensors "
                                 "(from --stage autoencoder) or --vae SD_VAE.safetensors")
        model = TalkFormer(cfg)
        if resume_tensors is not None:
            allow = ("autoencoder.",) if external is not None else ()
            load_model_state(model, resume_tensors, "", source=ck_path, allow_missing=allow)
            if external is not None:
                model.autoencoder.load_ldm_state_dict(external.state_dict, source=o.vae)
                external = {"path": o.vae, "config": dataclasses.asdict(external.config),
                            "scale_factor": external.scale_factor, "sha256": external.sha256}
        else:
            load_model_state(model.autoencoder, ae_state, "autoencoder", source=o.autoencoder or o.vae)
            if o.init_landmarks is not None:
                init_landmarks_from(model, o.init_landmarks)
        model.autoencoder.eval()
    model.to(dev)
    if o.channels_last if o.channels_last is not None else dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if o.grad_checkpointing and o.stage == "talkformer":
        enable_grad_checkpointing(model.unet)
        if model.appearance is not None:
            enable_grad_checkpointing(model.appearance)

    perceptual = None
    if o.lpips is not None and o.stage == "autoencoder":
        try:
            from ..eval.lpips import load_lpips  # the eval helper's LPIPS module, weights from the user
        except ImportError:
            raise InputError("--lpips: talkformer_core.eval.lpips is not available in this version") from None
        perceptual = load_lpips(o.lpips).to(dev).eval().requires_grad_(False)

    step_module: nn.Module = (AutoencoderStep(model, cfg, perceptual) if o.stage == "autoencoder"
                              else TalkFormerStep(model, cfg))
    trainable = _trainable(model, o.stage)
    params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.train.autoencoder_lr if o.stage == "autoencoder" else cfg.train.lr)
    ema_obj = EMA(trainable, cfg.train.ema_decay) if o.ema else None
    wrapped = step_module
    if dd.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(step_module, device_ids=[dev.index] if dev.type == "cuda" else None)

    # ---- data
    if o.stage == "autoencoder":
        dataset = FrameDataset(o.data, cfg, frames=o.frames)
    else:
        dataset = TalkingFaceDataset(o.data, cfg, split="train", frames=o.frames, seed=o.seed)

    if o.stage == "talkformer" and o.cache_latents is not False:
        turns = step_module.turns if cfg.train.turn_augment > 0 else []
        yaws = step_module.yaws if cfg.train.yaw_augment > 0 else []
        need = LatentCache.estimate_bytes(model, dataset, len(turns) + 2 * len(yaws))
        if o.cache_latents or need <= LATENT_CACHE_MAX_BYTES:
            step_module.latents = LatentCache(model, dataset, dev, turns=turns, yaws=yaws)
            metrics_cache = need
            if not o.preview_every:  # the step reads latents only: no image tensors per sample
                dataset.images = False
        else:
            metrics_cache = 0
    else:
        metrics_cache = 0

    if o.resume:
        st = load_training_state(st_path)
        if st.get("stage") != o.stage:
            raise CheckpointError(f"{st_path}: a {st.get('stage')!r} run, not {o.stage!r}")
        opt.load_state_dict(st["optimizer"])
        if ema_obj is not None:
            if "ema" not in st:
                raise CheckpointError(f"{st_path}: the run had no EMA; resume without --ema")
            ema_obj.load_state_dict(st["ema"])
        start_step = int(st["step"])
        restore_rng_state(st["rng"])
        if st.get("world", 1) != dd.world or st.get("grad_accum", 1) != o.grad_accum or \
                st.get("batch_size") != cfg.train.batch_size:
            warnings.warn("--resume with a different world size / batch size / grad_accum: the batch "
                          "sequence differs from the original run's", stacklevel=2)

    weights = balance_weights(dataset.openness(), cfg.train.balance_openness) if cfg.train.balance_openness > 0 else None
    sampler = StepBatchSampler(len(dataset), cfg.train.batch_size, dd.world, dd.rank, o.grad_accum, o.seed,
                               start_step, o.steps, weights=weights)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=o.num_workers,
                                         pin_memory=dev.type == "cuda", persistent_workers=False,
                                         # its own generator: creating the iterator must not draw
                                         # from the global RNG (dropout's), or a resume would differ
                                         generator=torch.Generator().manual_seed(o.seed))
    logger = Logger(out, start_step, dd.main)
    metrics: dict[str, Any] = {"loss": [], "steps": [], "start_step": start_step, "latent_cache_bytes": metrics_cache}
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=o.bf16 and dev.type in ("cuda", "cpu"))
    sync_dev = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t_compute = t_data = 0.0

    def save(step: int) -> None:
        if not dd.main:
            return
        with defer_sigint():  # a second Ctrl-C must not leave a checkpoint and a state of different steps
            _save(step)

    def _save(step: int) -> None:
        save_cfg = cfg
        if o.stage == "autoencoder":
            modules = {"autoencoder": model}
        else:
            modules = {"autoencoder": model.autoencoder, **trainable}
        if ema_obj is not None:
            modules["ema"] = ema_obj.state_dict()
        ext = None if external is None else {k: v for k, v in external.items() if k != "path"}
        save_checkpoint(ck_path, modules, save_cfg, external_vae=ext,
                        extra_metadata={"training_state": {"step": step, "stage": o.stage}})
        state = {"optimizer": opt.state_dict(), "rng": capture_rng_state(), "step": step, "stage": o.stage,
                 "world": dd.world, "grad_accum": o.grad_accum, "batch_size": cfg.train.batch_size}
        if ema_obj is not None:
            state["ema"] = ema_obj.state_dict()
        save_training_state(st_path, state)

    t_start = time.time()
    step = start_step
    bar = tqdm(total=o.steps, initial=start_step, desc=f"train {o.stage}", disable=not (o.progress and dd.main))
    it = iter(loader)
    step_module.train()
    if o.stage == "talkformer":
        model.autoencoder.eval()
    n_done = 0
    # Exact resume after an interrupt: nothing of an unfinished step may reach the saved state. The
    # forward changes BatchNorm buffers and draws dropout masks from the global RNG before the
    # optimiser step, so both are snapshotted at each step boundary and restored if the step is cut
    # short; the optimiser step and its bookkeeping run with Ctrl-C held (signals.defer_sigint).
    buffers = _buffers(trainable)
    in_step = False
    try:
        while step < o.steps:
            snap_buffers = [b.detach().clone() for b in buffers]
            snap_rng = capture_rng_state()
            in_step = True
            opt.zero_grad(set_to_none=True)
            logs_sum: dict[str, float] = {}
            loss_sum = 0.0
            last_batch = None
            for a in range(o.grad_accum):
                t0 = time.perf_counter()
                batch = _to(next(it), dev)
                t1 = time.perf_counter()
                t_data += t1 - t0
                last_batch = batch
                g = torch.Generator(device=dev).manual_seed(_seed_of(o.seed, step, dd.rank * o.grad_accum + a))
                sync = dd.world == 1 or a == o.grad_accum - 1
                ctx = wrapped.no_sync() if (not sync and hasattr(wrapped, "no_sync")) else contextlib.nullcontext()
                with ctx:
                    with autocast:
                        loss, logs = wrapped(batch, g)
                    (loss / o.grad_accum).backward()
                loss_sum += float(loss.detach()) / o.grad_accum
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + float(v) / o.grad_accum
                t_compute += time.perf_counter() - t1
            t1 = time.perf_counter()
            with defer_sigint():
                gnorm = (torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip) if cfg.train.grad_clip > 0
                         else None)
                opt.step()
                step += 1
                if ema_obj is not None:
                    ema_obj.update(step)
                in_step = False
            sync_dev()
            t_compute += time.perf_counter() - t1
            n_done += 1
            vals = {"loss": loss_sum, **logs_sum}
            if dd.world > 1:  # log the mean over processes
                v = torch.tensor(list(vals.values()), dtype=torch.float64, device=dev)
                dist.all_reduce(v)
                vals = dict(zip(vals.keys(), (v / dd.world).tolist()))
            if gnorm is not None:
                vals["grad_norm"] = float(gnorm)
            vals["lr"] = opt.param_groups[0]["lr"]
            metrics["steps"].append(step)
            for k, v in vals.items():
                metrics.setdefault(k, []).append(v)
            if dd.main and (step % o.log_every == 0 or step == o.steps):
                logger.log(step, vals)
            if dd.main and o.preview_every and step % o.preview_every == 0:
                _write_preview(out, step, model, last_batch, cfg, o.stage, o.preview_steps, o.seed, logger)
                step_module.train()
                if o.stage == "talkformer":
                    model.autoencoder.eval()
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in vals.items() if k in ("loss", "ldm", "l1", "kl")})
            if o.save_every and step % o.save_every == 0 and step < o.steps:
                save(step)
            if dd.main and o.callback is not None:
                o.callback(step, o.steps, vals)
            stop = o.budget_minutes is not None and (time.time() - t_start) > 60.0 * o.budget_minutes
            if dd.world > 1:
                f = torch.tensor([float(stop)], device=dev)
                dist.all_reduce(f)
                stop = bool(f.item() > 0)
            if stop:
                metrics["stopped_by_budget"] = True
                break
    except BaseException:
        bar.close()
        if in_step:  # cut inside a step: back to the state at its start
            with torch.no_grad():
                for b, v in zip(buffers, snap_buffers):
                    b.copy_(v)
            restore_rng_state(snap_rng)
        if step > start_step:
            save(step)  # an interrupt keeps what was learned; --resume continues from here
        logger.close()
        raise
    bar.close()
    elapsed = time.time() - t_start
    metrics["steps_per_s"] = n_done / elapsed if elapsed > 0 else float("nan")
    per_step = cfg.train.batch_size * dd.world * o.grad_accum
    metrics.update(compute_seconds=t_compute, data_seconds=t_data, wall_seconds=elapsed,
                   busy_share=t_compute / elapsed if elapsed > 0 else float("nan"),
                   samples_per_s=n_done * per_step / elapsed if elapsed > 0 else float("nan"),
                   batch_size=cfg.train.batch_size)
    metrics["final_step"] = step

    if o.stage == "autoencoder":  # LDM: scale factor = 1 / std of the training latents
        sf = latent_scale_factor(model, dataset, dev, o.seed)
        cfg.model.autoencoder.scale_factor = sf
        model.scale_factor = sf
        metrics["scale_factor"] = sf
    save(step)
    logger.close()
    if dd.world > 1:
        dist.barrier()
    return TrainResult(ck_path, metrics)


def _buffers(modules: Mapping[str, nn.Module]) -> list[Tensor]:
    """Every buffer a training forward may change in place (BatchNorm running statistics and
    num_batches_tracked), of the trainable modules."""
    seen: dict[int, Tensor] = {}
    for m in modules.values():
        for b in m.buffers():
            seen.setdefault(id(b), b)
    return list(seen.values())

"""The training device: a clear error for a missing GPU, and batches sized to the GPU's memory.

``finetune`` calls these before any long work: ``resolve_device`` (``--device cuda`` without CUDA
is an error, not a silent CPU run), then on CUDA ``fit_batches``, which measures the preset's
activation bytes per sample on the device (one forward at one sample, the tensors autograd keeps
counted) and takes the largest batch up to the preset's that fits the free memory
(``batch_for_device``); a preset that does not fit at a useful batch names the one that does.
"""
from __future__ import annotations

import copy
import torch

from ..config import PERSON_PRESETS, TalkFormerConfig
from ..errors import InputError

GIB = 1024 ** 3
HEADROOM = 0.85  # of the free memory: allocator fragmentation, cuDNN workspaces, the sampler later
WORKSPACE = 1.3  # activations kept for backward -> peak of a step (transients, gradients of activations)
MIN_BATCH = 4  # below this a person preset's step is too noisy to be worth running (cpu64 trains at 4)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None: CUDA when available, else the CPU. ``cuda`` without a CUDA device: InputError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"--device {device!r}: not a torch device ({e}); expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA GPU is visible to PyTorch {torch.__version__} "
                             f"(built for CUDA {torch.version.cuda or 'none: a CPU-only build'}); "
                             "train on the CPU with --device cpu --preset cpu64, or install PyTorch with CUDA")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def batch_for_device(preset_batch: int, free_bytes: int, per_sample_bytes: int, fixed_bytes: int = 0,
                     headroom: float = HEADROOM) -> int:
    """The largest batch <= ``preset_batch`` whose memory (``fixed_bytes`` + batch x
    ``per_sample_bytes``) fits ``headroom`` of ``free_bytes``; 0 when not even one sample fits."""
    if per_sample_bytes <= 0:
        raise ValueError(f"per_sample_bytes={per_sample_bytes}: expected > 0")
    room = headroom * float(free_bytes) - float(fixed_bytes)
    return int(max(0, min(int(preset_batch), int(room // per_sample_bytes))))


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn()`` runs (distinct storages)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen[key] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # no storage (e.g. a wrapper tensor): count its size
            seen[(id(t), 0)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return int(sum(seen.values()))


def sample_bytes(cfg: TalkFormerConfig, device: torch.device | str, bf16: bool, stage: str) -> tuple[int, int]:
    """(per-sample bytes of a training step, fixed bytes) of ``stage`` on ``device``, measured: one
    sample's forward (a window of L frames for talkformer, one crop for autoencoder) with the
    tensors kept for backward counted, times WORKSPACE; fixed = weights, gradients and Adam's two
    moments of the trained modules (4 x their fp32 bytes), plus the frozen autoencoder."""
    from ..models.autoencoder import AutoencoderKL
    from ..models.model import TalkFormer

    dev = torch.device(device)
    cfg = copy.deepcopy(cfg)
    ac = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16 and dev.type in ("cuda", "cpu"))
    S, L = cfg.model.image_size, cfg.model.sequence_length
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(0)
        if stage == "autoencoder":
            ae = AutoencoderKL(cfg.model.autoencoder).to(dev)
            x = torch.zeros(1, 3, S, S, device=dev)

            def run() -> None:
                with ac:
                    post = ae.encode(x)
                    ae.decode(post.mean + post.std * torch.randn_like(post.std))

            trained, frozen = ae, None
        else:
            model = TalkFormer(cfg).to(dev)
            model.autoencoder.requires_grad_(False)
            h, C = cfg.model.latent_size, cfg.model.latent_channels
            z = torch.zeros(L, C, h, h, device=dev)
            lms = torch.full((L, 131, 2), 0.5, device=dev)
            t = torch.full((L,), 500, device=dev, dtype=torch.long)

            def run() -> None:
                with ac:
                    ref = model.prepare_reference(z[:1])
                    model.unet(z, t, lms, ref, num_frames=L)

            trained, frozen = model.unet, model.autoencoder
        per = int(_saved_bytes(run) * WORKSPACE)
    fixed = 4 * sum(p.numel() * 4 for p in trained.parameters())
    if frozen is not None:
        fixed += sum(p.numel() * p.element_size() for p in frozen.parameters())
    return max(per, 1), int(fixed)


def fit_batches(cfg: TalkFormerConfig, device: torch.device, bf16: bool, *, train_autoencoder: bool = True,
                free_bytes: int | None = None, name: str | None = None) -> tuple[int, int]:
    """(talkformer batch, autoencoder batch) for ``cfg`` (preset ``name``) on CUDA ``device``: the
    preset's batches, smaller where the free memory asks for it. InputError before any training when
    the preset does not fit at MIN_BATCH (or its own batch if smaller), naming the largest smaller
    person preset that does (``free_bytes`` given: no device query, for tests)."""
    from ..config import preset as named

    name = name or cfg.name
    if free_bytes is None:
        free_bytes = int(torch.cuda.mem_get_info(device)[0])
    tf_b, ae_b = _fit(cfg, device, bf16, free_bytes, train_autoencoder)
    if tf_b and (ae_b or not train_autoencoder):
        return tf_b, ae_b
    need = _need(cfg, device, bf16, train_autoencoder)
    order = list(reversed(PERSON_PRESETS))  # gpu256, gpu128, cpu96, cpu64: largest first
    smaller = order[order.index(name) + 1:] if name in order else order
    fits = next((p for p in smaller if all(_fit(named(p), device, bf16, free_bytes, train_autoencoder)
                                           [:1 + train_autoencoder])), None)
    raise InputError(f"preset {name}: needs about {need / GIB:.1f} GiB of GPU memory at batch "
                     f"{min(MIN_BATCH, cfg.train.batch_size)}, and {device} has {free_bytes / GIB:.1f} GiB free; "
                     + (f"--preset {fits} fits" if fits else "no person preset fits: train on the CPU with --device cpu"))


def _fit(cfg: TalkFormerConfig, device: torch.device, bf16: bool, free: int, train_ae: bool) -> tuple[int, int]:
    per, fixed = sample_bytes(cfg, device, bf16, "talkformer")
    tf_b = batch_for_device(cfg.train.batch_size, free, per, fixed)
    tf_b = tf_b if tf_b >= min(MIN_BATCH, cfg.train.batch_size) else 0
    ae_b = 0
    if train_ae:
        per, fixed = sample_bytes(cfg, device, bf16, "autoencoder")
        ae_b = batch_for_device(cfg.train.autoencoder_batch_size, free, per, fixed)
        ae_b = ae_b if ae_b >= min(MIN_BATCH, cfg.train.autoencoder_batch_size) else 0
    return tf_b, ae_b


def _need(cfg: TalkFormerConfig, device: torch.device, bf16: bool, train_ae: bool) -> int:
    """Bytes (before headroom) of the preset's hungrier stage at MIN_BATCH."""
    out = []
    for stage, b in (("talkformer", cfg.train.batch_size), ("autoencoder", cfg.train.autoencoder_batch_size)):
        if stage == "autoencoder" and not train_ae:
            continue
        per, fixed = sample_bytes(cfg, device, bf16, stage)
        out.append(fixed + min(MIN_BATCH, b) * per)
    return int(max(out) / HEADROOM)

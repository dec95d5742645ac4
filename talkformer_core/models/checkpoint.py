"""Safetensors checkpoints: one file for a whole TalkFormer model, config in the metadata.

Checkpoints are safetensors only; nothing is unpickled. A file holds every module of a
model under a prefix (``autoencoder.``, ``landmark.``, ``appearance.``, ``unet.``, optionally an
``ema.`` copy) and these metadata strings:

    format          "talkformer"
    format_version  "1"
    kind            "talkformer" (our model) or "iplap" (IP-LAP weights imported by convert.py)
    config          TalkFormerConfig.to_json()
    autoencoder     "embedded", or JSON {"config", "scale_factor", "sha256"} naming an external VAE
                    (a user's SD VAE); then no ``autoencoder.*`` tensors are stored
    created_by      "talkformer_core <version>"
    training_state  optional JSON (step, epoch, ...)

Loading checks every key and shape against the model and names each mismatch. The optimizer / EMA /
RNG state for bit-exact resume goes to a second safetensors file (``save_training_state``): tensors
stored raw, everything else as JSON in the metadata.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..config import AutoencoderConfig, TalkFormerConfig, _from_dict
from ..errors import CheckpointError, VAEMismatchError

FORMAT = "talkformer"
FORMAT_VERSION = "1"
KINDS = ("talkformer", "iplap")
MODULE_PREFIXES = ("autoencoder", "landmark", "appearance", "unet", "ema")
TRAINING_STATE_FORMAT = "talkformer-training-state"

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


# ----------------------------------------------------------------------------------------------
# Low-level file checks (shared with autoencoder.py)

def _looks_like_pickle(head: bytes) -> bool:
    # torch.save since 1.6 writes a zip archive; older torch.save and plain pickle start with the
    # PROTO opcode 0x80 followed by the protocol number (2..5).
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a safetensors file's JSON header without reading any tensor data.

    Raises CheckpointError naming the file if it is missing, a pickle, or not safetensors.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if _looks_like_pickle(head):
            raise CheckpointError(
                f"only safetensors checkpoints are read; {p} looks like a pickle (torch.save / "
                f".ckpt / .pt / .pth) file, which is never unpickled. Convert it to .safetensors "
                f"first (e.g. safetensors.torch.save_file on a state dict you trust).")
        if len(head) < 8:
            raise CheckpointError(f"{p}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > _MAX_HEADER or n > size - 8:
            raise CheckpointError(f"{p}: not a safetensors file (bad header length {n}); "
                                  f"only safetensors checkpoints are read")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: not a safetensors file (header is not a JSON object)")
    return header


def safetensors_keys(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype string, shape)} of a safetensors file, from the header only."""
    header = read_safetensors_header(path)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def load_safetensors(path: str | os.PathLike, keys: list[str] | None = None,
                     device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read tensors (all, or only ``keys``) from a safetensors file after validating it."""
    from safetensors import safe_open

    read_safetensors_header(path)  # the clear errors come from here
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            names = list(f.keys()) if keys is None else keys
            return {k: f.get_tensor(k) for k in names}
    except Exception as e:  # a truncated file or a corrupt offset table
        raise CheckpointError(f"{path}: could not read safetensors tensors ({e})") from None


def state_dict_sha256(sd: Mapping[str, torch.Tensor]) -> str:
    """Deterministic SHA-256 of a state dict: sorted keys, each with dtype, shape and raw bytes.

    Names an external VAE (a user's SD VAE) in a checkpoint. Independent of device and of key order;
    depends on dtype (an fp16 copy of a VAE is a different file).
    """
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach()
        h.update(k.encode("utf-8") + b"\0")
        h.update(str(t.dtype).removeprefix("torch.").encode() + b"\0")
        h.update(json.dumps(list(t.shape)).encode() + b"\0")
        t = t.to("cpu").contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Model checkpoints

def _config_json(config: Any) -> str:
    if isinstance(config, str):
        json.loads(config)  # must be JSON
        return config
    if hasattr(config, "to_json"):
        return config.to_json()
    if isinstance(config, dict):
        return json.dumps(config, sort_keys=True)
    raise TypeError(f"config must be a TalkFormerConfig, dict or JSON string, got {type(config).__name__}")


def _as_state_dict(m: nn.Module | Mapping[str, torch.Tensor], name: str) -> Mapping[str, torch.Tensor]:
    sd = m.state_dict() if isinstance(m, nn.Module) else m
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"module {name!r}: state dict entry {k!r} is a {type(v).__name__}, not a tensor")
    return sd


def _gather_tensors(modules: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Prefix each module's state dict; make tensors contiguous CPU copies safetensors accepts."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, m in modules.items():
        if not name or name.startswith(".") or name.endswith("."):
            raise ValueError(f"bad module name {name!r}")
        for k, v in _as_state_dict(m, name).items():
            t = v.detach().to("cpu").contiguous()
            # safetensors refuses tensors sharing storage (tied weights, views): store a copy
            if t.numel() and t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            out[f"{name}.{k}"] = t
    return out


# ----------------------------------------------------------------------------------------------
# Reading VAE weights (a VAE file or a full SD / LDM checkpoint; the external VAE is hashed on these)

_PREFIX = "first_stage_model."
_ATTN_1X1 = (".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")


def _vae_keys(keys, source) -> list[str]:
    """Which keys of a file/state dict are the first stage (in the file's own naming)."""
    keys = list(keys)
    if any(k.startswith(_PREFIX) for k in keys):  # full SD / LDM checkpoint: take the first stage only
        keys = [k for k in keys if k.startswith(_PREFIX)]
    # LDM training checkpoints also hold the loss (LPIPS, discriminator) and EMA bookkeeping
    sel = [k for k in keys if not k.removeprefix(_PREFIX).startswith(("loss.", "model_ema."))]
    if any(".down_blocks." in k or ".up_blocks." in k or k.startswith("encoder.down_blocks") for k in sel):
        raise CheckpointError(f"{source or 'state dict'}: this VAE is in the diffusers key layout "
                              f"(down_blocks/up_blocks); expected the LDM layout (encoder.down.N.block.M...)")
    return sel


def normalize_vae_state_dict(sd: Mapping[str, torch.Tensor], source=None) -> dict[str, torch.Tensor]:
    """LDM-layout first-stage weights without prefix: drop ``first_stage_model.``, ``loss.*`` and
    (in a full checkpoint) every other module; 2-D attention 1x1 weights become (C, C, 1, 1)."""
    out = {}
    for k in _vae_keys(sd.keys(), source):
        v = sd[k]
        k = k.removeprefix(_PREFIX)
        if v.ndim == 2 and k.endswith(_ATTN_1X1) and ".attn" in k:
            v = v.reshape(*v.shape, 1, 1)
        out[k] = v
    return out


def read_vae_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The first-stage weights of a safetensors file (VAE alone or a full SD/LDM checkpoint),
    normalised as ``normalize_vae_state_dict``; only those tensors are read from disk."""
    p = Path(path)
    keys = _vae_keys(safetensors_keys(p), p)  # header only; pickles refused here
    if not keys:
        raise CheckpointError(f"{p}: contains no autoencoder weights (expected LDM keys encoder.*, "
                              f"decoder.*, quant_conv.*, post_quant_conv.*, optionally under "
                              f"{_PREFIX!r})")
    return normalize_vae_state_dict(load_safetensors(p, keys), p)


def external_vae_spec(vae: str | os.PathLike | Mapping[str, torch.Tensor],
                      config: AutoencoderConfig) -> dict[str, Any]:
    """The ``external_vae`` dict for save_checkpoint: {config, scale_factor, sha256}.

    ``vae`` is the VAE's safetensors file or its state dict (LDM layout, any prefix).
    """
    sd = read_vae_file(vae) if isinstance(vae, (str, os.PathLike)) else normalize_vae_state_dict(vae)
    return {"config": dataclasses.asdict(config), "scale_factor": float(config.scale_factor),
            "sha256": state_dict_sha256(sd)}


def save_checkpoint(path: str | os.PathLike, modules: Mapping[str, nn.Module | Mapping[str, torch.Tensor]],
                    config: TalkFormerConfig | dict | str, *, external_vae: dict | None = None,
                    kind: str = "talkformer", extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write all ``modules`` (name -> nn.Module or state dict) into one safetensors file.

    Written atomically: a temporary file beside ``path``, fsynced, then ``os.replace``d, so a
    crash never leaves a half-written checkpoint under the real name. With ``external_vae`` (see
    ``external_vae_spec``) the autoencoder is named, not stored: ``autoencoder.*`` is dropped.
    """

    from .. import __version__

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    modules = dict(modules)
    if external_vae is not None:
        missing = {"config", "scale_factor", "sha256"} - set(external_vae)
        if missing:
            raise ValueError(f"external_vae needs keys config, scale_factor, sha256; missing {sorted(missing)}")
        # the model was built around this VAE: its config must describe the same autoencoder
        own = getattr(getattr(config, "model", None), "autoencoder", None)
        if own is not None:
            diffs = config_differences(own, external_vae["config"], "autoencoder")
            if diffs:
                raise ValueError("external_vae config differs from config.model.autoencoder: " + "; ".join(diffs))
        modules.pop("autoencoder", None)
        vae_meta = json.dumps({"config": external_vae["config"], "scale_factor": float(external_vae["scale_factor"]),
                               "sha256": str(external_vae["sha256"])}, sort_keys=True)
    else:
        vae_meta = "embedded"
    tensors = _gather_tensors(modules)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
            "config": _config_json(config), "autoencoder": vae_meta,
            "created_by": f"talkformer_core {__version__}"}
    for k, v in (extra_metadata or {}).items():
        if k in meta:
            raise ValueError(f"extra_metadata may not override {k!r}")
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)

    return _write_atomically(tensors, Path(path), meta)


def _check_metadata(meta: dict[str, str] | None, path: Path) -> dict[str, str]:
    if not meta or meta.get("format") != FORMAT:
        got = None if not meta else meta.get("format")
        raise CheckpointError(f"{path}: not a TalkFormer checkpoint (metadata format={got!r}, expected "
                              f"{FORMAT!r}); a bare VAE or foreign model goes in a VAE input instead")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {meta.get('format_version')!r}; this "
                              f"version of talkformer_core reads {FORMAT_VERSION!r}")
    for k in ("kind", "config", "autoencoder"):
        if k not in meta:
            raise CheckpointError(f"{path}: checkpoint metadata lacks {k!r}")
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The checkpoint's metadata strings, from the header alone (no tensor is read)."""
    p = Path(path)
    return _check_metadata(read_safetensors_header(p).get("__metadata__"), p)


# What a checkpoint is for (optional metadata): "demo" (the shipped synthetic-face demo),
# "person:<name>" (finetune / the train node), "iplap" (IP-LAP's converted weights).
PURPOSE_KEY = "purpose"
DEMO_WARNING = ("demo checkpoint: trained on one synthetic face; on a real person the mouth will be a blurred box "
                "(a model of your person: python -m talkformer_core.finetune, docs/finetune.md)")


class DemoCheckpointWarning(UserWarning):
    """A checkpoint whose metadata says purpose=demo is being used for lip-sync."""


def purpose_warning(meta: Mapping[str, str]) -> str | None:
    """The warning a user of this checkpoint should see, from its purpose (None: none)."""
    return DEMO_WARNING if meta.get(PURPOSE_KEY) == "demo" else None


def copy_with_metadata(src: str | os.PathLike, dst: str | os.PathLike, extra: Mapping[str, str]) -> Path:
    """Copy a TalkFormer checkpoint to ``dst`` (atomically) with ``extra`` metadata added or replaced;
    the tensors are unchanged. The format keys (format, kind, config, autoencoder) cannot be replaced."""
    meta = dict(read_metadata(src))
    for k, v in extra.items():
        if k in ("format", "format_version", "kind", "config", "autoencoder"):
            raise ValueError(f"copy_with_metadata may not replace {k!r}")
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return _write_atomically(load_safetensors(src), Path(dst), meta)


def replace_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Rewrite a TalkFormer checkpoint in place (atomically) with ``tensors`` replacing those of the
    same keys (each must exist with the same shape); metadata unchanged."""
    meta = dict(read_metadata(path))
    have = load_safetensors(path)
    for k, v in tensors.items():
        if k not in have or tuple(have[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: replace_tensors: no tensor {k!r} of shape {tuple(v.shape)}")
        have[k] = v.detach().to("cpu", have[k].dtype).clone().contiguous()  # never one storage for two keys
    return _write_atomically(have, Path(path), meta)


def checkpoint_kind(path: str | os.PathLike) -> str:
    """'talkformer' or 'iplap'."""
    return read_metadata(path)["kind"]


def read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a validated TalkFormer checkpoint."""
    meta = read_metadata(path)
    return load_safetensors(path, device=device), meta


def checkpoint_config(meta: Mapping[str, str], path: str | os.PathLike | None = None) -> TalkFormerConfig:
    """Parse the TalkFormerConfig in a checkpoint's metadata; errors name the file."""
    try:
        return TalkFormerConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path or 'checkpoint'}: its config does not fit this version ({e})") from None


def config_differences(a: Any, b: Any, where: str = "config") -> list[str]:
    """Every field where two configs (dataclasses or dicts) differ, as 'path: a != b'."""
    da = dataclasses.asdict(a) if dataclasses.is_dataclass(a) else a
    db = dataclasses.asdict(b) if dataclasses.is_dataclass(b) else b
    if isinstance(da, dict) and isinstance(db, dict):
        out = []
        for k in sorted(set(da) | set(db), key=str):
            if k not in da or k not in db:
                out.append(f"{where}.{k}: {'missing' if k not in da else da[k]!r} != "
                           f"{'missing' if k not in db else db[k]!r}")
            else:
                out += config_differences(da[k], db[k], f"{where}.{k}")
        return out
    na, nb = (list(x) if isinstance(x, (tuple, list)) else x for x in (da, db))
    return [] if na == nb else [f"{where}: {da!r} != {db!r}"]


def _shape(s) -> str:
    return str(tuple(s))


def load_model_state(model: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str = "", *,
                     source: str | os.PathLike | None = None, exclude: tuple[str, ...] = ("ema.",),
                     allow_missing: tuple[str, ...] = ()) -> None:
    """Load ``tensors[prefix + key]`` into ``model`` after checking every key and shape.

    ``prefix`` is e.g. "unet" (or "unet.") for one module, "" for a model whose children carry
    the prefixes. With prefix "", keys starting with any of ``exclude`` are skipped (the EMA copy).
    ``allow_missing``: model-key prefixes the checkpoint may lack (e.g. "autoencoder." when it names
    an external VAE). Every mismatch is named in one CheckpointError, e.g.
    "unet.input_blocks.1.0.weight: checkpoint has (64, 3, 3, 3), model expects (32, 3, 3, 3)".
    """
    pre = prefix if not prefix or prefix.endswith(".") else prefix + "."
    ours = {}
    for k, v in tensors.items():
        if not k.startswith(pre) or (not pre and exclude and k.startswith(tuple(exclude))):
            continue
        ours[k[len(pre):]] = v
    expected = model.state_dict()
    problems = []
    for k, v in expected.items():
        if k not in ours:
            if not (allow_missing and k.startswith(tuple(allow_missing))):
                problems.append(f"{pre}{k}: missing from checkpoint (model expects {_shape(v.shape)})")
        elif tuple(ours[k].shape) != tuple(v.shape):
            problems.append(f"{pre}{k}: checkpoint has {_shape(ours[k].shape)}, model expects {_shape(v.shape)}")
    for k in ours:
        if k not in expected:
            problems.append(f"{pre}{k}: unexpected key in checkpoint (shape {_shape(ours[k].shape)})")
    if problems:
        where = f"{source}: " if source else ""
        raise CheckpointError(f"{where}{len(problems)} tensor(s) do not fit {type(model).__name__}"
                              f"{f' (prefix {pre!r})' if pre else ''}:\n  " + "\n  ".join(problems))
    # strict=False only for the allowed-missing keys; everything else was checked above
    model.load_state_dict(ours, strict=not allow_missing)


@dataclass
class ExternalVAE:
    """A user's VAE file that matched the checkpoint's record of it."""

    path: Path
    config: AutoencoderConfig
    scale_factor: float
    sha256: str
    state_dict: dict[str, torch.Tensor]  # LDM layout, no prefix


def external_vae_record(meta: Mapping[str, str]) -> dict[str, Any] | None:
    """The checkpoint's external-VAE record, or None if it embeds its autoencoder."""
    v = meta.get("autoencoder", "embedded")
    return None if v == "embedded" else json.loads(v)


def resolve_external_vae(meta: Mapping[str, str], vae_path: str | os.PathLike | Mapping[str, torch.Tensor] | None, *,
                         checkpoint_path: str | os.PathLike | None = None) -> ExternalVAE | None:
    """Check a user-given VAE against the checkpoint's record of it.

    Returns None for a checkpoint that embeds its autoencoder (a given ``vae_path`` is then
    ignored with a warning), else the verified VAE. ``vae_path`` may also be the VAE's state dict
    (LDM layout, e.g. ComfyUI's ``vae.first_stage_model.state_dict()``). Errors say which VAE (hash, config) is needed.
    """
    ck = checkpoint_path or "checkpoint"
    rec = external_vae_record(meta)
    if rec is None:
        if vae_path is not None:
            warnings.warn(f"{ck} embeds its autoencoder; the VAE {vae_path} is not used", stacklevel=2)
        return None
    cfg = _from_dict(AutoencoderConfig, rec["config"], "autoencoder")
    need = (f"a VAE with sha256 {rec['sha256']} (LDM layout, {cfg.embed_dim} latent channels, "
            f"downsampling {cfg.downsample}, ch {cfg.ch}, ch_mult {tuple(cfg.ch_mult)}, "
            f"scale factor {rec['scale_factor']})")
    if vae_path is None:
        raise CheckpointError(f"{ck} does not contain its autoencoder; it needs {need}. Give it as "
                              f"--vae (CLI) or the loader node's VAE input.")
    if isinstance(vae_path, Mapping):  # a state dict already in memory (ComfyUI's VAE input)
        sd = normalize_vae_state_dict(vae_path, "the VAE input")
        vae_path = "the VAE input"
    else:
        sd = read_vae_file(vae_path)
    got = state_dict_sha256(sd)
    if got != rec["sha256"]:
        raise VAEMismatchError(f"the VAE {vae_path} (sha256 {got}) is not the one {ck} was trained "
                              f"with; it needs {need}")
    return ExternalVAE(Path(vae_path), cfg, float(rec["scale_factor"]), got, sd)


# ----------------------------------------------------------------------------------------------
# Training state (optimizer, EMA, RNG, counters) for bit-exact resume

def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Nested Python structure -> JSON-able structure; tensors go to ``tensors`` under ``key``."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        # safetensors/torch lack some numpy dtypes (uint32 of numpy's RNG): store widened, cast back
        arr = obj.astype(np.int64) if obj.dtype.kind == "u" else obj
        tensors[key] = torch.from_numpy(np.ascontiguousarray(arr)).clone()
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return {"__npscalar__": obj.item(), "dtype": str(obj.dtype)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        # non-string keys (Adam's per-parameter state is keyed by int): keep them typed
        return {"__dict__": [[_encode(k, f"{key}/k{i}", tensors), _encode(v, f"{key}/{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    raise TypeError(f"training state at {key!r}: cannot store a {type(obj).__name__}")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__npscalar__" in obj:
        return np.dtype(obj["dtype"]).type(obj["__npscalar__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG a training step may draw from: torch CPU (and CUDA if in use), numpy, Python,
    plus any named ``torch.Generator`` (e.g. a DataLoader's)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generators:
        state["generators"] = {k: g.get_state() for k, g in generators.items()}
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn("training state has CUDA RNG states for a different device count; not restored",
                          stacklevel=2)
    for k, g in (generators or {}).items():
        g.set_state(state["generators"][k])


def save_training_state(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Store a nested training state (e.g. {"optimizer": opt.state_dict(), "ema": ema_sd,
    "rng": capture_rng_state(), "step": 1234}) in a safetensors file, atomically.

    Tensors (Adam's moments, its float ``step`` tensors, EMA weights, RNG byte states) are stored
    raw, so a resume is bit-exact; the structure, ints, floats (exact via JSON repr), tuples and
    int-keyed dicts go to the ``state`` metadata string.
    """
    from .. import __version__

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(dict(state), "", tensors)
    meta = {"format": TRAINING_STATE_FORMAT, "format_version": FORMAT_VERSION,
            "state": json.dumps(structure), "created_by": f"talkformer_core {__version__}"}
    return _write_atomically(tensors, Path(path), meta)


def _write_atomically(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> Path:
    """safetensors file written beside ``path``, fsynced, then renamed: never a half-written file.
    safetensors creates it 0600; a finished checkpoint gets a plain file's mode (0666 - umask)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_training_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Inverse of save_training_state: the same nested structure, tensors on ``device``
    (``optimizer.load_state_dict`` moves Adam's moments to the parameters' device itself)."""
    p = Path(path)
    meta = read_safetensors_header(p).get("__metadata__") or {}
    if meta.get("format") != TRAINING_STATE_FORMAT:
        raise CheckpointError(f"{p}: not a TalkFormer training-state file (format={meta.get('format')!r})")
    tensors = load_safetensors(p, device=device)
    return _decode(json.loads(meta["state"]), tensors)

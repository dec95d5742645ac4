"""Import IP-LAP's published weights into one safetensors checkpoint of ours.

    python -m talkformer_core.convert iplap --landmark-generator L.pth [--renderer R.pth] --out M.safetensors

IP-LAP (Weizhi-Zhong/IP_LAP, commit 9b9dc03) saves ``{state_dict, optimizer, global_step,
global_epoch}`` with ``torch.save`` (train_landmarks_generator.py:204-216,
train_video_renderer.py:170-181); inference reads only ``state_dict``, removes ``module.`` from keys
that start with it and loads strictly (inference_single.py:167-176). Here:

- files are read with ``torch.load(weights_only=True, map_location="cpu")`` only, never a full
  unpickle; a file it refuses, or one that is not an IP-LAP checkpoint, is a
  ``CheckpointError`` naming the file and what was expected;
- a dict with ``state_dict`` (training format) or a bare state dict is accepted; only a LEADING
  ``module.`` is stripped (the renderer has ``flow_module.*`` keys); ``perceptual.*`` (the VGG19 of
  the renderer's training loss) is dropped;
- every key and shape is checked against IP-LAP's layout (package data ``models/iplap_layouts/``)
  and each mismatch is named;
- one safetensors file is written through ``models.checkpoint.save_checkpoint`` with kind "iplap":
  tensors ``landmark.<IP-LAP key>`` and ``renderer.<IP-LAP key>``, metadata ``config`` (the
  constructor values), ``format_version`` "1", ``source`` (file names, IP-LAP's global step/epoch).

``load_iplap_checkpoint`` builds the modules back from that file.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import CheckpointError, TalkFormerError

KIND = "iplap"
PREFIX = {"landmark_generator": "landmark", "renderer": "renderer"}
IPLAP_CLASS = {"landmark_generator": "Landmark_generator", "renderer": "Renderer"}
# IP-LAP's constructor values (inference_single.py:194-197); T is not a weight shape
LANDMARK_CONSTRUCTOR = {"T": 5, "d_model": 512, "nlayers": 4, "nhead": 4, "dim_feedforward": 1024, "dropout": 0.1}
RENDERER_CONSTRUCTOR: dict[str, Any] = {}
DROPPED_PREFIX = "perceptual."
EXPECTED = ("IP-LAP's training checkpoint (a torch.save'd dict with 'state_dict', 'optimizer', "
            "'global_step', 'global_epoch'; inference_single.py:167) or a bare state dict of tensors")


@lru_cache(maxsize=None)
def iplap_layout(which: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) of IP-LAP's network ``which`` ("landmark_generator" | "renderer",
    the renderer without ``perceptual.*``), in IP-LAP's state-dict order."""
    if which not in PREFIX:
        raise ValueError(f"which must be one of {tuple(PREFIX)}, got {which!r}")
    text = resources.files("talkformer_core.models").joinpath(f"iplap_layouts/{which}.json").read_text()
    return {k: (tuple(s), t) for k, s, t in json.loads(text)["state_dict"]}


# ---------------------------------------------------------------------------------------------
# Reading IP-LAP's .pth files
# ---------------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"


def load_pth(path: str | Path) -> Any:
    """``torch.load(weights_only=True, map_location="cpu")`` with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file; expected {EXPECTED}")
    try:
        return torch.load(p, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{p}: torch.load(weights_only=True) refused this file ({_first_line(e)}); it holds "
            f"Python objects other than tensors and plain containers, and such files are never fully "
            f"unpickled here. Expected {EXPECTED}.") from None
    except Exception as e:  # not a torch file at all, truncated zip, ...
        raise CheckpointError(f"{p}: not a readable torch checkpoint ({_first_line(e)}); expected {EXPECTED}") from None


def _strip_module(key: str) -> str:
    # only a leading "module." (DataParallel), as inference_single.py:169-175
    return key[len("module."):] if key.startswith("module.") else key


def _describe(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def read_iplap_state_dict(path: str | Path, which: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read, unwrap, normalise and check one IP-LAP file.

    Returns (state dict with IP-LAP's own keys in IP-LAP's order, info) where info holds the file
    name and, for the training format, ``global_step`` / ``global_epoch``.
    """
    p = Path(path)
    layout = iplap_layout(which)
    obj = load_pth(p)
    info: dict[str, Any] = {"file": p.name}
    if isinstance(obj, Mapping) and "state_dict" in obj:
        raw = obj["state_dict"]
        for k in ("global_step", "global_epoch"):
            if isinstance(obj.get(k), (int, float)) and not isinstance(obj.get(k), bool):
                info[k] = obj[k]
    else:
        raw = obj
    if not isinstance(raw, Mapping) or not raw:
        got = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{p}: not an IP-LAP checkpoint (found {got}); expected {EXPECTED}")
    not_tensors = [str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{p}: not an IP-LAP checkpoint: entries {not_tensors[:5]} are not tensors; "
                              f"expected {EXPECTED}")

    sd: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        k2 = _strip_module(str(k))
        if k2.startswith(DROPPED_PREFIX):
            continue
        if k2 in sd:
            raise CheckpointError(f"{p}: key {k2!r} appears twice (with and without a 'module.' prefix)")
        sd[k2] = v

    if not set(sd) & set(layout):
        others = [w for w in PREFIX if w != which and set(sd) & set(iplap_layout(w))]
        hint = (f" It looks like IP-LAP's {IPLAP_CLASS[others[0]]} ({others[0].replace('_', ' ')}); pass it as "
                f"--{others[0].replace('_', '-')}.") if others else ""
        example = ", ".join(list(sd)[:3])
        raise CheckpointError(
            f"{p}: not an IP-LAP {which.replace('_', ' ')} checkpoint: none of its {len(sd)} tensor names "
            f"(e.g. {example}) is a key of IP-LAP's {IPLAP_CLASS[which]} (e.g. {', '.join(list(layout)[:2])}).{hint}")

    problems = []
    for k, (shape, dtype) in layout.items():
        if k not in sd:
            problems.append(f"{k}: missing (IP-LAP's {IPLAP_CLASS[which]} has {_describe(shape)})")
            continue
        t = sd[k]
        if tuple(t.shape) != shape:
            problems.append(f"{k}: file has {_describe(t.shape)}, IP-LAP's {IPLAP_CLASS[which]} has {_describe(shape)}")
        elif dtype == "int64" and (t.is_floating_point() or t.is_complex()):
            problems.append(f"{k}: file has dtype {t.dtype}, expected an integer tensor")
        elif dtype == "float32" and not t.is_floating_point():
            problems.append(f"{k}: file has dtype {t.dtype}, expected a floating-point tensor")
    for k, t in sd.items():
        if k not in layout:
            problems.append(f"{k}: unexpected (shape {_describe(t.shape)})")
    if problems:
        raise CheckpointError(f"{p}: {len(problems)} tensor(s) do not fit IP-LAP's {IPLAP_CLASS[which]} "
                              f"(commit 9b9dc03):\n  " + "\n  ".join(problems))

    # IP-LAP's order; float32 / int64 as IP-LAP stores them (a half-precision copy widens exactly)
    out = {}
    for k, (_, dtype) in layout.items():
        t = sd[k]
        out[k] = t.to(torch.int64) if dtype == "int64" else t.to(torch.float32)
    return out, info


# ---------------------------------------------------------------------------------------------
# Writing and loading our checkpoint
# ---------------------------------------------------------------------------------------------


def iplap_config(with_renderer: bool) -> dict[str, Any]:
    """The ``config`` metadata: IP-LAP's constructor values of each stored network."""
    cfg: dict[str, Any] = {"landmark_generator": dict(LANDMARK_CONSTRUCTOR)}
    cfg["renderer"] = dict(RENDERER_CONSTRUCTOR) if with_renderer else None
    return cfg


def convert_iplap(landmark_generator: str | Path, out: str | Path, renderer: str | Path | None = None) -> Path:
    """Read IP-LAP's .pth file(s), check them, write one safetensors checkpoint (kind "iplap")."""
    from .models.checkpoint import PURPOSE_KEY, save_checkpoint
    from .paths import check_output_file

    check_output_file(out, "--out")  # before reading (and checking) the .pth files
    lg, lg_info = read_iplap_state_dict(landmark_generator, "landmark_generator")
    modules: dict[str, Mapping[str, torch.Tensor]] = {PREFIX["landmark_generator"]: lg}
    source: dict[str, Any] = {"landmark_generator": lg_info}
    if renderer is not None:
        rd, rd_info = read_iplap_state_dict(renderer, "renderer")
        modules[PREFIX["renderer"]] = rd
        source["renderer"] = rd_info
    source["iplap_commit"] = "9b9dc03"
    return save_checkpoint(out, modules, iplap_config(renderer is not None), kind=KIND,
                           extra_metadata={"source": json.dumps(source, sort_keys=True), PURPOSE_KEY: "iplap"})


@dataclass
class IPLAPModels:
    """The networks of an "iplap" checkpoint, in eval mode on the requested device/dtype."""

    landmark_generator: torch.nn.Module  # models.landmark_completion.LandmarkCompletion
    renderer: torch.nn.Module | None  # models.iplap_renderer.IPLAPRenderer, absent if not converted
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def load_iplap_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> IPLAPModels:
    """Build IP-LAP's networks from a checkpoint written by ``convert_iplap``."""
    from .config import LandmarkConfig
    from .models.checkpoint import load_model_state, read_checkpoint
    from .models.iplap_renderer import IPLAPRenderer
    from .models.landmark_completion import LandmarkCompletion

    p = Path(path)
    tensors, meta = read_checkpoint(p)
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{p}: a {meta.get('kind')!r} checkpoint; expected kind {KIND!r} "
                              f"(made by `python -m talkformer_core.convert iplap`)")
    try:
        cfg = json.loads(meta["config"])
        lg_cfg = cfg["landmark_generator"]
        lm = LandmarkConfig(**{k: lg_cfg[k] for k in ("d_model", "nlayers", "nhead", "dim_feedforward", "dropout")})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: its IP-LAP config does not fit this version ({_first_line(e)})") from None

    landmark = LandmarkCompletion(lm)
    load_model_state(landmark, tensors, PREFIX["landmark_generator"], source=p)
    renderer = None
    if cfg.get("renderer") is not None:
        renderer = IPLAPRenderer()
        load_model_state(renderer, tensors, PREFIX["renderer"], source=p)
    elif any(k.startswith(PREFIX["renderer"] + ".") for k in tensors):
        raise CheckpointError(f"{p}: has renderer tensors but its config says no renderer")
    models = [m for m in (landmark, renderer) if m is not None]
    for m in models:
        m.to(device=device, dtype=dtype).eval()
    return IPLAPModels(landmark, renderer, cfg, dict(meta))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .clitools import HelpFormatter, parser

    ap = parser("convert", "Import foreign weights into a safetensors checkpoint.")
    sub = ap.add_subparsers(dest="format", required=True, metavar="FORMAT",
                            help="iplap: IP-LAP's landmark generator (and renderer) .pth files")
    ip = sub.add_parser("iplap", help="IP-LAP's landmark generator (and renderer) .pth files",
                        description="IP-LAP's public .pth weights -> one safetensors checkpoint (docs/iplap.md).",
                        formatter_class=HelpFormatter)
    ip.add_argument("--landmark-generator", required=True, metavar="L.pth",
                    help="IP-LAP's landmarkgenerator_checkpoint.pth")
    ip.add_argument("--renderer", metavar="R.pth", help="IP-LAP's renderer_checkpoint.pth (optional)")
    ip.add_argument("--out", required=True, metavar="M.safetensors", help="the checkpoint to write")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = convert_iplap(args.landmark_generator, args.out, args.renderer)
    except TalkFormerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; no output written", file=sys.stderr)
        return 130
    from .models.checkpoint import safetensors_keys

    keys = safetensors_keys(out)
    counts = {pre: sum(1 for k in keys if k.startswith(pre + ".")) for pre in PREFIX.values()}
    print(f"wrote {out}: " + ", ".join(f"{n} {pre}.* tensors" for pre, n in counts.items() if n))
    return 0


if __name__ == "__main__":
    sys.exit(main())

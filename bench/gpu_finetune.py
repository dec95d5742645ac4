"""Person-specific training of one clip on a machine without mediapipe or PyAV (a GPU box).

    python3 bench/gpu_finetune.py --shard .gpu/shards_256/CLIP.npz --minutes 6 --out $OUT/CLIP.gpu256.npz \
        [--preset gpu256] [--holdout 0.2] [--device cuda] [--steps N] [--ae-steps N]

The clip comes preprocessed (``python -m talkformer_core.data.preprocess --crop-size 256`` here,
then ``python -m talkformer_core.data.packed pack``: lossless, 33 MiB for the three shared clips).
One clip per process, finetune's recipe on it: the autoencoder stage on the first 1 - holdout of
the frames (``autoencoder_share`` of the training minutes), then TalkFormer with EMA, then the
mouth model; batches sized to the device, bf16 on CUDA (the preset's). A shard at a larger crop
than the preset's is resized (area) to it, so cpu64 trains on the same frames. Then the held-out
frames are generated twice (``finetune.holdout.generate``: audio-driven, and with the test frames'
landmarks) and, with ``--dubbing``, the dubbing protocol's and the silence check's faces
(``finetune.dubbing.dubbing_inputs``, stored by ``save_dubbing_inputs`` in ``OUT.dubbing.npz``,
beside: KatieHill's 200 frames make ~13 MiB of them at 128 px), and saved, losslessly (``data.packed.encode_images``), in a compressed ``--out`` .npz
with the run's numbers (steps,
minutes, samples/s, busy share). ``bench/score_gpu_finetune.py`` scores those files where
mediapipe is (the 256 px ruler, the baselines) and draws the grid. ``--minutes`` is the process's
whole wall clock: setup, both stages and the sampling.

Device: ``--device``, else $DEV, else CUDA when available. Imports neither mediapipe nor PyAV.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE_RESERVE_MIN = 0.5  # minutes kept for loading the model and sampling the held-out frames
DUBBING_RESERVE_MIN = 1.0  # and for the dubbing protocol's and the silence check's faces (--dubbing)


def _tqdm_stand_in() -> None:
    """A GPU box may lack tqdm (train imports it; every bar here is off): a silent stand-in."""
    try:
        import tqdm  # noqa: F401
    except ImportError:
        import types

        class _Bar:
            def __init__(self, *a, **k):
                self.n, self.total = k.get("initial", 0), k.get("total")

            def __getattr__(self, name):
                return lambda *a, **k: None

            @staticmethod
            def write(msg, *a, **k):
                print(msg, flush=True)

        from importlib.machinery import ModuleSpec

        mod = types.ModuleType("tqdm")
        mod.__spec__, mod.tqdm = ModuleSpec("tqdm", None), _Bar  # a spec: torch._dynamo looks modules up
        sys.modules["tqdm"] = mod


def prepare_shard(src: Path, dst_dir: Path, crop_size: int) -> Path:
    """A packed (or plain) shard -> a plain shard in ``dst_dir`` at ``crop_size`` (area-resized)."""
    import cv2
    import numpy as np

    from talkformer_core.data.packed import PACKED_KEYS, unpack_arrays
    from talkformer_core.data.preprocess import save_shard

    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if all(k in arrays for k in PACKED_KEYS):
        arrays = unpack_arrays(arrays, str(src))
    crops = arrays["crops"]
    if crops.shape[1] != crop_size:  # crop-frame landmarks are in [0, 1]: they stay valid
        interp = cv2.INTER_AREA if crops.shape[1] > crop_size else cv2.INTER_CUBIC
        arrays["crops"] = np.stack([cv2.resize(c, (crop_size, crop_size), interpolation=interp) for c in crops])
    return save_shard(dst_dir / src.name, arrays)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shard", required=True, help="a packed or plain shard (.npz) of one clip")
    ap.add_argument("--out", required=True, help="the generated held-out crops and numbers (.npz)")
    ap.add_argument("--minutes", type=float, required=True, help="wall clock of the whole process")
    ap.add_argument("--preset", default="gpu256")
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--device", default=os.environ.get("DEV") or None)
    ap.add_argument("--steps", type=int, default=None, help="cap on TalkFormer steps (tests)")
    ap.add_argument("--ae-steps", type=int, default=None, help="cap on autoencoder steps (default: --steps)")
    ap.add_argument("--batch-size", type=int, default=None, help="override the preset's TalkFormer batch")
    ap.add_argument("--sampler-steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (several processes share the box)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="work folder (default: /tmp/gpu_finetune/<out stem>)")
    ap.add_argument("--dubbing", action="store_true",
                    help="also make the dubbing protocol's and the silence check's crops (finetune.dubbing."
                         "dubbing_inputs; give --holdout 0.4): the scorer reads them with mediapipe")
    a = ap.parse_args(argv)
    if a.dubbing and not 0.0 < a.holdout < 1.0:  # before any training: the protocol splits the held-out part
        ap.error(f"--dubbing needs 0 < --holdout < 1 (0.4: new audio = frames [0.6, 0.8), template = [0.8, 1.0)); "
                 f"got {a.holdout}")
    t_start = time.time()

    import numpy as np
    import torch

    _tqdm_stand_in()
    from talkformer_core.config import resolve_preset
    from talkformer_core.finetune.holdout import generate, load_holdout
    from talkformer_core.finetune.presets import finetune_config
    from talkformer_core.finetune.run import fit_mouth_model
    from talkformer_core.pipeline import load_model
    from talkformer_core.train import train
    from talkformer_core.train.device import fit_batches, resolve_device

    torch.set_num_threads(max(1, a.threads))
    dev = resolve_device(a.device)
    preset = resolve_preset(a.preset, dev)
    cfg = finetune_config(preset, device=dev)
    if a.batch_size:
        cfg.train.batch_size = int(a.batch_size)
    bf16 = bool(cfg.train.bf16 and dev.type == "cuda")
    tf_batch, ae_batch = cfg.train.batch_size, cfg.train.autoencoder_batch_size
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        tf_batch, ae_batch = fit_batches(cfg, dev, bf16, name=preset)
    out = Path(a.out)
    work = Path(a.work) if a.work else Path("/tmp/gpu_finetune") / out.stem
    shards = work / "shards"
    if shards.exists():
        import shutil

        shutil.rmtree(work)
    shard = prepare_shard(Path(a.shard), shards, cfg.model.image_size)
    frames = (0.0, 1.0 - a.holdout)
    ae_steps = a.ae_steps if a.ae_steps is not None else a.steps
    print(f"[gpu_finetune] {Path(a.shard).name}: preset {preset} on {dev} "
          f"({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), batch {tf_batch} windows / "
          f"autoencoder {ae_batch} crops, bf16 {bf16}, setup {time.time() - t_start:.0f} s", flush=True)

    def left() -> float:
        return a.minutes - (time.time() - t_start) / 60.0 - SAMPLE_RESERVE_MIN - (DUBBING_RESERVE_MIN if a.dubbing else 0.0)

    ae_minutes = max(cfg.train.autoencoder_share * left(), 0.05)
    res_ae = train(cfg, stage="autoencoder", data=shards, out=work / "ae", steps=ae_steps or 10 ** 7,
                   batch_size=ae_batch, frames=frames, budget_minutes=ae_minutes, device=str(dev), bf16=bf16,
                   seed=a.seed, progress=False, log_every=50)
    m_ae = res_ae.metrics
    print(f"[gpu_finetune] autoencoder: {m_ae['final_step']} steps in {m_ae['wall_seconds']:.0f} s, L1 "
          f"{m_ae['l1'][-1]:.4f}, {m_ae['samples_per_s']:.1f} crops/s, busy {100 * m_ae['busy_share']:.0f} %", flush=True)
    res_tf = train(cfg, stage="talkformer", data=shards, out=work / "tf", steps=a.steps or 10 ** 7,
                   batch_size=tf_batch, autoencoder=res_ae.checkpoint, frames=frames,
                   budget_minutes=max(left(), 0.05), ema=True, device=str(dev), bf16=bf16, seed=a.seed,
                   progress=False, log_every=50)
    m_tf = res_tf.metrics
    print(f"[gpu_finetune] talkformer: {m_tf['final_step']} steps in {m_tf['wall_seconds']:.0f} s, ldm "
          f"{np.mean(m_tf['ldm'][-20:]):.4f}, l1 {np.mean(m_tf['l1'][-20:]):.4f}, {m_tf['samples_per_s']:.1f} windows/s, "
          f"busy {100 * m_tf['busy_share']:.0f} %", flush=True)
    if cfg.model.landmark.mouth_model:
        fit_mouth_model(res_tf.checkpoint, shard, frames)

    t_s = time.time()
    h = load_holdout(shard, a.holdout)
    model = load_model(res_tf.checkpoint, dev)
    kw = dict(steps=a.sampler_steps, seed=a.seed)
    gen = {"ours_landmarks": generate(model, h, audio_driven=False, **kw),
           "ours_audio": generate(model, h, audio_driven=True, **kw)}
    dub = None
    if a.dubbing:  # everything the dubbing report reads, made here; mediapipe reads it where it is
        from talkformer_core.finetune.dubbing import dubbing_inputs, dubbing_inputs_path, save_dubbing_inputs
        dub = save_dubbing_inputs(dubbing_inputs(res_tf.checkpoint, shard, a.holdout, device=str(dev),
                                                 steps=a.sampler_steps, seed=a.seed))
    sample_s = time.time() - t_s
    speed = lambda m: {k: float(m[k]) for k in ("samples_per_s", "steps_per_s", "busy_share", "batch_size",  # noqa: E731
                                                "compute_seconds", "data_seconds", "wall_seconds") if k in m}
    meta = {"shard": Path(a.shard).name, "preset": preset, "crop_size": cfg.model.image_size,
            "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "bf16": bf16, "holdout": a.holdout, "minutes_budget": a.minutes,
            "steps": {"autoencoder": int(m_ae["final_step"]), "talkformer": int(m_tf["final_step"])},
            "speed": {"autoencoder": speed(m_ae), "talkformer": speed(m_tf)},
            "losses": {"ae_l1": float(np.mean(m_ae["l1"][-20:])), "ldm": float(np.mean(m_tf["ldm"][-20:])),
                       "landmark_l1": float(np.mean(m_tf["l1"][-20:]))},
            "sample_seconds": sample_s, "sampler_steps": a.sampler_steps, "seed": a.seed,
            "peak_gpu_gib": torch.cuda.max_memory_allocated(dev) / 1024 ** 3 if dev.type == "cuda" else None,
            "minutes": (time.time() - t_start) / 60.0, "config": cfg.to_dict()}
    out.parent.mkdir(parents=True, exist_ok=True)
    from talkformer_core.data.packed import encode_images

    enc = {}
    for k, v in gen.items():  # lossless WebP: a third of zlib's size (returned files are capped)
        enc.update(encode_images(v.astype(np.uint8), k))
    if dub is not None:  # a file of its own: each file brought back from a GPU machine is capped (16 MiB)
        np.savez_compressed(dubbing_inputs_path(out), **dub)
    np.savez_compressed(out, test_idx=h.test_idx.astype(np.int64), train_idx=h.train_idx.astype(np.int64),
                        meta=np.array(json.dumps(meta, default=float)), **enc)
    print(f"[gpu_finetune] wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MiB): {len(h.test_idx)} held-out frames, "
          f"sampling {sample_s:.0f} s, {meta['minutes']:.2f} min in all"
          + (f", peak {meta['peak_gpu_gib']:.1f} GiB" if meta["peak_gpu_gib"] else ""), flush=True)
    print(json.dumps({k: meta[k] for k in ("shard", "preset", "steps", "speed", "losses", "minutes", "peak_gpu_gib")},
                     default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

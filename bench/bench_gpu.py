"""Stage-2 speed on a GPU (or, with --quick, on the CPU at tiny sizes): frames per second of the
one batch loop (sampling.FaceSampler = masked encode + sampler with the step-invariant caches +
decode; what pipeline.sample_faces and the sync CLI run), random weights.

    python3 bench/bench_gpu.py --out bench.json            # CUDA: ~4 minutes on an H200
    python3 bench/bench_gpu.py --quick --out bench.json    # CPU, tiny preset, ~1 minute

Rows: preset x dtype x Temp-Att x steps x batch ("auto" = sampling.auto_batch_size from free
memory), plus a knob ablation (paper, bf16, 25 steps: autocast NCHW -> channels_last -> bf16
weights [-> torch.compile with --compile]). Per row: fps; achieved TFLOP/s of the whole loop and
of the U-Net forward alone (timed separately at the row's batch) against a bf16 matmul measured in
the same run; peak device memory. FLOPs are counted with torch.utils.flop_counter on the meta
device (shapes only; 1 multiply-add = 2 FLOPs): U-Net per frame-step, autoencoder per frame (two
encodes, masked and whole, and one decode).

Temp-Att rows sample 4 x batch frames so the parallel chains (sampling.FaceSampler) fill the
batch; their fps counts output frames (the chains' overlap frames are work that costs fps).
Each row stops at --cap seconds and reports what it measured until then (fps from the steps
done, "partial"); rows are skipped once --budget seconds have passed. Imports neither mediapipe
nor PyAV (GPU boxes may lack them); --e2e VIDEO AUDIO CKPT adds an end-to-end lipsync row where
they exist.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from talkformer_core import sampling as S  # noqa: E402
from talkformer_core.config import preset  # noqa: E402
from talkformer_core.diffusion import NoiseSchedule  # noqa: E402
from talkformer_core.models.model import TalkFormer  # noqa: E402
from talkformer_core.pipeline import LoadedModel, encode_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class CapReached(Exception):
    pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int, repeats: int = 10) -> float:
    """Achieved bf16 matmul TFLOP/s (n x n x n), the reference rate of the same device and run."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12


def count_flops(cfg) -> dict[str, float]:
    """FLOPs per frame: one U-Net step (with its caches) and the autoencoder (2 encodes + 1 decode)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = cfg.model
    with torch.device("meta"):
        model = TalkFormer(cfg)
        s, C, S_ = m.latent_size, m.latent_channels, m.image_size
        L = m.sequence_length if m.temporal_attention else 1
        z = torch.randn(L, C, s, s)
        x = torch.randn(1, 3, S_, S_)
        lms = torch.rand(L, 131, 2)
        with torch.no_grad():
            ref = model.prepare_reference(torch.randn(1, C, s, s))
            lc = model.prepare_landmarks(lms)
            mc = model.prepare_motion(torch.randn(1, m.unet.num_motion_frames, C, s, s)) if L > 1 else None
            fc = FlopCounterMode(display=False)
            with fc:
                model.unet(z, torch.full((L,), 500), lc, ref, motion=mc, num_frames=L)
            unet = fc.get_total_flops() / L
            fc = FlopCounterMode(display=False)
            with fc:
                model.encode(x)
            enc = fc.get_total_flops()
            fc = FlopCounterMode(display=False)
            with fc:
                model.decode(torch.randn(1, C, s, s))
            dec = fc.get_total_flops()
    return {"unet_per_frame_step": float(unet), "autoencoder_per_frame": float(2 * enc + dec)}


def build(name: str, temporal: bool, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    cfg = preset(name)
    cfg.model.temporal_attention = temporal
    torch.manual_seed(0)
    with torch.device(device):
        model = TalkFormer(cfg).eval().requires_grad_(False)
    return LoadedModel("talkformer", cfg, model, NoiseSchedule(cfg.model.diffusion), device, dtype)


def time_unet(lm: LoadedModel, fs: S.FaceSampler, batch: int, repeats: int) -> float:
    """Seconds of one U-Net forward (caches made once) at ``batch`` frames, as the sampler calls it."""
    m = lm.config.model
    L = lm.sequence_length if m.temporal_attention else 1
    n = max(L, batch // L * L)
    dev = lm.device
    lms = torch.rand(n, 131, 2, device=dev) * 0.6 + 0.2
    with S._net_ctx(lm):
        lc = lm.model.prepare_landmarks(lms)
        mc = (lm.model.prepare_motion(torch.randn(n // L, m.unet.num_motion_frames, m.latent_channels,
                                                  m.latent_size, m.latent_size, device=dev)) if L > 1 else None)
    fn = S._model_fn(lm, lc, fs.reference, mc, L)
    x = torch.randn(n, m.latent_channels, m.latent_size, m.latent_size, device=dev)
    t = torch.full((n,), 500, device=dev, dtype=torch.long)
    with torch.no_grad():
        fn(x, t)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(x, t)
        sync(dev)
    return (time.perf_counter() - t0) / repeats * batch / n


def run_row(row: dict, device: torch.device, cap: float, flops: dict, matmul: float, quick: bool) -> dict:
    name, dtype, temporal, steps = row["preset"], DTYPES[row["dtype"]], row["temporal"], row["steps"]
    lm = build(name, temporal, dtype, device)
    speed = row.get("speed")
    batch = row["batch"] if row["batch"] != "auto" else S.auto_batch_size(lm)
    if quick and row["batch"] == "auto":
        batch = 4
    T = 4 * batch if temporal else batch
    S_ = lm.crop_size
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (T, S_, S_, 3), dtype=np.uint8)
    lms = rng.uniform(0.2, 0.8, (T, 131, 2)).astype(np.float32)
    ref = encode_reference(lm, crops[0])
    out = {**{k: v for k, v in row.items() if k != "speed"}, "batch": batch, "frames": T,
           "speed": None if speed is None else dict(vars(speed))}
    # warm-up: one step over one batch (cuDNN autotuning, compile, allocator)
    S.FaceSampler(lm, ref, steps=1, batch_size=batch, speed=speed)(crops[:batch], lms[:batch])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    done = [0]
    fs = S.FaceSampler(lm, ref, steps=steps, batch_size=batch, speed=speed)
    total_steps = fs.num_runs(T) * steps
    t0 = time.perf_counter()

    def cb(i: int, n: int) -> None:
        done[0] += 1
        if time.perf_counter() - t0 > cap:
            raise CapReached

    fs.step_callback = cb
    try:
        fs(crops, lms)
        sync(device)
        secs = time.perf_counter() - t0
        out["fps"] = T / secs
        out["status"] = "ok"
    except CapReached:
        sync(device)
        secs = time.perf_counter() - t0
        out["fps"] = T * done[0] / total_steps / secs  # from the sampler steps done (decode not reached)
        out["status"] = f"partial: {done[0]} of {total_steps} steps in the {cap:.0f} s cap"
    out["seconds"] = round(secs, 3)
    per_frame = steps * flops["unet_per_frame_step"] + flops["autoencoder_per_frame"]
    out["loop_tflops"] = out["fps"] * per_frame / 1e12
    t_unet = time_unet(lm, fs, batch, 2 if quick else 5)
    out["unet_forward_ms"] = t_unet * 1e3
    out["unet_tflops"] = batch * flops["unet_per_frame_step"] / t_unet / 1e12
    out["unet_of_matmul"] = out["unet_tflops"] / matmul
    out["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None)
    del lm, fs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def matrix(quick: bool, compile_: bool) -> list[dict]:
    if quick:
        rows = [dict(preset="tiny", dtype=d, temporal=ta, steps=st, batch=b)
                for d in ("fp32", "bf16") for ta in (False, True) for st, b in ((2, "auto"), (3, 5))]
        rows.append(dict(preset="tiny", dtype="bf16", temporal=False, steps=2, batch=5,
                         speed=S.SpeedOptions(channels_last=False, half_weights=False), ablation="autocast NCHW"))
        return rows
    rows = [
        dict(preset="paper", dtype="bf16", temporal=False, steps=25, batch="auto"),
        dict(preset="paper", dtype="bf16", temporal=True, steps=25, batch="auto"),
        dict(preset="paper", dtype="bf16", temporal=False, steps=200, batch="auto"),
        dict(preset="paper", dtype="bf16", temporal=False, steps=25, batch=32),
        dict(preset="paper", dtype="bf16", temporal=False, steps=25, batch=128),
        dict(preset="small", dtype="bf16", temporal=False, steps=25, batch="auto"),
        dict(preset="small", dtype="bf16", temporal=True, steps=25, batch="auto"),
        dict(preset="paper", dtype="fp32", temporal=False, steps=25, batch=32),
        dict(preset="paper", dtype="bf16", temporal=True, steps=200, batch="auto"),
        dict(preset="small", dtype="bf16", temporal=False, steps=200, batch="auto"),
        dict(preset="tiny", dtype="bf16", temporal=False, steps=25, batch="auto"),
    ]
    abl = [("autocast NCHW", S.SpeedOptions(channels_last=False, half_weights=False)),
           ("channels_last", S.SpeedOptions(channels_last=True, half_weights=False)),
           ("channels_last + bf16 weights", S.SpeedOptions(channels_last=True, half_weights=True))]
    if compile_:
        abl.append(("+ torch.compile", S.SpeedOptions(channels_last=True, half_weights=True, compile=True)))
    rows[4:4] = [dict(preset="paper", dtype="bf16", temporal=False, steps=25, batch=64, speed=s, ablation=a)
                 for a, s in abl]
    return rows


def table(result: dict) -> str:
    head = (f"{'preset':7} {'dtype':5} {'TA':3} {'steps':>5} {'batch':>5} {'fps':>8} {'loop TF/s':>9} "
            f"{'U-Net TF/s':>10} {'of mm':>6} {'peak GiB':>8}  note")
    lines = [f"device: {result['device']}, torch {result['torch']}, bf16 matmul {result['matmul_bf16_tflops']:.1f} "
             f"TFLOP/s", head]
    for r in result["rows"]:
        if "fps" not in r:
            lines.append(f"{r['preset']:7} {r['dtype']:5} {'on' if r['temporal'] else 'off':3} {r['steps']:>5} "
                         f"{str(r['batch']):>5}  {r['status']}")
            continue
        pk = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        note = " ".join(x for x in (r.get("ablation", ""), "" if r["status"] == "ok" else r["status"]) if x)
        lines.append(f"{r['preset']:7} {r['dtype']:5} {'on' if r['temporal'] else 'off':3} {r['steps']:>5} "
                     f"{r['batch']:>5} {r['fps']:>8.2f} {r['loop_tflops']:>9.2f} {r['unet_tflops']:>10.2f} "
                     f"{100 * r['unet_of_matmul']:>5.1f}% {pk:>8}  {note}")
    return "\n".join(lines)


def e2e_row(video: str, audio: str, ckpt: str, device: torch.device, out_dir: Path) -> dict:
    try:
        import av  # noqa: F401
        import mediapipe  # noqa: F401
    except ImportError as e:
        return {"status": f"skipped: {e.name} is not installed (the front end needs mediapipe and PyAV)"}
    from talkformer_core import pipeline as P

    model = P.load_model(ckpt, device=device)
    r = P.lipsync(video, audio, model, out_dir / "e2e.mp4", P.SyncOptions(watermark=False))
    return {"status": "ok", "frames": r.num_frames, "seconds": r.seconds, "fps": r.num_frames / r.seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("--quick", action="store_true", help="CPU-sized matrix (tiny preset, 2-3 steps)")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --quick)")
    ap.add_argument("--cap", type=float, default=None, help="seconds per row (default 20; quick 30)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all rows (default 200; quick 120)")
    ap.add_argument("--compile", action="store_true", help="add a torch.compile row to the ablation")
    ap.add_argument("--e2e", nargs=3, metavar=("VIDEO", "AUDIO", "CKPT"), default=None,
                    help="also time lipsync end to end (needs mediapipe and PyAV)")
    a = ap.parse_args(argv)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() and not a.quick else "cpu"))
    if dev.type == "cpu":
        torch.set_num_threads(1)  # shared CPUs: one thread keeps small ops from waiting on others
    cap = a.cap or (30.0 if a.quick else 20.0)
    budget = a.budget or (120.0 if a.quick else 200.0)
    t_start = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "quick": bool(a.quick), "cap_seconds": cap, "budget_seconds": budget,
              "matmul_bf16_tflops": matmul_tflops(dev, 256 if dev.type == "cpu" else 8192), "rows": []}
    flops: dict[tuple, dict] = {}
    for row in matrix(a.quick, a.compile):
        if time.perf_counter() - t_start > budget:
            result["rows"].append({**{k: v for k, v in row.items() if k != "speed"},
                                   "status": "skipped: time budget"})
            continue
        key = (row["preset"], row["temporal"])
        if key not in flops:
            cfg = preset(row["preset"])
            cfg.model.temporal_attention = row["temporal"]
            flops[key] = count_flops(cfg)
        try:
            r = run_row(row, dev, cap, flops[key], result["matmul_bf16_tflops"], a.quick)
        except torch.cuda.OutOfMemoryError as e:  # a row too large for this device: report, go on
            torch.cuda.empty_cache()
            r = {**{k: v for k, v in row.items() if k != "speed"}, "status": f"out of memory: {e}"[:200]}
        except Exception as e:  # noqa: BLE001  (one failing row must not cost the device run the others)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            r = {**{k: v for k, v in row.items() if k != "speed"}, "status": f"error: {type(e).__name__}: {e}"[:300]}
        r.update({f"flops_{k}": v for k, v in flops[key].items()})
        result["rows"].append(r)
        print(table({**result, "rows": [r]}).splitlines()[-1], flush=True)
    if a.e2e:
        result["lipsync_e2e"] = e2e_row(*a.e2e, dev, Path(a.out).resolve().parent)
    else:
        result["lipsync_e2e"] = {"status": "skipped: no --e2e VIDEO AUDIO CKPT"}
    result["seconds"] = time.perf_counter() - t_start
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"lipsync end to end: {result['lipsync_e2e']}")
    print(f"total {result['seconds']:.0f} s; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Pipeline speed and memory, measured side by side in one run (random-weight checkpoints).

    python bench/bench_pipeline.py [--presets tiny small] [--steps 10 25 50 200] [--batch 8]
                                   [--max-direct-steps 25] [--memory 10 60] [--device cpu]

1. Frames per second of the sampling stage (sample_faces: masked encode, the sampler's U-Net steps
   with the step-invariant caches, decode) per preset and step count, batch ``--batch`` frames.
   Step counts above ``--max-direct-steps`` are extrapolated from the measured per-step and fixed
   costs (marked "extrap."): fps(S) = B / (fixed + S * per_step), which the direct rows check.
2. End-to-end fps of ``lipsync`` (tiny, 25 steps, face tracking, landmark completion, blending,
   h264 encode), with and without the provenance watermark.
3. Peak RSS of a whole ``lipsync`` run (tiny, 1 step, no watermark) for a 10 s and a 60 s synthetic
   video, each in a fresh process, and their ratio (streaming: should be ~1).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from talkformer_core import pipeline as P  # noqa: E402
from talkformer_core.config import preset  # noqa: E402
from talkformer_core.models.checkpoint import save_checkpoint  # noqa: E402
from talkformer_core.models.model import TalkFormer  # noqa: E402


def make_checkpoint(name: str, folder: Path) -> Path:
    torch.manual_seed(0)
    cfg = preset(name)
    m = TalkFormer(cfg)
    mods = {"autoencoder": m.autoencoder, "landmark": m.landmark, "unet": m.unet}
    if m.appearance is not None:
        mods["appearance"] = m.appearance
    return save_checkpoint(folder / f"{name}.safetensors", mods, cfg)


def sampling_fps(model: P.LoadedModel, steps_list, batch: int, max_direct: int) -> list[tuple[int, float, str]]:
    S = model.crop_size
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (batch, S, S, 3), dtype=np.uint8)
    lm = rng.uniform(0.2, 0.8, (batch, 131, 2)).astype(np.float32)
    ref = P.encode_reference(model, crops[0])
    P.sample_faces(model, crops[:1], lm[:1], ref, steps=1)  # warm-up
    measured = {}
    for s in sorted(set([1] + [x for x in steps_list if x <= max_direct])):
        t = time.perf_counter()
        P.sample_faces(model, crops, lm, ref, steps=s)
        measured[s] = time.perf_counter() - t
    direct = sorted(measured)
    hi = direct[-1]
    per_step = (measured[hi] - measured[1]) / max(hi - 1, 1)
    fixed = max(measured[1] - per_step, 0.0)
    rows = []
    for s in steps_list:
        if s in measured:
            rows.append((s, batch / measured[s], "measured"))
        else:
            rows.append((s, batch / (fixed + s * per_step), "extrap."))
    return rows


MEM_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from talkformer_core import pipeline as P
    def rss(key):
        for line in open('/proc/self/status'):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    model = P.load_model({ckpt!r})
    base = rss('VmRSS')
    r = P.lipsync({video!r}, {audio!r}, model, {out!r}, P.SyncOptions(steps=1, watermark=False))
    print(base, rss('VmHWM'), r.num_frames, r.seconds)
""")


def synthetic_video(folder: Path, seconds: int, size: int) -> tuple[Path, Path]:
    """A 4 s synthetic astronaut clip played forward/backward to ``seconds`` (frames streamed to disk)."""
    import soundfile as sf

    from talkformer_core.data.synthetic import load_photo, make_clip
    from talkformer_core.video import VideoWriter

    clip = make_clip(load_photo("astronaut"), seed=0, duration=4.0, frame_size=size)
    n = seconds * 25
    plan = [k % (2 * len(clip.frames) - 2) for k in range(n)]
    plan = [i if i < len(clip.frames) else 2 * len(clip.frames) - 2 - i for i in plan]
    v = folder / f"v{seconds}.mp4"
    with VideoWriter(v, 25.0, crf=23) as w:
        for i in plan:
            w.write(clip.frames[i])
    a = folder / f"a{seconds}.wav"
    sf.write(str(a), np.resize(clip.audio, seconds * 16000), 16000)
    return v, a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", nargs="+", type=int, default=[10, 25, 50, 200])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-direct-steps", type=int, default=25)
    ap.add_argument("--memory", nargs="*", type=int, default=[10, 60], help="video lengths in s ('' to skip)")
    ap.add_argument("--memory-size", type=int, default=256, help="frame side of the memory videos")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}\n")

    print(f"## Sampling stage fps (batch {a.batch}, ddim)\n\n| preset | steps | frames/s | s/frame | how |\n|---|---|---|---|---|")
    ckpts = {}
    for name in a.presets:
        ckpts[name] = make_checkpoint(name, tmp)
        model = P.load_model(ckpts[name], device=a.device)
        for s, fps, how in sampling_fps(model, a.steps, a.batch, a.max_direct_steps):
            print(f"| {name} | {s} | {fps:.3f} | {1 / fps:.3f} | {how} |", flush=True)
        del model

    print("\n## End-to-end lipsync fps (tiny, 25 steps, 4 s synthetic 256x256 clip)\n")
    tiny = ckpts.get("tiny") or make_checkpoint("tiny", tmp)
    v4, a4 = synthetic_video(tmp, 4, 256)
    model = P.load_model(tiny, device=a.device)
    print("| watermark | frames | seconds | frames/s |\n|---|---|---|---|")
    for wm in (False, True):
        r = P.lipsync(v4, a4, model, tmp / f"e2e_{wm}.mp4", P.SyncOptions(steps=25, watermark=wm))
        print(f"| {'on' if wm else 'off'} | {r.num_frames} | {r.seconds:.1f} | {r.num_frames / r.seconds:.2f} |", flush=True)

    if a.memory:
        print(f"\n## Peak RSS of lipsync (tiny, 1 step, no watermark, {a.memory_size}x{a.memory_size}), fresh process each\n")
        print("| video | frames | RSS after load (MB) | peak RSS (MB) | growth (MB) | run s |\n|---|---|---|---|---|---|")
        peaks = []
        for sec in a.memory:
            v, au = synthetic_video(tmp, sec, a.memory_size)
            code = MEM_SCRIPT.format(root=str(ROOT), ckpt=str(tiny), video=str(v), audio=str(au), out=str(tmp / "m.mp4"))
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-2000:])
                return
            base, peak, n, secs = res.stdout.split()[-4:]
            base, peak = int(base) / 2 ** 20, int(peak) / 2 ** 20
            peaks.append(peak)
            print(f"| {sec} s | {n} | {base:.0f} | {peak:.0f} | {peak - base:.0f} | {float(secs):.0f} |", flush=True)
        if len(peaks) >= 2:
            print(f"\npeak RSS ratio {a.memory[-1]} s / {a.memory[0]} s: {peaks[-1] / peaks[0]:.3f}")


if __name__ == "__main__":
    main()

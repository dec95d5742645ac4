"""The one-node path against the stage path, side by side in one run, seconds per frame by stage.

    python bench/bench_paths.py [--video CLIP.mp4] [--seconds 4] [--checkpoint C] [--steps 25] [--repeat 2]

Both paths run in this process through the pack's own node classes (as ComfyUI calls them, without
the server), on the same clip, audio, checkpoint, steps and seed, with the watermark on:
  one-node  TalkFormer Lip Sync (Video): file in, mp4 out (streaming, two passes over the file);
  stages    decode the whole clip into one IMAGE batch (what core Get Video Components does), Match
            Length, Audio Features, Detect Face Landmarks, Complete Landmarks, Encode Reference,
            TalkFormer Sampler, Blend Face, then the mp4 written with our VideoWriter (standing in for
            core Create Video + Save Video, which encode the same way).
Runs alternate (one-node, stages, one-node, ...) so a busy machine slows both alike. Prints the
seconds per frame of each stage and of each path, and their ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_CLIP = ROOT.parent / "shared" / "media" / "videoretalking_face_5.mp4"


def _stage_path(video: Path, audio: dict, ckpt: str, steps: int, out: Path) -> dict[str, float]:
    import numpy as np
    import torch

    from nodes.audio_nodes import AudioFeatures, MatchLength
    from nodes.face_nodes import BlendFace, DetectFaceLandmarks
    from nodes.generate_nodes import CompleteLandmarks, EncodeReference, TalkFormerSampler
    from nodes.model_nodes import LoadTalkFormerModel
    from talkformer_core.video import VideoWriter, iter_frames

    t: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        t[name] = t.get(name, 0.0) + time.perf_counter() - t0
        return time.perf_counter()

    t0 = time.perf_counter()
    (model,) = LoadTalkFormerModel().load(ckpt, "fp32")
    t0 = lap("load model", t0)
    frames = np.stack(list(iter_frames(video, 25.0)))
    images = torch.from_numpy(frames).float() / 255.0  # Get Video Components: one float batch
    t0 = lap("decode video", t0)
    images, count, aud = MatchLength().match(images, audio, 25.0, "pingpong")
    (feats, count) = AudioFeatures().features(aud, 25.0, count)
    t0 = lap("audio", t0)
    track, _ = DetectFaceLandmarks().detect(images, 256, -1)
    t0 = lap("face analysis", t0)
    lms, _ = CompleteLandmarks().complete(model, track, feats)
    (ref,) = EncodeReference().encode(model, track, images, -1)
    t0 = lap("stage 1 + reference", t0)
    (crops,) = TalkFormerSampler().sample(model, images, track, lms, ref, steps, "ddim", 0, 0.0)
    t0 = lap("sampling", t0)
    (blended,) = BlendFace().blend(images, crops, track, -1, True)
    t0 = lap("blend + watermark", t0)
    wav = aud["waveform"][0].numpy()
    with VideoWriter(out, 25.0, audio=wav, audio_rate=int(aud["sample_rate"])) as w:
        for f in (blended.clamp(0, 1) * 255).round().to(torch.uint8).numpy():
            w.write(f)
    lap("encode", t0)
    return t


def _one_node(video: Path, audio: dict, ckpt: str, steps: int) -> dict[str, float]:
    from nodes.model_nodes import LoadTalkFormerModel
    from nodes.video_node import TalkFormerLipSyncVideo

    t0 = time.perf_counter()
    (model,) = LoadTalkFormerModel().load(ckpt, "fp32")
    t1 = time.perf_counter()
    TalkFormerLipSyncVideo().lipsync(str(video), model, steps=steps, sampler="ddim", seed=0, audio=audio)
    return {"load model": t1 - t0, "lip sync (video node)": time.perf_counter() - t1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/bench_paths.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--video", type=Path, default=DEFAULT_CLIP, help="template clip (its own audio drives it)")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of the clip used")
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "demo_astronaut.safetensors"), help="model")
    ap.add_argument("--steps", type=int, default=25, help="sampler steps")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each path (alternating)")
    a = ap.parse_args(argv)
    if not a.video.is_file():
        print(f"error: {a.video}: no such clip", file=sys.stderr)
        return 2
    import torch

    from talkformer_core.video import VideoWriter, iter_frames, read_audio_track

    tmp = Path(tempfile.mkdtemp(prefix="bench_paths_"))
    n = int(round(a.seconds * 25))
    clip = tmp / "clip.mp4"
    wav, rate = read_audio_track(a.video)  # (C, T)
    wav = wav[:, : int(round(a.seconds * rate))]
    with VideoWriter(clip, 25.0, audio=wav, audio_rate=rate) as w:
        for i, f in enumerate(iter_frames(a.video, 25.0)):
            if i >= n:
                break
            w.write(f)
    audio = {"waveform": torch.from_numpy(wav[None].copy()).float(), "sample_rate": int(rate)}  # ComfyUI AUDIO
    runs: dict[str, list[dict[str, float]]] = {"one-node": [], "stages": []}
    for r in range(a.repeat):
        runs["one-node"].append(_one_node(clip, audio, a.checkpoint, a.steps))
        runs["stages"].append(_stage_path(clip, audio, a.checkpoint, a.steps, tmp / f"stages{r}.mp4"))
    print(f"{n} frames of {a.video.name}, {a.checkpoint.split('/')[-1]}, {a.steps} DDIM steps, watermark on, "
          f"{torch.get_num_threads()} threads; best of {a.repeat}, seconds per frame")
    totals = {}
    for path, rs in runs.items():
        best = min(rs, key=lambda d: sum(v for k, v in d.items() if k != "load model"))
        totals[path] = sum(v for k, v in best.items() if k != "load model") / n
        for k, v in best.items():
            print(f"  {path:9s} {k:24s} {v / n:8.4f}")
        print(f"  {path:9s} {'total (without loading)':24s} {totals[path]:8.4f}")
    print(f"one-node / stages = {totals['one-node'] / totals['stages']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Face front end speed and stability on real talking clips (``--media``, default ../shared/media).

Prints, per clip: mediapipe FaceMesh (tracking mode, refine_landmarks) ms per frame, the crop-centre
jitter (std in px of frame-to-frame centre differences) before and after smoothing, and the time
of crop + paste-back per frame. Usage: python bench/bench_face.py [--crop 256] [--frames N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from talkformer_core.face.blend import paste_back
from talkformer_core.face.landmarks import LandmarkDetector
from talkformer_core.face.track import build_track, crop_frame, crop_jitter

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"


def read_frames(path: Path, n: int | None) -> list[np.ndarray]:
    import av

    out = []
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if n is not None and len(out) == n:
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--media", type=Path, default=MEDIA)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--frames", type=int, default=None, help="frames per clip (default: all)")
    args = ap.parse_args()
    clips = sorted(args.media.glob("*.mp4"))
    if not clips:
        raise SystemExit(f"no .mp4 clips in {args.media}")
    print(f"{'clip':34s} {'size':>9s} {'T':>4s} {'mesh ms/fr':>10s} {'jitter raw':>10s} {'smoothed':>9s} "
          f"{'ratio':>6s} {'crop+paste ms':>13s}")
    for clip in clips:
        frames = read_frames(clip, args.frames)
        with LandmarkDetector() as det:
            det.detect(frames[0])  # warm-up: graph start, first detection
            det.close()
            det.open()
            t0 = time.perf_counter()
            fl = det.detect_sequence(frames)
            mesh_ms = (time.perf_counter() - t0) * 1000 / len(frames)
        track = build_track(fl, crop_size=args.crop)
        raw, smooth = crop_jitter(track.raw_boxes), crop_jitter(track.boxes)
        t0 = time.perf_counter()
        for t, frame in enumerate(frames):
            paste_back(frame, crop_frame(frame, track.boxes[t], args.crop), track.boxes[t])
        cp_ms = (time.perf_counter() - t0) * 1000 / len(frames)
        h, w = fl.size
        print(f"{clip.name:34s} {w:4d}x{h:<4d} {len(frames):4d} {mesh_ms:10.1f} {raw:10.2f} {smooth:9.2f} "
              f"{raw / smooth:6.2f} {cp_ms:13.2f}")


if __name__ == "__main__":
    main()

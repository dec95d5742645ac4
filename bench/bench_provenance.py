"""Provenance marks: cost and robustness on real clips (docs/provenance.md).

    OMP_NUM_THREADS=1 python bench/bench_provenance.py CLIP.mp4 [...] [--frames 24]

For each clip (or every mp4 in the folder $TALKFORMER_MEDIA when none is given): the face track of the
first ``--frames`` frames (25 fps), then
  - marking cost per frame: ``embed_region`` one frame at a time vs ``embed_regions`` (batches of
    provenance.MARK_BATCH, as Blend Face and the pipeline run it);
  - robustness: the marked frames through our h264 writer at crf 18 and re-encoded at crf 28,
    decoded in detect's face boxes: per-frame bit accuracy and bits correct after voting;
  - Mark Video's cost (``detect.mark_file``: the watermark check + stream copy + tag), and
    C2PA signing when c2pa-python is installed (a throw-away test certificate).
Timings are wall clock on whatever machine runs it; they only report.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("clips", nargs="*")
    ap.add_argument("--frames", type=int, default=24)
    a = ap.parse_args()
    from talkformer_core import content_credentials as cc
    from talkformer_core import provenance as pv
    from talkformer_core.detect import detect_file, mark_file
    from talkformer_core.pipeline import analyze_frames
    from talkformer_core.video import VideoWriter, iter_frames

    clips = [Path(c) for c in a.clips] or sorted(Path(os.environ.get("TALKFORMER_MEDIA", ".")).glob("*.mp4"))
    if not clips:
        sys.exit("no clips: give mp4 paths or set TALKFORMER_MEDIA to a folder of them")
    wm = pv.Watermarker().load()
    tmp = Path(tempfile.mkdtemp(prefix="bench_prov_"))
    creds = None
    if cc.available():
        from test_content_credentials import make_chain

        ch = make_chain(tmp / "cert")
        creds = cc.load_credentials(ch["chain"], ch["key"])
    for clip in clips:
        frames = list(iter_frames(clip, 25.0, max_frames=a.frames))
        an = analyze_frames(frames, 256, source=str(clip))
        boxes, found = an.boxes, an.found
        t = time.perf_counter()
        single = [wm.embed_region(f, b) if ok else f for f, b, ok in zip(frames, boxes, found)]
        t_single = (time.perf_counter() - t) / len(frames)
        t = time.perf_counter()
        batched = wm.embed_regions(frames, boxes, found)
        t_batch = (time.perf_counter() - t) / len(frames)
        diff = max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(single, batched))
        own, r28 = tmp / f"{clip.stem}_crf18.mp4", tmp / f"{clip.stem}_crf28.mp4"
        with VideoWriter(own, 25.0, crf=18) as w:
            for f in batched:
                w.write(f)
        with VideoWriter(r28, 25.0, crf=28) as w:
            for f in iter_frames(own):
                w.write(f)
        side = int(np.median(boxes[found, 2])) if found.any() else 0
        print(f"{clip.name}: {len(frames)} frames {frames[0].shape[1]}x{frames[0].shape[0]}, face box ~{side} px")
        print(f"  mark: {t_single:.3f} s/frame one at a time, {t_batch:.3f} s/frame batched "
              f"({t_single / t_batch:.2f}x), max pixel difference {diff}")
        for name, path in (("crf 18", own), ("crf 28 re-encode", r28)):
            r = detect_file(path, frames=len(frames), track_frames=len(frames), c2pa=False)
            print(f"  {name}: per frame {100 * r.per_frame_accuracy:.1f} % bits, voted {r.bits_correct}/32 "
                  f"over {r.frames_decoded} frames, found={r.watermark_found}")
        t = time.perf_counter()
        mark_file(own, tmp / f"{clip.stem}_marked.mp4")
        t_mark = time.perf_counter() - t
        line = f"  Mark Video (check + copy + tag): {t_mark:.2f} s"
        if creds is not None:
            t = time.perf_counter()
            mark_file(own, tmp / f"{clip.stem}_signed.mp4", watermark=True, credentials=creds)
            line += f"; copy + tag + C2PA signing: {time.perf_counter() - t:.2f} s"
        print(line, flush=True)


if __name__ == "__main__":
    main()

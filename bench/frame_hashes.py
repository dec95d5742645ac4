"""Behaviour guard for restructuring: sha256 of the decoded frames of three runs, recorded before a
change and compared after it, on the same machine.

- ``demo``: ``python -m talkformer_core.demo`` (its sample clip lip-synced with the demo checkpoint);
- ``sync``: the sync CLI on a shared clip driven by its own audio, demo checkpoint, 10 steps;
- ``iplap``: pipeline.lipsync with a random-weight IP-LAP checkpoint (IP-LAP's training format,
  converted; the fixture of tests/test_iplap_pipeline.py) on a 1 s synthetic clip, 5 frames.

CPU kernels add in an order that depends on the machine and the thread count (docs/architecture.md,
"Tests"), so the hashes only mean something on the machine that recorded them, at the fixed thread
count used here: record on a clean tree, change the code, then check.

    python bench/frame_hashes.py --record      # writes .bench/frame_hashes.json (not committed)
    python bench/frame_hashes.py               # recomputes, compares, exit 1 on any difference
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # pipeline_helpers: the IP-LAP fixture
THREADS = 1
SYNC_CLIP = ROOT.parent / "shared" / "media" / "videoretalking_face_5.mp4"
DEFAULT_FILE = ROOT / ".bench" / "frame_hashes.json"


def video_digest(path: Path) -> dict:
    """sha256 over the decoded RGB frames, in order, and the frame count."""
    from talkformer_core.video import iter_frames, probe_video

    h, n = hashlib.sha256(), 0
    for f in iter_frames(path, probe_video(path).fps):
        h.update(np.ascontiguousarray(f).tobytes())
        n += 1
    return {"sha256": h.hexdigest(), "frames": n}


def run_demo(tmp: Path) -> Path:
    from talkformer_core import demo

    assert demo.main(["--out", str(tmp / "demo")]) == 0
    return tmp / "demo" / "lipsync.mp4"


def run_sync(tmp: Path) -> Path:
    from talkformer_core import sync

    out = tmp / "sync.mp4"
    assert sync.main(["--video", str(SYNC_CLIP), "--audio", str(SYNC_CLIP), "--checkpoint",
                      str(ROOT / "checkpoints" / "demo_astronaut.safetensors"), "--steps", "10",
                      "--out", str(out)]) == 0
    return out


def run_iplap(tmp: Path) -> Path:
    from pipeline_helpers import iplap_nets, iplap_training_format
    from talkformer_core import pipeline
    from talkformer_core.convert import convert_iplap
    from talkformer_core.data import synthetic

    lg, rd = iplap_nets()
    torch.save(iplap_training_format(lg.state_dict()), tmp / "lg.pth")
    torch.save(iplap_training_format(rd.state_dict(), "module."), tmp / "rd.pth")
    ckpt = convert_iplap(tmp / "lg.pth", tmp / "iplap.safetensors", tmp / "rd.pth")
    clip = synthetic.make_clip(synthetic.load_photo("astronaut"), seed=3, duration=1.0, frame_size=256)
    path = synthetic.write_clip(clip, tmp / "clip.mp4")
    res = pipeline.lipsync(path, (clip.audio[: 16000 * 5 // 25], 16000), pipeline.load_model(ckpt, "cpu", dtype="fp32"),
                           tmp / "iplap.mp4", pipeline.SyncOptions(iplap_references=1, batch_size=3,
                                                                   watermark=False, crf=12))
    return res.out_path


RUNS = {"demo": run_demo, "sync": run_sync, "iplap": run_iplap}


def compute(names: list[str]) -> dict:
    torch.set_num_threads(THREADS)
    out = {}
    for name in names:
        if name == "sync" and not SYNC_CLIP.exists():
            print(f"sync: {SYNC_CLIP} not found, skipped")
            continue
        with tempfile.TemporaryDirectory() as d:
            out[name] = video_digest(RUNS[name](Path(d)))
        print(f"{name}: {out[name]['frames']} frames, {out[name]['sha256'][:16]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", action="store_true", help="write the hashes (before a change)")
    ap.add_argument("--file", type=Path, default=DEFAULT_FILE)
    ap.add_argument("--only", nargs="*", choices=sorted(RUNS), default=sorted(RUNS))
    a = ap.parse_args(argv)
    got = compute(a.only)
    machine = {"processor": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": THREADS}
    if a.record:
        a.file.parent.mkdir(parents=True, exist_ok=True)
        a.file.write_text(json.dumps({"machine": machine, "runs": got}, indent=1))
        print(f"recorded {a.file}")
        return 0
    if not a.file.exists():
        print(f"{a.file}: no recording; run with --record on a clean tree first", file=sys.stderr)
        return 2
    rec = json.loads(a.file.read_text())
    if rec["machine"] != machine:
        print(f"warning: recorded on {rec['machine']}, checking on {machine}: hashes may differ by rounding")
    bad = [n for n in got if rec["runs"].get(n) != got[n]]
    for n in got:
        print(f"{n}: {'same' if n not in bad else 'DIFFERENT'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

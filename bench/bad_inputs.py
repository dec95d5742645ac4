"""The bad-input matrix, measured: each CLI run as a user runs it (a subprocess) on generated bad
inputs; prints the markdown table of docs/bad_inputs.md (case, the message's first line, exit
status, seconds to fail, whether a traceback or a stray file appeared).

    OMP_NUM_THREADS=1 python bench/bad_inputs.py [--keep DIR]

Inputs are made in a temporary folder from the synthetic astronaut clip (data/synthetic.py); the
checkpoint is the shipped demo checkpoint. Seconds include starting Python and importing torch.
"""
from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "checkpoints" / "demo_astronaut.safetensors"


class Boom:
    """A pickle that runs code when loaded: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def make_inputs(d: Path) -> dict[str, Path]:
    import soundfile as sf

    from talkformer_core.data.synthetic import load_photo, make_clip
    from talkformer_core.models.checkpoint import _write_atomically
    from talkformer_core.video import VideoWriter

    clip = make_clip(load_photo("astronaut"), seed=3, duration=1.2, frame_size=128)
    p: dict[str, Path] = {}

    def video(name, frames, audio=None):
        with VideoWriter(d / name, 25.0, audio=audio, audio_rate=16000) as w:
            for f in frames:
                w.write(f)
        return d / name

    p["video"] = video("talk.mp4", clip.frames, clip.audio)
    p["mute"] = video("mute.mp4", clip.frames)
    p["noface"] = video("noface.mp4", [np.full((128, 128, 3), 120, np.uint8)] * 30, clip.audio)
    p["two"] = video("two.mp4", [np.ascontiguousarray(np.concatenate([f, f[:, ::-1]], 1)) for f in clip.frames],
                     clip.audio)
    raw = p["video"].read_bytes()
    (d / "truncated.mp4").write_bytes(raw[: len(raw) // 2])
    p["truncated"] = d / "truncated.mp4"
    rng = np.random.default_rng(0)
    for name in ("random.mp4", "random.wav", "random.safetensors"):
        (d / name).write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        p[name] = d / name
    sf.write(str(d / "a16k.wav"), clip.audio, 16000)
    p["wav"] = d / "a16k.wav"
    wav = (d / "a16k.wav").read_bytes()
    (d / "trunc.wav").write_bytes(wav[:60])  # a header and no samples
    p["trunc.wav"] = d / "trunc.wav"
    t8 = np.interp(np.arange(0, len(clip.audio), 2), np.arange(len(clip.audio)), clip.audio)
    sf.write(str(d / "a8k.wav"), t8.astype(np.float32), 8000)
    p["8k"] = d / "a8k.wav"
    t48 = np.interp(np.arange(0, len(clip.audio), 1 / 3), np.arange(len(clip.audio)), clip.audio)
    sf.write(str(d / "a48k_stereo.wav"), np.stack([t48, t48 * 0.5], 1).astype(np.float32), 48000)
    p["48k"] = d / "a48k_stereo.wav"
    sf.write(str(d / "short.wav"), clip.audio[:1600], 16000)  # 0.1 s
    p["short"] = d / "short.wav"
    sf.write(str(d / "short03.wav"), clip.audio[:4800], 16000)  # 0.3 s
    p["short03"] = d / "short03.wav"
    import torch

    _write_atomically({"w": torch.zeros(3)}, d / "foreign.safetensors", {"format": "pt"})
    p["foreign"] = d / "foreign.safetensors"
    marker = d / "PWNED"
    with open(d / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Boom(marker)}, f)
    p["pickle"] = d / "evil.pth"
    p["marker"] = marker
    (d / "existing.mp4").write_bytes(b"x")
    p["existing"] = d / "existing.mp4"
    return p


def run(argv: list[str], cwd: Path) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.time()
    r = subprocess.run([sys.executable, "-m", *argv], cwd=cwd, env=env, capture_output=True, text=True)
    return r.returncode, r.stderr, time.time() - t


def first_line(err: str) -> str:
    """The error line if there is one, else the first warning (else the last line)."""
    for kind in ("error:", "warning:"):
        lines = [ln for ln in err.splitlines() if ln.startswith(kind)]
        if lines:
            return lines[0]
    return (err.strip().splitlines() or [""])[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description="Measure the bad-input matrix; print a markdown table.")
    ap.add_argument("--keep", default=None, help="make the inputs here (kept) instead of a temporary folder")
    a = ap.parse_args()
    d = Path(a.keep or tempfile.mkdtemp(prefix="talkformer_bad_"))
    d.mkdir(parents=True, exist_ok=True)
    p = make_inputs(d)
    out = d / "out"
    out.mkdir(exist_ok=True)
    unwritable = Path("/proc") if os.geteuid() == 0 else d / "ro"
    if unwritable != Path("/proc"):
        unwritable.mkdir(exist_ok=True)
        unwritable.chmod(0o555)

    def sync(video, audio, ckpt=DEMO, o=None, *extra):
        return ["talkformer_core.sync", "--video", str(video), "--audio", str(audio), "--checkpoint", str(ckpt),
                "--out", str(o or out / "o.mp4"), "--steps", "1", "--no-watermark", *extra]

    cases = [
        ("sync: random-bytes video", sync(p["random.mp4"], p["wav"])),
        ("sync: truncated video (first half of an mp4)", sync(p["truncated"], p["wav"])),
        ("sync: random-bytes audio", sync(p["video"], p["random.wav"])),
        ("sync: truncated wav (header, no samples)", sync(p["video"], p["trunc.wav"])),
        ("sync: --audio a video without an audio stream", sync(p["video"], p["mute"])),
        ("sync: no face in any frame", sync(p["noface"], p["wav"])),
        ("sync: two faces, --face-index 5", sync(p["two"], p["wav"], DEMO, None, "--face-index", "5")),
        ("sync: --face-index -2", sync(p["video"], p["wav"], DEMO, None, "--face-index", "-2")),
        ("sync: 0.1 s of audio", sync(p["video"], p["short"])),
        ("sync: 0.3 s of audio (works, warns)", sync(p["video"], p["short03"])),
        ("sync: 8 kHz mono audio (works)", sync(p["video"], p["8k"])),
        ("sync: 48 kHz stereo audio (works)", sync(p["video"], p["48k"])),
        ("sync: random-bytes checkpoint", sync(p["video"], p["wav"], p["random.safetensors"])),
        ("sync: foreign safetensors (no TalkFormer metadata)", sync(p["video"], p["wav"], p["foreign"])),
        ("sync: a pickle (.pth) as checkpoint", sync(p["video"], p["wav"], p["pickle"])),
        ("sync: demo checkpoint (works, warns)", sync(p["video"], p["wav"])),
        ("sync: --out in a read-only folder", sync(p["video"], p["wav"], DEMO, unwritable / "o.mp4")),
        ("sync: --out under a file (existing.mp4/o.mp4)", sync(p["video"], p["wav"], DEMO, p["existing"] / "o.mp4")),
        ("sync: --out an existing folder", sync(p["video"], p["wav"], DEMO, out)),
        ("convert: a malicious pickle as IP-LAP weights",
         ["talkformer_core.convert", "iplap", "--landmark-generator", str(p["pickle"]), "--out", str(out / "i.safetensors")]),
        ("finetune: random-bytes video", ["talkformer_core.finetune", "--video", str(p["random.mp4"]), "--out",
                                          str(out / "p.safetensors")]),
        ("finetune: --out under a file", ["talkformer_core.finetune", "--video", str(p["video"]), "--out",
                                          str(p["existing"] / "p.safetensors")]),
        ("train: --out under a file", ["talkformer_core.train", "--stage", "autoencoder", "--data", str(out),
                                       "--out", str(p["existing"] / "run")]),
        ("preprocess: --out is a file", ["talkformer_core.data.preprocess", "--inputs", str(p["video"]), "--out",
                                         str(p["existing"])]),
        ("eval: --out-dir under a file", ["talkformer_core.eval", "--generated", str(p["video"]), "--truth",
                                          str(p["video"]), "--out-dir", str(p["existing"] / "e")]),
    ]
    print("| case | first line on stderr | exit | seconds | traceback | files left |")
    print("|---|---|---|---|---|---|")
    for name, argv in cases:
        before = set(out.iterdir())
        rc, err, secs = run(argv, d)
        left = sorted(x.name for x in set(out.iterdir()) - before)
        if p["marker"].exists():
            left.append("PICKLE MARKER")
        for x in set(out.iterdir()) - before:  # the next case starts clean
            if x.is_file():
                x.unlink()
        msg = first_line(err).replace(str(d) + "/", "").replace("|", "\\|")
        if len(msg) > 160:
            msg = msg[:157] + "..."
        print(f"| {name} | `{msg}` | {rc} | {secs:.1f} | {'yes' if 'Traceback' in err else 'no'} | "
              f"{', '.join(left) if left else 'none'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

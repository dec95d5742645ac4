"""Read a video's provenance marks: ``python -m talkformer_core.detect FILE [--frames 24] [--json]``.

Reports both marks ``pipeline.lipsync`` leaves (provenance.py):
  - the container's ``comment`` metadata tag (does it name the generator?);
  - the invisible rivaGan watermark in the face region: our face track (pipeline.analyze_frames,
    the same tracker and box rule that placed the mark) runs over a stretch of up to
    ``--track-frames`` consecutive frames from the middle of the video, the mark is decoded in the
    face box of ``--frames`` frames spread over it, and the per-frame logits are averaged (soft
    voting) into 32 bits, compared with the generator's payload.
Verdict: "watermark found" when at least 29 of 32 bits agree (an unmarked video does so by chance
with probability 5.6e-6), "not found" otherwise.

Exit status: 0 watermark found, 1 not found, 2 bad input (message on stderr).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import TalkFormerError, VideoError

MIN_CORRECT = 29  # of 32 bits


@dataclass
class DetectReport:
    path: str
    comment: str | None  # the container's comment tag
    tag_names_generator: bool
    frames_decoded: int
    bits: str  # decoded payload, hex
    expected: str  # the generator's payload, hex
    bits_correct: int
    bit_accuracy: float  # after voting
    per_frame_accuracy: float  # mean over frames, before voting
    false_match_probability: float
    watermark_found: bool
    frames: list[int] = field(default_factory=list)  # template frames (25 fps) decoded

    @property
    def verdict(self) -> str:
        wm = "watermark found" if self.watermark_found else "watermark not found"
        tag = "tag names the generator" if self.tag_names_generator else "no generator tag"
        return f"{wm}; {tag}"


def read_tags(path: str | Path) -> dict[str, str]:
    """The container's metadata tags (e.g. {'comment': ...})."""
    import av

    from .video import _check_file, _open

    p = _check_file(path)
    with _open(p) as c:
        return {str(k): str(v) for k, v in c.metadata.items()}


def detect_file(path: str | Path, frames: int = 24, track_frames: int = 75) -> DetectReport:
    """Decode the tag and the watermark of a video file (see the module docstring)."""
    from . import provenance
    from .pipeline import FPS, analyze_frames
    from .video import iter_frames, probe_video

    info = probe_video(path)  # VideoError for missing / corrupt files
    tags = read_tags(path)
    comment = tags.get("comment")
    n_total = info.frames_at(FPS)
    span = max(1, min(track_frames, n_total))
    start = max(0, (n_total - span) // 2)
    wm = provenance.Watermarker().load()
    held = list(iter_frames(path, FPS, start=start, max_frames=span))
    if not held:
        raise VideoError(f"{path}: no frames decoded")
    analysis = analyze_frames(held, 256, source=str(path))
    found = np.flatnonzero(analysis.found)
    pick = found[np.unique(np.linspace(0, len(found) - 1, min(frames, len(found))).round().astype(int))]
    logits = []
    for t in pick:
        lg = wm.decode_region(held[t], analysis.boxes[t])
        if lg is not None:
            logits.append(lg)
    lg = np.array(logits).reshape(-1, provenance.PAYLOAD_LENGTH)
    bits = provenance.vote(lg) if len(lg) else np.zeros(provenance.PAYLOAD_LENGTH, np.uint8)
    correct = int((bits == provenance.PAYLOAD).sum()) if len(lg) else 0
    per_frame = float(((lg > 0) == provenance.PAYLOAD[None]).mean()) if len(lg) else 0.0
    return DetectReport(
        path=str(path), comment=comment,
        tag_names_generator=bool(comment and provenance.GENERATOR.lower() in comment.lower()),
        frames_decoded=len(lg), bits=provenance.bits_to_hex(bits), expected=provenance.bits_to_hex(provenance.PAYLOAD),
        bits_correct=correct, bit_accuracy=correct / provenance.PAYLOAD_LENGTH, per_frame_accuracy=per_frame,
        false_match_probability=provenance.false_match_probability(correct),
        watermark_found=bool(len(lg)) and correct >= MIN_CORRECT,
        frames=[int(start + t) for t in pick],
    )


def format_report(r: DetectReport) -> str:
    lines = [
        f"file: {r.path}",
        f"comment tag: {r.comment!r}" + ("  (names the generator)" if r.tag_names_generator else ""),
        f"watermark: {r.bits_correct}/32 payload bits correct after voting over {r.frames_decoded} frames "
        f"(per frame {100 * r.per_frame_accuracy:.1f} %); decoded {r.bits}, expected {r.expected}",
        f"chance of this many matching bits in an unmarked video: {r.false_match_probability:.2g}",
        f"verdict: {r.verdict}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m talkformer_core.detect",
                                 description="Report the provenance tag and invisible watermark of a video.")
    ap.add_argument("file", help="video file (mp4, ...)")
    ap.add_argument("--frames", type=int, default=24, help="frames whose face region is decoded (voted)")
    ap.add_argument("--track-frames", type=int, default=75, help="consecutive frames the face track runs over")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    a = ap.parse_args(argv)
    try:
        r = detect_file(a.file, frames=max(1, a.frames), track_frames=max(1, a.track_frames))
    except TalkFormerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({**asdict(r), "verdict": r.verdict}, indent=2))
    else:
        print(format_report(r))
    return 0 if r.watermark_found else 1


if __name__ == "__main__":
    sys.exit(main())

"""Read a video's provenance marks: ``python -m talkformer_core.detect FILE [--frames 24] [--json]``;
and ``mark_file``, which gives an existing video the file-level marks after looking for the watermark.

Reports the three marks our outputs can carry (docs/provenance.md):
  - the container's ``comment`` metadata tag (does it name the generator, and does it say the
    frames carry the invisible watermark or that none was embedded?);
  - the invisible rivaGan watermark in the face region: our face track (pipeline.analyze_frames,
    the same tracker and box rule that placed the mark) runs over a stretch of up to
    ``--track-frames`` consecutive frames from the middle of the video, the mark is decoded in the
    face box of ``--frames`` frames spread over it, and the per-frame logits are averaged (soft
    voting) into 32 bits, compared with the generator's payload;
  - C2PA content credentials (content_credentials.py): valid / trusted (``--c2pa-trust CA.pem``) /
    invalid / absent, the signer and the claim generator; "not checked" without c2pa-python.
Watermark verdict: "found" when at least 29 of 32 bits agree (an unmarked video does so by chance
with probability 5.6e-6), "not found" otherwise; read against what the tag says (a tag that says
no watermark was embedded makes "not found" the expected answer, not a failure).

Exit status: 0 watermark found, 1 not found, 2 bad input (message on stderr).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    tag_claims_watermark: bool | None = None  # True / False: what our tag says; None: no tag of ours
    note: str = ""  # e.g. why no frame could be decoded
    c2pa: dict | None = None  # content_credentials.report_dict

    @property
    def verdict(self) -> str:
        tag = "tag names the generator" if self.tag_names_generator else "no generator tag"
        if self.tag_claims_watermark is False:
            wm = ("watermark found although the tag says none was embedded" if self.watermark_found
                  else "the tag says no watermark was embedded (none found)")
        elif self.watermark_found:
            wm = "watermark found"
        elif self.tag_claims_watermark:
            wm = "watermark not found although the tag claims one (re-encoded, cropped or scaled since?)"
        else:
            wm = "watermark not found"
        parts = [wm, tag] if self.tag_claims_watermark is None else [tag, wm]
        c = self.c2pa or {}
        status = c.get("status")
        if status in ("valid", "trusted"):
            parts.append(f"C2PA credentials {status} (signer {c.get('signer')}, generator {c.get('generator')})")
        elif status == "invalid":
            parts.append("C2PA credentials INVALID (" + str(c.get("detail")) + ")")
        elif status == "absent":
            parts.append("no C2PA credentials")
        elif status:
            parts.append(f"C2PA {status} ({c.get('detail')})")
        return "; ".join(parts)


def read_tags(path: str | Path) -> dict[str, str]:
    """The container's metadata tags (e.g. {'comment': ...})."""
    from .video import _check_file, _open

    p = _check_file(path)
    with _open(p) as c:
        return {str(k): str(v) for k, v in c.metadata.items()}


def detect_file(path: str | Path, frames: int = 24, track_frames: int = 75, c2pa: bool = True,
                c2pa_trust: str | Path | None = None) -> DetectReport:
    """Read the tag, the watermark and (``c2pa``) the C2PA credentials of a video file (see the
    module docstring); ``c2pa_trust``: PEM trust anchors for the C2PA signer."""
    from . import provenance
    from .content_credentials import read_credentials, report_dict
    from .errors import FaceError
    from .pipeline import FPS, analyze_frames
    from .video import iter_frames, probe_video

    info = probe_video(path)  # VideoError for missing / corrupt files
    tags = read_tags(path)
    comment = tags.get("comment")
    creds = report_dict(read_credentials(path, c2pa_trust)) if c2pa else None
    n_total = info.frames_at(FPS)
    span = max(1, min(track_frames, n_total))
    start = max(0, (n_total - span) // 2)
    wm = provenance.Watermarker().load()
    held = list(iter_frames(path, FPS, start=start, max_frames=span))
    if not held:
        raise VideoError(f"{path}: no frames decoded")
    note = ""
    try:
        analysis = analyze_frames(held, 256, source=str(path))
        found = np.flatnonzero(analysis.found)
    except FaceError:  # the tag and the credentials are still worth reporting
        analysis, found = None, np.zeros(0, np.int64)
        note = f"no face in frames {start}..{start + len(held) - 1}: the watermark could not be read"
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
        tag_claims_watermark=provenance.tag_claims_watermark(comment), note=note, c2pa=creds,
    )


def mark_file(src: str | Path, dst: str | Path, watermark: bool | None = None, credentials: Any = None) -> bool:
    """Give an existing video file the file-level marks: copy its streams (no re-encode) into the
    mp4 ``dst`` with the generator tag, and sign C2PA ``credentials`` (content_credentials.
    Credentials) into it. ``watermark``: what the tag says about the frames; None = look (the
    face track over 25 frames from the middle, 8 face regions decoded and voted, as
    ``detect_file`` does), so the tag only claims a watermark that is there. Returns what the tag says.
    Atomic: on any error nothing is left at ``dst``."""
    from .provenance import generator_tag
    from .video import remux

    if watermark is None:
        watermark = detect_file(src, frames=8, track_frames=25, c2pa=False).watermark_found
    sign = credentials.finalizer(Path(dst).name) if credentials is not None else None
    remux(src, dst, {"comment": generator_tag(bool(watermark))}, finalize=sign)
    return bool(watermark)


def format_report(r: DetectReport) -> str:
    lines = [
        f"file: {r.path}",
        f"comment tag: {r.comment!r}" + ("  (names the generator)" if r.tag_names_generator else ""),
        f"watermark: {r.bits_correct}/32 payload bits correct after voting over {r.frames_decoded} frames "
        f"(per frame {100 * r.per_frame_accuracy:.1f} %); decoded {r.bits}, expected {r.expected}",
        f"chance of this many matching bits in an unmarked video: {r.false_match_probability:.2g}",
    ]
    if r.note:
        lines.append(f"note: {r.note}")
    c = r.c2pa
    if c is not None:
        line = f"C2PA: {c['status']}: {c['detail']}"
        if c.get("signer") or c.get("generator"):
            line += (f"; signer {c.get('signer')}; claim generator {c.get('generator')}; actions "
                     f"{', '.join(c.get('actions') or []) or '-'} ({', '.join(c.get('digital_source_types') or []) or '-'})")
        lines.append(line)
    lines.append(f"verdict: {r.verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m talkformer_core.detect",
                                 description="Report the provenance tag and invisible watermark of a video.")
    ap.add_argument("file", help="video file (mp4, ...)")
    ap.add_argument("--frames", type=int, default=24, help="frames whose face region is decoded (voted)")
    ap.add_argument("--track-frames", type=int, default=75, help="consecutive frames the face track runs over")
    ap.add_argument("--c2pa-trust", default=None, metavar="CA.pem",
                    help="PEM trust anchors: also check that the C2PA signer chains to one (default: the "
                         "signature and content hash are checked, not the signer's trust)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    a = ap.parse_args(argv)
    try:
        r = detect_file(a.file, frames=max(1, a.frames), track_frames=max(1, a.track_frames),
                        c2pa_trust=a.c2pa_trust)
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

"""Provenance: the rivaGan watermark in the face region and the generator tag (provenance.py,
detect.py). The mark must survive our own h264 encode and a re-encode at crf 28 (>= 95 % of the
payload bits after voting, DESIGN.md §4)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pipeline_helpers import psnr, save_tiny_checkpoint, synthetic_clip, write_video, write_wav
from talkformer_core import pipeline as P
from talkformer_core import provenance as pv
from talkformer_core.detect import detect_file, main as detect_main
from talkformer_core.video import iter_frames

pytest.importorskip("onnxruntime")
pytest.importorskip("imwatermark")


def test_payload_names_the_generator():
    bits = pv.payload_bits()
    assert bits.shape == (32,) and set(np.unique(bits)) <= {0, 1}
    assert pv.bits_to_hex(bits) == hashlib.sha256(b"TalkFormer").hexdigest()[:8]
    assert pv.bits_to_hex(pv.payload_bits("someone else")) != pv.bits_to_hex(bits)
    assert "TalkFormer" in pv.GENERATOR_TAG
    assert pv.false_match_probability(32) == 2.0 ** -32
    assert pv.false_match_probability(0) == 1.0


def test_face_region_rule():
    # small face: a 256 square around it, moved inside the frame; big face: its own box
    assert pv.face_region((10, 20, 100), (300, 400)) == (0, 0, 256, 256)
    assert pv.face_region((300, 100, 80), (300, 400)) == (144, 12, 400, 268)
    assert pv.face_region((50, 40, 300), (720, 1280)) == (50, 40, 350, 340)
    assert pv.face_region((0, 0, 100), (200, 200)) == (0, 0, 200, 200)  # frame smaller than 256


def test_embed_decode_roundtrip_uncompressed():
    clip = synthetic_clip(0, 2.0, 256)
    frame = clip.frames[0]
    a = P.analyze_frames([frame], 64)
    box = a.boxes[0]
    marked = pv.embed(frame, box=box)
    assert marked.shape == frame.shape and marked.dtype == np.uint8
    assert 36 < psnr(marked, frame) < 60  # invisible, but there
    assert pv.bit_accuracy(pv.vote(pv.decode(marked, box=box))) == 1.0
    assert pv.bit_accuracy(pv.vote(pv.decode(frame, box=box))) < 0.85  # the unmarked frame
    other = pv.Watermarker(pv.payload_bits("other"))
    assert pv.bit_accuracy(pv.vote(other.decode_region(other.embed_region(frame, box), box))) < 0.85


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    """A synthetic talking clip marked in its face boxes (our face track) and written by our own
    h264 writer (crf 18, with the generator tag), and its re-encode at crf 28."""
    from talkformer_core.video import VideoWriter

    d = tmp_path_factory.mktemp("prov")
    clip = synthetic_clip(1, 0.8, 256)  # 20 frames
    a = P.analyze_frames(clip.frames, 64)
    wm = pv.Watermarker()
    own = d / "marked.mp4"
    with VideoWriter(own, 25.0, audio=clip.audio, metadata={"comment": pv.GENERATOR_TAG}) as w:
        for f, box in zip(clip.frames, a.boxes):
            w.write(wm.embed_region(f, box))
    recoded = d / "crf28.mp4"
    with VideoWriter(recoded, 25.0, crf=28) as w:  # a re-encode, which also drops our tag
        for f in iter_frames(own):
            w.write(f)
    plain = write_video(d / "plain.mp4", clip.frames)
    return dict(dir=d, own=own, recoded=recoded, plain=plain, clip=clip)


def test_watermark_survives_h264_and_crf28_reencode(marked):
    r = detect_file(marked["own"], frames=20)
    assert r.tag_names_generator and r.watermark_found and r.frames_decoded == 20
    assert r.bit_accuracy >= 0.95
    r28 = detect_file(marked["recoded"], frames=20)
    assert r28.bit_accuracy >= 0.95 and r28.watermark_found, r28
    assert not r28.tag_names_generator


def test_detect_cli_on_marked_and_unmarked(marked, capsys):
    assert detect_main([str(marked["own"]), "--frames", "8"]) == 0
    text = capsys.readouterr().out
    assert "watermark found" in text and "names the generator" in text
    assert detect_main([str(marked["plain"]), "--frames", "8"]) == 1
    text = capsys.readouterr().out
    assert "watermark not found" in text and "no generator tag" in text
    assert detect_main([str(marked["dir"] / "missing.mp4")]) == 2
    assert "missing.mp4" in capsys.readouterr().err


def test_lipsync_output_carries_both_marks(marked):
    """The pipeline marks its output by default (found in our own h264 encode) and writes the tag;
    --no-watermark leaves the tag only. (Random weights make the generated mouth noise, which is
    why the crf-28 check above runs on a clip with a real face.)"""
    d, clip = marked["dir"], marked["clip"]
    video = write_video(d / "template.mp4", clip.frames[:12])
    audio = write_wav(d / "a.wav", clip.audio[:8000])  # 0.5 s -> 13 frames
    ckpt = save_tiny_checkpoint(d / "tiny.safetensors")
    model = P.load_model(ckpt)
    on = P.lipsync(video, audio, model, d / "on.mp4", P.SyncOptions(steps=1))
    r = detect_file(on.out_path, frames=13)
    assert r.watermark_found and r.tag_names_generator and r.bit_accuracy >= 0.95
    off = P.lipsync(video, audio, model, d / "off.mp4", P.SyncOptions(steps=1, watermark=False))
    r = detect_file(off.out_path, frames=8)
    assert not r.watermark_found and r.tag_names_generator

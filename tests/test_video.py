"""Video I/O: probing, streaming with fps resampling, the h264 + AAC writer, length plans."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from talkformer_core.audio import load_audio
from talkformer_core.errors import AudioError, InputError, VideoError
from talkformer_core.video import (
    VideoWriter,
    iter_frames,
    match_length_indices,
    output_length,
    probe_video,
    read_audio_track,
    resample_indices,
)

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"


def index_frame(i: int, size=(48, 64)) -> np.ndarray:
    """Frame i of a test video: left half grey (i % 16) * 16 + 8, right half (i // 16) * 16 + 8,
    steps that survive h264 at crf 18 many times over, so a decoded frame says which it is."""
    h, w = size
    f = np.empty((h, w, 3), np.uint8)
    f[:, : w // 2] = (i % 16) * 16 + 8
    f[:, w // 2:] = (i // 16) * 16 + 8
    return f


def frame_index(img: np.ndarray) -> int:
    h, w = img.shape[:2]
    lo = int(round((float(img[4:-4, 4: w // 2 - 4].mean()) - 8) / 16))
    hi = int(round((float(img[4:-4, w // 2 + 4: -4].mean()) - 8) / 16))
    return hi * 16 + lo


def write_indexed(path: Path, n: int, fps: float, **kw) -> None:
    with VideoWriter(path, fps, **kw) as w:
        for i in range(n):
            w.write(index_frame(i))


# ----------------------------------------------------------------------------- reading

def test_30_to_25_fps_picks_nearest_source_frames(tmp_path):
    p = tmp_path / "idx30.mp4"
    write_indexed(p, 30, 30)
    info = probe_video(p)
    assert (info.fps, info.num_frames, info.width, info.height) == (30.0, 30, 64, 48)
    assert info.duration == pytest.approx(1.0) and not info.has_audio and info.codec == "h264"
    got = [frame_index(f) for f in iter_frames(p, 25)]
    # Output frame k at k/25 s; source frames at j/30 s; nearest, ties to the earlier.
    expected = [round(k * 30 / 25 - 1e-9) for k in range(25)]
    assert got == expected == list(resample_indices(30, 30, 25))
    assert got[:6] == [0, 1, 2, 4, 5, 6]  # frame 3 (0.100 s) loses to 4 (0.133 s) for t = 0.12 s
    assert info.frames_at(25) == 25
    # fps=None gives every source frame, in order.
    assert [frame_index(f) for f in iter_frames(p, None)] == list(range(30))
    # Upsampling 30 -> 60 repeats frames, never skips.
    up = [frame_index(f) for f in iter_frames(p, 60)]
    assert len(up) == 60 and up == list(resample_indices(30, 30, 60)) and set(up) == set(range(30))
    frames = list(iter_frames(p, 60))  # repeats are separate arrays: drawing on one spares the next
    frames[0][:] = 255
    assert frame_index(frames[1]) == 0


def test_frames_are_rgb_uint8(tmp_path):
    p = tmp_path / "rgb.mp4"
    img = np.zeros((32, 48, 3), np.uint8)
    img[..., 0] = 200  # red
    with VideoWriter(p, 25) as w:
        for _ in range(3):
            w.write(img)
    f = next(iter_frames(p))
    assert f.dtype == np.uint8 and f.shape == (32, 48, 3)
    assert f[..., 0].mean() > 180 and f[..., 1].mean() < 20 and f[..., 2].mean() < 20


def test_chunked_reading_matches_one_pass(tmp_path):
    p = tmp_path / "gop.mp4"
    write_indexed(p, 120, 30, codec_options={"g": "10"})  # 4 s, keyframe every 10 frames
    full = [frame_index(f) for f in iter_frames(p, 25)]
    assert len(full) == 100
    for start in (0, 7, 49, 60, 61, 90, 99, 100, 130):  # 60+ seeks (> 2 s in)
        part = [frame_index(f) for f in iter_frames(p, 25, start=start, max_frames=6)]
        assert part == full[start:start + 6], start
    src = [frame_index(f) for f in iter_frames(p, None, start=75, max_frames=4)]
    assert src == [75, 76, 77, 78]


def test_resample_indices_rules():
    assert np.array_equal(resample_indices(40, 25, 25), np.arange(40))
    assert np.array_equal(resample_indices(40, 50, 25), np.arange(0, 40, 2))
    r = resample_indices(199, 30, 25)
    assert len(r) == 166 and r[-1] == 198 and np.all(np.diff(r) >= 1) and np.all(np.diff(r) <= 2)
    r = resample_indices(24, 24, 25)  # 24 -> 25 fps: one repeat per second
    assert len(r) == 25 and np.all(np.diff(r) >= 0) and len(set(r.tolist())) == 24
    assert len(resample_indices(0, 30, 25)) == 0
    with pytest.raises(InputError):
        resample_indices(10, 0, 25)


# ----------------------------------------------------------------------------- length plans

@pytest.mark.parametrize("n,target", [(5, 23), (2, 7), (10, 4), (1, 6), (7, 7)])
def test_pingpong_length_and_continuity(n, target):
    idx = match_length_indices(n, target, "pingpong")
    assert len(idx) == target == output_length(n, target, "pingpong")
    assert idx.min() >= 0 and idx.max() <= n - 1
    assert np.all(np.abs(np.diff(idx)) <= 1)  # the head never jumps
    assert np.array_equal(idx[: min(n, target)], np.arange(min(n, target)))  # forward first
    if target >= 2 * n - 1 and n > 1:  # a full bounce: forward then backward
        assert np.array_equal(idx[n - 1: 2 * n - 1], np.arange(n - 1, -1, -1))
    if n > 1:
        assert np.all(np.diff(idx) != 0)  # no frame is shown twice in a row


def test_loop_and_trim_plans():
    assert match_length_indices(3, 8, "loop").tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert match_length_indices(5, 3, "trim").tolist() == [0, 1, 2]  # video cut to the audio
    assert match_length_indices(3, 5, "trim").tolist() == [0, 1, 2]  # audio to be cut to the video
    assert output_length(3, 5, "trim") == 3 and output_length(3, 5, "loop") == 5
    assert match_length_indices(4, 9).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2]  # pingpong default
    with pytest.raises(InputError, match="mode"):
        match_length_indices(4, 9, "bounce")
    with pytest.raises(InputError, match="no frames"):
        match_length_indices(0, 9)


# ----------------------------------------------------------------------------- writing

def test_writer_round_trip(tmp_path):
    h, w, n, fps = 45, 63, 17, 25.0  # odd sizes are padded to even
    yy, xx = np.mgrid[:h, :w]
    frames = [np.stack([xx * 3 + i, yy * 4, 200 - xx - yy], -1).astype(np.uint8) for i in range(n)]
    t = np.arange(int(16000 * 1.0)) / 16000  # 1.0 s of audio for a 0.68 s video: trimmed
    audio = np.stack([0.4 * np.sin(2 * np.pi * 1000 * t), 0.4 * np.sin(2 * np.pi * 1000 * t)]).astype(np.float32)
    p = tmp_path / "out" / "round.mp4"
    with VideoWriter(p, fps, audio=audio, audio_rate=16000, metadata={"comment": "generated by TalkFormer test"}) as wr:
        for f in frames:
            wr.write(f)
    assert sorted(x.name for x in p.parent.iterdir()) == ["round.mp4"]  # no temp file left
    info = probe_video(p)
    assert (info.num_frames, info.fps, info.width, info.height) == (n, fps, 64, 46)
    assert info.has_audio and info.codec == "h264"
    back = list(iter_frames(p, None))
    assert len(back) == n
    for a, b in zip(frames, back):
        mse = np.mean((a.astype(float) - b[:h, :w].astype(float)) ** 2)
        assert 10 * np.log10(255 ** 2 / mse) > 35
    data, rate = read_audio_track(p)
    assert rate == 16000 and data.shape[0] == 2
    assert abs(data.shape[1] / rate - n / fps) < 0.03  # trimmed to the video
    wav = load_audio(p)
    assert abs(len(wav) / 16000 - n / fps) < 0.03
    import av

    with av.open(str(p)) as c:
        assert c.metadata.get("comment") == "generated by TalkFormer test"


def test_writer_pads_short_audio(tmp_path):
    p = tmp_path / "pad.mp4"
    audio = 0.3 * np.ones(4000, np.float32)  # 0.25 s for a 1 s video
    write_indexed(p, 25, 25, audio=audio)
    wav = load_audio(p)
    assert abs(len(wav) / 16000 - 1.0) < 0.03
    assert np.abs(wav[8000:15000]).max() < 1e-3  # the padding is silence


def test_writer_is_atomic(tmp_path):
    p = tmp_path / "never.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(p, 25, audio=np.zeros(16000, np.float32)) as w:
            for i in range(5):
                w.write(np.zeros((16, 16, 3), np.uint8))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temp file
    with pytest.raises(VideoError, match=r"never\.mp4.*no frames"):
        with VideoWriter(p, 25):
            pass
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="uint8"):
        with VideoWriter(p, 25) as w:
            w.write(np.zeros((16, 16, 3), np.float32))
    with pytest.raises(InputError, match="earlier frames"):
        with VideoWriter(p, 25) as w:
            w.write(np.zeros((16, 16, 3), np.uint8))
            w.write(np.zeros((18, 16, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bad inputs

def test_missing_unknown_and_empty(tmp_path):
    with pytest.raises(VideoError, match=r"nothere\.mp4.*not found"):
        probe_video(tmp_path / "nothere.mp4")
    with pytest.raises(VideoError, match=r"nothere\.mp4.*not found"):
        next(iter_frames(tmp_path / "nothere.mp4"))
    txt = tmp_path / "notes.mp4"
    txt.write_text("not a video\n" * 50)
    with pytest.raises(VideoError, match=r"notes\.mp4.*not a readable video"):
        probe_video(txt)
    with pytest.raises(VideoError, match=r"notes\.mp4"):
        next(iter_frames(txt))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty\.mp4.*empty"):
        probe_video(empty)
    import soundfile as sf

    wav = tmp_path / "speech.wav"
    sf.write(wav, np.zeros(1600, np.float32), 16000)
    with pytest.raises(VideoError, match=r"speech\.wav.*has no video stream"):
        probe_video(wav)
    silent = tmp_path / "silent.mp4"
    write_indexed(silent, 3, 25)
    with pytest.raises(AudioError, match=r"silent\.mp4.*has no audio stream"):
        read_audio_track(silent)


def test_truncated_mp4_index_at_end(tmp_path):
    """Cut before the index (moov at the end, ffmpeg's default): unreadable, said at once."""
    src = tmp_path / "whole.mp4"
    rng = np.random.default_rng(2)
    with VideoWriter(src, 30, faststart=False, audio=np.zeros(32000, np.float32)) as w:
        for _ in range(60):  # noise frames: the media data, not the index, fills the file
            w.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    data = src.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=r"cut\.mp4.*truncated"):
        probe_video(cut)
    with pytest.raises(VideoError, match=r"cut\.mp4"):
        next(iter_frames(cut))
    with pytest.raises(AudioError, match=r"cut\.mp4"):
        load_audio(cut)


def test_truncated_mp4_index_at_front(tmp_path):
    """Cut after a surviving index (faststart): probe checks the tail; a reader stops with an error
    that names the frame reached."""
    rng = np.random.default_rng(1)
    src = tmp_path / "fast.mp4"
    with VideoWriter(src, 30, faststart=True) as w:  # noise frames: the bytes spread over time
        for _ in range(75):
            w.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    assert probe_video(src).num_frames == 75
    data = src.read_bytes()
    cut = tmp_path / "fastcut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=r"fastcut\.mp4.*truncated"):
        probe_video(cut)
    got = []
    with pytest.raises(VideoError, match=r"fastcut\.mp4.*truncated.*output frame (\d+)") as e:
        for f in iter_frames(cut, 25):
            got.append(f)
    assert 0 < len(got) < 62 and f"output frame {len(got)}" in str(e.value)


# ----------------------------------------------------------------------------- real clip

def test_real_clip_30fps_to_25fps():
    clip = MEDIA / "videoretalking_face_4.mp4"
    if not clip.exists():
        pytest.skip(f"{clip} absent")
    info = probe_video(clip)
    assert info.fps == pytest.approx(30.0) and info.num_frames == 199 and info.has_audio
    assert (info.width, info.height) == (700, 700)
    # Per-frame signatures (a coarse thumbnail) instead of holding 199 full frames.
    def sig(f):
        return f[::50, ::50].astype(np.float32)

    src = [sig(f) for f in iter_frames(clip, None)]
    out = [sig(f) for f in iter_frames(clip, 25)]
    assert len(src) == 199
    assert len(out) == info.frames_at(25) == 166 and abs(len(out) - 6.63 * 25) < 1
    idx = resample_indices(len(src), info.fps, 25)
    assert all(np.array_equal(o, src[j]) for o, j in zip(out, idx))

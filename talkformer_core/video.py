"""Video I/O with PyAV: probe, streaming frame reader with fps resampling, h264 + AAC writer,
and the frame-index plans that make a template video as long as an audio track.

Frames are numpy uint8 (H, W, 3) RGB (docs/architecture.md). Nothing here holds a whole video in
memory: ``iter_frames`` decodes one source frame ahead of what it yields.

Time-resampling rule (``iter_frames`` and ``resample_indices`` agree exactly): output frame k
stands for time k / fps after the first source frame and shows the source frame whose timestamp is
nearest to it (ties go to the earlier frame). The output has ceil(duration * fps) frames, duration =
number of source frames / source fps, so 6.63 s at 30 fps gives 166 frames at 25 fps. Nearest (not
"latest at or before") keeps every output frame within half a source frame of its true time, which
is what the per-frame mel windows (audio.window_starts) assume.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import InputError, VideoError

PLAN_MODES = ("pingpong", "loop", "trim")


# ----------------------------------------------------------------------------- probing

@dataclass
class VideoInfo:
    path: str
    fps: float  # source frame rate (average)
    width: int
    height: int
    num_frames: int  # source frames: the container's count, or duration * fps where it has none
    duration: float  # seconds of video
    has_audio: bool
    codec: str

    def frames_at(self, fps: float) -> int:
        """Frames ``iter_frames(path, fps)`` yields for the whole video (the estimate it is)."""
        return int(math.ceil(self.num_frames / self.fps * fps - 1e-9))


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise VideoError(f"{p}: video file not found")
    if not p.is_file():
        raise VideoError(f"{p}: expected a video file, got a directory or special file")
    if p.stat().st_size == 0:
        raise VideoError(f"{p}: the file is empty (0 bytes)")
    return p


def _open(p: Path):
    import av

    try:
        return av.open(str(p))
    except av.FFmpegError as e:
        raise VideoError(
            f"{p}: not a readable video: truncated, corrupt or an unknown format ({e.__class__.__name__}: {e})"
        ) from e


def _video_stream(container, p: Path):
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "no streams"
        raise VideoError(f"{p}: has no video stream (found: {kinds})")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # e.g. an mp4 cut inside its index: the track has no codec
        raise VideoError(f"{p}: corrupt or truncated video: the video stream has no decodable codec")
    return stream


def _stream_fps(stream, p: Path) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or float(rate) <= 0:
        raise VideoError(f"{p}: the video stream has no frame rate")
    return float(rate)


def _stream_duration(stream) -> float | None:
    """Seconds of video the container promises (None where it does not say)."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    return None


def probe_video(path: str | Path) -> VideoInfo:
    """Read the header, decode the first frame and the last second. VideoError for a missing,
    truncated or corrupt file, a file without a video stream, or one that decodes to no frame."""
    import av

    p = _check_file(path)
    container = _open(p)
    with container:
        stream = _video_stream(container, p)
        fps = _stream_fps(stream, p)
        duration = _stream_duration(stream)
        first = None
        try:
            for first in container.decode(stream):
                break
        except av.FFmpegError as e:
            raise VideoError(f"{p}: corrupt or truncated video: the first frame does not decode ({e})") from e
        if first is None:
            raise VideoError(f"{p}: the video stream has zero frames")
        if duration is not None and duration > 1.0:
            _check_tail(container, stream, p, fps, duration)
        n = int(stream.frames or 0)
        if n <= 0:
            if duration is None and container.duration:
                duration = container.duration / 1e6
            n = max(1, int(round((duration or 0.0) * fps)))
        if duration is None:
            duration = n / fps
        return VideoInfo(
            path=str(p), fps=fps, width=int(first.width), height=int(first.height), num_frames=n,
            duration=float(duration), has_audio=bool(container.streams.audio),
            codec=stream.codec_context.name,
        )


def _check_tail(container, stream, p: Path, fps: float, duration: float) -> None:
    """Seek to the last second and decode to the end: a file cut short whose index survived (an
    mp4 written with faststart) fails here, before any long work starts, not at its end."""
    import av

    tb = float(stream.time_base)
    t0 = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    last = None
    try:
        container.seek(int((t0 + duration - 1.0) / tb), stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.time is not None:
                last = frame.time - t0
    except av.FFmpegError as e:
        raise VideoError(f"{p}: corrupt or truncated video: the last second does not decode ({e})") from e
    if last is None or duration - (last + 1.0 / fps) > max(3.0 / fps, 0.1):
        got = "no frame" if last is None else f"the last frame at {last:.2f} s"
        raise VideoError(f"{p}: truncated video: the header says {duration:.2f} s but the file ends early ({got})")


# ----------------------------------------------------------------------------- reading

def iter_frames(path: str | Path, fps: float | None = 25.0, start: int = 0,
                max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Stream frames as uint8 (H, W, 3) RGB, resampled to ``fps`` (None: every source frame).

    ``start`` and ``max_frames`` count output frames, so chunked reading is
    ``iter_frames(p, 25, start=s, max_frames=n)``; a start more than 2 s in seeks to the keyframe
    before it instead of decoding from the beginning.

    Truncated or corrupt files: a decoding error raises VideoError naming the file and the output
    frame index reached. A file whose frames simply stop early (a cut-off mp4 whose index survived)
    yields what decodes and then raises VideoError saying where decoding stopped and how long the
    header says the video is (tolerance: 3 source frames or 0.1 s). It never hangs: PyAV's demuxer
    ends at the end of the file.
    """
    p = _check_file(path)
    if fps is not None and fps <= 0:
        raise InputError(f"fps must be positive, got {fps}")
    if start < 0:
        raise InputError(f"start must be >= 0, got {start}")
    if max_frames is not None and max_frames <= 0:
        return iter(())
    return _iter_frames(p, fps, start, max_frames, allow_seek=True)


def _iter_frames(p: Path, fps: float | None, start: int, max_frames: int | None,
                 allow_seek: bool) -> Iterator[np.ndarray]:
    import av

    limit = math.inf if max_frames is None else start + int(max_frames)
    container = _open(p)
    with container:
        stream = _video_stream(container, p)
        stream.thread_type = "AUTO"  # frame + slice threads; still streaming
        src_fps = _stream_fps(stream, p)
        tb = float(stream.time_base) if stream.time_base is not None else 1.0 / src_fps
        expected = _stream_duration(stream)
        if expected is None and stream.frames:
            expected = stream.frames / src_fps
        t0 = float(stream.start_time * tb) if stream.start_time is not None else None

        # Seek when the wanted start is well into the file: to the keyframe at or before a point
        # two source frames ahead of the first output time, so the nearest-frame rule still sees
        # the first wanted frame's left neighbour.
        t_first = start / (fps or src_fps)
        seeked = False
        if allow_seek and start > 0 and t0 is not None and t_first > 2.0:
            try:
                container.seek(int((t0 + t_first - 2.0 / src_fps) / tb), stream=stream, backward=True)
                seeked = True
            except av.FFmpegError:
                return (yield from _iter_frames(p, fps, start, max_frames, allow_seek=False))

        k = start  # next output index (fps None: next source index to yield)
        n_src = 0
        prev_t: float | None = None
        prev_frame = None
        prev_rgb: np.ndarray | None = None
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else n_src / src_fps
                if t0 is None:
                    t0 = t
                t -= t0
                n_src += 1
                if seeked and prev_t is None and t > t_first - 1.0 / src_fps + 1e-6:
                    break  # landed past the wanted frame's neighbour: read from the start instead
                if fps is None:
                    if seeked:  # the source index of a sought frame comes from its time
                        n_src = int(round(t * src_fps)) + 1
                    if n_src - 1 >= k:
                        yield frame.to_ndarray(format="rgb24")
                        k += 1
                        if k >= limit:
                            return
                    prev_t, prev_frame = t, frame
                    continue
                # Output times strictly before this frame: nearest of (prev, this); ties -> prev.
                cur_rgb = None
                while k < limit and k / fps < t - 1e-9:
                    tk = k / fps
                    # A repeated frame is yielded as a copy, so a caller may draw on what it gets.
                    if prev_t is not None and tk - prev_t <= t - tk + 1e-9:
                        if prev_rgb is None:
                            prev_rgb = prev_frame.to_ndarray(format="rgb24")
                            yield prev_rgb
                        else:
                            yield prev_rgb.copy()
                    else:
                        if cur_rgb is None:
                            cur_rgb = frame.to_ndarray(format="rgb24")
                            yield cur_rgb
                        else:
                            yield cur_rgb.copy()
                    k += 1
                if k >= limit:
                    return
                prev_t, prev_frame, prev_rgb = t, frame, cur_rgb
            else:
                seeked = False  # the loop ran to the end of the stream
        except av.FFmpegError as e:
            raise VideoError(
                f"{p}: corrupt or truncated video: decoding failed at output frame {k} "
                f"({e.__class__.__name__}: {e})"
            ) from e
        if seeked:
            return (yield from _iter_frames(p, fps, start, max_frames, allow_seek=False))
        if prev_t is None:
            raise VideoError(f"{p}: the video stream has zero frames")
        # The last source frame covers [prev_t, prev_t + 1 / src_fps).
        end = prev_t + 1.0 / src_fps
        if fps is not None:
            while k < limit and k / fps < end - 1e-6:
                if prev_rgb is None:
                    prev_rgb = prev_frame.to_ndarray(format="rgb24")
                    yield prev_rgb
                else:
                    yield prev_rgb.copy()
                k += 1
            if k >= limit:
                return
        if expected is not None and expected - end > max(3.0 / src_fps, 0.1):
            raise VideoError(
                f"{p}: truncated video: decoding stopped at output frame {k} ({end:.2f} s) but the "
                f"header says the video lasts {expected:.2f} s"
            )


def read_audio_track(path: str | Path) -> tuple[np.ndarray, int]:
    """The first audio stream at its own rate. -> float32 (C, T), sample rate.

    For the model's 16 kHz mono use ``talkformer_core.audio.load_audio(path)``, which reads the
    same track. AudioError (an InputError) when the file has no audio stream.
    """
    from .audio.io import read_audio

    return read_audio(path)


# ----------------------------------------------------------------------------- writing

class VideoWriter:
    """Write an mp4: h264 (libx264, yuv420p, ``crf``) plus an optional AAC track.

    Usage: ``with VideoWriter(path, fps, audio=wav, audio_rate=16000) as w: w.write(frame)``.
    Frames are uint8 (H, W, 3) RGB, all the same size; odd sizes are padded to even by repeating the
    last row/column (yuv420p needs even sizes). The audio (float32 (T,), (C, T) or (T, C), 1 or 2
    channels) is trimmed or zero-padded to the video's length and interleaved as frames are written.
    The file is written under a temporary name in the same folder and renamed on a successful close,
    so the final path never holds a half-written video; on an exception the temporary file is deleted.
    ``metadata`` goes into the container's tags (mp4: e.g. ``comment``, ``title``).
    ``faststart`` moves the index to the front (playable while downloading).
    ``finalize(tmp_path)``, if given, runs on the finished temporary file before the rename and may
    rewrite it in place (C2PA signing: content_credentials.py); if it raises, nothing is left.
    """

    def __init__(self, path: str | Path, fps: float, audio: np.ndarray | None = None,
                 audio_rate: int = 16000, crf: int = 18, metadata: dict[str, str] | None = None,
                 preset: str = "medium", faststart: bool = True, codec_options: dict[str, str] | None = None,
                 finalize: Callable[[Path], None] | None = None):
        if fps <= 0:
            raise InputError(f"{path}: fps must be positive, got {fps}")
        self.path = Path(path)
        self.fps = float(fps)
        self.rate = Fraction(fps).limit_denominator(1001)
        self.crf = int(crf)
        self.preset = preset
        self.faststart = faststart
        self.codec_options = dict(codec_options or {})
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.finalize = finalize
        self.audio_rate = int(audio_rate)
        self.audio = self._prepare_audio(audio) if audio is not None else None  # (C, T) float32
        self.num_frames = 0
        self._container = None
        self._vstream = None
        self._astream = None
        self._size: tuple[int, int] | None = None  # (H, W) of the input frames
        self._audio_pos = 0  # samples already sent to the encoder
        self._tmp: Path | None = None
        self._closed = False

    def _prepare_audio(self, audio: np.ndarray) -> np.ndarray:
        if hasattr(audio, "detach"):
            audio = audio.detach().cpu().float().numpy()
        a = np.asarray(audio, dtype=np.float32)
        if a.ndim == 1:
            a = a[None]
        elif a.ndim == 2 and a.shape[0] > 2 and a.shape[1] <= 2:
            a = a.T  # (T, C) -> (C, T)
        if a.ndim != 2 or a.shape[0] not in (1, 2):
            raise InputError(f"{self.path}: audio must be mono or stereo (T,), (C, T) or (T, C), got {np.shape(audio)}")
        return np.ascontiguousarray(np.clip(np.nan_to_num(a), -1.0, 1.0))

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self, h: int, w: int) -> None:
        import av

        self.path.parent.mkdir(parents=True, exist_ok=True)
        from .signals import defer_sigint

        with defer_sigint():  # a Ctrl-C between creating the file and noting its name would leak it
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".part" + (self.path.suffix or ".mp4"),
                                       dir=self.path.parent)
            self._tmp = Path(tmp)
            os.close(fd)
        fmt = "mp4" if self.path.suffix.lower() in ("", ".mp4", ".m4v") else None
        options = {"movflags": "+faststart"} if self.faststart and fmt == "mp4" else {}
        self._container = av.open(str(self._tmp), mode="w", format=fmt, options=options)
        self._container.metadata.update(self.metadata)
        vs = self._container.add_stream("libx264", rate=self.rate)
        vs.width, vs.height = w + (w % 2), h + (h % 2)
        vs.pix_fmt = "yuv420p"
        vs.options = {"crf": str(self.crf), "preset": self.preset, **self.codec_options}
        self._vstream = vs
        if self.audio is not None:
            layout = "mono" if self.audio.shape[0] == 1 else "stereo"
            self._astream = self._container.add_stream("aac", rate=self.audio_rate, layout=layout)
        self._size = (h, w)

    def write(self, frame: np.ndarray) -> None:
        """Append one frame, uint8 (H, W, 3) RGB."""
        import av

        if self._closed:
            raise VideoError(f"{self.path}: write() after close()")
        f = np.asarray(frame)
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
            raise InputError(f"{self.path}: frames must be uint8 (H, W, 3) RGB, got {f.dtype} {f.shape}")
        if self._container is None:
            self._open(f.shape[0], f.shape[1])
        elif f.shape[:2] != self._size:
            raise InputError(f"{self.path}: frame {self.num_frames} is {f.shape[:2]}, earlier frames {self._size}")
        h, w = f.shape[:2]
        if h % 2 or w % 2:
            f = np.pad(f, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
        vf.pts = self.num_frames
        vf.time_base = Fraction(1) / self.rate
        for packet in self._vstream.encode(vf):
            self._container.mux(packet)
        self.num_frames += 1
        self._send_audio(self._audio_samples(self.num_frames))

    def _audio_samples(self, n_frames: int) -> int:
        return int(round(n_frames * self.audio_rate / self.fps))

    def _send_audio(self, upto: int) -> None:
        """Encode audio up to sample ``upto`` (zeros past the end of the given track)."""
        import av

        if self._astream is None or upto <= self._audio_pos:
            return
        a = self.audio[:, self._audio_pos:upto]  # (C, n)
        n = upto - self._audio_pos
        if a.shape[1] < n:
            a = np.pad(a, ((0, 0), (0, n - a.shape[1])))
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(a, dtype=np.float32), format="fltp",
                                        layout="mono" if a.shape[0] == 1 else "stereo")
        af.sample_rate = self.audio_rate
        af.pts = self._audio_pos
        af.time_base = Fraction(1, self.audio_rate)
        for packet in self._astream.encode(af):
            self._container.mux(packet)
        self._audio_pos = upto

    def close(self) -> None:
        """Flush the encoders, finish the file and move it to its final path."""
        if self._closed:
            return
        if self._container is None:
            self._closed = True
            raise VideoError(f"{self.path}: no frames were written; no video created")
        try:
            for packet in self._vstream.encode(None):
                self._container.mux(packet)
            if self._astream is not None:
                for packet in self._astream.encode(None):
                    self._container.mux(packet)
            self._container.close()
            self._container = None
            if self.finalize is not None:
                self.finalize(self._tmp)
            from .signals import defer_sigint

            with defer_sigint():  # the rename and forgetting the temporary name go together
                _chmod_like_new_file(self._tmp)  # mkstemp makes 0600; a finished video is a normal file
                os.replace(self._tmp, self.path)
                self._tmp = None
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Drop the partial file (called on an exception inside ``with``). A second Ctrl-C while
        it runs waits for the file to be gone."""
        from .signals import defer_sigint

        with defer_sigint():
            self._closed = True
            try:
                if self._container is not None:
                    try:
                        self._container.close()
                    except Exception:
                        pass
                    self._container = None
            finally:
                if self._tmp is not None:
                    try:
                        self._tmp.unlink()
                    except FileNotFoundError:
                        pass
                    self._tmp = None


def remux(src: str | Path, dst: str | Path, metadata: dict[str, str] | None = None,
          finalize: Callable[[Path], None] | None = None) -> Path:
    """Copy ``src``'s video and audio streams into a new mp4 ``dst`` (no re-encode) with its
    container tags updated by ``metadata`` (the others kept). Atomic like VideoWriter: written
    under a temporary name (``finalize(tmp)`` may rewrite it, e.g. C2PA signing) and renamed; on
    any error nothing is left at ``dst``. VideoError for an unreadable ``src``."""
    import av

    p = _check_file(src)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.stem}.", suffix=".part" + (dst.suffix or ".mp4"), dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with _open(p) as inp:
            _video_stream(inp, p)
            fmt = "mp4" if dst.suffix.lower() in ("", ".mp4", ".m4v") else None
            with av.open(str(tmp), mode="w", format=fmt, options={"movflags": "+faststart"}) as out:
                for k, v in inp.metadata.items():
                    if k not in ("major_brand", "minor_version", "compatible_brands", "encoder"):
                        out.metadata[k] = v
                out.metadata.update({str(k): str(v) for k, v in (metadata or {}).items()})
                streams = {s: out.add_stream_from_template(template=s) for s in inp.streams
                           if s.type in ("video", "audio")}
                try:
                    for packet in inp.demux(*streams):
                        if packet.dts is None:
                            continue  # the demuxer's flush packets
                        packet.stream = streams[packet.stream]
                        out.mux(packet)
                except av.FFmpegError as e:
                    raise VideoError(f"{p}: corrupt or truncated video: copying its streams failed "
                                     f"({e.__class__.__name__}: {e})") from e
        if finalize is not None:
            finalize(tmp)
        _chmod_like_new_file(tmp)
        os.replace(tmp, dst)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return dst


# ----------------------------------------------------------------------------- index plans

def output_length(n_video: int, n_audio: int, mode: str = "pingpong") -> int:
    """Frames of the output for a template of ``n_video`` frames and audio of ``n_audio`` video
    frames: the audio's length for pingpong and loop (the video is repeated or cut to it); for trim
    the shorter of the two (a longer video is cut to the audio, a longer audio to the video)."""
    if mode not in PLAN_MODES:
        raise InputError(f"length mode must be one of {PLAN_MODES}, got {mode!r}")
    return min(n_video, n_audio) if mode == "trim" else n_audio


def match_length_indices(num_frames: int, target_len: int, mode: str = "pingpong") -> np.ndarray:
    """Template frame index for each output frame. -> int64 (output_length(num_frames, target_len, mode),)

    pingpong: 0, 1, ..., n-1, n-2, ..., 1, 0, 1, ... (period 2n - 2; consecutive indices differ by
    at most 1, so the head never jumps; IP-LAP ``inference_single.py:429-431`` does the same);
    loop: 0..n-1, 0..n-1, ...; trim: 0..min(n, target_len)-1 (the caller trims the audio to that).
    """
    if num_frames <= 0:
        raise InputError(f"the template video has no frames (num_frames={num_frames})")
    if target_len < 0:
        raise InputError(f"target length must be >= 0, got {target_len}")
    length = output_length(num_frames, target_len, mode)
    k = np.arange(length, dtype=np.int64)
    if mode == "trim":
        return k
    if mode == "loop" or num_frames == 1:
        return k % num_frames
    period = 2 * num_frames - 2
    r = k % period
    return np.where(r < num_frames, r, period - r)


def resample_indices(num_src: int, src_fps: float, dst_fps: float) -> np.ndarray:
    """Source index of each frame of an in-memory sequence resampled from src_fps to dst_fps, by
    the rule of ``iter_frames`` (nearest source frame, ties to the earlier one).
    -> int64 (ceil(num_src * dst_fps / src_fps),)"""
    if src_fps <= 0 or dst_fps <= 0:
        raise InputError(f"fps must be positive, got src_fps={src_fps}, dst_fps={dst_fps}")
    if num_src <= 0:
        return np.zeros(0, dtype=np.int64)
    n_out = int(math.ceil(num_src * dst_fps / src_fps - 1e-6 * dst_fps))
    x = np.arange(n_out, dtype=np.float64) * (src_fps / dst_fps)  # output time in source frames
    idx = np.ceil(x - 0.5 - 1e-9).astype(np.int64)  # nearest, ties to the earlier frame
    return np.clip(idx, 0, num_src - 1)


def _chmod_like_new_file(path) -> None:
    """Give a finished temp file the permissions a plain open() would (0666 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)

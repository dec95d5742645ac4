"""Audio loading: any file soundfile or PyAV reads -> 16 kHz mono float32.

IP-LAP loads with ``librosa.core.load(path, sr=16000)`` (mono, kaiser_best resampler, in
its ``models/audio.py``). We read with soundfile (wav/flac/ogg/...) or
PyAV (mp3, m4a/aac, the audio track of mp4/mkv/webm, anything ffmpeg decodes), average the
channels and resample with soxr's very-high-quality polyphase resampler (scipy's
``resample_poly`` where soxr is missing). The two resamplers differ from kaiser_best by well under
the mel's 1e-3 resolution on speech.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AudioError

SAMPLE_RATE = 16000  # Hz, the model's audio rate (IP-LAP's)

# Formats libsndfile reads natively; anything else (and anything soundfile refuses) goes to PyAV.
_SOUNDFILE_SUFFIXES = {".wav", ".wave", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".aifc", ".au", ".w64", ".caf"}


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: audio file not found")
    if not p.is_file():
        raise AudioError(f"{p}: expected an audio or video file, got a directory or special file")
    if p.stat().st_size == 0:
        raise AudioError(f"{p}: the file is empty (0 bytes)")
    return p


def _to_float32(x: np.ndarray) -> np.ndarray:
    """Integer PCM -> float32 in [-1, 1); floats pass through as float32."""
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32, copy=False)
    if x.dtype == np.uint8:  # 8-bit PCM is unsigned
        return ((x.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if np.issubdtype(x.dtype, np.integer):
        return (x.astype(np.float64) / float(2 ** (8 * x.dtype.itemsize - 1))).astype(np.float32)
    if x.dtype == np.bool_:
        return x.astype(np.float32)
    raise AudioError(f"waveform: expected a numeric array, got dtype {x.dtype}")


def resample(x: np.ndarray, sr_in: float, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling along the last axis. (..., T) -> (..., T * sr_out / sr_in)."""
    if sr_in <= 0:
        raise AudioError(f"waveform: sample rate must be positive, got {sr_in}")
    if float(sr_in) == float(sr_out) or x.shape[-1] == 0:
        return x.astype(np.float32, copy=False)
    try:
        import soxr

        if x.ndim == 1:
            y = soxr.resample(x.astype(np.float32, copy=False), float(sr_in), float(sr_out), quality="VHQ")
        else:  # soxr wants (T, C)
            flat = x.reshape(-1, x.shape[-1]).T
            y = soxr.resample(np.ascontiguousarray(flat, dtype=np.float32), float(sr_in), float(sr_out), quality="VHQ")
            y = y.T.reshape(*x.shape[:-1], -1)
    except ImportError:  # pragma: no cover - soxr is in requirements.txt
        from scipy.signal import resample_poly

        frac = Fraction(float(sr_out) / float(sr_in)).limit_denominator(1000)
        y = resample_poly(x.astype(np.float64), frac.numerator, frac.denominator, axis=-1)
    return np.asarray(y, dtype=np.float32)


def to_16k_mono(waveform: Any, sample_rate: float) -> np.ndarray:
    """In-memory waveform -> float32 (n,) at 16 kHz, channels averaged.

    Accepts a numpy array or torch tensor shaped (T,), (C, T) (torchaudio/ComfyUI order) or
    ComfyUI's AUDIO waveform (B, C, T), of which batch item 0 is taken. A 2-D array that is plainly
    (T, C) (soundfile's order: more than 64 rows and at most 8 columns) is transposed. Integer PCM is
    scaled to [-1, 1).
    """
    if hasattr(waveform, "detach"):  # torch tensor, without importing torch here
        waveform = waveform.detach().cpu().float().numpy()
    x = _to_float32(np.asarray(waveform))
    if x.ndim == 3:  # (B, C, T)
        if x.shape[0] == 0:
            raise AudioError("waveform: empty batch (B = 0)")
        x = x[0]
    if x.ndim == 2:
        if x.shape[0] > 64 and x.shape[1] <= 8:  # (T, C)
            x = x.T
        if x.shape[0] == 0:
            raise AudioError("waveform: no channels (C = 0)")
        x = x.mean(axis=0)  # (C, T) -> (T,)
    if x.ndim != 1:
        raise AudioError(f"waveform: expected shape (T,), (C, T) or (B, C, T), got {tuple(np.shape(waveform))}")
    if x.size == 0:
        raise AudioError("waveform: zero-length audio (no samples)")
    if not np.all(np.isfinite(x)):
        raise AudioError("waveform: contains NaN or infinite samples")
    return np.ascontiguousarray(resample(x, sample_rate, SAMPLE_RATE), dtype=np.float32)


# Name used in docs/architecture.md's module map.
waveform_to_16k_mono = to_16k_mono


def _read_soundfile(p: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, sr = sf.read(str(p), dtype="float32", always_2d=True)  # (T, C)
    return np.ascontiguousarray(data.T), int(sr)  # (C, T)


def _read_av(p: Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with PyAV at its own rate. -> float32 (C, T), rate."""
    import av

    try:
        container = av.open(str(p))
    except av.FFmpegError as e:
        raise AudioError(f"{p}: not a readable audio or video file ({e.__class__.__name__}: {e})") from e
    with container:
        if not container.streams.audio:
            if any(s.codec_context is None for s in container.streams):
                raise AudioError(f"{p}: corrupt or truncated file: its streams have no decodable codec")
            kinds = ", ".join(s.type for s in container.streams) or "no streams"
            raise AudioError(f"{p}: has no audio stream (found: {kinds})")
        stream = container.streams.audio[0]
        # fltp keeps the stream's own rate and layout; to_ndarray then gives (C, n) per frame.
        resampler = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        rate = stream.rate or stream.codec_context.sample_rate
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                    rate = out.sample_rate
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
        except av.FFmpegError as e:
            got = sum(c.shape[1] for c in chunks)
            raise AudioError(
                f"{p}: corrupt or truncated audio: decoding failed after {got} samples "
                f"({e.__class__.__name__}: {e})"
            ) from e
        expected = None
        if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
            expected = int(round(float(stream.duration * stream.time_base) * rate))
        exact_index = any(n in container.format.name.split(",") for n in ("mp4", "mov", "matroska"))
    if not chunks:
        raise AudioError(f"{p}: zero-length audio (the audio stream decodes to no samples)")
    data = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)  # (C, T)
    if expected is not None and exact_index:
        # AAC decodes to whole 1024-sample frames: drop the encoder's tail padding the header excludes.
        if 0 < data.shape[1] - expected <= 4096:
            data = data[:, :expected]
        # mp4/mkv indexes are exact, so much less audio than they promise means a cut-off file.
        elif expected - data.shape[1] > max(0.1 * rate, 4096):
            raise AudioError(
                f"{p}: truncated audio: decoded {data.shape[1] / rate:.2f} s of the "
                f"{expected / rate:.2f} s the header promises"
            )
    return data, int(rate)


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a file's audio at its own rate and channel count. -> float32 (C, T), sample rate.

    soundfile first for the formats libsndfile reads (wav, flac, ogg, aiff, ...), PyAV for
    everything else or when soundfile refuses the file (e.g. a .wav holding a codec libsndfile
    lacks). Raises AudioError naming the file: missing, unreadable or unknown format, a container
    with no audio stream, zero-length audio.
    """
    p = _check_file(path)
    data: np.ndarray | None = None
    sf_error: Exception | None = None
    if p.suffix.lower() in _SOUNDFILE_SUFFIXES:
        try:
            data, sr = _read_soundfile(p)
        except Exception as e:  # soundfile.LibsndfileError, RuntimeError, ...: fall back to PyAV
            sf_error = e
    if data is None:
        try:
            data, sr = _read_av(p)
        except AudioError as e:
            if sf_error is not None and "not a readable" in str(e):
                raise AudioError(
                    f"{p}: not a readable audio file: soundfile says {sf_error}; PyAV cannot open it either"
                ) from e
            raise
    if data.shape[1] == 0 or data.shape[0] == 0:
        raise AudioError(f"{p}: zero-length audio (no samples)")
    return data, sr


def load_audio(path: str | Path) -> np.ndarray:
    """Any audio file, or the audio track of a video -> float32 (n,) at 16 kHz mono."""
    data, sr = read_audio(path)  # (C, T)
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    return to_16k_mono(data, sr)

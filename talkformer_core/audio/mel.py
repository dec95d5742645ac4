"""Mel spectrogram and per-video-frame mel windows, exactly as IP-LAP's ``models/audio.py``.

Parameters (IP-LAP ``models/audio.py:36-38, 57-66, 106-109, 137, 188-216``):
pre-emphasis [1, -0.97] -> STFT (n_fft 800, hop 200, win 800, periodic Hann, center=True with zero
padding: librosa 0.9.2's defaults) -> magnitude -> Slaney mel basis (80 mels, 55..7600 Hz, Slaney
area norm) -> 20 * log10(max(1e-5, x)) - 20 -> clip(8 * (S + 100) / 100 - 4, -4, 4).
Written with numpy/scipy only (no librosa at run time); the test checks it against librosa.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.signal import get_window, lfilter

from .io import SAMPLE_RATE, to_16k_mono

N_FFT = 800
HOP = 200  # 12.5 ms at 16 kHz -> 80 mel frames per second
WIN = 800
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
REF_LEVEL_DB = 20.0
MIN_LEVEL_DB = -100.0
MAX_ABS_VALUE = 4.0
MEL_FPS = SAMPLE_RATE // HOP  # 80
MEL_WINDOW = 16  # mel frames per video frame window (200 ms)
SILENCE = -MAX_ABS_VALUE  # value of silence (and of padding) on the +-4 scale
# IP-LAP's window for frame i starts 2 video frames (at 25 fps) earlier: 2 * 80 / 25 = 6.4 mel frames.
WINDOW_OFFSET = 6.4


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale (librosa ``htk=False``): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=4)
def mel_basis(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
              fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """Triangular Slaney-normalised mel filters, as librosa.filters.mel. -> (n_mels, n_fft//2+1)."""
    fftfreqs = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)  # (F,)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))  # (n_mels+2,)
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]  # (n_mels+2, F)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))  # (n_mels, F)
    enorm = 2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels])  # Slaney: constant area per filter
    weights *= enorm[:, None]
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=2)
def _hann(win: int) -> np.ndarray:
    w = get_window("hann", win, fftbins=True)  # periodic Hann, librosa's default
    w.setflags(write=False)
    return w


def stft_magnitude(y: np.ndarray) -> np.ndarray:
    """|STFT| with center=True zero padding. (n,) -> (n_fft//2+1, 1 + n // hop)."""
    y = np.asarray(y, dtype=np.float64)
    pad = N_FFT // 2
    y = np.pad(y, (pad, pad), mode="constant")  # librosa >= 0.9 default pad_mode="constant"
    n_frames = 1 + (len(y) - N_FFT) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(y, N_FFT)[::HOP][:n_frames]  # (M, n_fft)
    spec = np.fft.rfft(frames * _hann(WIN), axis=-1)  # (M, F)
    return np.abs(spec).T  # (F, M)


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """16 kHz mono waveform (n,) -> normalised log-mel (80, 1 + n // 200) float32 in [-4, 4]."""
    wav = np.asarray(wav, dtype=np.float64).reshape(-1)
    emphasized = lfilter([1.0, -PREEMPHASIS], [1.0], wav)  # IP-LAP audio.py:57-58
    mag = stft_magnitude(emphasized)  # (401, M)
    mel = mel_basis() @ mag  # (80, M)
    s = 20.0 * np.log10(np.maximum(1e-5, mel)) - REF_LEVEL_DB  # amp_to_db - ref_level_db
    s = 2 * MAX_ABS_VALUE * (s - MIN_LEVEL_DB) / (-MIN_LEVEL_DB) - MAX_ABS_VALUE  # symmetric
    return np.clip(s, -MAX_ABS_VALUE, MAX_ABS_VALUE).astype(np.float32)


def window_starts(num_frames: int, fps: float = 25.0) -> np.ndarray:
    """First mel frame of each video frame's 16-mel window. -> int64 (num_frames,).

    start_i = floor(80 * i / fps - 6.4). At 25 fps this is IP-LAP's floor(16 * (i - 2) / 5)
    exactly; for any other fps the window keeps the same place in time: it starts 80 ms (6.4 mel
    frames) before the video frame's time i / fps, so its centre sits ~14 ms after it.
    """
    i = np.arange(num_frames, dtype=np.float64)
    # The 1e-9 guards the floor against float noise such as 80 * 7 / 25 - 6.4 = 15.999999...
    return np.floor(MEL_FPS * i / float(fps) - WINDOW_OFFSET + 1e-9).astype(np.int64)


def mel_windows(mel: np.ndarray, num_frames: int, fps: float = 25.0) -> np.ndarray:
    """Per-video-frame windows. mel (80, M) -> (num_frames, 80, 16) float32.

    Mel frames before the start or past the end read as SILENCE (-4), so every video frame has a
    window (IP-LAP clamps the first two frames to the first window instead; only those two differ).
    """
    mel = np.asarray(mel, dtype=np.float32)
    if mel.ndim != 2:
        raise ValueError(f"mel: expected (80, M), got shape {mel.shape}")
    if num_frames <= 0:
        return np.zeros((0, mel.shape[0], MEL_WINDOW), dtype=np.float32)
    starts = window_starts(num_frames, fps)  # (T,)
    left = max(0, -int(starts.min()))
    right = max(0, int(starts.max()) + MEL_WINDOW - mel.shape[1])
    padded = np.pad(mel, ((0, 0), (left, right)), constant_values=SILENCE)  # (80, left+M+right)
    idx = (starts + left)[:, None] + np.arange(MEL_WINDOW)[None, :]  # (T, 16)
    return np.ascontiguousarray(padded[:, idx].transpose(1, 0, 2))  # (80, T, 16) -> (T, 80, 16)


def num_video_frames(num_samples: int, fps: float = 25.0, sample_rate: int = SAMPLE_RATE) -> int:
    """Video frames covering the audio: ceil(duration * fps) (a last partial frame counts)."""
    return int(math.ceil(num_samples * float(fps) / sample_rate - 1e-9))


def audio_windows(wav16k: np.ndarray, num_frames: int | None = None, fps: float = 25.0,
                  sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
    """Waveform -> (mel (80, M), windows (T, 80, 16)). T defaults to ceil(duration * fps).

    ``sample_rate`` other than 16 kHz (or a multi-channel array) goes through to_16k_mono first.
    """
    if sample_rate != SAMPLE_RATE or hasattr(wav16k, "detach") or np.ndim(wav16k) != 1:
        wav = to_16k_mono(wav16k, sample_rate)
    else:
        wav = np.asarray(wav16k, dtype=np.float32)
    mel = melspectrogram(wav)
    if num_frames is None:
        num_frames = num_video_frames(len(wav), fps)
    return mel, mel_windows(mel, num_frames, fps)

"""Audio front end: any audio file -> 16 kHz mono -> IP-LAP's mel -> per-video-frame windows.

Shapes (docs/architecture.md): waveform float32 (n,) at 16 kHz; mel (80, M) with M = 1 + n // 200
(80 frames per second); windows (T, 80, 16), one per video frame.
"""
from .io import (
    SAMPLE_RATE,
    load_audio,
    read_audio,
    resample,
    to_16k_mono,
    waveform_to_16k_mono,
)
from .mel import (
    MEL_FPS,
    MEL_WINDOW,
    N_MELS,
    SILENCE,
    audio_windows,
    mel_basis,
    mel_windows,
    melspectrogram,
    num_video_frames,
    window_starts,
)

__all__ = [
    "SAMPLE_RATE", "MEL_FPS", "MEL_WINDOW", "N_MELS", "SILENCE",
    "load_audio", "read_audio", "resample", "to_16k_mono", "waveform_to_16k_mono",
    "melspectrogram", "mel_basis", "mel_windows", "window_starts", "audio_windows", "num_video_frames",
]

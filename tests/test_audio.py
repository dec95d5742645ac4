"""Audio front end: loading any file/rate/channel count, IP-LAP's mel, the windows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from talkformer_core.audio import (
    MEL_FPS,
    SAMPLE_RATE,
    SILENCE,
    audio_windows,
    load_audio,
    mel_basis,
    mel_windows,
    melspectrogram,
    num_video_frames,
    read_audio,
    to_16k_mono,
    window_starts,
)
from talkformer_core.errors import AudioError, InputError

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"


def sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def spectrum_peaks(wav: np.ndarray, sr: int = SAMPLE_RATE, k: int = 1) -> list[float]:
    """Frequencies (Hz) of the k strongest spectral peaks, far enough apart to be distinct."""
    w = wav[len(wav) // 10: -len(wav) // 10]  # skip codec/resampler edges
    spec = np.abs(np.fft.rfft(w * np.hanning(len(w))))
    freqs = np.fft.rfftfreq(len(w), 1 / sr)
    peaks: list[float] = []
    for _ in range(k):
        i = int(np.argmax(spec))
        peaks.append(float(freqs[i]))
        spec[max(0, i - 50): i + 50] = 0
    return sorted(peaks)


def amplitude_at(wav: np.ndarray, freq: float, sr: int = SAMPLE_RATE) -> float:
    t = np.arange(len(wav)) / sr
    c = np.exp(-2j * np.pi * freq * t)
    return float(2 * np.abs(np.mean(wav * c)))


def write_av_audio(path: Path, x: np.ndarray, sr: int, codec: str) -> None:
    """x: float32 (C, T) -> an audio-only file encoded by PyAV (mp3, m4a, ...)."""
    import av

    layout = "mono" if x.shape[0] == 1 else "stereo"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=sr, layout=layout)
        f = av.AudioFrame.from_ndarray(np.ascontiguousarray(x, np.float32), format="fltp", layout=layout)
        f.sample_rate = sr
        f.pts = 0
        for pk in s.encode(f):
            c.mux(pk)
        for pk in s.encode(None):
            c.mux(pk)


# ----------------------------------------------------------------------------- mel

def librosa_mel(wav: np.ndarray) -> np.ndarray:
    """The same formula through librosa (independent STFT and filter bank)."""
    librosa = pytest.importorskip("librosa")
    from scipy.signal import lfilter

    y = lfilter([1, -0.97], [1], wav.astype(np.float64))
    d = np.abs(librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800, window="hann",
                            center=True, pad_mode="constant"))
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    s = 20 * np.log10(np.maximum(1e-5, basis @ d)) - 20
    return np.clip(8 * (s + 100) / 100 - 4, -4, 4)


@pytest.mark.parametrize("n", [16000 * 2 + 137, 4000, 801])
def test_mel_matches_librosa(n):
    rng = np.random.default_rng(n)
    wav = 0.2 * rng.standard_normal(n).astype(np.float32) + sine(440, SAMPLE_RATE, n / SAMPLE_RATE, 0.3)
    wav *= np.linspace(0, 1, n, dtype=np.float32)  # a range of levels, some below the -100 dB floor
    ours = melspectrogram(wav)
    ref = librosa_mel(wav)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (80, 1 + n // 200)
    assert np.abs(ours - ref).max() < 1e-3
    assert ours.min() >= -4 and ours.max() <= 4
    assert ours.std() > 0.5  # a real spectrogram, not a constant


def test_mel_basis_matches_librosa():
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    assert mel_basis().shape == (80, 401)
    assert np.abs(mel_basis() - ref).max() < 1e-7


def test_mel_rate_and_silence():
    for seconds in (1, 3, 10):
        assert melspectrogram(np.zeros(SAMPLE_RATE * seconds, np.float32)).shape == (80, MEL_FPS * seconds + 1)
    assert np.all(melspectrogram(np.zeros(8000, np.float32)) == SILENCE)
    # A 1 kHz tone lights the mel bin that holds 1 kHz and leaves far bins low.
    m = melspectrogram(sine(1000, SAMPLE_RATE, 1.0))
    hot = int(np.argmax(m[:, 40]))
    librosa = pytest.importorskip("librosa")
    centres = librosa.mel_frequencies(n_mels=82, fmin=55, fmax=7600)[1:-1]
    assert abs(centres[hot] - 1000) < 120
    assert m[hot, 40] - m[75, 40] > 2


# ----------------------------------------------------------------------------- windows

def test_window_starts_are_iplap_at_25fps():
    i = np.arange(2000)
    assert np.array_equal(window_starts(2000, 25.0), (16 * (i - 2)) // 5)  # floor, also below 0


@pytest.mark.parametrize("fps", [25.0, 30.0, 29.97, 50.0, 24.0])
def test_windows_keep_their_place_in_time(fps):
    n = 500
    starts = window_starts(n, fps)
    centre = (starts + 7.5) / MEL_FPS  # mel frame j sits at j / 80 s (center=True)
    offset = centre - np.arange(n) / fps
    # Same place as IP-LAP's at 25 fps (frame 0: start -6.4 -> -7): within one mel frame.
    assert np.all(offset <= (-6.4 + 7.5) / 80 + 1e-9) and np.all(offset > (-6.4 + 7.5) / 80 - 1 / 80)


def test_mel_windows_padding_both_ends():
    m_len = 50
    mel = np.tile(np.arange(m_len, dtype=np.float32) / 100, (80, 1))  # (80, 50), column j = j / 100
    mel[:, 0] = 3.0  # distinct from the pad value
    t = 17  # 17 frames at 25 fps reach past the end: last start = floor(16 * 14 / 5) = 44
    w = mel_windows(mel, t)
    assert w.shape == (t, 80, 16) and w.dtype == np.float32
    # Frame 0 starts at -7: seven pad columns, then mel[:, 0:9].
    assert np.all(w[0, :, :7] == SILENCE)
    assert np.array_equal(w[0, :, 7:], mel[:, :9])
    # Frame 1 starts at floor(-3.2) = -4.
    assert np.all(w[1, :, :4] == SILENCE) and np.array_equal(w[1, :, 4:], mel[:, :12])
    # Frame 2 is the first full window, IP-LAP's chunk 0.
    assert np.array_equal(w[2], mel[:, 0:16])
    # The last frame starts at 44: six real columns then silence.
    assert np.array_equal(w[-1, :, :6], mel[:, 44:50]) and np.all(w[-1, :, 6:] == SILENCE)
    # Every window is the padded mel at its start.
    padded = np.pad(mel, ((0, 0), (100, 100)), constant_values=SILENCE)
    for i, s in enumerate(window_starts(t)):
        assert np.array_equal(w[i], padded[:, 100 + s: 100 + s + 16])


def test_audio_windows_frame_count():
    assert num_video_frames(16000, 25) == 25
    assert num_video_frames(16001, 25) == 26
    assert num_video_frames(16000 * 6, 30) == 180
    mel, win = audio_windows(sine(300, SAMPLE_RATE, 1.3))
    assert mel.shape == (80, 1 + int(1.3 * 16000) // 200)
    assert win.shape == (33, 80, 16)  # ceil(1.3 * 25)
    _, win = audio_windows(sine(300, SAMPLE_RATE, 1.3), num_frames=10, fps=30)
    assert win.shape == (10, 80, 16)
    # A 44.1 kHz stereo array goes through to_16k_mono first.
    x = np.stack([sine(300, 44100, 1.0), sine(300, 44100, 1.0)])
    mel2, _ = audio_windows(x, sample_rate=44100)
    assert mel2.shape == (80, 81)


# ----------------------------------------------------------------------------- in-memory

def test_to_16k_mono_shapes_and_types():
    torch = pytest.importorskip("torch")
    x = sine(1000, 48000, 0.5)
    a = to_16k_mono(x, 48000)
    assert a.dtype == np.float32 and a.shape == (8000,)
    assert spectrum_peaks(a) == pytest.approx([1000], abs=3)
    assert np.allclose(to_16k_mono(x[None], 48000), a)  # (C, T)
    # ComfyUI AUDIO waveform (B, C, T) as a torch tensor: batch item 0, channels averaged.
    b = torch.zeros(2, 2, x.size)
    b[0, 0] = torch.from_numpy(x)
    b[0, 1] = torch.from_numpy(x)
    b[1] = 0.9  # a different batch item must not leak in
    assert np.allclose(to_16k_mono(b, 48000), a, atol=1e-6)
    # (T, C) from soundfile is recognised; int16 PCM is scaled to [-1, 1).
    assert np.allclose(to_16k_mono(np.stack([x, x], 1), 48000), a, atol=1e-6)
    pcm = (x * 32767).astype(np.int16)
    assert np.abs(to_16k_mono(pcm, 48000) - a).max() < 1e-3
    assert np.array_equal(to_16k_mono(a, 16000), a)  # 16 kHz mono passes through unchanged


def test_to_16k_mono_rejects_bad_input():
    with pytest.raises(AudioError, match="zero-length"):
        to_16k_mono(np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="shape"):
        to_16k_mono(np.zeros((1, 1, 1, 10), np.float32), 16000)
    with pytest.raises(AudioError, match="NaN"):
        to_16k_mono(np.array([0.0, np.nan, 0.0], np.float32), 16000)


# ----------------------------------------------------------------------------- files

@pytest.mark.parametrize("sr,channels", [(8000, 1), (8000, 2), (44100, 1), (44100, 2), (48000, 1), (48000, 2)])
def test_load_wav_any_rate_and_channels(tmp_path, sr, channels):
    seconds = 1.5
    left = sine(1000, sr, seconds, 0.5)
    x = np.stack([left, sine(2500, sr, seconds, 0.5)]) if channels == 2 else left[None]  # (C, T)
    path = tmp_path / f"tone_{sr}_{channels}.wav"
    sf.write(path, x.T, sr, subtype="PCM_16")
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - seconds * SAMPLE_RATE) <= 1
    if channels == 1:
        assert spectrum_peaks(wav) == pytest.approx([1000], abs=3)
        assert amplitude_at(wav, 1000) == pytest.approx(0.5, abs=0.01)
    else:  # channels averaged: both tones at half amplitude
        assert spectrum_peaks(wav, k=2) == pytest.approx([1000, 2500], abs=3)
        assert amplitude_at(wav, 1000) == pytest.approx(0.25, abs=0.01)
        assert amplitude_at(wav, 2500) == pytest.approx(0.25, abs=0.01)
    assert np.abs(wav).max() < 0.6


@pytest.mark.parametrize("fmt", ["flac", "ogg", "mp3", "m4a", "mp4"])
def test_load_compressed_formats(tmp_path, fmt):
    sr, seconds = 44100, 1.2
    x = np.stack([sine(1000, sr, seconds), sine(1000, sr, seconds)])  # (2, T)
    path = tmp_path / f"tone.{fmt}"
    if fmt in ("flac", "ogg"):
        sf.write(path, x.T, sr)
    elif fmt == "mp3":
        write_av_audio(path, x, sr, "libmp3lame")
    elif fmt == "m4a":
        write_av_audio(path, x, sr, "aac")
    else:  # the audio track of an mp4 with video
        from talkformer_core.video import VideoWriter

        with VideoWriter(path, 25, audio=x, audio_rate=sr) as w:
            for _ in range(30):  # 1.2 s of video: the audio keeps its length
                w.write(np.full((32, 32, 3), 128, np.uint8))
    wav = load_audio(path)
    assert abs(len(wav) / SAMPLE_RATE - seconds) < 0.1, len(wav)
    assert spectrum_peaks(wav) == pytest.approx([1000], abs=3)
    assert amplitude_at(wav, 1000) == pytest.approx(0.5, abs=0.05)
    data, rate = read_audio(path)
    assert rate == sr and data.shape[0] == 2 and data.dtype == np.float32


def test_load_audio_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.wav"
    with pytest.raises(AudioError, match=r"missing\.wav.*not found"):
        load_audio(missing)
    for name in ("text.wav", "text.mp4", "text.mp3"):
        p = tmp_path / name
        p.write_text("this is not audio\n" * 20)
        with pytest.raises(AudioError, match=rf"{name}.*not a readable"):
            load_audio(p)
    empty_file = tmp_path / "empty.m4a"
    empty_file.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.m4a.*empty"):
        load_audio(empty_file)
    zero = tmp_path / "zero.wav"
    sf.write(zero, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match=r"zero\.wav.*zero-length"):
        load_audio(zero)
    assert issubclass(AudioError, InputError)


def test_video_without_audio_stream(tmp_path):
    from talkformer_core.video import VideoWriter

    p = tmp_path / "silent_video.mp4"
    with VideoWriter(p, 25) as w:
        for _ in range(5):
            w.write(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(AudioError, match=r"silent_video\.mp4.*has no audio stream"):
        load_audio(p)


def test_truncated_audio_is_an_error(tmp_path):
    src = tmp_path / "long.m4a"
    write_av_audio(src, sine(440, 16000, 3.0)[None], 16000, "aac")
    assert abs(len(load_audio(src)) - 48000) < 1100
    cut = tmp_path / "cut.m4a"
    data = src.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(AudioError, match=r"cut\.m4a"):
        load_audio(cut)


def test_real_clip_audio_track():
    clip = MEDIA / "videoretalking_face_4.mp4"
    if not clip.exists():
        pytest.skip(f"{clip} absent")
    wav = load_audio(clip)  # AAC 44.1 kHz stereo -> 16 kHz mono
    assert wav.dtype == np.float32 and abs(len(wav) / SAMPLE_RATE - 6.6) < 0.15
    assert 0.01 < np.sqrt(np.mean(wav ** 2)) < 0.5  # speech, not silence or clipping
    mel, win = audio_windows(wav, fps=25)
    assert win.shape == (num_video_frames(len(wav), 25), 80, 16)
    assert mel.max() > 0 and mel.min() > -4.001

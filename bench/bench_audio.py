"""Audio front-end timings on this machine: mel of 10 s of audio, windows, file loading.

Run: python bench/bench_audio.py  (prints a table; nothing is downloaded or written outside a temp dir)
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from talkformer_core.audio import audio_windows, load_audio, mel_windows, melspectrogram  # noqa: E402


def timeit(fn, repeats: int = 20) -> float:
    fn()  # warm-up (mel basis cache, imports)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    import soundfile as sf

    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(16000 * 10)).astype(np.float32)  # 10 s at 16 kHz
    mel = melspectrogram(wav)
    rows = [
        ("melspectrogram, 10 s @ 16 kHz", timeit(lambda: melspectrogram(wav)), f"{mel.shape}"),
        ("mel_windows, 250 frames @ 25 fps", timeit(lambda: mel_windows(mel, 250)), "(250, 80, 16)"),
        ("audio_windows, 10 s", timeit(lambda: audio_windows(wav)), "mel + windows"),
    ]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "stereo44k.wav"
        sf.write(p, (0.1 * rng.standard_normal((441000, 2))).astype(np.float32), 44100)
        rows.append(("load_audio, 10 s wav 44.1 kHz stereo", timeit(lambda: load_audio(p), 5), "-> 16 kHz mono"))
    try:
        import librosa  # reference only

        rows.append(("librosa.feature.melspectrogram (reference)",
                     timeit(lambda: librosa.feature.melspectrogram(y=wav, sr=16000, n_fft=800, hop_length=200,
                                                                   n_mels=80, fmin=55, fmax=7600, power=1.0)),
                     "same STFT + mel, no dB"))
    except ImportError:
        pass
    print(f"{'what':46s} {'median ms':>10s}  note")
    for name, t, note in rows:
        print(f"{name:46s} {t * 1e3:10.2f}  {note}")


if __name__ == "__main__":
    main()

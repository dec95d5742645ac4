"""The README's main job: ``python -m talkformer_core.demo``.

Downloads nothing. Makes a sample talking clip on the spot (scikit-image's public-domain astronaut
photo, synthetic vowel audio; ``data/synthetic.py``), runs the front end on it (audio -> mel
windows; mediapipe landmarks in tracking mode -> smoothed face track) and writes:

- ``<out>/sample.mp4``: the sample clip (the template video and its audio);
- ``<out>/frontend_preview.mp4``: frame | tracked crop, with the crop box and the 131 landmarks
  drawn, and the sample's audio;
- ``<out>/lipsync.mp4``: the sample lip-synced to new synthetic audio with the demo checkpoint,
  when one is given or shipped (``--checkpoint``; see README "Demo checkpoint").

``--video`` / ``--audio`` run the same on your own files.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "demo_astronaut.safetensors"


def frontend_preview(video: Path, out: Path, crop_size: int = 256, face_index: int | None = None) -> dict:
    """Front end on a video file; writes the preview video and returns what it measured."""
    from .audio import audio_windows, load_audio
    from .face.draw import draw_box, draw_points131, draw_track_crop, side_by_side
    from .face.landmarks import LandmarkDetector
    from .face.track import build_track
    from .video import VideoWriter, iter_frames, probe_video

    info = probe_video(video)
    wav = load_audio(video) if info.has_audio else None
    t0 = time.perf_counter()
    with LandmarkDetector(face_index=face_index) as det:
        lm = det.detect_sequence(iter_frames(video, fps=25.0))
    t_lm = time.perf_counter() - t0
    track = build_track(lm, crop_size=crop_size)
    num_frames = len(track)
    mel_shape = windows_shape = None
    if wav is not None:
        mel, windows = audio_windows(wav, num_frames=num_frames, fps=25.0)
        mel_shape, windows_shape = mel.shape, windows.shape
    with VideoWriter(out, 25.0, audio=wav, audio_rate=16000) as wr:
        for t, frame in enumerate(iter_frames(video, fps=25.0)):  # second pass: streaming, bounded
            if t >= num_frames:
                break
            left = draw_box(frame.copy(), track.boxes[t])
            if track.found[t]:
                left = draw_points131(left, track.points131[t], radius=2)
            wr.write(side_by_side(left, draw_track_crop(track.crop(frame, t), track, t)))
    return {
        "frames": num_frames,
        "faces_found": int(track.found.sum()),
        "landmark_ms_per_frame": 1000 * t_lm / max(num_frames, 1),
        "mel_shape": mel_shape,
        "mel_windows_shape": windows_shape,
    }


def build_parser() -> argparse.ArgumentParser:
    from .clitools import parser

    ap = parser("demo", "The README's main job: make a sample talking clip (or take yours), run the front end "
                        "on it and lip-sync it with the demo checkpoint. Downloads nothing.")
    ap.add_argument("--out", default="out/demo", help="output folder")
    ap.add_argument("--video", help="your own template video (default: a sample made on the spot)")
    ap.add_argument("--audio", help="your own driving audio (default: new synthetic speech)")
    ap.add_argument("--checkpoint", help=f"TalkFormer checkpoint (default: {DEMO_CHECKPOINT.name} if present)")
    ap.add_argument("--steps", type=int, default=25, help="sampler steps of the lip-sync")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps")
    return ap


def main(argv=None) -> int:
    from .clitools import run

    a = build_parser().parse_args(argv)
    return run(lambda: _main(a))


def _main(a: argparse.Namespace) -> int:
    from .paths import check_output_dir

    out = Path(a.out)
    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    if a.video:
        video = Path(a.video)
    else:
        from .data.synthetic import load_photo, make_clip, write_clip

        print("making a sample clip from scikit-image's astronaut photo (synthetic speech) ...")
        video = write_clip(make_clip(load_photo("astronaut"), seed=7, duration=4.0, frame_size=256),
                           out / "sample.mp4")
    stats = frontend_preview(video, out / "frontend_preview.mp4")
    print(f"front end: {stats['frames']} frames at 25 fps, face found in {stats['faces_found']}, "
          f"{stats['landmark_ms_per_frame']:.1f} ms/frame for landmarks")
    print(f"mel spectrogram {stats['mel_shape']} (80 mels x 80 frames/s), "
          f"per-frame windows {stats['mel_windows_shape']}")
    print(f"wrote {out / 'frontend_preview.mp4'}")
    ckpt = Path(a.checkpoint) if a.checkpoint else (DEMO_CHECKPOINT if DEMO_CHECKPOINT.exists() else None)
    if ckpt is not None:
        import warnings

        from .models.checkpoint import DemoCheckpointWarning

        with warnings.catch_warnings():
            if not a.video:  # the demo checkpoint on its own synthetic face: what it is for
                warnings.simplefilter("ignore", DemoCheckpointWarning)
            _lipsync_demo(video, a.audio, ckpt, out, a.steps, a.device)
    else:
        print("no checkpoint given and no demo checkpoint shipped: lip-sync step skipped")
    return 0


SPEECH_SEED = 1234  # the demo's new speech: a seed the demo model never trained on


def new_speech(duration: float = 4.0) -> tuple[list, np.ndarray]:
    """The synthetic speech the demo lip-syncs to: (phoneme sequence (phoneme, t0, t1), float32
    waveform at data.synthetic.SAMPLE_RATE); the sequence gives the true mouth opening
    (data.synthetic.mouth_trajectory)."""
    from .data.synthetic import phoneme_sequence, synthesize_audio

    rng = np.random.default_rng(SPEECH_SEED)
    seq = phoneme_sequence(duration, rng)
    return seq, synthesize_audio(seq, duration, rng)


def _lipsync_demo(video: Path, audio: str | None, ckpt: Path, out: Path, steps: int, device: str) -> None:
    from . import pipeline

    if audio is None:
        from .data.synthetic import SAMPLE_RATE

        _, wav = new_speech()
        audio_in = (wav, SAMPLE_RATE)
    else:
        audio_in = audio
    model = pipeline.load_model(ckpt, device=device)
    result = pipeline.lipsync(video, audio_in, model, out / "lipsync.mp4",
                              pipeline.SyncOptions(steps=steps), callback=None)
    print(f"lip-synced {result.num_frames} frames with {ckpt.name}: wrote {out / 'lipsync.mp4'}")


if __name__ == "__main__":
    raise SystemExit(main())

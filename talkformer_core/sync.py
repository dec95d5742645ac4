"""Lip-sync CLI: ``python -m talkformer_core.sync --video V --audio A --checkpoint C --out O.mp4``.

A thin shell over ``pipeline.lipsync``. Every bad input of docs/bad_inputs.md is reported before the long
work starts, as one line on stderr naming the file and what was expected, with exit status 2 (no
traceback): a missing / corrupt / truncated video or image, audio that is missing, unreadable, has
no audio stream or is zero-length, a checkpoint of the wrong format / kind / shape, a missing or
wrong external VAE, no face in any frame, an unknown sampler or length mode, a bad device.
Frames without a face pass through unchanged and are counted in a warning. Ctrl-C stops the run
(exit status 130) and leaves no partial output file.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .errors import TalkFormerError



def build_parser() -> argparse.ArgumentParser:
    from .clitools import parser
    from .diffusion.samplers import SAMPLERS
    from .loaded_model import DTYPE_CHOICES
    from .sampling import DEFAULT_SAMPLER, DEFAULT_STEPS
    from .video import PLAN_MODES

    ap = parser("sync", "Lip-sync a template video (or one image) to an audio track.")
    ap.add_argument("--video", required=True, help="template video, or a single image (png/jpg)")
    ap.add_argument("--audio", required=True, help="audio file (any format PyAV/soundfile reads, or a video's track)")
    ap.add_argument("--checkpoint", required=True, help="TalkFormer checkpoint (.safetensors), or IP-LAP's weights converted by "
                         "python -m talkformer_core.convert iplap (docs/iplap.md)")
    ap.add_argument("--out", required=True, help="output .mp4")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                    help=f"sampler steps (default {DEFAULT_STEPS}; the paper: 200 DDIM steps)")
    ap.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=sorted(SAMPLERS),
                    help=f"stage-2 sampler (default {DEFAULT_SAMPLER}: at {DEFAULT_STEPS} steps within 2 %% of the "
                         "paper's 200 DDIM steps, docs/speed.md; ddim as the paper; ddpm: ancestral)")
    ap.add_argument("--eta", type=float, default=0.0, help="sampler stochasticity (0 = deterministic)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the starting noise (same seed, same video)")
    ap.add_argument("--noise-scale", type=float, default=None,
                    help="scale of the starting noise x_T (default: the model's: 0.5 for person models from "
                         "finetune, 1 otherwise; lower follows the landmarks more closely, docs/dubbing.md)")
    ap.add_argument("--decode-refine", type=int, default=None,
                    help="re-encoding passes of the decode, which keep the template's own mouth out of the face "
                         "(default: the model's: 4 for person models from finetune, 0 otherwise; docs/dubbing.md)")
    ap.add_argument("--mouth-guidance", type=float, default=None,
                    help="guidance of the mouth toward its target landmarks, away from stage 1's average mouth "
                         "(two U-Net passes a step when > 0; default: the model's, 0 = off for every preset: it "
                         "closes some silent mouths and costs 1-2 dB on others, docs/dubbing.md)")
    ap.add_argument("--reference-frame", type=int, default=None,
                    help="template frame (25 fps) used as the appearance reference (default: automatic)")
    ap.add_argument("--face-index", type=int, default=-1,
                    help="which face when there are several, counting from 0 by size: 0 = the largest, "
                         "1 = the second largest, ...; -1 = the largest")
    ap.add_argument("--length-mode", default="pingpong", choices=PLAN_MODES,
                    help="audio longer than the video: pingpong / loop the video; trim: the shorter wins")
    ap.add_argument("--feather", type=int, default=None,
                    help="blend feather in crop pixels (default: from the crop size)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="frames denoised together (default: from free device memory; 8 on the CPU)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                    help="compute dtype (auto: fp32 on CPU, bf16/fp16 on GPU)")
    ap.add_argument("--vae", default=None, help="external VAE (.safetensors) for a checkpoint that names one")
    ap.add_argument("--no-watermark", action="store_true",
                    help="do not embed the invisible provenance watermark (the metadata tag is always written "
                         "and then says that no watermark was embedded)")
    ap.add_argument("--c2pa-cert", default=None, metavar="CERT.pem",
                    help="sign C2PA content credentials into the mp4 with this PEM certificate chain "
                         "(signer first; needs --c2pa-key and the c2pa-python package; docs/provenance.md) "
                         "(default: no credentials)")
    ap.add_argument("--c2pa-key", default=None, metavar="KEY.pem",
                    help="the PEM private key of --c2pa-cert (default: none)")
    ap.add_argument("--crf", type=int, default=18, help="h264 quality (lower = better)")
    ap.add_argument("--iplap-references", type=int, default=25,
                    help="IP-LAP checkpoints only: reference frames of the renderer (IP-LAP: 25; fewer = faster)")
    return ap


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)  # imports torch (the samplers' list): seconds
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    try:
        from . import pipeline as P  # torch's import takes seconds: Ctrl-C there ends cleanly too

        # checks first, cheapest first (lipsync repeats the input checks; they are quick)
        for flag, path in (("--video", a.video), ("--audio", a.audio), ("--checkpoint", a.checkpoint),
                           ("--vae", a.vae)):
            if path is not None and not Path(path).exists():
                return _error(f"{path}: file not found (given as {flag})")
        if a.steps < 1:
            return _error(f"--steps {a.steps}: expected >= 1")
        if a.batch_size is not None and a.batch_size < 1:
            return _error(f"--batch-size {a.batch_size}: expected >= 1")
        if a.iplap_references < 1:
            return _error(f"--iplap-references {a.iplap_references}: expected >= 1")
        if a.face_index < -1:
            return _error(f"--face-index {a.face_index}: expected -1 (the largest face) or K >= 0 "
                          "(the K-th largest, counting from 0)")
        from .paths import check_output_file

        check_output_file(a.out, "--out")  # a folder it cannot write: an error now, not after the sampling
        from .content_credentials import load_credentials

        load_credentials(a.c2pa_cert, a.c2pa_key)  # a bad certificate or key: an error before the work
        if not P._is_image(a.video):
            from .video import probe_video

            probe_video(a.video)
        shown: set[str] = set()  # each warning once (lipsync re-reads the audio it is given)

        def show(caught) -> None:
            for w in caught:
                key = str(w.message).split(": ", 1)[-1]  # the same words about the file or its waveform
                if key not in shown:
                    shown.add(key)
                    print(f"warning: {w.message}", file=sys.stderr)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # short audio; a demo checkpoint; a --vae for a checkpoint that embeds its own
            audio = P.audio_features(a.audio)
            model = P.load_model(a.checkpoint, device=a.device, dtype=a.dtype, vae=a.vae)
        show(caught)
        opts = P.SyncOptions(steps=a.steps, sampler=a.sampler, eta=a.eta, seed=a.seed, noise_scale=a.noise_scale,
                             decode_refine=a.decode_refine, mouth_guidance=a.mouth_guidance, reference_frame=a.reference_frame, face_index=a.face_index,
                             length_mode=a.length_mode, feather=a.feather, batch_size=a.batch_size,
                             watermark=not a.no_watermark, crf=a.crf, iplap_references=a.iplap_references,
                             c2pa_cert=a.c2pa_cert, c2pa_key=a.c2pa_key)
        from tqdm import tqdm

        bar = None

        def progress(done: int, total: int, preview) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, unit="frame", desc="lip-sync", file=sys.stderr)
            bar.update(done - bar.n)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = P.lipsync(a.video, (audio.waveform, audio.sample_rate), model, a.out, opts,
                                   callback=progress)
            finally:
                if bar is not None:
                    bar.close()
        show(caught)
    except TalkFormerError as e:
        msg = str(e)
        if msg.startswith("face index "):  # the core's words for this CLI's flag
            msg = "--face-index " + msg[len("face index "):]
        return _error(msg)
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    print(f"wrote {result.out_path}: {result.num_frames} frames at 25 fps "
          f"({result.num_frames / 25:.2f} s), reference frame {result.reference_frame}, "
          f"{result.num_faceless} frame(s) without a face passed through, {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TalkFormer Lip Sync (Video): a core VIDEO in, a lip-synced VIDEO out, in bounded memory.

Why a one-node path: ComfyUI's own route into IMAGE nodes (LoadVideo -> GetVideoComponents)
decodes every frame into one float32 tensor [T, H, W, 3] (a 60 s 1080p clip is ~37 GB) before any
node of ours runs. This node never calls ``get_components()``: it reads the VIDEO's *stream source*
(a file path, or bytes we spill to a temp file), runs the same streaming
``talkformer_core.pipeline.lipsync`` as ``python -m talkformer_core.sync`` (chunks of frames in,
chunks of frames out through the atomic h264 + AAC writer), and returns the written file as a
file-backed VIDEO. Memory does not grow with the video's length (bench/bench_comfy_memory.py).

Reading the VIDEO (``video_source``), in order:
  1. a plain path (str / os.PathLike) is used as it is (the node runs without ComfyUI);
  2. ``video.get_stream_source()`` (ComfyUI >= 2025-07): a path is used in place, a BytesIO is
     copied to a temp file in chunks (PyAV needs a seekable file for mp4 and we read it twice:
     probe, then frames);
  3. ComfyUI's VideoFromFile without get_stream_source (older releases): its file attribute;
  4. anything else (VideoFromComponents: its get_stream_source fails, it only has tensors):
     ``save_to(temp .mp4)``, which encodes those tensors once; memory is then what the upstream
     node already holds, not more.

The output VIDEO: inside ComfyUI (``comfy_api`` importable) ComfyUI's own ``VideoFromFile`` on the
mp4 we wrote into ``folder_paths.get_temp_directory()`` (h264 yuv420p + AAC, so SaveVideo's "auto"
stream copy gives a normal mp4; GetVideoComponents / CreateVideo consumers decode it as usual).
Without ComfyUI: a ``FileVideo``, a small object with the same reading methods
(``get_stream_source()`` -> path, ``get_dimensions()``, ``get_duration()``, ``save_to(path)``) and
``os.fspath(video)`` -> path, in the system temp folder (``$TMPDIR/talkformer``).

Failure: the pipeline checks every input before long work starts and its writer is atomic (a temp
name renamed on success), so an error or a Cancel leaves no output file; we also remove the output
path and every temp file we made on any exception. Cancel: the progress callback raises ComfyUI's
InterruptProcessingException (every ProgressBar update is an interrupt point), which the pipeline
lets through between frames of a chunk.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from ._common import (CATEGORY, DECODE_PASSES_INPUT, FEATHER_INPUT, MODEL_INPUT, MOUTH_GUIDANCE_INPUT,
                      NOISE_SCALE_INPUT, Progress, audio_input, check_interrupt, comfy_module, decode_passes_option,
                      length_modes, mouth_guidance_option, noise_scale_option, sampler_inputs)
from .generate_nodes import DEFAULT_SAMPLER, DEFAULT_STEPS

OUTPUT_PREFIX = "talkformer_lipsync"


# ---------------------------------------------------------------------------------------------
# where files go

def temp_directory() -> Path:
    """ComfyUI's temp folder (emptied at start and exit) inside ComfyUI, else $TMPDIR/talkformer."""
    fp = comfy_module("folder_paths")
    d = Path(fp.get_temp_directory()) if fp is not None else Path(tempfile.gettempdir()) / "talkformer"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _unique_path(folder: Path, stem: str, suffix: str = ".mp4") -> Path:
    return folder / f"{stem}_{uuid.uuid4().hex[:12]}{suffix}"


def _unlink(p: Path | None) -> None:
    if p is not None:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------------------------
# VIDEO in

def _spill(fileobj: Any, folder: Path) -> Path:
    """Copy a file-like source (ComfyUI's BytesIO) to a temp file, in 1 MiB chunks."""
    p = _unique_path(folder, "talkformer_src")
    if hasattr(fileobj, "seek"):
        fileobj.seek(0)
    try:
        with open(p, "wb") as f:
            shutil.copyfileobj(fileobj, f, 1 << 20)
    except BaseException:
        _unlink(p)
        raise
    return p


@contextmanager
def video_source(video: Any) -> Iterator[Path]:
    """A local file holding ``video`` (see the module doc for the order tried); temp files made
    here are deleted when the block ends. Never decodes frames into memory itself."""
    from talkformer_core.errors import VideoError

    if isinstance(video, (str, os.PathLike)):
        p = Path(os.fspath(video))
        if not p.is_file():
            raise VideoError(f"{p}: video file not found")
        yield p
        return
    if video is None:
        raise VideoError("video: nothing connected; expected a VIDEO (Load Video) or a file path")

    made: Path | None = None
    try:
        src = None
        if hasattr(video, "get_stream_source"):
            try:
                src = video.get_stream_source()
            except Exception:  # VideoFromComponents: the base class tries save_to(BytesIO), which fails
                src = None
        if src is None:  # ComfyUI before get_stream_source: VideoFromFile keeps its source privately
            src = getattr(video, "_VideoFromFile__file", None)
        if isinstance(src, (str, os.PathLike)):
            p = Path(os.fspath(src))
            if not p.is_file():
                raise VideoError(f"{p}: the VIDEO's file does not exist (moved or deleted since it was loaded)")
            yield p
            return
        if src is not None and hasattr(src, "read"):
            made = _spill(src, temp_directory())
            yield made
            return
        if hasattr(video, "save_to"):  # frames in memory (CreateVideo): encode them once to a file
            made = _unique_path(temp_directory(), "talkformer_src")
            try:
                video.save_to(str(made))
            except Exception as e:
                raise VideoError(f"video: could not write the connected {type(video).__name__} to a file "
                                 f"for streaming ({type(e).__name__}: {e})") from e
            yield made
            return
        raise VideoError(f"video: expected a ComfyUI VIDEO (Load Video, Create Video) or a file path, "
                         f"got {type(video).__name__}")
    finally:
        _unlink(made)


# ---------------------------------------------------------------------------------------------
# VIDEO out

class FileVideo:
    """The VIDEO this node returns when ComfyUI is absent: a finished mp4 on disk, with the reading
    methods of ComfyUI's VideoFromFile that matter here (and ``os.fspath``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(os.fspath(path))

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"FileVideo({self.path!r})"

    def get_stream_source(self) -> str:
        return self.path

    def get_dimensions(self) -> tuple[int, int]:
        from talkformer_core.video import probe_video

        info = probe_video(self.path)
        return info.width, info.height

    def get_duration(self) -> float:
        from talkformer_core.video import probe_video

        return probe_video(self.path).duration

    def save_to(self, path: str | os.PathLike, format: Any = None, codec: Any = None, metadata: Any = None) -> None:
        shutil.copyfile(self.path, os.fspath(path))


def file_video(path: Path) -> Any:
    """ComfyUI's VideoFromFile(path) where comfy_api is importable, else FileVideo(path)."""
    impl = comfy_module("comfy_api.input_impl")
    cls = getattr(impl, "VideoFromFile", None) if impl is not None else None
    return cls(str(path)) if cls is not None else FileVideo(path)


# ---------------------------------------------------------------------------------------------
# the node

class TalkFormerLipSyncVideo:
    DESCRIPTION = ("Lip-syncs a whole VIDEO in one node, streaming: frames are read from the video's file "
                   "and written to a new mp4 chunk by chunk, so memory stays flat however long the clip "
                   "is (the path for long videos; the stage nodes are for short clips and chaining image "
                   "nodes). Audio: the connected AUDIO, else the video's own track. Output: a file-backed "
                   "VIDEO (h264 + AAC) for Save Video or any VIDEO node, and its frame count. Progress "
                   "shows the latest generated face; Cancel stops between frames and leaves no file.")
    CATEGORY = CATEGORY
    FUNCTION = "lipsync"
    RETURN_TYPES = ("VIDEO", "INT")
    RETURN_NAMES = ("video", "frame_count")
    OUTPUT_TOOLTIPS = ("The lip-synced video (an mp4 in ComfyUI's temp folder; connect Save Video to keep it).",
                       "Number of frames of the output video.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "video": ("VIDEO", {"tooltip": "The template video (Load Video, or any node giving a VIDEO). "
                                               "Read from its file, never decoded whole into memory."}),
                "model": MODEL_INPUT,
                **sampler_inputs(),
                "length_mode": (length_modes(), {
                    "default": "pingpong",
                    "tooltip": "When audio and video lengths differ: pingpong plays the video forward then "
                               "backward to the audio's length, loop repeats it, trim cuts both to the shorter."}),
                "face_index": ("INT", {
                    "default": -1, "min": -1, "max": 3,
                    "tooltip": "Which face to track when there are several: -1 = the largest, 0..3 = that "
                               "rank by size (0 largest)."}),
                "reference_frame": ("INT", {
                    "default": -1, "min": -1, "max": 1_000_000,
                    "tooltip": "Frame whose face gives the appearance (teeth, lips); -1 = automatic (the most "
                               "open, most frontal mouth)."}),
                "feather": FEATHER_INPUT,
                "watermark": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Provenance: an invisible watermark in the generated faces and a metadata tag "
                               "naming the generator (python -m talkformer_core.detect reads both)."}),
            },
            "optional": {
                "audio": ("AUDIO", {"tooltip": "The driving speech; not connected = the video's own audio track."}),
                "iplap_references": ("INT", {
                    "default": 25, "min": 1, "max": 100,
                    "tooltip": "IP-LAP checkpoints only: the renderer's reference frames (25 as IP-LAP; 5 is about "
                               "4x faster per frame on a CPU, slightly less faithful teeth and lips)."}),
                "c2pa_cert": ("STRING", {
                    "default": "",
                    "tooltip": "Path of a PEM certificate chain (signer first) to sign C2PA content credentials "
                               "into the mp4; empty = none. Needs c2pa-python; Save Video's copy drops them, "
                               "TalkFormer Mark Video can save the signed file (docs/provenance.md)."}),
                "c2pa_key": ("STRING", {"default": "", "tooltip": "Path of the certificate's PEM private key."}),
                "noise_scale": NOISE_SCALE_INPUT,
                "decode_passes": DECODE_PASSES_INPUT,
                "mouth_guidance": MOUTH_GUIDANCE_INPUT,
            },
        }

    def lipsync(self, video: Any, model: Any, steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER, seed: int = 0,
                length_mode: str = "pingpong", face_index: int = -1, reference_frame: int = -1,
                feather: int = -1, watermark: bool = True, audio: Any = None, iplap_references: int = 25,
                c2pa_cert: str = "", c2pa_key: str = "", noise_scale: float = -1.0, decode_passes: int = -1,
                mouth_guidance: float = -1.0):
        from talkformer_core import pipeline
        from talkformer_core.errors import AudioError
        from talkformer_core.video import probe_video

        options = pipeline.SyncOptions(
            steps=int(steps), sampler=str(sampler), seed=int(seed), noise_scale=noise_scale_option(noise_scale),
            decode_refine=decode_passes_option(decode_passes), mouth_guidance=mouth_guidance_option(mouth_guidance),
            length_mode=str(length_mode),
            face_index=None if int(face_index) < 0 else int(face_index),
            reference_frame=None if int(reference_frame) < 0 else int(reference_frame),
            feather=None if int(feather) < 0 else int(feather),
            watermark=bool(watermark), iplap_references=int(iplap_references),
            c2pa_cert=str(c2pa_cert or "").strip() or None, c2pa_key=str(c2pa_key or "").strip() or None,
        )
        out = _unique_path(temp_directory(), OUTPUT_PREFIX)
        bar: list[Progress] = []

        def callback(done: int, total: int, preview: Any = None) -> None:
            if not bar:
                bar.append(Progress(total))
            bar[0].update(done, preview)  # also the interrupt point (raises on Cancel)

        try:
            with ExitStack() as stack:
                src = stack.enter_context(video_source(video))
                # default audio: the video's own track, read by the pipeline from the same file
                if audio is None and not probe_video(src).has_audio:
                    raise AudioError(f"{src}: the video has no audio track and no AUDIO input is "
                                     f"connected; connect Load Audio with the speech to lip-sync to")
                aud = audio_input(audio) if audio is not None else str(src)
                check_interrupt()
                loaded = model.load() if hasattr(model, "load") else model
                result = pipeline.lipsync(str(src), aud, loaded, out, options=options, callback=callback)
        except BaseException:
            _unlink(out)  # the writer is atomic already; never present a partial file
            raise
        return (file_video(out), int(result.num_frames))


NODE_CLASS_MAPPINGS = {"TalkFormerLipSyncVideo": TalkFormerLipSyncVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"TalkFormerLipSyncVideo": "TalkFormer Lip Sync (Video)"}

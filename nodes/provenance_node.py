"""TalkFormer Mark Video: the file-level provenance marks for the stage path (docs/provenance.md).

The stage nodes end in IMAGE frames (Blend Face embeds the invisible watermark there); ComfyUI's
Create Video and Save Video then write the mp4, so the generator tag and optional C2PA content
credentials need a node between them: this one reads the VIDEO from its stream source (no frame
is decoded into memory, nodes/video_node.py), copies its streams into a new mp4 in ComfyUI's temp
folder (no re-encode) with the ``comment`` tag, signs C2PA credentials when a certificate and key
are given, and returns that file as a VIDEO. The tag says whether the frames carry our watermark,
as measured on the video (talkformer_core.detect.mark_file), so it is true whatever Blend
Face's setting was.

Save Video (format auto) copies the streams again and keeps the container's tags, so the tag
reaches output/; that copy drops the C2PA manifest (a new container; the manifest's hash covers
the bytes). ``filename_prefix`` saves this node's own signed file to output/ as well.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ._common import CATEGORY, check_interrupt, comfy_module
from .video_node import _unique_path, _unlink, file_video, temp_directory, video_source

OUTPUT_PREFIX = "talkformer_marked"


def _save_to_output(path: Path, prefix: str) -> dict:
    """Copy ``path`` into ComfyUI's output folder as ``<prefix>_NNNNN_.mp4`` (Save Video's naming);
    -> the UI's file entry. Outside ComfyUI: next to ``path``."""
    fp = comfy_module("folder_paths")
    if fp is not None:
        folder, name, counter, subfolder, _ = fp.get_save_image_path(prefix, fp.get_output_directory())
    else:
        folder, name, counter, subfolder = str(path.parent), Path(prefix).name, 1, ""
    dst = Path(folder) / f"{name}_{counter:05}_.mp4"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, dst)
    return {"filename": dst.name, "subfolder": subfolder, "type": "output"}


class TalkFormerMarkVideo:
    DESCRIPTION = ("Provenance marks for a finished video (put it between Create Video and Save Video on the "
                   "stage path): copies the video's streams without re-encoding into a new mp4 with a "
                   "metadata tag naming the generator (and saying whether the frames carry the invisible "
                   "watermark, as measured), and signs C2PA content credentials into it when a certificate "
                   "chain and key are given. Save Video keeps the tag but drops C2PA credentials; set "
                   "filename_prefix to save the signed file itself.")
    CATEGORY = CATEGORY
    FUNCTION = "mark"
    OUTPUT_NODE = True  # with filename_prefix it is a saving node (a workflow may end here)
    RETURN_TYPES = ("VIDEO",)
    RETURN_NAMES = ("video",)
    OUTPUT_TOOLTIPS = ("The marked video (an mp4 in ComfyUI's temp folder; connect Save Video to keep it).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "video": ("VIDEO", {"tooltip": "The finished video (Create Video, Load Video, or any VIDEO)."}),
            },
            "optional": {
                "c2pa_cert": ("STRING", {
                    "default": "",
                    "tooltip": "Path of a PEM certificate chain (signer first) to sign C2PA content credentials "
                               "with; empty = no credentials. Needs c2pa-python (docs/provenance.md)."}),
                "c2pa_key": ("STRING", {"default": "", "tooltip": "Path of the certificate's PEM private key."}),
                "filename_prefix": ("STRING", {
                    "default": "",
                    "tooltip": "When set, also save the marked mp4 to the output folder under this prefix "
                               "(keeps the C2PA credentials, which Save Video's copy drops)."}),
            },
        }

    def mark(self, video: Any, c2pa_cert: str = "", c2pa_key: str = "", filename_prefix: str = ""):
        from talkformer_core.content_credentials import load_credentials
        from talkformer_core.detect import mark_file

        credentials = load_credentials(c2pa_cert, c2pa_key)  # bad cert / key: an error naming the file now
        out = _unique_path(temp_directory(), OUTPUT_PREFIX)
        saved = []
        try:
            with video_source(video) as src:
                check_interrupt()
                mark_file(src, out, credentials=credentials)
            check_interrupt()
            if str(filename_prefix).strip():
                saved.append(_save_to_output(out, str(filename_prefix).strip()))
        except BaseException:
            _unlink(out)
            raise
        result = (file_video(out),)
        if saved:
            return {"ui": {"images": saved, "animated": (True,)}, "result": result}
        return result


NODE_CLASS_MAPPINGS = {"TalkFormerMarkVideo": TalkFormerMarkVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"TalkFormerMarkVideo": "TalkFormer Mark Video"}

"""Detect Face Landmarks and Blend Face: the front and back end of the face path."""
from __future__ import annotations

from typing import Any

from ._common import (CATEGORY, FEATHER_INPUT, TALKFORMER_FACE_TRACK, Progress, check_interrupt, image_to_uint8,
                      uint8_to_image)


class DetectFaceLandmarks:
    DESCRIPTION = ("Finds the face in every frame (mediapipe face mesh, tracking mode), keeps IP-LAP's 131 "
                   "landmarks and builds the smoothed square crop box the model works in. Frames without "
                   "a face pass through later untouched (their box is interpolated).")
    CATEGORY = CATEGORY
    FUNCTION = "detect"
    RETURN_TYPES = (TALKFORMER_FACE_TRACK, "IMAGE")
    RETURN_NAMES = ("face_track", "preview")
    OUTPUT_TOOLTIPS = ("Per-frame crop boxes, found flags and 131 landmarks of the tracked face.",
                       "The frames with the crop box (mid line = start of the generated half) and the "
                       "landmarks drawn; grey box = no face found in that frame.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Video frames (after Match Length, so the track covers every output frame)."}),
                "crop_size": ("INT", {
                    "default": 256, "min": 64, "max": 512, "step": 8,
                    "tooltip": "Side in pixels of the face crops shown in previews and blended back; the "
                               "model itself always works at its own resolution."}),
                "face_index": ("INT", {
                    "default": -1, "min": -1, "max": 3,
                    "tooltip": "Which face to track when there are several: -1 = the largest, 0..3 = that "
                               "rank by size (0 largest)."}),
            },
        }

    def detect(self, images: Any, crop_size: int = 256, face_index: int = -1):
        from talkformer_core import pipeline
        from talkformer_core.face.draw import draw_track_frame

        frames = image_to_uint8(images)  # (T, H, W, 3)
        T = frames.shape[0]
        bar = Progress(T + 1)
        analysis = pipeline.analyze_frames(frames, crop_size=int(crop_size),
                                           face_index=None if face_index < 0 else int(face_index),
                                           progress=bar.update, source="images")  # FaceError if no face at all
        track = analysis.track
        if track.num_missing:
            print(f"[TalkFormer] Detect Face Landmarks: no face in {track.num_missing} of {T} frames; "
                  f"they pass through unchanged")
        preview = []
        for t in range(T):
            preview.append(draw_track_frame(frames[t], track, t))
            if t % 8 == 0:
                check_interrupt()
        bar.update(T + 1, preview[-1])
        return (analysis, uint8_to_image(preview))


class BlendFace:
    DESCRIPTION = ("Pastes the generated face crops back into the original frames through a feathered "
                   "lower-face mask (Gaussian ramps); frames without a face pass through unchanged. With "
                   "watermark on (default) the face region of every blended frame gets the invisible "
                   "provenance watermark of the one-node path (off: pixels outside the mask stay "
                   "bit-identical); "
                   "put TalkFormer Mark Video after Create Video for the file's metadata tag.")
    CATEGORY = CATEGORY
    FUNCTION = "blend"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The lip-synced frames, same size and count as the input frames.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The frames the face track was made from."}),
                "face_crops": ("IMAGE", {"tooltip": "Generated face crops (TalkFormer Sampler), one per frame."}),
                "face_track": (TALKFORMER_FACE_TRACK, {"tooltip": "The face track of these frames (Detect Face Landmarks)."}),
                "feather": FEATHER_INPUT,
                "watermark": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Provenance: embed the invisible rivaGan watermark in the face region of every "
                               "blended frame (python -m talkformer_core.detect reads it)."}),
            },
        }

    def blend(self, images: Any, face_crops: Any, face_track: Any, feather: int = -1, watermark: bool = True):
        from talkformer_core import pipeline
        from talkformer_core.errors import InputError

        track = face_track.track
        frames = image_to_uint8(images)
        crops = image_to_uint8(face_crops, "face_crops")
        if len(frames) != len(track) or len(crops) != len(track):
            raise InputError(f"Blend Face: {len(frames)} frames, {len(crops)} face crops and a face track of "
                             f"{len(track)} frames; expected the same count (use the frames the track and "
                             f"the crops were made from)")
        marker = None
        if watermark:
            from talkformer_core.provenance import Watermarker

            marker = Watermarker().load()  # onnxruntime missing: a clear error before the work
        check_interrupt()
        out = pipeline.blend_faces(frames, crops, track.boxes, track.found, None if feather < 0 else int(feather))
        if marker is not None:  # the same box rule and payload as pipeline.lipsync, batched
            from talkformer_core.provenance import MARK_BATCH

            bar = Progress(len(out))
            for b0 in range(0, len(out), MARK_BATCH):
                b1 = min(b0 + MARK_BATCH, len(out))
                out[b0:b1] = marker.embed_regions(out[b0:b1], track.boxes[b0:b1], track.found[b0:b1])
                bar.update(b1)  # also the interrupt point
        return (uint8_to_image(out),)


NODE_CLASS_MAPPINGS = {"TalkFormerDetectFaceLandmarks": DetectFaceLandmarks, "TalkFormerBlendFace": BlendFace}
NODE_DISPLAY_NAME_MAPPINGS = {"TalkFormerDetectFaceLandmarks": "Detect Face Landmarks",
                              "TalkFormerBlendFace": "Blend Face"}

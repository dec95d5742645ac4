"""Audio Features and Match Length: ComfyUI AUDIO -> mel windows; frames fitted to the audio."""
from __future__ import annotations

import math
from typing import Any

from ._common import (CATEGORY, TALKFORMER_AUDIO, audio_input, audio_seconds, intermediate_device, length_modes,
                      trim_audio)

FPS_SPEC = ("FLOAT", {"default": 25.0, "min": 1.0, "max": 120.0, "step": 0.001,
                      "tooltip": "Frame rate of the video frames (connect GetVideoComponents' fps)."})


class AudioFeatures:
    DESCRIPTION = ("Turns audio (Load Audio, Get Video Components, VideoHelperSuite) into the model's "
                   "input: 16 kHz mono, IP-LAP's 80-band mel spectrogram, one 16-mel window (0.2 s) "
                   "per video frame.")
    CATEGORY = CATEGORY
    FUNCTION = "features"
    RETURN_TYPES = (TALKFORMER_AUDIO, "INT")
    RETURN_NAMES = ("audio_features", "frame_count")
    OUTPUT_TOOLTIPS = ("Mel windows (T, 80, 16), one per video frame.",
                       "T: the number of video frames the features cover.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "audio": ("AUDIO", {"tooltip": "The driving speech (any sample rate, mono or stereo)."}),
                "fps": FPS_SPEC,
                "frame_count": ("INT", {
                    "default": 0, "min": 0, "max": 1_000_000,
                    "tooltip": "Video frames to make windows for; 0 = as many as the audio lasts "
                               "(ceil(duration x fps)). Connect Match Length's frame_count."}),
            },
        }

    def features(self, audio: dict, fps: float, frame_count: int = 0):
        from talkformer_core import pipeline

        feats = pipeline.audio_features(audio_input(audio), fps=float(fps), num_frames=int(frame_count) or None)
        return (feats, int(feats.num_frames))


class MatchLength:
    DESCRIPTION = ("Fits the template frames to the audio's length: pingpong plays them forward then "
                   "backward (the head never jumps), loop repeats them, trim cuts the longer of the two "
                   "(the audio output is cut to the frames then).")
    CATEGORY = CATEGORY
    FUNCTION = "match"
    RETURN_TYPES = ("IMAGE", "INT", "AUDIO")
    RETURN_NAMES = ("images", "frame_count", "audio")
    OUTPUT_TOOLTIPS = ("The frames, as many as the audio lasts (trim: the shorter of the two).",
                       "Number of output frames.",
                       "The audio, cut to the output frames' duration when it was longer (trim); else unchanged.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Template video frames."}),
                "audio": ("AUDIO", {"tooltip": "The driving audio whose length the frames should match."}),
                "fps": FPS_SPEC,
                "mode": (length_modes(), {
                    "default": "pingpong",
                    "tooltip": "pingpong: forward-backward repeat; loop: repeat from the start; trim: cut "
                               "whichever is longer."}),
            },
        }

    def match(self, images: Any, audio: dict, fps: float, mode: str = "pingpong"):
        import torch

        from talkformer_core.video import match_length_indices

        n_audio = int(math.ceil(audio_seconds(audio) * float(fps) - 1e-6))  # frames the audio covers
        idx = match_length_indices(int(images.shape[0]), n_audio, mode)  # (T_out,)
        out = images[torch.from_numpy(idx).to(images.device)]
        T = int(idx.shape[0])
        return (out.to(intermediate_device()), T, trim_audio(audio, T / float(fps)))


NODE_CLASS_MAPPINGS = {"TalkFormerAudioFeatures": AudioFeatures, "TalkFormerMatchLength": MatchLength}
NODE_DISPLAY_NAME_MAPPINGS = {"TalkFormerAudioFeatures": "Audio Features", "TalkFormerMatchLength": "Match Length"}

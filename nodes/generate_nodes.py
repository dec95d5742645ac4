"""Complete Landmarks, Encode Reference and TalkFormer Sampler: the model's two stages as nodes."""
from __future__ import annotations

from typing import Any

from ._common import (
    CATEGORY,
    DECODE_PASSES_INPUT,
    FACE_TRACK_INPUT,
    MODEL_INPUT,
    MOUTH_GUIDANCE_INPUT,
    NOISE_SCALE_INPUT,
    TALKFORMER_AUDIO,
    TALKFORMER_LANDMARKS,
    TALKFORMER_REFERENCE,
    Progress,
    check_interrupt,
    decode_passes_option,
    image_to_uint8,
    mouth_guidance_option,
    noise_scale_option,
    sampler_inputs,
    uint8_to_image,
)


# talkformer_core.sampling's defaults, repeated for the node functions' signatures (node modules import
# the core only inside functions; tests/test_sampling.py checks they agree)
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpmpp_2m", 10


def _check_count(what: str, n: int, track: Any) -> None:
    from talkformer_core.errors import InputError

    if n != len(track):
        raise InputError(f"{what}: {n} frames but the face track has {len(track)}; connect the frames the "
                         f"track was made from (after Match Length)")


class CompleteLandmarks:
    DESCRIPTION = ("Stage 1 (landmark completion): from the mel windows, the upper-face (pose) landmarks of "
                   "each frame and N reference landmark sets spread over lip openness, predicts the lip and "
                   "jaw landmarks that follow the audio; merged with the pose they are the 131 target "
                   "landmarks of every frame.")
    CATEGORY = CATEGORY
    FUNCTION = "complete"
    RETURN_TYPES = (TALKFORMER_LANDMARKS, "IMAGE")
    RETURN_NAMES = ("landmarks", "preview")
    OUTPUT_TOOLTIPS = ("Target landmarks (T, 131, 2) in each frame's crop, [0, 1].",
                       "Face crops with the predicted landmarks drawn (lips red, jaw orange, pose green); "
                       "black crops when no frames are connected.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "face_track": FACE_TRACK_INPUT,
                "audio_features": (TALKFORMER_AUDIO, {"tooltip": "Audio Features of the driving audio."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "The tracked frames, only to draw the preview on."}),
            },
        }

    def complete(self, model: Any, face_track: Any, audio_features: Any, images: Any = None):
        import numpy as np

        from talkformer_core import pipeline
        from talkformer_core.face.draw import draw_points131
        from talkformer_core.face.track import crop_frame

        analysis = face_track
        track = analysis.track
        T = len(track)
        loaded = model.load()
        bar = Progress(T + 1)
        idx = np.arange(T)  # the frames were matched to the audio upstream (Match Length)
        lms_box = pipeline.complete_landmarks(loaded, analysis, audio_features, idx)  # (T, 131, 2) box frame
        lms = pipeline.landmarks_to_crop(analysis, lms_box, idx, loaded)  # (T, 131, 2) crop frame [0, 1]
        bar.update(1)
        size = int(track.crop_size)
        frames = image_to_uint8(images) if images is not None else None
        if frames is not None:
            _check_count("Complete Landmarks images", len(frames), track)
        preview = []
        for t in range(T):
            canvas = (crop_frame(frames[t], track.boxes[t], size) if frames is not None
                      else np.zeros((size, size, 3), np.uint8))
            preview.append(draw_points131(canvas, lms[t] * size, radius=max(1, size // 128)))
            if t % 8 == 0:
                bar.update(1 + t, preview[-1])
        bar.update(T + 1, preview[-1])
        return (lms, uint8_to_image(preview))


class EncodeReference:
    DESCRIPTION = ("Encodes the reference face whose appearance (teeth, lips, beard) the generated mouth "
                   "takes: a frame of the video (auto: the most open and most frontal mouth) or an image "
                   "you give. Its appearance features are computed once and reused at every step.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (TALKFORMER_REFERENCE,)
    RETURN_NAMES = ("reference",)
    OUTPUT_TOOLTIPS = ("The reference latent and its cached appearance features.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "face_track": FACE_TRACK_INPUT,
                "images": ("IMAGE", {"tooltip": "The tracked frames (the reference is cropped from one of them)."}),
                "frame_index": ("INT", {
                    "default": -1, "min": -1, "max": 1_000_000,
                    "tooltip": "Frame to take the reference from; -1 = automatic (widest open, most frontal "
                               "mouth). Ignored when reference_image is connected."}),
            },
            "optional": {
                "reference_image": ("IMAGE", {
                    "tooltip": "Optional still of the same person (first image used): its face is detected, "
                               "cropped and encoded instead of a video frame."}),
            },
        }

    def encode(self, model: Any, face_track: Any, images: Any, frame_index: int = -1, reference_image: Any = None):
        from talkformer_core import pipeline
        from talkformer_core.analysis import image_reference_crop
        from talkformer_core.face.track import crop_frame

        analysis = face_track
        loaded = model.load()
        size = loaded.crop_size
        if reference_image is not None:
            crop = image_reference_crop(image_to_uint8(reference_image, "reference_image")[0], size,
                                        source="reference_image")
        else:
            frames = image_to_uint8(images)
            _check_count("Encode Reference images", len(frames), analysis.track)
            t = pipeline.choose_reference_frame(analysis, None if frame_index < 0 else int(frame_index))
            crop = crop_frame(frames[t], analysis.boxes[t], size)
        check_interrupt()
        return (pipeline.encode_reference(loaded, crop),)


class TalkFormerSampler:
    DESCRIPTION = ("Stage 2 (latent diffusion inpainting): for every frame, denoises the lower half of the "
                   "face latent guided by the target landmarks (M-Align) and the reference (R-Align), with "
                   "the upper half fixed to the frame's own; decodes to face crops. Progress shows the "
                   "latest face; Cancel stops between steps.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("face_crops",)
    OUTPUT_TOOLTIPS = ("Generated face crops [T, S, S, 3] at the model's resolution (Blend Face pastes them back).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "images": ("IMAGE", {"tooltip": "The tracked frames (their upper faces are kept)."}),
                "face_track": FACE_TRACK_INPUT,
                "landmarks": (TALKFORMER_LANDMARKS, {"tooltip": "Complete Landmarks' target landmarks."}),
                "reference": (TALKFORMER_REFERENCE, {"tooltip": "Encode Reference's output."}),
                **sampler_inputs(),
                "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Stochasticity: 0 deterministic (DDIM / DPM-Solver++), 1 ancestral."}),
            },
            "optional": {"noise_scale": NOISE_SCALE_INPUT, "decode_passes": DECODE_PASSES_INPUT,
                         "mouth_guidance": MOUTH_GUIDANCE_INPUT},
        }

    def sample(self, model: Any, images: Any, face_track: Any, landmarks: Any, reference: Any,
               steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER, seed: int = 0, eta: float = 0.0,
               noise_scale: float = -1.0, decode_passes: int = -1, mouth_guidance: float = -1.0):
        import numpy as np

        from talkformer_core.face.track import crop_frame
        from talkformer_core.pipeline import guidance_neutral_mouth
        from talkformer_core.sampling import FaceSampler, auto_batch_size

        analysis = face_track
        track = analysis.track
        frames = image_to_uint8(images)
        lms = np.asarray(landmarks, dtype=np.float32)
        _check_count("TalkFormer Sampler images", len(frames), track)
        _check_count("TalkFormer Sampler landmarks", len(lms), track)
        loaded = model.load()
        size = loaded.crop_size
        crops = np.stack([crop_frame(frames[t], track.boxes[t], size) for t in range(len(frames))])
        # the core's one batch loop (batch from free device memory; Temp-Att: parallel chains)
        latest: list = [None]  # the last decoded face: the progress preview

        def step(i: int, n: int) -> None:
            done[0] += 1
            bar.update(done[0], latest[0] if i == 0 else None)  # interrupt point

        guidance = mouth_guidance_option(mouth_guidance)
        neutral = guidance_neutral_mouth(loaded, analysis, None, guidance)
        fs = FaceSampler(loaded, reference, steps=int(steps), sampler=sampler, seed=int(seed), eta=float(eta),
                         noise_scale=noise_scale_option(noise_scale), decode_refine=decode_passes_option(decode_passes),
                         batch_size=auto_batch_size(loaded), step_callback=step, mouth_guidance=guidance,
                         neutral_mouth=neutral)
        done, bar = [0], Progress(max(1, fs.num_runs(len(crops)) * int(steps)))
        faces = fs(crops, lms, on_faces=lambda b0, f: latest.__setitem__(0, f[-1]))
        bar.update(bar.total, faces[-1])
        return (uint8_to_image(faces),)


NODE_CLASS_MAPPINGS = {
    "TalkFormerCompleteLandmarks": CompleteLandmarks,
    "TalkFormerEncodeReference": EncodeReference,
    "TalkFormerSampler": TalkFormerSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TalkFormerCompleteLandmarks": "Complete Landmarks",
    "TalkFormerEncodeReference": "Encode Reference",
    "TalkFormerSampler": "TalkFormer Sampler",
}

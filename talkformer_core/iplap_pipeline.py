"""The IP-LAP renderer path: lip-sync with IP-LAP's published weights (docs/iplap.md).

A checkpoint of kind "iplap" (``python -m talkformer_core.convert iplap``) holds IP-LAP's landmark
generator (= our landmark completion, ``models.landmark_completion``) and its video renderer
(``models.iplap_renderer``). ``pipeline.lipsync`` dispatches on the kind and runs this module's
``IPLAPFrameRenderer`` inside its own streaming orchestrator (same analysis pass, length plan,
chunked reading, provenance watermark and atomic writer); only the per-frame rendering differs.

Per output frame t (IP-LAP ``inference_single.py``, cited ``inf:LINE``, commit 9b9dc03):
  1. the 5-frame window ``iplap.window(t)`` = t-2 .. t+2 (inf:434-445);
  2. landmark completion on that window: mel windows, the window frames' detected pose (74 points,
     each in its own landmark-box frame) and Nl reference landmark sets (Nl = 15, the checkpoint's
     config; frames spread over lip openness, inf:342-351) -> jaw 17 + lips 40 of all 5 frames
     (inf:447-472);
  3. 5 target sketches: detected pose 74 + predicted content 57, drawn on each frame's own
     landmark-box canvas (inf:474-489, ``iplap.draw_sketch``);
  4. the renderer gets the middle frame's landmark-box crop (128x128, BGR, /255; it zeroes the
     lower half itself), the 5 sketches, N = 25 reference crops + their sketches (chosen by lip
     openness, fixed for the whole video, inf:374-416) and the middle frame's mel (inf:491-501);
  5. its output (BGR [0, 1], 128x128) -> RGB uint8, resized into the landmark box (inf:502-506),
     blended through a Gaussian-blurred mask of the face contour (``face_contour_mask``).

Where we differ from IP-LAP's script (by choice; the networks see IP-LAP's inputs):
  - windows at the ends: IP-LAP renders positions 2 .. M-1 and writes its first result three
    times (inf:434, 513-515); here every position t renders its own frame from the window clamped
    to [0, T-1] (``iplap.window``), so frames 0 and 1 show their own template frame and mel.
  - the mel of positions 0 and 1: IP-LAP's chunk max(0, p - 2) = chunk 0 (inf:443); our
    ``audio.mel_windows`` pads the first two frames with silence instead, so this path reads
    window max(p, 2) (= IP-LAP's chunk 0) for them (``mel_index``).
  - blending: IP-LAP fills the convex hull of face_alignment's 68-point contour (jaw + brows) of the
    template frame and blurs it 21x21, sigma 11 (inf:126-156); face_alignment is not a dependency,
    so the hull here is mediapipe's contour points among the 131 (cheeks, jaw, brows: FULL_131
    positions 0-44) plus the predicted jaw (an opening jaw is not cut off), same blur. The blend is
    done in the landmark box only: pixels outside it are bit-identical to the template.
  - no face in a frame: IP-LAP stops (inf:258); here the frame passes through unchanged.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from . import iplap
from .analysis import reference_landmark_sets
from .errors import CheckpointError, InputError
from .face import topology
from .loaded_model import LoadedModel

KIND = "iplap"
CROP_SIZE = iplap.IMG_SIZE  # 128: the renderer's resolution
WINDOW = iplap.WINDOW  # 5 frames per landmark-completion window, the middle one rendered
DEFAULT_RENDER_REFERENCES = iplap.N_REF_IMAGES  # 25 (inf:26)
DEFAULT_LANDMARK_REFERENCES = iplap.N_REF_LANDMARKS  # Nl = 15 (inf:27)
CONTOUR_POSITIONS = tuple(range(45))  # FULL_131 positions 0-44: cheeks 4 + jaw 17 + cheeks 4 + brows 20
JAW_POSITIONS = tuple(range(4, 21))
IPLAP_BLUR = 10  # half-width of IP-LAP's 21x21 mask blur (sigma 11 = half-width + 1), inf:126


# ---------------------------------------------------------------------------------------------
# loading (pipeline._LOADERS["iplap"])
# ---------------------------------------------------------------------------------------------


class IPLAPModel(nn.Module):
    """IP-LAP's two networks as one module (what ComfyUI's ModelPatcher holds on a TALKFORMER_MODEL).

    ``landmark`` is our LandmarkCompletion on IP-LAP's weights (so ``pipeline.complete_landmarks``
    and the Complete Landmarks node run it like a TalkFormer model's); ``renderer`` is None when the
    checkpoint was converted without ``--renderer``.
    """

    def __init__(self, landmark: nn.Module, renderer: nn.Module | None):
        super().__init__()
        self.landmark = landmark
        self.renderer = renderer

    # The diffusion stage does not exist here: a clear error instead of an AttributeError when an
    # IP-LAP model is wired into Encode Reference / TalkFormer Sampler.
    def _no_diffusion(self, *args: Any, **kwargs: Any):
        raise InputError("an IP-LAP checkpoint has no diffusion stage (no autoencoder, no U-Net): use it for "
                         "Complete Landmarks or the one-node lip-sync, and connect a TalkFormer checkpoint "
                         "to Encode Reference / TalkFormer Sampler")

    encode = encode_masked = prepare_reference = decode = _no_diffusion


def load_iplap_model(path: Path, meta: dict[str, str], device: torch.device, dtype: torch.dtype,
                     vae: Any = None, use_ema: bool = True):
    """An "iplap" checkpoint -> LoadedModel (kind "iplap"), weights in fp32 on ``device``;
    a reduced ``dtype`` runs the networks under autocast, as the TalkFormer path does."""
    from .config import LandmarkConfig, ModelConfig, TalkFormerConfig
    from .convert import load_iplap_checkpoint

    if vae is not None:
        warnings.warn(f"{path}: an IP-LAP checkpoint has no autoencoder; the VAE given is not used", stacklevel=3)
    m = load_iplap_checkpoint(path, device=device, dtype=torch.float32)
    lg = m.config.get("landmark_generator") or {}
    n_refs = int(lg.get("Nl", DEFAULT_LANDMARK_REFERENCES))
    lm_cfg = LandmarkConfig(**{k: lg[k] for k in ("d_model", "nlayers", "nhead", "dim_feedforward", "dropout") if k in lg})
    cfg = TalkFormerConfig(name="iplap", model=ModelConfig(
        image_size=CROP_SIZE, landmark=lm_cfg, sequence_length=int(lg.get("T", WINDOW)),
        num_reference_landmarks=n_refs))
    model = IPLAPModel(m.landmark_generator, m.renderer).to(device).eval().requires_grad_(False)
    return LoadedModel(KIND, cfg, model, None, device, dtype, Path(path), dict(meta))


def check_renderable(model: Any) -> None:
    """CheckpointError (before any long work) when an "iplap" checkpoint has no renderer."""
    if getattr(model.model, "renderer", None) is None:
        raise CheckpointError(f"{model.path}: this IP-LAP checkpoint holds only the landmark generator; "
                              f"lip-sync needs the renderer too: python -m talkformer_core.convert iplap "
                              f"--landmark-generator L.pth --renderer R.pth --out M.safetensors")


# ---------------------------------------------------------------------------------------------
# input builders (what the networks receive, IP-LAP's conventions exactly)
# ---------------------------------------------------------------------------------------------


def mel_index(position: int, num_windows: int) -> int:
    """Index into ``audio.mel_windows``'s per-frame windows that gives IP-LAP's mel for output
    position p: chunk max(0, p - 2) (inf:443) is our window max(p, 2) (window p starts at
    floor(16 (p - 2) / 5), audio/mel.py), capped at the last window."""
    return int(min(max(int(position), 2), num_windows - 1))


def box_hw(box: Sequence[int]) -> tuple[int, int]:
    """(h, w) of a landmark box (x1, y1, x2, y2): the crop IP-LAP cuts and draws the sketch for."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return y2 - y1, x2 - x1


@dataclass
class IPLAPReferences:
    """The renderer's references, fixed for the whole video (inf:374-416)."""

    frames: np.ndarray  # (N,) template frame indices, ranked by lip openness (ascending)
    images: np.ndarray  # (N, 3, 128, 128) float32 BGR / 255: landmark-box crops
    sketches: np.ndarray  # (N, 3, 128, 128) float32: sketches of their detected 131 points


def reference_frames(analysis: Any, n: int = DEFAULT_RENDER_REFERENCES) -> np.ndarray:
    """Template frames of the renderer's n references: frames ranked by lip openness, the ones at
    ranks int(linspace(0, L-1, n)) (inf:342-351, 374); frames without a face are never picked."""
    if int(n) < 1:
        raise InputError(f"IP-LAP references {n}: expected >= 1 (IP-LAP uses 25)")
    return iplap.select_references(analysis.openness, int(n))


def build_references(analysis: Any, read_frame: Callable[[int], np.ndarray],
                     n: int = DEFAULT_RENDER_REFERENCES) -> IPLAPReferences:
    """Crop and sketch the n reference frames. ``read_frame(t)`` -> template frame t, uint8 RGB."""
    idx = reference_frames(analysis, n)
    cache: dict[int, np.ndarray] = {}
    images = []
    for t in idx.tolist():
        if t not in cache:
            cache[t] = iplap.crop_face(read_frame(t), analysis.landmark_boxes[t])
        images.append(cache[t])
    boxes = analysis.landmark_boxes[idx]
    sketches = iplap.draw_sketches(analysis.points_box(idx), [box_hw(b) for b in boxes])
    return IPLAPReferences(idx, np.stack(images), sketches)


@torch.no_grad()
def window_landmarks(model: Any, analysis: Any, windows: np.ndarray, plan: np.ndarray, positions: Sequence[int],
                     references: np.ndarray) -> np.ndarray:
    """Landmark completion over the 5-frame window of each output position (inf:434-472).

    windows (M, 80, 16) per-frame mel windows; plan (T,) template frame of each output position;
    references (Nl, 131, 2) box frame. -> (len(positions), 5, 131, 2) float32: for each position,
    the 5 window frames' detected pose with the predicted jaw and lips, each in its own box frame.
    """
    T = len(plan)
    pos = np.asarray(positions, dtype=np.int64)
    if pos.size == 0:
        return np.zeros((0, WINDOW, 131, 2), np.float32)
    win = np.array([iplap.window(int(t), T) for t in pos], dtype=np.int64)  # (B, 5) output positions
    tmpl = np.asarray(plan, dtype=np.int64)[win]  # (B, 5) template frames
    mel_idx = np.vectorize(lambda p: mel_index(p, len(windows)))(win)
    dev = model.device
    mels = torch.as_tensor(np.ascontiguousarray(windows[mel_idx]), device=dev)[:, :, None]  # (B, 5, 1, 80, 16)
    pose = torch.as_tensor(analysis.points_box(tmpl)[..., list(topology.POSE_POS), :], device=dev)  # (B, 5, 74, 2)
    refs = torch.as_tensor(references, dtype=torch.float32, device=dev)[None].expand(len(pos), -1, -1, -1)
    # fp32 as pipeline.complete_landmarks: 13.7 M parameters, coordinates want the precision
    return model.landmark.complete(mels.float(), pose.float(), refs).float().cpu().numpy()


def target_sketches(landmarks5: np.ndarray, boxes5: np.ndarray) -> np.ndarray:
    """(5, 131, 2) box-frame landmarks of a window and the 5 frames' landmark boxes (5, 4) ->
    (5, 3, 128, 128) float32 sketches, each on its own frame's canvas (inf:474-489)."""
    return iplap.draw_sketches(landmarks5, [box_hw(b) for b in boxes5])


def renderer_inputs(face: np.ndarray, sketches5: np.ndarray, references: IPLAPReferences, mel: np.ndarray,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """One frame's renderer inputs in IP-LAP's shapes (inf:491-501): face (1, 1, 3, 128, 128),
    target sketches (1, 5, 3, 128, 128), reference images and sketches (1, N, 3, 128, 128),
    mel (1, 1, 1, 80, 16). face from ``iplap.crop_face`` (BGR / 255, lower half NOT zeroed: the
    renderer zeroes it, vr.py:359)."""
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)  # noqa: E731
    return (t(face)[None, None], t(sketches5)[None], t(references.images)[None], t(references.sketches)[None],
            t(mel)[None, None, None])


@torch.no_grad()
def render(model: Any, faces: np.ndarray, sketches: np.ndarray, references: IPLAPReferences,
           mels: np.ndarray) -> np.ndarray:
    """Run IPLAPRenderer on B frames: faces (B, 3, 128, 128), sketches (B, 5, 3, 128, 128), mels
    (B, 80, 16) -> generated faces (B, 3, 128, 128) float32, BGR in [0, 1]."""
    dev = model.device
    B = len(faces)
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=dev)  # noqa: E731
    ref_img = t(references.images)[None].expand(B, -1, -1, -1, -1)
    ref_sk = t(references.sketches)[None].expand(B, -1, -1, -1, -1)
    with model.autocast():
        gen, _ = model.model.renderer(t(faces)[:, None], t(sketches), ref_img, ref_sk, t(mels)[:, None, None])
    return gen.float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# paste back
# ---------------------------------------------------------------------------------------------


@contextmanager
def interrupt_points(module: nn.Module, callback: Callable[[], None] | None, every_s: float = 0.25):
    """While the block runs, ``callback()`` is called before a submodule's forward whenever
    ``every_s`` seconds have passed since the last call: raising from it stops the forward pass
    mid-way (the host's Cancel) instead of after a whole batch."""
    if callback is None:
        yield
        return
    last = [time.monotonic()]

    def hook(_m: nn.Module, _args: Any) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            callback()

    handles = [m.register_forward_pre_hook(hook) for m in module.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def face_contour_mask(points_px: np.ndarray, box: Sequence[int], blur: int | None = None) -> np.ndarray:
    """(h, w) float32 alpha in [0, 1] over the landmark box: the filled convex hull of ``points_px``
    (K, 2) frame pixels, Gaussian-blurred with a (2 blur + 1)^2 kernel and sigma blur + 1 (default
    blur 10: IP-LAP's 21x21, sigma 11, inf:126). Points are clipped to the box."""
    b = IPLAP_BLUR if blur is None else int(blur)
    if b < 0:
        raise InputError(f"feather {b}: expected >= 0 (the face-contour blur half-width in frame pixels)")
    x1, y1, x2, y2 = (int(v) for v in box)
    h, w = y2 - y1, x2 - x1
    p = np.asarray(points_px, dtype=np.float64).reshape(-1, 2) - (x1, y1)
    p = p[np.all(np.isfinite(p), axis=1)]
    mask = np.zeros((h, w), np.float32)
    if len(p) < 3:
        return mask
    p[:, 0] = np.clip(p[:, 0], 0, w - 1)
    p[:, 1] = np.clip(p[:, 1], 0, h - 1)
    hull = cv2.convexHull(np.rint(p).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 1.0)
    if b > 0:
        mask = cv2.GaussianBlur(mask, (2 * b + 1, 2 * b + 1), b + 1.0, borderType=cv2.BORDER_CONSTANT)
    return np.clip(mask, 0.0, 1.0)


def paste_face(frame: np.ndarray, face_rgb: np.ndarray, box: Sequence[int], mask: np.ndarray) -> np.ndarray:
    """Resize the generated face (S, S, 3) uint8 RGB into the landmark box (bilinear, as inf:506) and
    blend it there: out = frame (1 - a) + face a, rounded. Pixels outside the box are bit-identical."""
    x1, y1, x2, y2 = (int(v) for v in box)
    h, w = y2 - y1, x2 - x1
    if mask.shape != (h, w):
        raise InputError(f"paste_face: mask {mask.shape} does not match the box {h}x{w}")
    out = frame.copy()
    face = cv2.resize(face_rgb, (w, h)).astype(np.float32)  # INTER_LINEAR
    a = mask[..., None]
    roi = out[y1:y2, x1:x2].astype(np.float32)
    out[y1:y2, x1:x2] = np.clip(np.rint(roi * (1.0 - a) + face * a), 0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# the frame renderer the streaming orchestrator calls per chunk
# ---------------------------------------------------------------------------------------------


class IPLAPFrameRenderer:
    """Renders output frames k0..k1 of ``pipeline.lipsync``'s plan with IP-LAP's networks.

    Built once per video after the analysis pass (it reads the reference frames with
    ``read_frame``); then ``__call__(frames, k0, k1, found, step_callback)`` -> (output frames,
    the last generated face (128, 128, 3) RGB or None, watermark boxes (x0, y0, side) per frame).
    Memory: the references (N x 2 x 3 x 128 x 128 floats) and one batch of frames.
    """

    check = staticmethod(check_renderable)

    def __init__(self, model: Any, analysis: Any, audio: Any, plan: np.ndarray,
                 read_frame: Callable[[int], np.ndarray], options: Any):
        check_renderable(model)
        self.model, self.analysis, self.plan = model, analysis, np.asarray(plan, dtype=np.int64)
        self.windows = audio.windows
        n_lm = getattr(options, "num_references", None) or model.num_references
        self.landmark_refs = reference_landmark_sets(analysis, int(n_lm))  # (Nl, 131, 2)
        n_img = getattr(options, "iplap_references", None) or DEFAULT_RENDER_REFERENCES
        self.references = build_references(analysis, read_frame, int(n_img))
        # one frame at a time on a CPU: the progress bar then moves every frame (a batch of 8 with 25
        # references is minutes of silence), at the same seconds per frame
        self.batch = 1 if model.device.type == "cpu" else max(1, int(getattr(options, "batch_size", 1) or 1))
        self.blur = getattr(options, "feather", None)
        face_contour_mask(np.zeros((0, 2)), (0, 0, 1, 1), self.blur)  # checks the feather now

    def __call__(self, frames: Sequence[np.ndarray], k0: int, k1: int, found: np.ndarray,
                 step_callback: Callable[[int, int], None] | None = None
                 ) -> tuple[list[np.ndarray], np.ndarray | None, list[tuple[float, float, float]]]:
        a = self.analysis
        out = [np.array(f, copy=True) for f in frames]
        tmpl = self.plan[k0:k1]
        boxes = a.landmark_boxes[tmpl]
        # the watermark goes where detect.py looks for it: the face track's square box, as on the
        # TalkFormer path (provenance.face_region), not the landmark box
        marks = [tuple(float(v) for v in b) for b in a.boxes[tmpl]]
        sel = np.flatnonzero(np.asarray(found, dtype=bool))
        preview = None
        n_batches = math.ceil(len(sel) / self.batch)
        # a frame costs seconds on a CPU (one flow pass per reference): the callback also runs
        # between the renderer's layers, so a stop request is honoured within a fraction of a second
        within = (lambda: step_callback(bi, n_batches)) if step_callback is not None else None  # noqa: E731
        bi = 0
        for bi, b0 in enumerate(range(0, len(sel), self.batch)):
            bsel = sel[b0:b0 + self.batch]
            positions = k0 + bsel
            lms = window_landmarks(self.model, a, self.windows, self.plan, positions, self.landmark_refs)
            win = np.array([iplap.window(int(t), len(self.plan)) for t in positions])  # (B, 5)
            sketches = np.stack([target_sketches(lms[j], a.landmark_boxes[self.plan[win[j]]])
                                 for j in range(len(bsel))])
            faces = np.stack([iplap.crop_face(frames[i], boxes[i]) for i in bsel])
            mels = self.windows[[mel_index(t, len(self.windows)) for t in positions]]
            with interrupt_points(self.model.model.renderer, within):
                gen = render(self.model, faces, sketches, self.references, mels)  # (B, 3, 128, 128) BGR
            for j, i in enumerate(bsel):
                face = iplap.face_to_rgb_uint8(gen[j])
                box = boxes[i]
                detected = a.track.points131_filled[tmpl[i]][list(CONTOUR_POSITIONS)]
                predicted_jaw = topology.denormalize(lms[j, WINDOW // 2][list(JAW_POSITIONS)].astype(np.float64),
                                                     box.astype(np.float64))
                mask = face_contour_mask(np.concatenate([detected, predicted_jaw]), box, self.blur)
                out[i] = paste_face(frames[i], face, box, mask)
                preview = face
            if step_callback is not None:
                step_callback(bi + 1, n_batches)  # progress and the interrupt point between batches
        return out, preview, marks


__all__ = [
    "KIND", "IPLAPModel", "load_iplap_model", "check_renderable", "mel_index", "box_hw", "IPLAPReferences",
    "reference_frames", "build_references", "window_landmarks", "target_sketches", "renderer_inputs", "render",
    "face_contour_mask", "paste_face", "IPLAPFrameRenderer", "DEFAULT_RENDER_REFERENCES",
]

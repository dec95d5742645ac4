"""Synthetic talking data with exact truth.

From any real face photo, a clip whose audio is a sequence of synthesised vowels, nasals and
silences (a numpy source-filter synthesiser: a glottal pulse train through formant resonators) and
whose frames warp the lower face to a known mouth opening and width per frame:

- the photo's 478 face-mesh points are found once with mediapipe;
- per frame, lip, jaw and chin points move by a displacement that is an exact function of
  (opening, width); a fixed ring of points around the face keeps the rest of the image still;
- the image is warped piecewise-affinely over the Delaunay triangles of those points (a
  backward map interpolated linearly inside each triangle, then ``cv2.remap``), and the inner-lip
  polygon is filled with a dark mouth interior;
- a small smooth head motion (similarity transform) moves the whole frame.

The true 478 landmarks, opening and width of every frame are returned with the frames. Everything
is deterministic from the seed. Audio and mouth are aligned in time: the mouth trajectory is the
phoneme targets smoothed with a 40 ms Gaussian (coarticulation), sampled at the frame times.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000

# Phonemes: (F1, F2, F3) formants in Hz (Peterson & Barney averages), voice amplitude, and the mouth
# target (opening in [0, 1], width in [-1, 1]: negative = rounded/narrow, positive = spread).
PHONEMES: dict[str, tuple[tuple[float, float, float], float, float, float]] = {
    "a": ((730.0, 1090.0, 2440.0), 1.0, 0.95, 0.25),
    "e": ((530.0, 1840.0, 2480.0), 0.9, 0.55, 0.55),
    "i": ((270.0, 2290.0, 3010.0), 0.8, 0.22, 0.85),
    "o": ((570.0, 840.0, 2410.0), 0.9, 0.65, -0.65),
    "u": ((300.0, 870.0, 2240.0), 0.8, 0.18, -0.9),
    "m": ((250.0, 1100.0, 2100.0), 0.35, 0.0, 0.0),  # nasal: lips closed, murmur
    "n": ((250.0, 1500.0, 2300.0), 0.35, 0.08, 0.1),
    "_": ((0.0, 0.0, 0.0), 0.0, 0.0, 0.0),  # silence: closed mouth
}
VOWELS = "aeiou"


@dataclass
class SyntheticClip:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    audio: np.ndarray  # (n,) float32, 16 kHz mono
    fps: float
    opening: np.ndarray  # (T,) mouth opening in [0, 1]
    width: np.ndarray  # (T,) mouth width in [-1, 1]
    points478: np.ndarray  # (T, 478, 2) true landmarks in pixels of the frames
    opening_px: np.ndarray  # (T,) true inner-lip gap in pixels (points 13-14 distance)
    phonemes: list[tuple[str, float, float]]  # (phoneme, start s, end s)


# ----------------------------------------------------------------------------------------------
# audio: source-filter synthesis


def phoneme_sequence(duration: float, rng: np.random.Generator) -> list[tuple[str, float, float]]:
    """Random syllables (nasal/silence onsets, vowel nuclei) covering ``duration`` seconds."""
    seq: list[tuple[str, float, float]] = []
    t = 0.0
    while t < duration:
        r = rng.random()
        if r < 0.15:
            ph, d = "_", rng.uniform(0.15, 0.4)
        elif r < 0.35:
            ph, d = str(rng.choice(["m", "n"])), rng.uniform(0.08, 0.16)
        else:
            ph, d = str(rng.choice(list(VOWELS))), rng.uniform(0.14, 0.3)
        seq.append((ph, t, min(t + d, duration)))
        t += d
    return seq


def _resonator(x: np.ndarray, freq: float, bw: float, sr: int) -> np.ndarray:
    from scipy.signal import lfilter

    r = np.exp(-np.pi * bw / sr)
    theta = 2 * np.pi * freq / sr
    a = [1.0, -2 * r * np.cos(theta), r * r]
    b = [1.0 - r]  # roughly unit gain near the resonance
    return lfilter(b, a, x)


def synthesize_audio(seq: list[tuple[str, float, float]], duration: float, rng: np.random.Generator,
                     sr: int = SAMPLE_RATE) -> np.ndarray:
    """A glottal pulse train (f0 with slow drift) through three formant resonators per phoneme."""
    n = int(round(duration * sr))
    out = np.zeros(n)
    f0_base = rng.uniform(105, 140)
    for ph, t0, t1 in seq:
        formants, amp, _, _ = PHONEMES[ph]
        i0, i1 = int(t0 * sr), min(int(t1 * sr), n)
        if amp == 0 or i1 <= i0:
            continue
        m = i1 - i0
        tt = np.arange(m) / sr + t0
        f0 = f0_base * (1 + 0.04 * np.sin(2 * np.pi * 0.7 * tt) + 0.01 * rng.standard_normal())
        phase = np.cumsum(f0 / sr)
        src = (np.diff(np.floor(phase), prepend=np.floor(phase[0])) > 0).astype(float)  # pulses
        src += 0.02 * rng.standard_normal(m)  # aspiration noise
        y = np.zeros(m)
        for k, f in enumerate(formants):
            y += _resonator(src, f, 80.0 + 40.0 * k, sr) / (k + 1)
        ramp = min(int(0.015 * sr), m // 2)
        env = np.ones(m)
        if ramp > 0:
            env[:ramp] = np.linspace(0, 1, ramp)
            env[-ramp:] = np.linspace(1, 0, ramp)
        y *= env * amp / (np.abs(y).max() + 1e-9)
        out[i0:i1] += y
    out += 1e-4 * rng.standard_normal(n)  # silence is near-zero, not digital zero
    return (0.5 * out / max(np.abs(out).max(), 1e-9)).astype(np.float32)


def mouth_trajectory(seq, num_frames: int, fps: float, smooth_s: float = 0.04):
    """Phoneme mouth targets on a 1 ms grid, Gaussian-smoothed, sampled at the frame times."""
    from scipy.ndimage import gaussian_filter1d

    grid = 1000
    dur = num_frames / fps
    n = int(np.ceil(dur * grid)) + 1
    o = np.zeros(n)
    w = np.zeros(n)
    for ph, t0, t1 in seq:
        _, _, op, wd = PHONEMES[ph]
        o[int(t0 * grid):int(t1 * grid)] = op
        w[int(t0 * grid):int(t1 * grid)] = wd
    o = gaussian_filter1d(o, smooth_s * grid, mode="nearest")
    w = gaussian_filter1d(w, smooth_s * grid, mode="nearest")
    idx = np.minimum((np.arange(num_frames) / fps * grid).round().astype(int), n - 1)
    return o[idx].astype(np.float32), w[idx].astype(np.float32)


# ----------------------------------------------------------------------------------------------
# face: deformation of the landmarks and piecewise-affine warp

UPPER_LIP = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
INNER_LIP_LOOP = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95]
MOUTH_CORNERS = (61, 291)
LOWER_LIP = [375, 321, 405, 314, 17, 84, 181, 91, 146, 324, 318, 402, 317, 14, 87, 178, 88, 95]


def detect_photo_landmarks(image: np.ndarray) -> np.ndarray:
    """The 478 face-mesh points of a still photo, in pixels (static-image mode)."""
    from ..errors import FaceError
    from ..face.landmarks import detect_image

    pts, found = detect_image(image)
    if not found:
        raise FaceError("synthetic data: no face found in the photo; expected a frontal face photo")
    return pts[:, :2].astype(np.float64)


def deform_points(p0: np.ndarray, opening: float, width: float) -> np.ndarray:
    """Move lip, jaw and chin points for a mouth (opening, width). p0: (478, 2) px.

    At opening 0 the inner lips meet (the photo's own gap, if any, is closed); at opening 1 the
    lower lip drops by 0.55 mouth widths. The lower lip moves as a whole (no stretching), tapering
    towards the corners; chin and jaw follow, fading out sideways and above the mouth line.
    """
    p = p0.copy()
    cl, cr = p0[MOUTH_CORNERS[0]], p0[MOUTH_CORNERS[1]]
    centre = (cl + cr) / 2
    w0 = np.linalg.norm(cr - cl)
    g0 = max(float(p0[14, 1] - p0[13, 1]), 0.0)  # the photo's own inner-lip gap
    dy = 0.55 * w0 * opening - g0
    rel = p0 - centre
    idx = np.arange(len(p0))
    lateral = np.exp(-(rel[:, 0] / (1.1 * w0)) ** 2)
    ramp = np.clip(rel[:, 1] / (0.25 * w0), 0, 1)
    s = np.where(rel[:, 1] > 0, ramp * lateral, 0.0)
    lip_taper = np.clip(1 - 0.6 * (rel[:, 0] / (0.5 * w0)) ** 2, 0.2, 1)
    lower = np.isin(idx, LOWER_LIP)
    s = np.where(lower, lip_taper, s)
    p[:, 1] += dy * s
    upper = np.isin(idx, UPPER_LIP) & ~np.isin(idx, MOUTH_CORNERS)
    p[:, 1] -= np.where(upper, 0.12 * 0.55 * w0 * opening * lip_taper, 0.0)
    # width: spread or round the lips around the mouth centre (corners move most)
    near = np.exp(-((rel[:, 0] / (0.9 * w0)) ** 2 + (rel[:, 1] / (0.6 * w0)) ** 2))
    p[:, 0] += rel[:, 0] * 0.22 * width * near
    return p


def _ring(p0: np.ndarray, shape: tuple[int, int], n: int = 24) -> np.ndarray:
    """Fixed anchor points: a ring well around the face plus the image corners and edge midpoints."""
    c = p0.mean(0)
    r = 1.6 * np.abs(p0 - c).max(0)
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = c + np.stack([r[0] * np.cos(a), r[1] * np.sin(a)], 1)
    h, w = shape
    border = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1], [w / 2, 0], [w / 2, h - 1],
                       [0, h / 2], [w - 1, h / 2]], float)
    return np.concatenate([ring, border])


class FaceWarper:
    """Backward piecewise-affine warp from the deformed points to the photo's points."""

    def __init__(self, image: np.ndarray, p0: np.ndarray):
        from scipy.spatial import Delaunay

        self.image = image
        self.p0 = p0
        h, w = image.shape[:2]
        self.anchors = _ring(p0, (h, w))
        src = np.concatenate([p0, self.anchors])
        self.tri = Delaunay(src).simplices  # fixed topology: the triangles of the rest shape
        # only pixels inside the ring move: restrict the map to its bounding box
        x0, y0 = np.floor(np.clip(self.anchors[:24].min(0), 0, [w - 1, h - 1])).astype(int)
        x1, y1 = np.ceil(np.clip(self.anchors[:24].max(0), 0, [w - 1, h - 1])).astype(int)
        self.box = (x0, y0, x1 + 1, y1 + 1)

    def warp(self, p: np.ndarray) -> np.ndarray:
        """The photo warped so that its points ``p0`` land on ``p`` (478, 2) px.

        Piecewise affine over the rest shape's fixed triangles: each pixel of the output is labelled
        with the deformed triangle that covers it (``cv2.fillConvexPoly`` into an id map), and its
        source position is that triangle's affine map (deformed -> rest) applied to it; pixels in
        no triangle stay where they are. (An earlier version re-triangulated the deformed points
        with scipy's LinearNDInterpolator every frame: the same map for small deformations, 20x
        slower.)
        """
        import cv2

        x0, y0, x1, y1 = self.box
        dst = np.concatenate([p, self.anchors])  # (V, 2) deformed
        src = np.concatenate([self.p0, self.anchors])  # (V, 2) rest
        tri = self.tri  # (M, 3)
        # affine per triangle: A_k [x, y, 1]^T (deformed) = source (x, y); solve the 3x3 systems
        d = np.concatenate([dst[tri], np.ones(tri.shape + (1,))], axis=2)  # (M, 3, 3)
        det = np.linalg.det(d)
        ok = np.abs(det) > 1e-9  # degenerate (collapsed) triangles cover no pixel
        aff = np.zeros((len(tri), 3, 2))
        aff[ok] = np.linalg.solve(d[ok], src[tri][ok])  # (M, 3, 2): [x y 1] @ aff = (sx, sy)
        ids = np.full((y1 - y0, x1 - x0), -1, np.int32)
        for k in np.flatnonzero(ok):
            poly = np.round((dst[tri[k]] - (x0, y0)) * 16).astype(np.int32)
            cv2.fillConvexPoly(ids, poly, int(k), lineType=cv2.LINE_8, shift=4)
        gx, gy = np.meshgrid(np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64))
        a = aff[np.maximum(ids, 0)]  # (h, w, 3, 2)
        mx = gx * a[..., 0, 0] + gy * a[..., 1, 0] + a[..., 2, 0]
        my = gx * a[..., 0, 1] + gy * a[..., 1, 1] + a[..., 2, 1]
        none = ids < 0
        mx[none] = gx[none]
        my[none] = gy[none]
        out = self.image.copy()
        out[y0:y1, x0:x1] = cv2.remap(self.image, mx.astype(np.float32), my.astype(np.float32),
                                      cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        return out


def _mouth_interior(frame: np.ndarray, p: np.ndarray, opening: float) -> None:
    """Fill the inner-lip polygon with a dark interior (in place), anti-aliased."""
    import cv2

    if np.linalg.norm(p[13] - p[14]) < 0.5:  # closed lips: no interior to show
        return
    poly = np.round(p[INNER_LIP_LOOP] * 16).astype(np.int32)
    mask = np.zeros(frame.shape[:2], np.uint8)
    cv2.fillPoly(mask, [poly], 255, lineType=cv2.LINE_AA, shift=4)
    a = (mask.astype(np.float32) / 255.0)[..., None]
    dark = np.array([38, 14, 16], np.float32)
    frame[:] = (frame * (1 - a) + dark * a).round().astype(np.uint8)


def _head_motion(num_frames: int, fps: float, rng: np.random.Generator, amp_px: float, amp_deg: float):
    t = np.arange(num_frames) / fps
    f = rng.uniform(0.15, 0.4, size=3)
    ph = rng.uniform(0, 2 * np.pi, size=3)
    dx = amp_px * np.sin(2 * np.pi * f[0] * t + ph[0])
    dy = 0.6 * amp_px * np.sin(2 * np.pi * f[1] * t + ph[1])
    rot = amp_deg * np.sin(2 * np.pi * f[2] * t + ph[2])
    return dx, dy, rot


def face_square(image: np.ndarray, frame_size: int, face_scale: float = 2.4):
    """Crop a photo to a square around its face and resize to frame_size (so the face is large)."""
    import cv2

    p = detect_photo_landmarks(image)
    c = (p.min(0) + p.max(0)) / 2
    side = face_scale * (p.max(0) - p.min(0)).max()
    m = np.array([[frame_size / side, 0, frame_size / 2 - c[0] * frame_size / side],
                  [0, frame_size / side, frame_size / 2 - c[1] * frame_size / side]])
    return cv2.warpAffine(image, m, (frame_size, frame_size), flags=cv2.INTER_AREA,
                          borderMode=cv2.BORDER_REFLECT)


def make_clip(photo: np.ndarray, seed: int = 0, duration: float = 4.0, fps: float = 25.0,
              frame_size: int | None = 256, head_motion_px: float = 2.0, head_motion_deg: float = 1.0,
              phonemes: list[tuple[str, float, float]] | None = None) -> SyntheticClip:
    """A deterministic synthetic talking clip of ``photo`` (RGB uint8)."""
    import cv2

    rng = np.random.default_rng(seed)
    image = face_square(photo, frame_size) if frame_size else np.ascontiguousarray(photo)
    p0 = detect_photo_landmarks(image)
    warper = FaceWarper(image, p0)
    n = int(round(duration * fps))
    seq = phonemes if phonemes is not None else phoneme_sequence(duration, rng)
    audio = synthesize_audio(seq, n / fps, rng)
    opening, width = mouth_trajectory(seq, n, fps)
    dx, dy, rot = _head_motion(n, fps, rng, head_motion_px, head_motion_deg)
    h, w = image.shape[:2]
    frames = np.empty((n, h, w, 3), np.uint8)
    pts = np.empty((n, 478, 2), np.float32)
    gap = np.empty(n, np.float32)
    for i in range(n):
        p = deform_points(p0, float(opening[i]), float(width[i]))
        f = warper.warp(p)
        _mouth_interior(f, p, float(opening[i]))
        m = cv2.getRotationMatrix2D((w / 2, h / 2), float(rot[i]), 1.0)
        m[:, 2] += (dx[i], dy[i])
        frames[i] = cv2.warpAffine(f, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        q = p @ m[:, :2].T + m[:, 2]
        pts[i] = q
        gap[i] = np.linalg.norm(q[13] - q[14])
    return SyntheticClip(frames, audio, fps, opening, width, pts, gap, seq)


def write_clip(clip: SyntheticClip, path: str | Path, crf: int = 12) -> Path:
    """Write the clip as an mp4 (h264 + AAC) and its truth beside it (``.truth.npz``)."""
    from ..video import VideoWriter

    path = Path(path)
    with VideoWriter(path, clip.fps, audio=clip.audio, audio_rate=SAMPLE_RATE, crf=crf,
                     metadata={"comment": "talkformer synthetic clip"}) as wr:
        for f in clip.frames:
            wr.write(f)
    np.savez_compressed(path.with_suffix(".truth.npz"), opening=clip.opening, width=clip.width,
                        points478=clip.points478, opening_px=clip.opening_px, fps=clip.fps,
                        audio=clip.audio)
    return path


def load_photo(name_or_path: str) -> np.ndarray:
    """``astronaut`` (scikit-image's public-domain NASA photo) or an image file path."""
    if name_or_path == "astronaut":
        from skimage.data import astronaut

        return astronaut()
    import cv2

    from ..errors import InputError

    img = cv2.imread(str(name_or_path), cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(f"{name_or_path}: cannot read the photo; expected an image file (png, jpg)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def build_parser() -> argparse.ArgumentParser:
    from ..clitools import parser

    ap = parser("data.synthetic", "Make synthetic talking clips with exact truth (mouth opening, landmarks).")
    ap.add_argument("--photo", default="astronaut", help="'astronaut' (scikit-image's public-domain photo) or an image path")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num-clips", type=int, default=4, help="clips to make (seeds SEED, SEED+1, ...)")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per clip")
    ap.add_argument("--size", type=int, default=256, help="frame side in pixels")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first clip")
    return ap


def main(argv=None) -> int:
    from ..clitools import run

    a = build_parser().parse_args(argv)
    return run(lambda: _main(a))


def _main(a: argparse.Namespace) -> int:
    from ..paths import check_output_dir

    out = check_output_dir(a.out)
    photo = load_photo(a.photo)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(a.num_clips):
        clip = make_clip(photo, seed=a.seed + k, duration=a.duration, frame_size=a.size)
        p = write_clip(clip, out / f"synthetic_{a.seed + k:04d}.mp4")
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

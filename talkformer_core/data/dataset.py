"""Training dataset over preprocessed shards (paper §III-D, IP-LAP's sampling).

``TalkingFaceDataset(shard_dir, cfg)`` indexes every window of L successive frames whose frames
all have a face (``found``); windows are restricted to a part of each clip with
``frames=(start_frac, end_frac)`` (e.g. (0, 0.8) for training and (0.8, 1) for a hold-out test).

A sample (dict of tensors; L = cfg.model.sequence_length, N = num_reference_landmarks, S = image_size):

    crops           (L, 3, S, S)      float32 in [-1, 1]   ground-truth face crops
    masked          (L, 3, S, S)      float32 in [-1, 1]   the same with rows [S//2:] set to -1 (black)
    mels            (L, 1, 80, 16)    float32              mel windows of the L frames
    pose            (L, 74, 2)        float32  box frame   the upper-face points (POSE_POS)
    target_box      (L, 131, 2)       float32  box frame   ground-truth 131 points (completion target)
    target_crop     (L, 131, 2)       float32  crop frame  the same in the crop frame (M-Align, w/o End2End)
    landmark_box    (L, 4)            float32  px          stage 1's landmark box (x1, y1, x2, y2): IP-LAP's
                                                           per-frame box, or with ``model.landmark_box``
                                                           "stable" (default) one that ignores the jaw
    crop_box        (L, 3)            float32  px          crop box (x0, y0, size)
                    (box -> crop: ``face.topology.box_to_crop(p, landmark_box, crop_box)``, per frame)
    reference       (3, S, S)         float32 in [-1, 1]   one crop of the clip outside the window
    ref_landmarks   (N, 131, 2)       float32  box frame   N landmark sets outside the window
    frame_index     (L,)              int64                frame numbers in the clip
    clip_index      ()                int64
    reference_index ()                int64                frame number of ``reference`` in the clip

Reference frames (the appearance reference and the N landmark sets) are frames of the same clip
(inside ``frames``) outside the window with a face. Training (``deterministic=False``): random, as
the paper and IP-LAP do; ``deterministic=True``: the N sets spread over lip openness (IP-LAP's
inference rule, ``topology.pick_spread``) and the reference crop the frame farthest from the window.
Frames with found=False are never targets (windows containing one are not indexed) nor references.

Randomness is a pure function of (seed, epoch, index): ``dataset[(index, epoch)]`` (the training
batch sampler passes these) or ``dataset[index]`` (epoch 0). So a resumed or multi-process run
draws exactly the same samples, with no RNG state to carry.

Clips are loaded on first use and kept in memory (``np.load`` of uncompressed .npz files).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import TalkFormerConfig
from ..errors import InputError
from ..face import topology
from ..pixels import mask_lower_face, to_signed

SHARD_KEYS = ("crops", "points131_box", "points131_crop", "crop_boxes", "landmark_boxes", "found", "mels")


def list_shards(shard_dir: str | Path) -> list[Path]:
    d = Path(shard_dir)
    if not d.is_dir():
        raise InputError(f"{d}: no such shard folder; expected the --out folder of data.preprocess")
    files = sorted(p for p in d.glob("*.npz") if not p.name.startswith("."))
    if not files:
        raise InputError(f"{d}: no shards (*.npz) found; run python -m talkformer_core.data.preprocess first")
    return files


def load_shard(path: str | Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in SHARD_KEYS if k not in z.files]
            if missing:
                raise InputError(f"{path}: not a TalkFormer shard (missing {missing})")
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable shard ({e})") from e


@dataclass
class _Clip:
    path: Path
    num_frames: int
    lo: int  # first usable frame (frames=(start_frac, ...))
    hi: int  # one past the last usable frame
    found: np.ndarray  # (T,) bool


def stage1_box_frame(d: dict[str, np.ndarray], lo: int = 0, hi: int | None = None) -> dict[str, np.ndarray]:
    """A shard's arrays with ``landmark_boxes`` / ``points131_box`` redone in the stable box of
    ``topology.stable_landmark_boxes`` (constants from the found frames in [lo, hi)), the box
    ``pipeline.complete_landmarks`` forms on the template: stage 1 trains as it runs."""
    lb = d["landmark_boxes"].astype(np.float64)
    px = (d["points131_px"].astype(np.float64) if "points131_px" in d
          else topology.denormalize(d["points131_box"].astype(np.float64), lb))
    H, W = (int(v) for v in d["frame_size"]) if "frame_size" in d else (int(lb[:, 3].max()), int(lb[:, 2].max()))
    found = d["found"].astype(bool)
    valid = np.zeros(len(px), bool)
    valid[lo:hi] = found[lo:hi]
    if not valid.any():
        valid = found
    boxes = topology.stable_landmark_boxes(px, W, H, valid=valid)
    return {**d, "landmark_boxes": boxes, "points131_box": topology.normalize(px, boxes).astype(np.float32)}


def _to_image(x: np.ndarray) -> torch.Tensor:
    """uint8 (..., S, S, 3) -> float (..., 3, S, S) in [-1, 1]."""
    return to_signed(torch.from_numpy(np.ascontiguousarray(x))).movedim(-1, -3)


class TalkingFaceDataset(Dataset):
    """L-frame windows of preprocessed clips; see the module docstring for every tensor."""

    def __init__(self, shard_dir: str | Path, cfg: TalkFormerConfig, split: str = "train",
                 frames: tuple[float, float] = (0.0, 1.0), deterministic: bool | None = None,
                 seed: int = 0, cache: bool = True):
        self.cfg = cfg
        self.L = int(cfg.model.sequence_length)
        self.N = int(cfg.model.num_reference_landmarks)
        self.S = int(cfg.model.image_size)
        self.split = split
        self.deterministic = (split != "train") if deterministic is None else bool(deterministic)
        self.seed = int(seed)
        self.cache = cache
        # False: "crops", "masked" (L, 0) and "reference" (0,) are empty; for a training step that
        # reads cached latents (train.LatentCache), where the images would only cost CPU time
        self.images = True
        self._data: dict[int, dict[str, np.ndarray]] = {}
        self.box_mode = str(cfg.model.landmark_box)
        if self.box_mode not in topology.LANDMARK_BOX_MODES:
            raise InputError(f"config model.landmark_box {self.box_mode!r}: expected one of "
                             f"{topology.LANDMARK_BOX_MODES}")
        a, b = frames
        if not 0.0 <= a < b <= 1.0:
            raise InputError(f"frames={frames}: expected 0 <= start_frac < end_frac <= 1")
        self.clips: list[_Clip] = []
        self.windows: list[tuple[int, int]] = []  # (clip, first frame)
        for path in list_shards(shard_dir):
            with np.load(path, allow_pickle=False) as z:
                if "crops" not in z.files or "found" not in z.files:
                    raise InputError(f"{path}: not a TalkFormer shard (no crops / found)")
                found = z["found"].astype(bool)
                S = z["crops"].shape[1] if z["crops"].ndim == 4 else -1
            if S != self.S:
                raise InputError(f"{path}: crops are {S}x{S}, the config's image_size is {self.S}; "
                                 f"preprocess with --crop-size {self.S}")
            T = len(found)
            lo, hi = int(round(a * T)), int(round(b * T))
            ci = len(self.clips)
            self.clips.append(_Clip(path, T, lo, hi, found))
            # a window needs L found frames, and at least one found frame outside it for references
            ok = found[lo:hi]
            for s in range(lo, hi - self.L + 1):
                if ok[s - lo:s - lo + self.L].all() and ok.sum() > self.L:
                    self.windows.append((ci, s))
        if not self.windows:
            raise InputError(f"{shard_dir}: no window of {self.L} successive frames with a face in frames {frames}")

    def __len__(self) -> int:
        return len(self.windows)

    def openness(self) -> np.ndarray:
        """(len,) each window's middle frame's lip opening (box frame): what
        TrainConfig.balance_openness balances the windows by."""
        out = np.empty(len(self.windows))
        for i, (ci, s) in enumerate(self.windows):
            out[i] = topology.lip_openness(self.clip_arrays(ci)["points131_box"][s + self.L // 2].astype(np.float64))
        return out

    def clip_arrays(self, ci: int) -> dict[str, np.ndarray]:
        d = self._data.get(ci)
        if d is None:
            d = load_shard(self.clips[ci].path)
            if self.box_mode == "stable":
                d = stage1_box_frame(d, self.clips[ci].lo, self.clips[ci].hi)
            if self.cache:
                self._data[ci] = d
        return d

    def _rng(self, index: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index])

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = (item, 0) if isinstance(item, (int, np.integer)) else (int(item[0]), int(item[1]))
        ci, s = self.windows[index]
        clip = self.clips[ci]
        d = self.clip_arrays(ci)
        L, N = self.L, self.N
        win = np.arange(s, s + L)
        cand = np.arange(clip.lo, clip.hi)
        cand = cand[clip.found[clip.lo:clip.hi] & ((cand < s) | (cand >= s + L))]  # found, outside
        rng = self._rng(index, epoch)
        if self.deterministic:
            opn = topology.lip_openness(d["points131_box"][cand].astype(np.float64))  # (M,)
            refs = cand[topology.pick_spread(opn, N)]
            ref_frame = cand[np.argmax(np.abs(cand - (s + L // 2)))]
        else:
            refs = rng.choice(cand, size=N, replace=len(cand) < N)
            ref_frame = int(rng.choice(cand))

        if self.images:
            crops = _to_image(d["crops"][win])  # (L, 3, S, S)
            masked = mask_lower_face(crops)
            reference = _to_image(d["crops"][ref_frame])  # (3, S, S)
        else:
            crops = masked = torch.zeros(L, 0)
            reference = torch.zeros(0)
        box = d["points131_box"][win].astype(np.float32)  # (L, 131, 2)
        return {
            "crops": crops,
            "masked": masked,
            "mels": torch.from_numpy(d["mels"][win].astype(np.float32)).unsqueeze(1),  # (L, 1, 80, 16)
            "pose": torch.from_numpy(box[:, list(topology.POSE_POS)]),  # (L, 74, 2)
            "target_box": torch.from_numpy(box),
            "target_crop": torch.from_numpy(d["points131_crop"][win].astype(np.float32)),
            "landmark_box": torch.from_numpy(d["landmark_boxes"][win].astype(np.float32)),  # (L, 4)
            "crop_box": torch.from_numpy(d["crop_boxes"][win].astype(np.float32)),  # (L, 3)
            "reference": reference,
            "ref_landmarks": torch.from_numpy(d["points131_box"][refs].astype(np.float32)),  # (N, 131, 2)
            "frame_index": torch.from_numpy(win.astype(np.int64)),
            "clip_index": torch.tensor(ci, dtype=torch.int64),
            "reference_index": torch.tensor(int(ref_frame), dtype=torch.int64),
        }


class FrameDataset(Dataset):
    """Single face crops for the autoencoder stage: item -> {"crops": (3, S, S) float in [-1, 1],
    "landmarks": (131, 2) crop frame in [0, 1], "found": () bool} (landmarks are zeros where no face
    was found; TrainConfig.autoencoder_mouth_weight weights the lips' box only where found).

    Every frame of every clip inside ``frames`` (with or without a found face: the crop is an
    image either way). Accepts ``(index, epoch)`` items like TalkingFaceDataset.
    """

    def __init__(self, shard_dir: str | Path, cfg: TalkFormerConfig, frames: tuple[float, float] = (0.0, 1.0)):
        self.S = int(cfg.model.image_size)
        self.crops: list[np.ndarray] = []
        self.points: list[np.ndarray] = []
        self.found: list[np.ndarray] = []
        self.index: list[tuple[int, int]] = []
        for path in list_shards(shard_dir):
            d = load_shard(path)
            c = d["crops"]
            if c.shape[1] != self.S:
                raise InputError(f"{path}: crops are {c.shape[1]}x{c.shape[1]}, the config's image_size is {self.S}")
            T = len(c)
            lo, hi = int(round(frames[0] * T)), int(round(frames[1] * T))
            ci = len(self.crops)
            self.crops.append(c)
            found = d["found"].astype(bool)
            self.found.append(found)
            self.points.append(np.where(found[:, None, None], np.nan_to_num(d["points131_crop"]), 0.0).astype(np.float32))
            self.index += [(ci, t) for t in range(lo, hi)]
        if not self.index:
            raise InputError(f"{shard_dir}: no frames in {frames}")

    def __len__(self) -> int:
        return len(self.index)

    def openness(self) -> np.ndarray:
        """(len,) each frame's lip opening (crop frame; nan without a face)."""
        return np.array([topology.lip_openness(self.points[ci][t].astype(np.float64)) if self.found[ci][t]
                         else np.nan for ci, t in self.index])

    def __getitem__(self, item: Any) -> dict[str, torch.Tensor]:
        index = item if isinstance(item, (int, np.integer)) else int(item[0])
        ci, t = self.index[index]
        return {"crops": _to_image(self.crops[ci][t]), "landmarks": torch.from_numpy(self.points[ci][t]),
                "found": torch.tensor(bool(self.found[ci][t]))}

"""SyncScore with SyncNet v2 (Chung & Zisserman 2016), as joonson/syncnet_python computes it.

Network: ``SyncNetModel.S`` (layout read from syncnet_python SyncNetModel.py): ``netcnnaud`` (2-D
convs over a (1, 13, 20) MFCC window), ``netfcaud``, ``netcnnlip`` (3-D convs over 5 frames of
3 x 224 x 224), ``netfclip``; state dict keys ``netcnnaud.0.weight`` ... as in ``syncnet_v2.model``.

Preprocessing (SyncNetInstance.evaluate and run_pipeline.crop_video):
  video: 25 fps face crops resized to 224x224, **BGR** (read with cv2), float 0..255, no
         normalisation, 5-frame windows (N, 3, 5, 224, 224); the crop is the whole face with
         room below the chin (crop_video: 2.8 x the half-size of the S3FD box). Our face track's
         crop (1.6 x the face width, centre moved down 0.2 x) frames the face the same way.
  audio: 16 kHz mono int16 samples -> python_speech_features.mfcc defaults (25 ms rectangular
         window, 10 ms step, 512-point FFT, 26 mel filters 0..8 kHz, pre-emphasis 0.97,
         13 cepstra, lifter 22, c0 = log frame energy) -> (13, M); window for video frame i is
         MFCC columns [4 i, 4 i + 20).
  score: features for i in range(0, min(T, floor(n / 640)) - 5); for each shift in -vshift..vshift
         (vshift 15 as run_syncnet.py) the mean over frames of the L2 distance between the
         frame's lip feature and the shifted audio feature (zero-padded); offset = vshift - argmin,
         min_dist = the minimum (LSE-D), confidence = median - min (LSE-C, the "Sync" score).
The MFCC is our numpy port (``mfcc``), equal to python_speech_features 0.6 (tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .weights import load_into, load_state_dict_file

SAMPLE_RATE = 16000
VIDEO_FPS = 25.0
CROP = 224


# ----------------------------------------------------------------------------- MFCC (numpy)

def _hz2mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel2hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(nfilt: int = 26, nfft: int = 512, samplerate: int = SAMPLE_RATE,
                   lowfreq: float = 0.0, highfreq: float | None = None) -> np.ndarray:
    """python_speech_features.get_filterbanks: triangles on floor((nfft+1) f / sr) bins. (nfilt, nfft//2+1)"""
    highfreq = highfreq or samplerate / 2
    mel = np.linspace(_hz2mel(lowfreq), _hz2mel(highfreq), nfilt + 2)
    bins = np.floor((nfft + 1) * _mel2hz(mel) / samplerate)
    fb = np.zeros((nfilt, nfft // 2 + 1))
    i = np.arange(nfft // 2 + 1, dtype=np.float64)
    for j in range(nfilt):
        lo, c, hi = bins[j], bins[j + 1], bins[j + 2]
        up = (i >= lo) & (i < c)
        down = (i >= c) & (i < hi)
        fb[j, up] = (i[up] - lo) / (c - lo)
        fb[j, down] = (hi - i[down]) / (hi - c)
    return fb


def mfcc(signal: np.ndarray, samplerate: int = SAMPLE_RATE, winlen: float = 0.025, winstep: float = 0.01,
         numcep: int = 13, nfilt: int = 26, nfft: int = 512, preemph: float = 0.97,
         ceplifter: int = 22) -> np.ndarray:
    """python_speech_features.mfcc with its defaults (append energy, rectangular window). (N,) -> (M, numcep)."""
    from scipy.fft import dct

    x = np.asarray(signal, dtype=np.float64).reshape(-1)
    x = np.append(x[0], x[1:] - preemph * x[:-1])  # sigproc.preemphasis
    flen = int(math.floor(winlen * samplerate + 0.5))  # round_half_up
    fstep = int(math.floor(winstep * samplerate + 0.5))
    n = 1 if len(x) <= flen else 1 + int(math.ceil((len(x) - flen) / fstep))
    pad = (n - 1) * fstep + flen
    x = np.concatenate([x, np.zeros(pad - len(x))])
    frames = x[np.arange(flen)[None, :] + fstep * np.arange(n)[:, None]]  # (M, flen) sigproc.framesig
    pspec = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft  # (M, nfft//2+1) sigproc.powspec
    eps = np.finfo(float).eps
    energy = pspec.sum(axis=1)
    energy = np.where(energy == 0, eps, energy)
    feat = pspec @ mel_filterbank(nfilt, nfft, samplerate).T  # (M, nfilt)
    feat = np.where(feat == 0, eps, feat)
    feat = dct(np.log(feat), type=2, axis=1, norm="ortho")[:, :numcep]
    if ceplifter > 0:
        feat = feat * (1 + (ceplifter / 2.0) * np.sin(np.pi * np.arange(numcep) / ceplifter))
    feat[:, 0] = np.log(energy)
    return feat


def syncnet_mfcc(wav16k: np.ndarray) -> np.ndarray:
    """float waveform at 16 kHz in [-1, 1] -> (13, M) MFCC on the int16 scale syncnet_python
    feeds (scipy.io.wavfile of a pcm_s16le wav)."""
    pcm = np.clip(np.round(np.asarray(wav16k, dtype=np.float64) * 32768.0), -32768, 32767)
    return mfcc(pcm).T


# ----------------------------------------------------------------------------- network

class SyncNet(nn.Module):
    """syncnet_python SyncNetModel.S (num_layers_in_fc_layers = 1024)."""

    def __init__(self, fc_dim: int = 1024):
        super().__init__()
        self.netcnnaud = nn.Sequential(
            nn.Conv2d(1, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(1, 1),
            nn.Conv2d(64, 192, 3, 1, 1), nn.BatchNorm2d(192), nn.ReLU(inplace=True), nn.MaxPool2d(3, (1, 2)),
            nn.Conv2d(192, 384, 3, padding=1), nn.BatchNorm2d(384), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 512, (5, 4), padding=0), nn.BatchNorm2d(512), nn.ReLU(),
        )
        self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, fc_dim))
        self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, fc_dim))
        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, 96, (5, 7, 7), (1, 2, 2), 0), nn.BatchNorm3d(96), nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            nn.Conv3d(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            nn.Conv3d(256, 512, (1, 6, 6), padding=0), nn.BatchNorm3d(512), nn.ReLU(inplace=True),
        )
        self.requires_grad_(False)
        self.eval()

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 13, 20) MFCC windows -> (N, fc_dim)."""
        return self.netfcaud(self.netcnnaud(x).flatten(1))  # (N, 512, 1, 1) -> (N, 512)

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 5, 224, 224) BGR 0..255 -> (N, fc_dim)."""
        return self.netfclip(self.netcnnlip(x).flatten(1))  # (N, 512, 1, 1, 1) -> (N, 512)


def load_syncnet(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> SyncNet:
    """``syncnet_v2.model`` (a pickled state dict; read with weights_only=True) or safetensors."""
    sd = load_state_dict_file(path, "SyncNet v2 weights (syncnet_v2.model: netcnnaud.*, netfcaud.*, netcnnlip.*, netfclip.*)")
    fc = sd.get("netfcaud.3.weight")
    model = SyncNet(fc_dim=int(fc.shape[0]) if fc is not None else 1024)
    load_into(model, sd, path, "SyncNet v2 weights (syncnet_python SyncNetModel.S)")
    return model.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------- scoring

@dataclass
class SyncResult:
    offset: int  # frames; audio leads video by this much (syncnet_python's "AV offset")
    confidence: float  # median - min of the mean distances (LSE-C)
    min_dist: float  # the minimum mean distance (LSE-D)
    frames: int  # number of 5-frame windows scored
    dists: np.ndarray  # (frames, 2 vshift + 1) per-frame distances at each shift

    def as_dict(self) -> dict:
        return {"offset": self.offset, "confidence": self.confidence, "min_dist": self.min_dist, "frames": self.frames}


def sync_offset(im_feat: torch.Tensor, cc_feat: torch.Tensor, vshift: int = 15) -> SyncResult:
    """syncnet_python calc_pdist + the offset/confidence lines of SyncNetInstance.evaluate."""
    win = 2 * vshift + 1
    ccp = F.pad(cc_feat, (0, 0, vshift, vshift))  # (N + 2 vshift, D)
    idx = torch.arange(len(im_feat))[:, None] + torch.arange(win)[None, :]  # (N, win)
    dists = torch.linalg.vector_norm(im_feat[:, None, :] - ccp[idx] + 1e-6, dim=-1)  # pairwise_distance eps
    mdist = dists.mean(0)  # (win,)
    minval, minidx = torch.min(mdist, 0)
    conf = torch.median(mdist) - minval
    return SyncResult(offset=int(vshift - int(minidx)), confidence=float(conf), min_dist=float(minval),
                      frames=int(len(im_feat)), dists=dists.numpy())


class SyncScorer:
    """Streams 224x224 RGB face crops; ``result(wav16k)`` gives the SyncScore of the sequence.

    Lip features are computed as 5-frame windows fill, so only 4 crops are held at a time.
    """

    def __init__(self, net: SyncNet, batch: int = 20):
        self.net = net
        self.batch = batch
        self._tail: list[np.ndarray] = []  # last <= 4 BGR crops (224, 224, 3)
        self._pending: list[np.ndarray] = []  # windows (5, 224, 224, 3) waiting for a batch
        self._feats: list[torch.Tensor] = []
        self.num_frames = 0

    @torch.no_grad()
    def _flush(self) -> None:
        if not self._pending:
            return
        p = next(self.net.parameters())
        x = torch.from_numpy(np.stack(self._pending)).to(p.device)  # (N, 5, 224, 224, 3)
        x = x.permute(0, 4, 1, 2, 3).to(p.dtype)  # (N, 3, 5, 224, 224), 0..255 BGR
        self._feats.append(self.net.forward_lip(x).float().cpu())
        self._pending = []

    def add(self, crops_rgb: Iterable[np.ndarray]) -> None:
        for c in crops_rgb:
            c = np.asarray(c)
            if c.shape != (CROP, CROP, 3):
                import cv2

                c = cv2.resize(c, (CROP, CROP), interpolation=cv2.INTER_LINEAR)
            self._tail.append(np.ascontiguousarray(c[..., ::-1]))  # RGB -> BGR as cv2.imread
            self.num_frames += 1
            if len(self._tail) == 5:
                self._pending.append(np.stack(self._tail))
                self._tail.pop(0)
                if len(self._pending) >= self.batch:
                    self._flush()

    @torch.no_grad()
    def result(self, wav16k: np.ndarray, vshift: int = 15) -> SyncResult:
        self._flush()
        cc = syncnet_mfcc(wav16k)  # (13, M)
        min_length = min(self.num_frames, int(math.floor(len(wav16k) / 640)))
        lastframe = min_length - 5  # syncnet_python scores windows range(0, lastframe)
        if lastframe < 1:
            raise ValueError(f"SyncScore needs at least 6 frames of video and audio, got {min_length}")
        im_feat = torch.cat(self._feats, 0)[:lastframe]
        p = next(self.net.parameters())
        cct = torch.from_numpy(cc).to(device=p.device, dtype=p.dtype)
        need = 4 * (lastframe - 1) + 20
        if cct.shape[1] < need:  # M = ceil-framed count, always enough; guard odd inputs anyway
            cct = F.pad(cct, (0, need - cct.shape[1]))
        cc_win = torch.stack([cct[:, 4 * i:4 * i + 20] for i in range(lastframe)])[:, None]  # (N, 1, 13, 20)
        cc_feat = torch.cat([self.net.forward_aud(cc_win[s:s + self.batch]).float().cpu()
                             for s in range(0, lastframe, self.batch)])
        return sync_offset(im_feat, cc_feat, vshift=vshift)

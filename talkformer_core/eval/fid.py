"""FID: the TF-ported Inception-v3 of pytorch-fid and the Fréchet distance.

``FIDInception`` reproduces pytorch-fid's ``fid_inception_v3`` (src/pytorch_fid/inception.py):
torchvision's Inception3 layout (``Conv2d_1a_3x3.conv.weight``, ``.bn.*``, ``Mixed_5b.branch1x1...``)
with the FID patches: average pools that exclude padding in the A/C/E blocks
(FIDInceptionA/C/E_1) and a max pool in the last E block (FIDInceptionE_2). It loads
``pt_inception-2015-12-05-6726825d.pth`` from a path the user gives (``fc.*``, the 1008-way
classifier, is ignored) and returns the 2048-d final average-pool features (block index 3).
Input: RGB in [0, 1], resized bilinearly to 299x299 (resize_input=True) and scaled to [-1, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .weights import load_into, load_state_dict_file


class BasicConv2d(nn.Module):
    """torchvision.models.inception.BasicConv2d: conv (no bias) -> BN(eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool does not count the zero padding (pytorch-fid "Patch" comments)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # FIDInceptionA
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):  # torchvision InceptionB (Mixed_6a), unpatched
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):  # FIDInceptionC
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = m(bd)
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):  # torchvision InceptionD (Mixed_7a), unpatched
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # FIDInceptionE_1 (max_pool=False) / FIDInceptionE_2 (max_pool=True)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        # FIDInceptionE_2 uses a max pool here (the TF graph's quirk), E_1 the padding-free average
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInception(nn.Module):
    """pytorch-fid InceptionV3(output_blocks=[3]) over the FID weights: images -> (B, 2048)."""

    def __init__(self, resize_input: bool = True):
        super().__init__()
        self.resize_input = resize_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) RGB in [0, 1] -> (B, 2048) pool features."""
        if self.resize_input:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # block 0 -> (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # block 1 -> (B, 192, 35, 35)
        for m in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                  self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = m(x)  # block 2 -> (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # AdaptiveAvgPool2d(1) -> (B, 2048)

    @torch.no_grad()
    def features_uint8(self, images: np.ndarray, batch: int = 16) -> np.ndarray:
        """uint8 (T, H, W, 3) RGB -> float64 (T, 2048)."""
        p = next(self.parameters())
        out = []
        for s in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch])).to(p.device).permute(0, 3, 1, 2)
            out.append(self(x.to(p.dtype) / 255.0).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))


def load_fid_inception(path: str | Path, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, resize_input: bool = True) -> FIDInception:
    """pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or the same keys in safetensors)."""
    model = FIDInception(resize_input=resize_input)
    sd = load_state_dict_file(path, "pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    load_into(model, sd, path, "pytorch-fid's FID Inception (pt_inception-2015-12-05-6726825d.pth)",
              ignore_prefixes=("fc.", "AuxLogits."))
    return model.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------- statistics

def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> mean (D,), covariance (D, D) (rowvar=False, N - 1 normalisation, as pytorch-fid)."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature vectors, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (pytorch-fid calculate_frechet_distance).

    As there, a product that is singular gets eps * I added to both covariances; a complex
    square root keeps its real part (pytorch-fid raises when the imaginary part exceeds 1e-3; few
    frames make S1 S2 rank-deficient, where that happens harmlessly, so we keep the real part).
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"FID: mismatched statistics {mu1.shape} / {mu2.shape}, {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = np.real(covmean)
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two sets of (N, D) features, with their sample means and covariances.

    Same value as ``frechet_distance(*feature_stats(f1), *feature_stats(f2))`` (pytorch-fid's
    formula), computed without a D x D matrix square root: with centred features A1, A2 and
    S_i = A_i^T A_i / (N_i - 1), the non-zero eigenvalues of S1 S2 are those of B B^T with
    B = A1 A2^T / sqrt((N1 - 1)(N2 - 1)), so Tr((S1 S2)^(1/2)) is the nuclear norm of B, an
    N1 x N2 matrix. Exact, stable, and fast when N < D (a video's frames against 2048 features).
    """
    a1, a2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    if a1.ndim != 2 or a2.ndim != 2 or a1.shape[1] != a2.shape[1] or min(len(a1), len(a2)) < 2:
        raise ValueError(f"FID needs two (N >= 2, D) feature sets of the same D, got {a1.shape} and {a2.shape}")
    if min(len(a1), len(a2)) > a1.shape[1]:  # more samples than dimensions: the D x D route is cheaper
        m1, c1 = feature_stats(a1)
        m2, c2 = feature_stats(a2)
        return frechet_distance(m1, c1, m2, c2)
    mu1, mu2 = a1.mean(0), a2.mean(0)
    c1, c2 = a1 - mu1, a2 - mu2  # (N1, D), (N2, D)
    n1, n2 = len(a1) - 1, len(a2) - 1
    tr1, tr2 = float((c1 * c1).sum()) / n1, float((c2 * c2).sum()) / n2  # Tr S1, Tr S2
    b = (c1 @ c2.T) / np.sqrt(n1 * n2)  # (N1, N2)
    tr_covmean = float(np.linalg.svd(b, compute_uv=False).sum())
    diff = mu1 - mu2
    return float(diff.dot(diff) + tr1 + tr2 - 2.0 * tr_covmean)

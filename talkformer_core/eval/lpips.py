"""LPIPS (Zhang et al. 2018, v0.1) with our own AlexNet / VGG16 feature stacks.

Layouts follow the public code so users' files load as they are:
  backbone: torchvision's ``alexnet`` / ``vgg16`` state dict, keys ``features.N.weight|bias``
            (``classifier.*`` is ignored), e.g. alexnet-owt-7be5be79.pth / vgg16-397923af.pth;
  heads:    the lpips package's v0.1 linear heads, keys ``lin{k}.model.1.weight`` of shape
            (1, C_k, 1, 1) (lpips/weights/v0.1/alex.pth or vgg.pth).
A full ``lpips.LPIPS`` state dict (``net.slice{j}.N.*`` + ``lin{k}.*``) is accepted too.
Forward as in lpips/lpips.py (LPIPS.forward, v0.1): inputs in [-1, 1] -> ScalingLayer ->
five ReLU taps -> unit-normalise over channels -> squared difference -> 1x1 head -> spatial mean
-> sum over layers. Nothing is downloaded: weights come from the user's files.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..pixels import to_signed
from .weights import load_into, load_state_dict_file

# (torchvision features index of the last module of each tap, channels per tap)
_TAPS = {
    "alex": ((1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),  # relu1..relu5 (pretrained_networks.alexnet)
    "vgg": ((3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),  # relu1_2 .. relu5_3 (pretrained_networks.vgg16)
}


def _alexnet_features() -> nn.Sequential:
    """torchvision.models.alexnet().features (indices 0..12)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )


def _vgg16_features() -> nn.Sequential:
    """torchvision.models.vgg16().features (indices 0..30, config D, no batch norm)."""
    layers: list[nn.Module] = []
    c = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=True)]
            c = int(v)
    return nn.Sequential(*layers)


class NetLinLayer(nn.Module):
    """lpips.NetLinLayer with use_dropout=True: ``model.0`` Dropout (no weights), ``model.1`` 1x1 conv."""

    def __init__(self, chn_in: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS distance; ``net`` is "alex" or "vgg"."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in _TAPS:
            raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
        self.net_name = net
        self.features = _alexnet_features() if net == "alex" else _vgg16_features()
        self.taps, chns = _TAPS[net]
        for k, c in enumerate(chns):
            self.add_module(f"lin{k}", NetLinLayer(c))
        # lpips.ScalingLayer: [-1, 1] RGB -> ImageNet-normalised
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = (x - self.shift) / self.scale
        last = self.taps[-1]
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
            if i == last:
                break
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """x0, x1 (B, 3, H, W) RGB in [-1, 1] -> (B,) distances."""
        f0, f1 = self._taps(x0), self._taps(x1)
        total = x0.new_zeros(x0.shape[0])
        for k, (a, b) in enumerate(zip(f0, f1)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # lpips.normalize_tensor
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = getattr(self, f"lin{k}")((a - b) ** 2)  # (B, 1, h, w)
            total = total + d.mean(dim=(1, 2, 3))
        return total

    @torch.no_grad()
    def distance_uint8(self, a: "np.ndarray", b: "np.ndarray", batch: int = 16) -> "np.ndarray":  # noqa: F821
        """uint8 (T, H, W, 3) RGB pairs -> float64 (T,) LPIPS, computed in batches."""
        import numpy as np

        p = next(self.parameters())
        out = []
        for s in range(0, len(a), batch):
            x0 = torch.from_numpy(np.ascontiguousarray(a[s:s + batch])).to(p.device).permute(0, 3, 1, 2)
            x1 = torch.from_numpy(np.ascontiguousarray(b[s:s + batch])).to(p.device).permute(0, 3, 1, 2)
            x0, x1 = to_signed(x0, p.dtype), to_signed(x1, p.dtype)  # (B, 3, H, W) in [-1, 1]
            out.append(self(x0, x1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def _net_from_heads(sd: dict[str, torch.Tensor]) -> str | None:
    w = sd.get("lin1.model.1.weight")
    if w is None:
        return None
    return {192: "alex", 128: "vgg"}.get(int(w.shape[1]))


def load_lpips(backbone: str | Path, heads: str | Path | None = None, net: str | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LPIPS:
    """Build LPIPS from a torchvision backbone file and the lpips v0.1 heads file.

    ``net`` ("alex" | "vgg") is read from the heads' channel counts when not given. ``heads`` may
    be omitted when ``backbone`` is a full lpips.LPIPS state dict holding both.
    """
    bsd = load_state_dict_file(backbone, "an AlexNet/VGG16 backbone (torchvision keys features.N.*)")
    # a full lpips.LPIPS state dict: net.slice{j}.{N}.{weight,bias} -> features.{N}.*
    if any(k.startswith("net.slice") for k in bsd):
        bsd = {re.sub(r"^net\.slice\d+\.", "features.", k): v for k, v in bsd.items()}
    hsd = {k: v for k, v in bsd.items() if k.startswith("lin")}
    if heads is not None:
        hsd = load_state_dict_file(heads, "LPIPS v0.1 linear heads (keys lin{k}.model.1.weight)")
    if not hsd:
        raise CheckpointError(f"{backbone}: no LPIPS linear heads given (--lpips-heads) and none inside this file")
    guess = _net_from_heads(hsd)
    if net is None:
        net = guess
    if net is None:
        raise CheckpointError(f"{heads}: cannot tell the LPIPS network from lin1.model.1.weight; expected 192 (alex) or 128 (vgg) channels")
    model = LPIPS(net)
    sd = {k: v for k, v in bsd.items() if k.startswith("features.")}
    if not sd:
        raise CheckpointError(f"{backbone}: expected a torchvision {net} state dict with keys features.N.weight, found none")
    load_into(model.features, {k[len("features."):]: v for k, v in sd.items()}, backbone, f"a torchvision {net} backbone")
    heads_mod = nn.ModuleDict({f"lin{k}": getattr(model, f"lin{k}") for k in range(5)})
    load_into(heads_mod, hsd, heads if heads is not None else backbone, f"LPIPS v0.1 heads for {net}")
    return model.to(device=device, dtype=dtype).eval()

"""Landmark completion (paper §III-B): audio + pose + N reference landmark sets -> lips and jaw.

The paper's stage 1 "follows [11]", i.e. IP-LAP's landmark generator (same authors). This module
has exactly the state-dict keys and shapes of IP-LAP's ``Landmark_generator`` (Weizhi-Zhong/IP_LAP,
commit 9b9dc03, ``models/landmark_generator.py``; Apache-2.0) and computes the same function, so
IP-LAP's published weights load into it. Written anew; ``file:line`` below cites that file.

Pipeline of ``LandmarkGenerator.forward`` (IP-LAP's layouts, x in row 0 and y in row 1):

    mel windows  (B, T, 1, 80, 16) --2-D conv stack--> (B, T, D) --LayerNorm--+ pos + modality 2
    pose         (B, T, 2, 74)     --1-D conv stack--> (B, T, D) --LayerNorm--+ pos + modality 1
    references   (B, N, 2, 131)    --1-D conv stack--> (B, N, D) --LayerNorm--+       modality 3
    tokens [N reference | T audio | T pose] -> post-norm transformer encoder
    audio-token outputs -> 40 lip points, pose-token outputs -> 17 jaw points -> (B*T, 2, 57)

Differences from IP-LAP that do not change the function or the weights: positional and modality
ids are built on the input's device (IP-LAP calls ``.cuda()``, :95-101) and from the input's T
(IP-LAP uses the constructor's T, so it only runs with T = 5); any N works (reference tokens carry
no position). ``LandmarkCompletion`` adds our ``(..., K, 2)`` / ``FULL_131`` conventions around it.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from talkformer_core.config import LandmarkConfig
from talkformer_core.errors import InputError

# positions within our 131-point order (docs/architecture.md): pose 74, content 57 = jaw 17 then
# lips 40, and NETWORK_ORDER = cat(pose, content) as IP-LAP's network sees it
from talkformer_core.face.topology import CONTENT_POS, NETWORK_ORDER, POSE_POS

# _NET_TO_FULL[p] = index in cat(pose, content) of the point at FULL_131 position p
_NET_TO_FULL = tuple(sorted(range(131), key=lambda j: NETWORK_ORDER[j]))
N_POSE, N_JAW, N_LIPS = 74, 17, 40
N_CONTENT = N_JAW + N_LIPS  # 57
MAX_LEN = 512  # rows of the sinusoid tables (landmark_generator.py:7)


# ------------------------------------------------------------------------------------------------
# building blocks (landmark_generator.py:6-63)

def sinusoid_table(max_len: int, d_model: int) -> torch.Tensor:
    """pe[p, 2i] = sin(p / 10000^(2i/d)), pe[p, 2i+1] = cos(...), as (1, max_len, d) (:6-21)."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # (max_len, 1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe[None]  # (1, max_len, d)


class PositionTable(nn.Module):
    """Holds the sinusoid table as the persistent buffer ``pe`` (key ``position_{v,a}.pe``)."""

    def __init__(self, d_model: int, max_len: int = MAX_LEN):
        super().__init__()
        self.register_buffer("pe", sinusoid_table(max_len, d_model))

    def forward(self, n: int) -> torch.Tensor:
        return self.pe[:, :n]  # (1, n, d)


class ConvBNAct(nn.Module):
    """conv -> BatchNorm (-> + input if residual) -> ReLU or Tanh (:26-63).

    The conv and BN sit in ``conv_block`` (keys ``conv_block.0`` / ``conv_block.1``) as in IP-LAP.
    """

    def __init__(self, dims: Literal[1, 2], cin: int, cout: int, kernel: int, stride, padding: int,
                 residual: bool = False, act: Literal["relu", "tanh"] = "relu"):
        super().__init__()
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.conv_block = nn.Sequential(conv(cin, cout, kernel, stride, padding), bn(cout))
        self.act = nn.ReLU() if act == "relu" else nn.Tanh()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_block(x)
        if self.residual:
            y = y + x  # the skip is added before the activation
        return self.act(y)


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names and maths
    (packed ``in_proj_weight``/``in_proj_bias``, ``out_proj``), via scaled_dot_product_attention."""

    def __init__(self, d_model: int, nhead: int, dropout: float):
        super().__init__()
        assert d_model % nhead == 0, f"d_model {d_model} is not divisible by nhead {nhead}"
        self.nhead, self.dropout = nhead, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(D, dim=-1)  # 3 x (B, S, D)
        q, k, v = (t.view(B, S, self.nhead, D // self.nhead).transpose(1, 2) for t in (q, k, v))  # (B, h, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, S, D))  # (B, S, D)


class EncoderLayer(nn.Module):
    """Post-norm transformer layer, ReLU feed-forward: the defaults of torch's
    TransformerEncoderLayer(batch_first=True) that IP-LAP uses (:85), same parameter names."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = SelfAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)   # inside the feed-forward
        self.dropout1 = nn.Dropout(dropout)  # on the attention branch
        self.dropout2 = nn.Dropout(dropout)  # on the feed-forward branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, D)
        x = self.norm1(x + self.dropout1(self.self_attn(x)))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout2(ff))


class TransformerStack(nn.Module):
    """``layers.{i}``, no final norm (torch's TransformerEncoder without ``norm``, :86)."""

    def __init__(self, d_model: int, nlayers: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, nhead, dim_feedforward, dropout)
                                    for _ in range(nlayers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


POSE, AUDIO, REFERENCE = 1, 2, 3  # modality ids; 0 is the (unused) padding row (:83)


class FusionTransformer(nn.Module):
    """Token assembly and the transformer (``Fusion_transformer_encoder``, :76-109)."""

    def __init__(self, d_model: int, nlayers: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.position_v = PositionTable(d_model)  # pose tokens
        self.position_a = PositionTable(d_model)  # audio tokens (identical table, its own buffer)
        self.modality = nn.Embedding(4, d_model, padding_idx=0)
        self.dropout = nn.Dropout(dropout)
        self.transformer_encoder = TransformerStack(d_model, nlayers, nhead, dim_feedforward, dropout)

    def forward(self, ref: torch.Tensor, audio: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        # ref (B, N, D), audio (B, T, D), pose (B, T, D)
        T = audio.shape[1]
        ids = torch.tensor([POSE, AUDIO, REFERENCE], device=ref.device)
        m_pose, m_audio, m_ref = self.modality(ids).unbind(0)  # 3 x (D,)
        pose_tok = pose + self.position_v(T) + m_pose      # (B, T, D)   :98
        audio_tok = audio + self.position_a(T) + m_audio   # (B, T, D)   :99
        ref_tok = ref + m_ref                              # (B, N, D)   :100-101, no position
        tokens = torch.cat([ref_tok, audio_tok, pose_tok], dim=1)  # (B, N+2T, D)  :104
        return self.transformer_encoder(self.dropout(tokens))      # (B, N+2T, D)


def _channels(c: int, width: float) -> int:
    return c if width == 1.0 else max(4, int(round(c * width)))


# (cin, cout, kernel, stride, padding, residual) per block; the last cout is d_model.
_MEL = [  # (B*T, 1, 80, 16) -> (B*T, D, 1, 1)   :115-133
    (1, 32, 3, 1, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True),
    (32, 64, 3, (3, 1), 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),     # 27 x 16
    (64, 128, 3, 3, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),     # 9 x 6
    (128, 256, 3, (3, 2), 1, False), (256, 256, 3, 1, 1, True),                          # 3 x 3
    (256, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False),                              # 1 x 1
]
_REF = [  # (B*N, 2, 131) -> (B*N, D, 1)   :135-163
    (2, 4, 3, 1, 1, False),
    (4, 8, 3, 2, 1, False), (8, 8, 3, 1, 1, True), (8, 8, 3, 1, 1, True),                # 66
    (8, 16, 3, 2, 1, False), (16, 16, 3, 1, 1, True), (16, 16, 3, 1, 1, True),           # 33
    (16, 32, 3, 2, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True),          # 17
    (32, 64, 3, 2, 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),          # 9
    (64, 128, 3, 2, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),     # 5
    (128, 256, 3, 2, 1, False), (256, 256, 3, 1, 1, True),                               # 3
    (256, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False),                              # 1
]
_POSE = [  # (B*T, 2, 74) -> (B*T, D, 1)   :164-193
    (2, 4, 3, 1, 1, False),
    (4, 8, 3, 1, 1, False), (8, 8, 3, 1, 1, True), (8, 8, 3, 1, 1, True),                # 74
    (8, 16, 3, 2, 1, False), (16, 16, 3, 1, 1, True), (16, 16, 3, 1, 1, True),           # 37
    (16, 32, 3, 2, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True),          # 19
    (32, 64, 3, 2, 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),          # 10
    (64, 128, 3, 2, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),     # 5
    (128, 256, 3, 2, 1, False), (256, 256, 3, 1, 1, True), (256, 256, 3, 1, 1, True),    # 3
    (256, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, True),                               # 1 (residual!)
]


def conv_stack(dims: Literal[1, 2], spec: list, d_model: int, width: float) -> nn.Sequential:
    """A conv encoder; the last block ends in Tanh. ``width`` scales every channel count except
    the input's and the output's (= d_model); width 1 with d_model 512 is IP-LAP's layout."""
    def ch(c: int) -> int:
        return d_model if c == 512 else (c if c <= 2 else _channels(c, width))
    blocks = [ConvBNAct(dims, ch(ci), ch(co), k, s, p, residual=r,
                        act="tanh" if i == len(spec) - 1 else "relu")
              for i, (ci, co, k, s, p, r) in enumerate(spec)]
    return nn.Sequential(*blocks)


# ------------------------------------------------------------------------------------------------

class LandmarkGenerator(nn.Module):
    """IP-LAP's ``Landmark_generator`` (:112-238): keys, shapes and function.

    With ``LandmarkConfig()`` (d_model 512, 4 layers, 4 heads, ff 1024, dropout 0.1, width 1) it
    has 435 state-dict tensors and 13,724,394 parameters, as ``iplap_layout()`` lists them.
    """

    def __init__(self, cfg: LandmarkConfig | None = None):
        super().__init__()
        cfg = cfg or LandmarkConfig()
        if not 0.0 < cfg.width <= 1.0:
            raise ValueError(f"LandmarkConfig.width must be in (0, 1], got {cfg.width}")
        self.cfg = cfg
        D = cfg.d_model
        self.mel_encoder = conv_stack(2, _MEL, D, cfg.width)
        self.ref_encoder = conv_stack(1, _REF, D, cfg.width)
        self.pose_encoder = conv_stack(1, _POSE, D, cfg.width)
        self.fusion_transformer = FusionTransformer(D, cfg.nlayers, cfg.nhead, cfg.dim_feedforward,
                                                    cfg.dropout)
        self.mouse_keypoint_map = nn.Linear(D, N_LIPS * 2)  # IP-LAP's name ("mouse" = mouth)
        self.jaw_keypoint_map = nn.Linear(D, N_JAW * 2)
        self.Norm = nn.LayerNorm(D)  # one LayerNorm shared by the three embeddings (:201, 219-221)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """IP-LAP's init (:67-73, 200): every Linear xavier-normal with zero bias (transformer
        ones included); torch defaults elsewhere (packed in_proj: xavier-uniform, zero bias)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, SelfAttention):
                nn.init.xavier_uniform_(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)

    def forward(self, T_mels: torch.Tensor, T_pose: torch.Tensor, Nl_pose: torch.Tensor,
                Nl_content: torch.Tensor) -> torch.Tensor:
        """IP-LAP's layouts: T_mels (B, T, 1, 80, 16), T_pose (B, T, 2, 74), Nl_pose (B, N, 2, 74),
        Nl_content (B, N, 2, 57) -> content (B*T, 2, 57), jaw 17 then lips 40, B-major (:203-238)."""
        B, T, N = T_mels.shape[0], T_mels.shape[1], Nl_content.shape[1]
        if T > MAX_LEN:
            raise InputError(f"landmark completion: sequence length {T} exceeds {MAX_LEN} frames")
        ref = torch.cat([Nl_pose, Nl_content], dim=3).flatten(0, 1)  # (B*N, 2, 131)   :208-209
        mel = T_mels.flatten(0, 1)                                    # (B*T, 1, 80, 16)
        pose = T_pose.flatten(0, 1)                                   # (B*T, 2, 74)

        mel_emb = self.Norm(self.mel_encoder(mel).flatten(1))     # (B*T, D)
        pose_emb = self.Norm(self.pose_encoder(pose).flatten(1))  # (B*T, D)
        ref_emb = self.Norm(self.ref_encoder(ref).flatten(1))     # (B*N, D)

        out = self.fusion_transformer(ref_emb.view(B, N, -1), mel_emb.view(B, T, -1),
                                      pose_emb.view(B, T, -1))    # (B, N+2T, D)
        lips = self.mouse_keypoint_map(out[:, N:N + T])           # (B, T, 80)  from audio tokens
        jaw = self.jaw_keypoint_map(out[:, N + T:])               # (B, T, 34)  from pose tokens
        content = torch.cat([jaw, lips], dim=2).view(B * T, N_CONTENT, 2)  # (x, y) pairs  :236
        return content.transpose(1, 2)                            # (B*T, 2, 57)        :237


@lru_cache(maxsize=None)
def _index(order: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(order, dtype=torch.long, device=device)


class LandmarkCompletion(LandmarkGenerator):
    """The completion module in our conventions: landmarks ``(..., K, 2)``, 131 points in
    ``FULL_131`` order, all in IP-LAP's per-frame landmark-box frame (docs/architecture.md).

    A subclass, so the state dict keeps IP-LAP's keys with no prefix. With
    ``LandmarkConfig.mouth_model`` it also holds ``mouth`` (models.mouth_model, buffers only).
    """

    def __init__(self, cfg: LandmarkConfig | None = None):
        super().__init__(cfg)
        self.mouth = None
        if self.cfg.mouth_model:
            from .mouth_model import MouthModel

            self.mouth = MouthModel(self.cfg.mouth_shape_modes)

    def _check(self, mels: torch.Tensor, pose: torch.Tensor, references: torch.Tensor) -> None:
        B, L = pose.shape[:2]
        if mels.dim() != 5 or tuple(mels.shape[:3]) != (B, L, 1) or mels.shape[3] != 80 or mels.shape[4] != 16:
            raise InputError(f"landmark completion: mels must be (B={B}, L={L}, 1, 80, 16), got {tuple(mels.shape)}")
        if pose.dim() != 4 or tuple(pose.shape[2:]) != (N_POSE, 2):
            raise InputError(f"landmark completion: pose must be (B, L, 74, 2), got {tuple(pose.shape)}")
        if references.dim() != 4 or references.shape[0] != B or tuple(references.shape[2:]) != (131, 2):
            raise InputError(f"landmark completion: references must be (B={B}, N, 131, 2), got "
                             f"{tuple(references.shape)}")

    def predict_content(self, mels: torch.Tensor, pose: torch.Tensor,
                        references: torch.Tensor) -> torch.Tensor:
        """mels (B, L, 1, 80, 16), pose (B, L, 74, 2), references (B, N, 131, 2) in FULL_131 order
        -> predicted content (B, L, 57, 2): jaw 17 then lips 40 (FULL_131 positions CONTENT_POS)."""
        self._check(mels, pose, references)
        B, L = pose.shape[:2]
        dev = references.device
        Nl_pose = references.index_select(2, _index(tuple(POSE_POS), dev)).transpose(2, 3)       # (B, N, 2, 74)
        Nl_content = references.index_select(2, _index(tuple(CONTENT_POS), dev)).transpose(2, 3)  # (B, N, 2, 57)
        out = self.forward(mels, pose.transpose(2, 3), Nl_pose, Nl_content)  # (B*L, 2, 57)
        return out.view(B, L, 2, N_CONTENT).transpose(2, 3)                  # (B, L, 57, 2)

    @staticmethod
    def merge(pose: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """pose (..., 74, 2) + content (..., 57, 2) -> (..., 131, 2) in FULL_131 order (exact copy)."""
        net = torch.cat([pose, content], dim=-2)  # (..., 131, 2) in IP-LAP's network order
        return net.index_select(-2, _index(_NET_TO_FULL, net.device))

    def complete(self, mels: torch.Tensor, pose: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """mels (B, L, 1, 80, 16), pose (B, L, 74, 2), references (B, N, 131, 2) -> (B, L, 131, 2):
        the input pose with predicted jaw and lips, in FULL_131 order (inference_single.py:471-472)."""
        return self.merge(pose, self.predict_content(mels, pose, references))

    @staticmethod
    def l1_loss(pred_content: torch.Tensor, target_content: torch.Tensor) -> torch.Tensor:
        """IP-LAP's landmark loss, nn.L1Loss (train_landmarks_generator.py:218, 320): the mean
        absolute error over all coordinates of all frames. Accepts (B, L, 57, 2) or (B*L, 2, 57)."""
        if pred_content.shape != target_content.shape:
            raise InputError(f"l1_loss: shapes differ, {tuple(pred_content.shape)} vs {tuple(target_content.shape)}")
        return F.l1_loss(pred_content, target_content)


def iplap_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of IP-LAP's Landmark_generator(T=5, 512, 4, 4, 1024, 0.1) state dict, in order
    (package data ``iplap_layouts/landmark_generator.json``, from IP-LAP's code)."""
    return {k: tuple(s) for k, s, _ in _layout_json()["state_dict"]}


@lru_cache(maxsize=1)
def _layout_json() -> dict:
    text = resources.files("talkformer_core.models").joinpath("iplap_layouts/landmark_generator.json").read_text()
    return json.loads(text)

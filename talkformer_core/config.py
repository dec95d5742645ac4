"""Typed configs and named presets (tiny for tests, small, paper).

Every ablation of the paper's Tables III and IV is a field here, not a code fork:
``ModelConfig.m_align``, ``r_align``, ``temporal_attention``, ``complete_reference_encoder``,
``TrainConfig.end_to_end``, ``sequence_length`` (L; 1 = w/o B-Sequential) and
``num_reference_landmarks`` (N).  Configs serialise to plain JSON (checkpoint metadata) and
back; unknown keys are an error, so a checkpoint from another version says what differs.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AutoencoderConfig:
    """LDM first-stage KL autoencoder (keys follow latent-diffusion's ``AutoencoderKL``)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)  # downsampling factor = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    resolution: int = 256
    z_channels: int = 3
    embed_dim: int = 3  # latent channels C
    double_z: bool = True
    scale_factor: float = 1.0  # latent = scale_factor * posterior sample (LDM: 1 / std)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class LandmarkConfig:
    """Landmark completion (paper §III-B), IP-LAP's ``Landmark_generator`` layout.

    ``width`` scales the conv encoders' channels and d_model; 1.0 is IP-LAP's exact layout
    (13,724,394 parameters), which ``small`` and ``paper`` keep so IP-LAP's weights load.
    Only ``tiny`` shrinks it.
    """

    d_model: int = 512
    nlayers: int = 4
    nhead: int = 4
    dim_feedforward: int = 1024
    dropout: float = 0.1
    width: float = 1.0


@dataclass
class UNetConfig:
    """Denoising U-Net with TalkFormer blocks at scales 2..I (DESIGN.md §1)."""

    model_channels: int = 224
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)  # I = len(channel_mult) scales
    num_res_blocks: int = 2
    head_channels: int = 32  # channels per attention head
    landmark_dim: int = 256  # width of the 1-D conv landmark embedding (M-Align keys/values)
    dropout: float = 0.0
    num_motion_frames: int = 2  # Temp-Att: frames of the previous clip prepended
    # M-Align positions (our addition, off in every paper-faithful preset): Fourier features of each
    # query token's crop-frame position added to the query input, and of each landmark's coordinates
    # added to its embedding, so attention can match "this place" with "the landmarks near it"
    # directly. Eq. 3's queries see content only and must infer where they are; with a few thousand
    # steps on one person's clip they never do (M-Align stays unused, docs/finetune.md).
    position_features: bool = False
    # Landmark map (our addition, off in every paper-faithful preset): the jaw, outer-lip and
    # inner-lip landmarks drawn as soft dots (Gaussian, sigma half a latent cell, max over points) on
    # the latent grid, 3 channels, added to conv_in's output through their own 3x3 conv. A spatially
    # aligned input a conv reads directly: with M-Align alone, a U-Net trained on one clip on a CPU
    # placed the mouth where the upper face implied and moved it by 0 % of a landmark shift
    # (docs/finetune_results.md, round 4).
    landmark_map: bool = False


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    beta_schedule: str = "linear"  # LDM "linear": linspace(sqrt(b0), sqrt(b1), T) ** 2
    beta_start: float = 0.0015
    beta_end: float = 0.0195


@dataclass
class ModelConfig:
    image_size: int = 256  # face crop side in pixels
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    landmark: LandmarkConfig = field(default_factory=LandmarkConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # ablation switches (paper §IV-D, Tables III/IV)
    m_align: bool = True
    r_align: bool = True
    temporal_attention: bool = False
    complete_reference_encoder: bool = False
    sequence_length: int = 5  # L successive frames (1 = w/o B-Sequential)
    num_reference_landmarks: int = 5  # N reference landmark sets
    # Audio-driven landmarks: slide the predicted jaw and lips sideways so the lips' mean x is the
    # template frame's detected lips' mean x (box frame). Our addition, on in the CPU person presets,
    # off in the paper's: a landmark module trained on one clip places the mouth where the training
    # frames had it (20 px @256 off on held-out frames with the head turned, docs/finetune_results.md
    # round 4). Where the mouth sits sideways is pose, which the template frame shows; what the audio
    # decides (opening, shape) is kept.
    anchor_mouth_x: bool = False

    @property
    def latent_size(self) -> int:
        return self.image_size // self.autoencoder.downsample

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.embed_dim


@dataclass
class TrainConfig:
    lr: float = 4e-5
    batch_size: int = 64
    landmark_loss_weight: float = 10.0  # lambda in eq. 6
    end_to_end: bool = True  # False = w/o End2End: LDM fed ground-truth landmarks, no gradient
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    autoencoder_lr: float = 1e-4
    autoencoder_kl_weight: float = 1e-6
    # Stage talkformer: each training window is shifted sideways by a random whole number of latent
    # cells in [-shift_augment, shift_augment] (z, context and landmarks together; the filled-in
    # border columns carry no loss). 0 = off (the paper's presets: a large dataset has every head
    # position). Our addition for one-clip training, where the held-out frames' heads sit where no
    # training frame's did (docs/finetune_results.md, round 4).
    shift_augment: int = 0


@dataclass
class TalkFormerConfig:
    name: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TalkFormerConfig":
        return _from_dict(cls, d, "config")

    @classmethod
    def from_json(cls, s: str) -> "TalkFormerConfig":
        return cls.from_dict(json.loads(s))


def _from_dict(cls, d: dict[str, Any], where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown config keys {unknown}; expected some of {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in d:
            continue
        v = d[name]
        sub = _dataclass_type(f.type)
        if sub is not None:
            v = _from_dict(sub, v, f"{where}.{name}")
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[name] = v
    return cls(**kwargs)


_TYPES = {c.__name__: c for c in (AutoencoderConfig, LandmarkConfig, UNetConfig, DiffusionConfig,
                                  ModelConfig, TrainConfig)}


def _dataclass_type(t):
    if isinstance(t, str):
        return _TYPES.get(t)
    return t if dataclasses.is_dataclass(t) else None


def tiny() -> TalkFormerConfig:
    """Tests: 32x32 crops, f4 autoencoder (8x8x3 latent), 2 U-Net scales, shrunk landmark net."""
    return TalkFormerConfig(
        name="tiny",
        model=ModelConfig(
            image_size=32,
            autoencoder=AutoencoderConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32),
            landmark=LandmarkConfig(d_model=64, nlayers=1, nhead=2, dim_feedforward=128, width=0.125),
            unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, head_channels=16,
                            landmark_dim=32),
        ),
        train=TrainConfig(batch_size=4, lr=1e-3),
    )


def small() -> TalkFormerConfig:
    """One consumer GPU: 128x128 crops, KL-f4 latent 32x32x3, TalkFormer at 16, 8 and 4."""
    return TalkFormerConfig(
        name="small",
        model=ModelConfig(
            image_size=128,
            autoencoder=AutoencoderConfig(ch=64, ch_mult=(1, 2, 4), num_res_blocks=2, resolution=128),
            unet=UNetConfig(model_channels=96, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                            head_channels=32, landmark_dim=256),
        ),
        train=TrainConfig(batch_size=16, lr=1e-4),
    )


def paper() -> TalkFormerConfig:
    """The paper: 256x256 crops, LDM KL-f4 (64x64x3), latent-diffusion's ffhq-ldm-vq-4 U-Net."""
    return TalkFormerConfig(name="paper")


PRESETS = {"tiny": tiny, "small": small, "paper": paper}


def preset(name: str) -> TalkFormerConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None

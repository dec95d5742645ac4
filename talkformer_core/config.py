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


SD_SCALE_FACTOR = 0.18215  # Stable Diffusion 1.x/2.x latent scale (1 / std of its latents)


def sd_vae_config() -> AutoencoderConfig:
    """Stable Diffusion 1.x/2.x VAE (vae-ft-mse etc.): f8, 4 latent channels, attention-free levels."""
    return AutoencoderConfig(in_channels=3, out_ch=3, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
                             attn_resolutions=(), dropout=0.0, resolution=256, z_channels=4, embed_dim=4,
                             double_z=True, scale_factor=SD_SCALE_FACTOR)


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
    # Our addition for person models (off in every preset that keeps IP-LAP's layout): a
    # low-dimensional mouth model of the person (models.mouth_model) fitted in closed form on their
    # training frames; when fitted, stage 1's jaw and lips come from it instead of the transformer,
    # which a few seconds of speech do not teach to follow new audio (docs/design.md).
    mouth_model: bool = False
    mouth_shape_modes: int = 3
    mouth_blend: float = 1.0  # weight of the mouth model's jaw and lips against the transformer's


@dataclass
class UNetConfig:
    """Denoising U-Net with TalkFormer blocks at scales 2..I (paper §III-C)."""

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
    # (docs/finetune_results.md, "Held-out head turns").
    landmark_map: bool = False
    # Filled lips (with landmark_map): two more map channels, the share of each latent cell inside the
    # outer-lip and inside the inner-lip polygon. The dots of a closed and a half-open mouth overlap
    # within a cell at 64 px (a 5 px opening is 1.2 cells of a 16x16 latent); the inner area is 0 for a
    # closed mouth and grows with the opening, a signal a conv reads linearly.
    landmark_fill: bool = False


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    beta_schedule: str = "linear"  # LDM "linear": linspace(sqrt(b0), sqrt(b1), T) ** 2
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    # sampling: x_T = noise_scale * N(0, I), shared by every frame (reduced-temperature sampling; 1 =
    # the paper). The person presets use 0.5: on the 3 real clips' 30-minute models the faces follow
    # their landmarks at 0.91 / 0.86 / 0.91 against 0.86 / 0.84 / 0.88 and stay more closed in
    # silence (docs/dubbing.md, "The starting noise")
    noise_scale: float = 1.0
    # decoding: the generated lower half is decoded under the upper half of E(crop) (sampling.
    # decode_faces); that upper half's rows near the middle see the template's own mouth through the
    # encoder's receptive field, and the decoder draws it back. decode_refine = k re-encodes the crop
    # with its lower half replaced by the decoded one, k times, before the final decode; 0 = once.
    decode_refine: int = 0
    # mouth guidance (sampling.MouthGuidance, classifier-free guidance with stage 1's average mouth as
    # the unconditional input): eps(L) + w (eps(L) - eps(L_neutral)); 0 = off (one U-Net pass a step),
    # w > 0 = two. Off in every preset: on face_5 w = 1 closed the silent mouth further (0.117 -> 0.077)
    # at the same PSNR, on face_4 / KatieHill it cost 1.0 / 2.0 dB (docs/dubbing.md, "Mouth guidance")
    mouth_guidance: float = 0.0


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
    # "Held-out head turns"). Where the mouth sits sideways is pose, which the template frame shows;
    # what the audio decides (opening, shape) is kept.
    anchor_mouth_x: bool = False
    # The box frame of stage 1 (pose input, references, target, and the map of its output back to
    # the crop): "per_frame" is IP-LAP's box over all 131 points, which grows with the template's
    # jaw, so the pose input carries the mouth it replaces; "stable" is the upper face's box
    # extended by per-clip constants (face.topology.stable_landmark_boxes): the same box on a
    # typical frame, so IP-LAP's weights still fit, but blind to the jaw (docs/design.md).
    landmark_box: str = "stable"

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
    # training frame's did (docs/finetune_results.md, "Held-out head turns").
    shift_augment: int = 0
    # Stage talkformer: each training window's lower face is sheared sideways against its upper face
    # by a whole number of pixels (at the lips) up to turn_augment * the crop width either way, its
    # landmarks with it (train.augment: what a head turn does to the mouth). 0 = off. Our addition
    # for one-clip training: held-out template heads turn beyond the training frames', and there the
    # renderer drew closed landmarks half-open (docs/dubbing.md).
    turn_augment: float = 0.0
    # Stage talkformer: each training window's inner face (eyes, nose, mouth) is moved sideways against
    # the face's outline by a whole number of pixels (at the crop's centre) up to yaw_augment * the
    # crop width either way, context and target alike, the landmarks with it (train.augment: what
    # turning the head does). 0 = off; not together with turn_augment. Our addition for one-clip
    # training: held-out templates turn the head beyond every training frame, and there the renderer
    # drew closed landmarks half-open while it drew them closed on unseen frames that did not turn
    # (docs/dubbing.md).
    yaw_augment: float = 0.0
    # Stage talkformer: the known context E(masked face) of each training window gets Gaussian noise
    # of a std drawn uniformly in [0, context_noise] (latent units; the latents are scaled to about
    # unit std); sampling keeps the context clean. 0 = off. Our addition for one-clip training: the
    # renderer memorises seconds of one face, so an unseen template's upper face is a context it has
    # never seen; a blurred view of it in training makes the mouth lean on the landmarks instead
    # (conditioning augmentation as in cascaded diffusion, Ho et al. 2021; docs/dubbing.md).
    context_noise: float = 0.0
    # Stage talkformer: eq. 1's squared error weighted mouth_loss_weight on the latent cells around
    # the target frame's lips (their box, one cell of margin), 1 elsewhere; 1 = eq. 1 as written.
    # Our addition for one-clip training: the mouth moves in a fraction of the lower half's cells
    # (about a quarter at 64 px, margin included) and the rest is the same in every frame, so an
    # unweighted loss is mostly spent on skin (docs/dubbing.md).
    mouth_loss_weight: float = 1.0
    # Stage autoencoder: its L1 weighted autoencoder_mouth_weight on the pixels of the lips' box
    # (grown by 1/16 of the crop), 1 elsewhere (a weighted mean); 1 = plain L1. Our addition for
    # one-clip training: the lips are a few percent of the crop, and an autoencoder that blurs them
    # draws every closed mouth a little open (docs/dubbing.md, "The autoencoder's mouth").
    autoencoder_mouth_weight: float = 1.0
    # Stage autoencoder: each training crop moved by a random similarity, up to autoencoder_warp of
    # the crop on each axis, 1 +- autoencoder_warp in scale and autoencoder_warp radians of rotation
    # (train.augment.similarity_thetas), its landmarks with it; 0 = off. Our addition for one-clip
    # training: the autoencoder sees seconds of crops on one pixel grid, and on the dubbed video's
    # poses its round trip draws a closed mouth half open (docs/dubbing.md).
    autoencoder_warp: float = 0.0
    # Stage autoencoder: an L1 on the crops' horizontal and vertical pixel differences, weighted like
    # the L1 above and added autoencoder_edge_weight times; 0 = off. Our addition: an L1 on pixels
    # alone lets the one-pixel line between closed lips fade into one dark band, which mediapipe
    # reads as parted lips (docs/dubbing.md, "A ruler for closed").
    autoencoder_edge_weight: float = 0.0
    # Both stages: samples drawn in proportion to density(mouth opening) ** -balance_openness
    # (train.batching.balance_weights; 1 = every opening equally often), 0 = uniform. Our addition
    # for one-clip training: a person's closed and wide-open frames are a small share of a few
    # seconds of speech, and a renderer trained on them draws the typical half-open mouth.
    balance_openness: float = 0.0
    # Person presets on a GPU (finetune): bf16 autocast when training on CUDA (ignored on a CPU,
    # where the CPU presets keep fp32), the autoencoder stage's batch, and the autoencoder's share of
    # the training budget (the rest goes to TalkFormer).
    bf16: bool = False
    autoencoder_batch_size: int = 8
    autoencoder_share: float = 0.3


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


# ----------------------------------------------------------------------------------------------
# person presets: one person's clip, trained by ``finetune`` on the user's machine

def person_config(crop_size: int = 64, *, full_landmarks: bool = False, vae: bool = False) -> TalkFormerConfig:
    """A TalkFormer sized for training on one short clip on a CPU (presets cpu64, cpu96).

    64 px crops (96 also works), our KL-f4 autoencoder (16x16x3 latent) or, with ``vae``, an SD VAE
    (f8, 4 channels); a 3-scale U-Net (64 channels) with TalkFormer blocks at the two coarser
    scales, 1 residual block per scale. The landmark module is IP-LAP's exact layout when
    ``full_landmarks`` (needed to start from IP-LAP's weights), else a shrunk one (0.6 M parameters:
    a few seconds of audio cannot train 13.7 M). lr 1e-3 (small net, few steps), batch 4 windows of
    L = 5 frames; the U-Net is trained on the detected landmarks (w/o End2End, see below), the
    landmark module on its L1 loss alongside.
    """
    if vae:
        ae = sd_vae_config()
        ae.resolution = crop_size
    else:
        ae = AutoencoderConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, resolution=crop_size)
    # mouth_model: stage 1's jaw and lips from a mouth model of the person fitted on their frames
    # (models.mouth_model): trained on seconds of one person, the transformer's opening followed
    # audio it had not heard at -0.3..0.7 (docs/dubbing.md). Not with IP-LAP's generic weights.
    lm = LandmarkConfig() if full_landmarks else LandmarkConfig(d_model=128, nlayers=2, nhead=4,
                                                                 dim_feedforward=256, width=0.25, mouth_model=True)
    # position_features: M-Align's queries and keys get Fourier features of their crop-frame
    # positions (our addition; the paper presets keep eq. 3). Without them a U-Net trained for a few
    # thousand steps on one clip never used M-Align: its output was the same whatever the landmarks
    # (0.002 grey levels apart for a closed and a wide-open mouth); with them it follows the
    # landmarks (docs/finetune_results.md).
    # landmark_map: the same landmarks drawn on the latent grid (UNetConfig); with M-Align alone the
    # U-Net placed the mouth from the upper face and ignored a landmark shift
    # (docs/finetune_results.md, "Held-out head turns"). landmark_fill: the lips' polygons filled on
    # that grid too; on the 3 real clips at the default budget the renderer given test-frame landmarks
    # followed their opening at 0.72 / 0.50 / 0.62 against 0.48 / 0.20 / 0.63 (docs/dubbing.md)
    unet = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, head_channels=32, landmark_dim=64,
                      position_features=True, landmark_map=True, landmark_fill=True)
    return TalkFormerConfig(
        name=f"person{crop_size}",
        # anchor_mouth_x: audio-driven lips placed sideways where the template frame's lips are (ModelConfig);
        # starting noise scaled by 0.5 at sampling (DiffusionConfig.noise_scale); the decode re-encodes
        # the template with the generated lower face four times (DiffusionConfig.decode_refine: on face_5
        # the faces on new audio 0.49 -> 0.64, silence 0.152 -> 0.117, self-reconstruction PSNR the same;
        # the other two clips settle by the third pass)
        model=ModelConfig(image_size=crop_size, autoencoder=ae, landmark=lm, unet=unet, anchor_mouth_x=True,
                          diffusion=DiffusionConfig(noise_scale=0.5, decode_refine=4)),
        # end_to_end off: within a CPU budget (a few hundred steps) the completion module's predictions
        # stay poor (box-frame L1 ~0.14 after 400 steps), and a U-Net fed them learns to ignore
        # M-Align; fed the detected landmarks it learns to follow them (measured: docs/finetune.md).
        # EMA 0.995 (a ~200-step horizon: a 0.999 average would still hold the first, poor steps of a
        # ~1500-step run); finetune trains stage 2 with it and the checkpoint's EMA weights are used
        # shift_augment 2: +-8 px at 64 px sideways, the head movement between a clip's first 80 % and
        # its last 20 % (measured: docs/finetune_results.md, "Held-out head turns")
        # autoencoder_mouth_weight 4: the lips' box weighted 4x in the autoencoder's L1; at the same 250
        # steps its reconstructions of KatieHill's closed training frames read 0.020 open, against
        # 0.051 unweighted (real: 0.0035), and follow the real opening at 0.98 against 0.91 (docs/dubbing.md)
        # autoencoder_warp 0.04: the autoencoder trained on crops moved by a random similarity (the dubbed
        # video's poses are not the training frames'). Faces on new audio, seeds 0 / 1, face_5: 0.703 / 0.672
        # against 0.638 / 0.567 without; face_4 0.236 / 0.405 (0.208); KatieHill 0.322 / 0.248 (0.046);
        # the silent mouth opens a little more on face_5 (docs/dubbing.md, "... over two seeds")
        train=TrainConfig(lr=1e-3, batch_size=4, autoencoder_lr=1e-3, ema_decay=0.995, end_to_end=False,
                          shift_augment=2, autoencoder_mouth_weight=4.0, autoencoder_warp=0.04),
    )


def gpu_person_config(crop_size: int = 256, *, full_landmarks: bool = False, vae: bool = False) -> TalkFormerConfig:
    """The GPU person presets gpu128 / gpu256: cpu64's recipe (position features, landmark map with
    filled lips, shift augmentation, mouth anchor, mouth model, w/o End2End, EMA) at the paper's crop sizes.

    Our KL-f4 autoencoder trained on the clip (32x32x3 / 64x64x3 latent at 128 / 256 px; ``vae``:
    an SD VAE, f8); a 4-scale U-Net (channel_mult (1, 2, 3, 4)) with TalkFormer blocks at the three
    coarser scales, as the paper; batch, lr and bf16 sized for one GPU (docs/finetune.md).
    """
    cfg = person_config(crop_size, full_landmarks=full_landmarks, vae=vae)
    cfg.name = f"gpu{crop_size}"
    m, t = cfg.model, cfg.train
    if not vae:
        # 64 base channels (cpu64: 32): the autoencoder bounds the sharpness of everything after it,
        # and at 128-256 px it has skin, teeth and lip edges to keep. 10.8 M parameters, 640 GFLOP per
        # 256 px crop and step (fwd + bwd; 2 residual blocks: 814): batch 8 keeps its steps many
        m.autoencoder = AutoencoderConfig(ch=64, ch_mult=(1, 2, 4), num_res_blocks=1, resolution=crop_size)
    # 96 channels, 4 scales (64 -> 8 cells at 256 px): the receptive field covers the lower face at
    # 4x cpu64's latent. 38 M parameters; 125 GFLOP and ~0.4 GB of bf16 activations per window of
    # L = 5 frames at 256 px (fwd + bwd), so batch 16 is ~2 TFLOP a step: an H200 share of a few
    # steps per second even with three clips training at once
    m.unet = UNetConfig(model_channels=96, channel_mult=(1, 2, 3, 4), num_res_blocks=1, head_channels=32,
                        landmark_dim=128, position_features=True, landmark_map=True, landmark_fill=True)
    # shift_augment: cpu64's +-1/8 of the crop sideways, in latent cells of this crop's latent
    t.shift_augment = max(1, (crop_size // 8) // m.autoencoder.downsample)
    # batch 16 windows (80 frames), lr 5e-4 (cpu64: 4 windows, 1e-3; a 4x batch with a bigger net);
    # bf16 autocast on CUDA; the autoencoder keeps cpu64's lr, batch 8 and 30 % of the budget
    t.batch_size, t.lr, t.autoencoder_lr = 16, 5e-4, 1e-3
    t.bf16, t.autoencoder_batch_size, t.autoencoder_share = True, 8, 0.3
    return cfg


PRESETS = {"tiny": tiny, "small": small, "paper": paper,
           "cpu64": lambda: person_config(64), "cpu96": lambda: person_config(96),
           "gpu128": lambda: gpu_person_config(128), "gpu256": lambda: gpu_person_config(256)}
# The one list of preset names the finetune / train CLIs, the Train TalkFormer on Video node and
# docs/finetune.md offer. "auto": cpu64 on a CPU, gpu256 on a GPU (resolve_preset); tiny: tests.
PRESET_NAMES = ("auto", "cpu64", "cpu96", "gpu128", "gpu256", "small", "paper", "tiny")
PERSON_PRESETS = ("cpu64", "cpu96", "gpu128", "gpu256")  # cpu64's recipe (person_config)


def resolve_preset(name: str, device: Any = None) -> str:
    """``auto`` -> the person preset for ``device`` (a torch device or its name; None: CUDA when
    available): cpu64 on a CPU, gpu256 on CUDA. Any other name is returned as is."""
    if name != "auto":
        return name
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return "gpu256" if kind == "cuda" else "cpu64"


def preset(name: str, device: Any = None) -> TalkFormerConfig:
    """A fresh config of preset ``name`` (``auto``: resolved for ``device``, see resolve_preset)."""
    name = resolve_preset(name, device)
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {list(PRESET_NAMES)}") from None

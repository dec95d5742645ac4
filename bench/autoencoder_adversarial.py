"""The person autoencoder with an adversarial term on the lower face: does it keep a closed mouth?

The person presets train the autoencoder with a (mouth-weighted) L1 and LDM's KL term only. LDM's
own first stages add a patch discriminator (Isola et al. 2017's PatchGAN, hinge loss), which is what
keeps their fine detail. This script trains the person autoencoder exactly as ``finetune`` does
(``talkformer_core.train``, the preset's config, the training frames [0, 0.6), batch 8) with such a
discriminator on the lower half of the crop beside it: 4 convolutions, ``--channels`` base width,
Adam 2e-4 (0.5, 0.9), one discriminator step per autoencoder step on that step's crops and
reconstructions, and ``--weight`` x (-D(reconstruction)) added to the autoencoder's loss. Score the
checkpoint with ``bench/autoencoder_unseen.py`` beside one trained without it (docs/dubbing.md, "An
adversarial term for the autoencoder").

    python bench/autoencoder_adversarial.py --shard-dir RUN.work/shards_64 --out DIR [--steps 1004]
        [--weight 0.05] [--channels 32] [--preset cpu64] [--seed 0] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def patch_discriminator(channels: int):
    import torch.nn as nn

    c = channels
    return nn.Sequential(nn.Conv2d(3, c, 4, 2, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2),
                         nn.Conv2d(2 * c, 4 * c, 3, 1, 1), nn.GroupNorm(8, 4 * c), nn.LeakyReLU(0.2),
                         nn.Conv2d(4 * c, 1, 3, 1, 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shard-dir", required=True, help="the clip's shard folder (finetune's RUN.work/shards_64)")
    ap.add_argument("--out", required=True, help="run folder (its last.safetensors is the autoencoder)")
    ap.add_argument("--steps", type=int, default=1004)
    ap.add_argument("--weight", type=float, default=0.05, help="the adversarial term's weight (0: none)")
    ap.add_argument("--channels", type=int, default=32, help="the discriminator's base width")
    ap.add_argument("--preset", default="cpu64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from talkformer_core.finetune.presets import finetune_config
    from talkformer_core.train import loop
    from talkformer_core.train.steps import AutoencoderStep

    torch.set_num_threads(a.threads)
    torch.manual_seed(1234 + a.seed)  # the discriminator's weights (the loop seeds its own)
    disc = patch_discriminator(a.channels)
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.9))

    class AdversarialStep(AutoencoderStep):
        """The preset's autoencoder step, its crops and reconstructions caught on their way through
        the encoder and decoder; the discriminator stepped on them, its verdict added to the loss."""

        def forward(self, batch, generator):
            seen: dict = {}
            hooks = (self.ae.encoder.register_forward_pre_hook(lambda m, inp: seen.__setitem__("x", inp[0])),
                     self.ae.decoder.register_forward_hook(lambda m, inp, out: seen.__setitem__("rec", out)))
            try:
                loss, logs = super().forward(batch, generator)
            finally:
                for h in hooks:
                    h.remove()
            h0 = seen["x"].shape[-2] // 2 - 4  # the lower face, a few rows above the mask line
            real, fake = seen["x"][..., h0:, :], seen["rec"][..., h0:, :]
            disc.requires_grad_(True)
            opt_d.zero_grad(set_to_none=True)
            d_loss = F.relu(1 - disc(real.detach())).mean() + F.relu(1 + disc(fake.detach())).mean()
            d_loss.backward()
            opt_d.step()
            disc.requires_grad_(False)
            g_loss = -disc(fake).mean()
            logs.update(d=d_loss.detach(), g=g_loss.detach())
            return loss + a.weight * g_loss, logs

    loop.AutoencoderStep = AdversarialStep  # the loop builds its step by this name
    try:
        res = loop.train(finetune_config(a.preset), stage="autoencoder", data=a.shard_dir, out=a.out, steps=a.steps,
                         batch_size=8, frames=(0.0, 0.6), seed=a.seed, progress=False, log_every=50)
    finally:
        loop.AutoencoderStep = AutoencoderStep
    d = res.metrics.get("d", [float("nan")])
    print(f"{res.checkpoint}: L1 {res.metrics['l1'][-1]:.4f}, discriminator hinge loss over the last 50 steps "
          f"{sum(d[-50:]) / max(len(d[-50:]), 1):.3f} (2.0 = chance)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

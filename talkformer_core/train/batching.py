"""The batches of a run as a pure function of (seed, step), so resume and DDP are bit-exact.

Step s takes the slice [s*G, (s+1)*G) of seeded permutations of the dataset, G = micro_batch *
world * accum, and micro-batch m = rank * accum + a takes its m-th part. Sample randomness is
keyed by (seed, epoch, index) inside the dataset. So a two-process run sees the same micro-batches
as one process accumulating over the two, and a resumed run the same as an uninterrupted one.
With ``weights`` an epoch is n seeded draws with replacement in proportion to them instead of a
permutation (``balance_weights``: TrainConfig.balance_openness), still a function of (seed, epoch).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from ..errors import InputError


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]) >> 1


class StepBatchSampler:
    """Yields, for steps start..total-1, ``accum`` micro-batches of (index, epoch) pairs for this rank.

    Pure function of (seed, step): see the module docstring.
    """

    def __init__(self, n: int, micro_batch: int, world: int = 1, rank: int = 0, accum: int = 1,
                 seed: int = 0, start_step: int = 0, total_steps: int = 1, weights: np.ndarray | None = None):
        if n <= 0:
            raise InputError("the dataset is empty")
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (n,) or not np.all(np.isfinite(weights)) or (weights < 0).any() or weights.sum() <= 0:
                raise InputError(f"sampler weights: expected {n} finite non-negative numbers with a positive sum")
        self.weights = None if weights is None else torch.from_numpy(weights)
        self.n, self.B, self.world, self.rank, self.accum = n, micro_batch, world, rank, accum
        self.seed, self.start, self.total = seed, start_step, total_steps
        self.G = micro_batch * world * accum
        self.per_epoch = max(n // self.G, 1)  # steps per "epoch"
        self._perm: tuple[int, np.ndarray] | None = None

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(_seed_of(self.seed, epoch, 7))
            reps = math.ceil(self.G / self.n)  # a dataset smaller than one global batch repeats
            if self.weights is not None:
                perm = torch.multinomial(self.weights, self.n * reps, replacement=True, generator=g).numpy()
            else:
                perm = torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)]).numpy()
            self._perm = (epoch, perm)
        return self._perm[1]

    def micro_batches(self, step: int) -> list[list[tuple[int, int]]]:
        epoch, pos = divmod(step, self.per_epoch)
        perm = self._epoch_perm(epoch)
        glob = perm[pos * self.G:(pos + 1) * self.G]
        out = []
        for a in range(self.accum):
            m = self.rank * self.accum + a
            out.append([(int(i), epoch) for i in glob[m * self.B:(m + 1) * self.B]])
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for s in range(self.start, self.total):
            yield from self.micro_batches(s)

    def __len__(self) -> int:
        return (self.total - self.start) * self.accum


def balance_weights(values: np.ndarray, power: float, bins: int = 8, floor: float = 0.05) -> np.ndarray | None:
    """Sampling weights that flatten the distribution of ``values`` (a mouth opening per sample):
    share ** -power, the share of the samples in each of ``bins`` equal-width bins over their range,
    floored at ``floor`` (a lone outlier frame is weighted as a bin of 5 %, not drawn as often as
    all the closed frames together); power 1 draws every bin of at least that share equally often,
    0 = None (uniform). Samples without a value (nan: no face) get the mean weight. Mean 1."""
    if power <= 0:
        return None
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    if ok.sum() < 2 or np.ptp(v[ok]) <= 0:
        return None
    edges = np.linspace(v[ok].min(), v[ok].max(), bins + 1)
    which = np.clip(np.searchsorted(edges, v[ok], side="right") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    w = np.empty_like(v)
    w[ok] = np.maximum(count[which] / ok.sum(), floor) ** -float(power)
    w[~ok] = w[ok].mean()
    return w / w.mean()

"""Deterministic data order and randomness, keyed by the micro-step counter.

Everything random in a step (which samples, crops/flips, timesteps, noise, empty-prompt dropout) is a function of
`seed` and each sample's position in the data stream. Resuming at step k therefore replays exactly what an
uninterrupted run would have done, without restoring any RNG state, and a batch of 4 sees the same samples, noise
and timesteps as 4 accumulated batches of 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for micro-steps `start, start+1, ...`, this process's share of the global batch as `(epoch, index)`
    keys. The data stream is the concatenation of per-epoch permutations; global micro-batch k covers stream
    positions `[k·B·P, (k+1)·B·P)` and process p takes `[p·B, (p+1)·B)` of it (B per-device batch, P processes)."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        num_processes: int = 1,
        process_index: int = 0,
    ):
        if num_samples <= 0:
            raise ValueError("the training dataset is empty after filtering; check the data source and its logs")
        self.n, self.batch_size, self.seed, self.start = num_samples, batch_size, seed, start
        self.num_processes, self.process_index = num_processes, process_index
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _key(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: epoch_permutation(self.n, self.seed, epoch)}
        return epoch, int(self._perm_cache[epoch][offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while True:
            positions = stream_positions(step, self.batch_size, self.num_processes, self.process_index)
            yield [self._key(q) for q in positions]
            step += 1

    def __len__(self) -> int:  # infinite stream; DataLoader only needs this for progress estimates
        return 2**62


class WeightedStepBatchSampler(StepBatchSampler):
    """`StepBatchSampler`'s stream, but each position draws its sample at random: desirable with probability
    `desirable_ratio`, then an index uniformly within that class (with replacement, so the official Diffusion-KTO
    `WeightedRandomSampler(weights, len(weights))` with class weights `p/N_D`, `(1 − p)/N_U` has the same law).

    Both draws come from a generator keyed by `(seed, position)` alone, so a position always yields the same key:
    resume, any batch × accumulation × processes layout and DataLoader workers see the same samples as the plain
    sampler's stream would. The key's epoch is `position // len(labels)` (it seeds the sample's crop/flip).

    Args:
        desirable (`Sequence[bool]`): per-sample flag of the dataset (index order).
        desirable_ratio (`float`): p, in (0, 1).
        batch_size, seed, start, num_processes, process_index: as for `StepBatchSampler`.
    """

    def __init__(
        self,
        desirable: Sequence[bool],
        desirable_ratio: float,
        batch_size: int,
        seed: int,
        start: int = 0,
        num_processes: int = 1,
        process_index: int = 0,
    ):
        super().__init__(len(desirable), batch_size, seed, start, num_processes, process_index)
        flags = torch.as_tensor(list(desirable), dtype=torch.bool)
        self.classes = (torch.nonzero(~flags).flatten(), torch.nonzero(flags).flatten())  # (undesirable, desirable)
        if not 0 < desirable_ratio < 1:
            raise ValueError(f"`desirable_ratio` must be in (0, 1) or null, got {desirable_ratio}")
        if min(len(c) for c in self.classes) == 0:
            counts = f"{len(self.classes[1])} desirable and {len(self.classes[0])} undesirable"
            from diffalign.data import DataError

            raise DataError(f"`desirable_ratio` needs both kinds of samples; the data has {counts}")
        self.desirable_ratio = desirable_ratio

    def _key(self, position: int) -> tuple[int, int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_033 + 104_729 * position + 17)
        pool = self.classes[int(torch.rand(1, generator=gen) < self.desirable_ratio)]
        return position // self.n, int(pool[torch.randint(len(pool), (1,), generator=gen)])


def stream_positions(micro_step: int, batch_size: int, num_processes: int = 1, process_index: int = 0) -> list[int]:
    """Stream positions of this process's samples in global micro-batch `micro_step` (see `StepBatchSampler`)."""
    first = (micro_step * num_processes + process_index) * batch_size
    return list(range(first, first + batch_size))


def sample_generators(seed: int, positions: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample, keyed by its stream position: its timestep, noise and prompt dropout do not
    depend on how samples are grouped into batches, accumulation steps or processes."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + 7919 * q + 1) for q in positions]

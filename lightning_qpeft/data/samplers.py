"""Which records go into which training micro-batch: length grouping, token budgets, one shard per rank.

Config keys (`data.*`):
    group_by_length:  records of similar length share a micro-batch (less padding)
    max_tokens:       fill each micro-batch up to this many tokens instead of `batch_size` records
                      (padded: longest record x records; packed: the sum of the lengths)
    batch_size, seed

`RecordBatchSampler` is always the training loader's `batch_sampler`. Its order is a pure function of
(seed, epoch): each epoch is planned whole, then cut into this rank's batches, so N ranks with `batch_size`
B (no token budget) see at each step the records one process with N x B sees, grouped by length or not (but at
an epoch's last, partial step, which the ranks pad with the epoch's first batches).

- Length grouping follows transformers' `get_length_grouped_indices`: a seeded permutation, cut into
  megabatches of 50 global batches, each sorted by length. Unlike transformers, the megabatch holding the
  longest record is not moved to the front, and the batches are then shuffled (in steps of `world_size`
  neighbours): the first steps of an epoch are a fair sample, not the longest records (a benchmark that
  times the first steps would otherwise measure the worst case).
- Distributed: the plan is made for the whole world; rank r takes batch r of every step of `world_size`
  batches, so all ranks see records of similar length at the same step and run the same number of steps
  (the plan is padded with its first batches, as `DistributedSampler` pads with its first records).
  Lightning injects a `DistributedSampler` into any loader whose sampler is not one; for a batch sampler
  it re-creates it with the new `sampler` argument, which this class accepts, checks against its own
  rank and world size, and otherwise ignores.
- Resuming: the loader is a torchdata `StatefulDataLoader`. `state_dict()` holds the epoch, the iterator's
  state the batches already yielded; Lightning saves both in checkpoints, and a restored loader continues
  with the next batch of the same plan.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DistributedSampler, Sampler


def length_grouped_order(lengths: np.ndarray, group: int, generator: torch.Generator) -> np.ndarray:
    """A seeded permutation, sorted by length (longest first) inside megabatches of `group * 50` records."""
    n = len(lengths)
    mult = max(1, min(n // (group * 4), 50))  # transformers: 50, or 4 megabatches for small sets
    perm = torch.randperm(n, generator=generator).numpy()
    mega = group * mult
    parts = [perm[i:i + mega] for i in range(0, n, mega)]
    return np.concatenate([p[np.argsort(-lengths[p], kind="stable")] for p in parts])


def cut_batches(order: np.ndarray, lengths: np.ndarray, batch_size: int, max_tokens: Optional[int],
                packed: bool) -> list[list[int]]:
    """Consecutive records of `order` as batches: `batch_size` each, or as many as fit in `max_tokens`."""
    if max_tokens is None:
        return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    batches, current, longest, total = [], [], 0, 0
    for i in order.tolist():
        n = int(lengths[i])
        cost = total + n if packed else max(longest, n) * (len(current) + 1)
        if current and cost > max_tokens:
            batches.append(current)
            current, longest, total = [], 0, 0
        current.append(i)
        longest, total = max(longest, n), total + n
    if current:
        batches.append(current)
    return batches


class _PlanIterator:
    """Yields one epoch's planned batches; its state is how many it has yielded (torchdata `Stateful`)."""

    def __init__(self, plan: list[list[int]]) -> None:
        self.plan = plan
        self.yielded = 0

    def __iter__(self) -> "_PlanIterator":
        return self

    def __next__(self) -> list[int]:
        if self.yielded >= len(self.plan):
            raise StopIteration
        self.yielded += 1
        return self.plan[self.yielded - 1]

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.yielded = int(state["yielded"])


class RecordBatchSampler(BatchSampler):
    """Training batches of record indices for this rank: shuffled, optionally length-grouped and/or
    filled to a token budget.

    Args:
        sampler: only for Lightning's distributed-sampler injection (see the module docstring); a
            `DistributedSampler` here must agree with `num_replicas`/`rank`. Its order is not used.
        batch_size: records per micro-batch (ignored when `max_tokens` is set).
        drop_last: drop the last, smaller batch of an epoch (fixed `batch_size` only).
        lengths: tokens of every record.
        max_tokens: token budget per micro-batch (None: `batch_size` records).
        packed: batches are packed rows (the budget counts real tokens, not padded ones).
        group_by_length: group records of similar length.
        shuffle: random order (else the dataset's order).
        seed: seed of the order; epoch `e` uses `seed + e`.
        num_replicas: world size (None: 1).
        rank: this process's global rank (None: 0).
    """

    def __init__(
        self,
        sampler: Optional[Sampler] = None,
        batch_size: int = 8,
        drop_last: bool = False,
        *,
        lengths: Sequence[int],
        max_tokens: Optional[int] = None,
        packed: bool = False,
        group_by_length: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> None:
        if isinstance(sampler, DistributedSampler):
            if num_replicas is None and rank is None:
                num_replicas, rank = sampler.num_replicas, sampler.rank
            elif (sampler.num_replicas, sampler.rank) != (num_replicas or 1, rank or 0):
                raise ValueError(
                    f"RecordBatchSampler: the injected DistributedSampler (world {sampler.num_replicas}, rank "
                    f"{sampler.rank}) disagrees with this sampler's (world {num_replicas}, rank {rank})"
                )
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_tokens = max_tokens
        self.packed = packed
        self.group_by_length = group_by_length
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas or 1
        self.rank = rank or 0
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"RecordBatchSampler: rank {self.rank} outside world size {self.num_replicas}")
        self.epoch = 0
        self._plans: dict[int, list[list[int]]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before every epoch (it looks for `set_epoch` on the batch sampler)."""
        self.epoch = epoch

    def global_plan(self, epoch: Optional[int] = None) -> list[list[int]]:
        """Every rank's batches of the epoch, in step order (step k: batches k*world ... k*world+world-1)."""
        epoch = self.epoch if epoch is None else epoch
        world = self.num_replicas
        g = torch.Generator().manual_seed(self.seed + epoch)
        n = len(self.lengths)
        if self.group_by_length:
            per_batch = self.batch_size
            if self.max_tokens is not None:  # about this many records fill a token budget
                per_batch = max(1, self.max_tokens // max(1, int(self.lengths.mean())))
            order = length_grouped_order(self.lengths, per_batch * world, g)
        else:
            order = torch.randperm(n, generator=g).numpy() if self.shuffle else np.arange(n)
        batches = cut_batches(order, self.lengths, self.batch_size, self.max_tokens, self.packed)
        if self.drop_last and self.max_tokens is None and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if len(batches) % world:
            batches += batches[: world - len(batches) % world]  # every rank runs the same number of steps
        steps = [batches[i:i + world] for i in range(0, len(batches), world)]
        if self.group_by_length and self.shuffle:
            steps = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
        return [b for step in steps for b in step]

    def plan(self, epoch: Optional[int] = None) -> list[list[int]]:
        """This rank's batches of the epoch."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._plans:
            self._plans = {epoch: self.global_plan(epoch)[self.rank::self.num_replicas]}
        return self._plans[epoch]

    def __iter__(self) -> Iterator[list[int]]:
        return _PlanIterator(self.plan())

    def __len__(self) -> int:
        return len(self.plan())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])

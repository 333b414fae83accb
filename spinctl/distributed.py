"""Data-parallel scoring under torchrun: rank context, sample sharding, accumulator all-reduce.

Single-process runs get a context with world_size 1 where every operation is a no-op.
(Interface stub: filled in by the issue-6 work.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> DistContext:
    """The current process's place in the job (world_size 1 outside torchrun)."""
    return DistContext()


def shard_samples(samples: list, ctx: DistContext) -> list:
    """This rank's share of the length-sorted samples (all of them in a single process)."""
    return samples


def all_reduce_(tensors: dict, ctx: DistContext) -> None:
    """Sum `tensors` (name -> tensor) across ranks in place; a no-op in a single process."""

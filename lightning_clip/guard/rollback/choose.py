"""Stage 2 of a rollback: choose one source for every rank.

Every rank lists its own folder view (`sources`), which may differ between ranks (node-local disks, an
NFS directory cache, an asynchronous writer). The ranks agree on the *highest step every rank holds a
candidate for*, in a fixed number of small all-reduces per round whatever the folders hold:

1. each rank proposes its highest candidate step below the current bound; the minimum over the ranks is
   the proposal;
2. each rank says whether it holds a candidate at exactly that step; unless every rank does, the bound
   drops to the proposal and the next round starts;
3. every rank reads and validates its candidate of that step; unless every rank succeeded, the bound drops
   to that step and the next round starts (a read failure on any rank moves all ranks on together).

Every branch depends only on reduced values, so the ranks run the same collectives in the same order and
end with the same step (or none). Megatron agrees on the iteration to load with an all-reduce; OLMo-core
has rank 0 decide and broadcast the decision; this is the former, so that a rank that cannot read the
step rank 0 chose moves every rank to an older one.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING

import torch

from lightning_clip.guard.rollback.sources import Candidate

if TYPE_CHECKING:
    from lightning_clip._compat import Trainer

__all__ = ["Ranks", "agreed_steps"]


class Ranks:
    """Small integer all-reduces over the Trainer's ranks (identity on one process)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        dist = torch.distributed
        self.active = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()

    def max(self, values: list[int]) -> list[int]:
        """The element-wise maximum of ``values`` over the ranks (int64: exact for any step)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self.trainer.strategy.root_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def min(self, values: list[int]) -> list[int]:
        return [-v for v in self.max([-v for v in values])]

    def all(self, flag: bool) -> bool:
        """True when ``flag`` is True on every rank."""
        return bool(self.min([int(flag)])[0])


def agreed_steps(
    candidates: Sequence[Candidate], newer_than: int, upto: int, ranks: Ranks
) -> Generator[int, bool, None]:
    """Yield the steps every rank holds a candidate for, highest first, within ``(newer_than, upto]``;
    send True back when every rank read and validated its candidate of that step (the generator then
    stops), False to move every rank to the next older step."""
    bound = upto + 1
    while True:
        mine = [c.step for c in candidates if newer_than < c.step < bound]
        proposal = ranks.min([max(mine, default=-1)])[0]
        if proposal <= newer_than:
            return
        if not ranks.all(proposal in mine):
            bound = proposal
            continue
        done = yield proposal
        if done:
            return
        bound = proposal

"""The ranks' agreement on a rollback step (`lightning_clip.guard.rollback.choose.agreed_steps`), with each
rank's folder view drawn at random: every rank ends on the same step, the highest one that every rank holds
and reads, in the same number of all-reduces, whatever the views. Ranks are threads meeting at a barrier
(a real 2-process run: ``tests/distributed/test_ddp_views.py``)."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest

from lightning_clip.guard.rollback.choose import agreed_steps
from lightning_clip.guard.rollback.sources import Candidate


class ThreadRanks:
    """`Ranks` for threads: each all-reduce is a barrier, a shared slot per rank, a barrier."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[list[int]] = [[] for _ in range(world)]
        self.calls = [0] * world

    def view(self, rank: int) -> Any:
        outer = self

        class View:
            def max(self, values: list[int]) -> list[int]:
                outer.calls[rank] += 1
                outer.slots[rank] = list(values)
                outer.barrier.wait()
                out = [max(col) for col in zip(*outer.slots, strict=True)]
                outer.barrier.wait()
                return out

            def min(self, values: list[int]) -> list[int]:
                return [-v for v in self.max([-v for v in values])]

            def all(self, flag: bool) -> bool:
                return bool(self.min([int(flag)])[0])

        return View()


def run(views: list[set[int]], unreadable: list[set[int]], newer_than: int, upto: int) -> list[Any]:
    ranks = ThreadRanks(len(views))
    results: list[Any] = [None] * len(views)

    def rank(r: int) -> None:
        candidates = [Candidate(f"/r{r}/step={s}.ckpt", (f"{s}", 0, 0, 0), s, False) for s in views[r]]
        me = ranks.view(r)
        steps = agreed_steps(candidates, newer_than, upto, me)
        step = next(steps, None)
        chosen = None
        while step is not None:  # as `FileSources.newest` drives it
            agreed = me.all(step not in unreadable[r])
            try:
                step = steps.send(agreed)
            except StopIteration:
                chosen = step if agreed else None
                break
        results[r] = (chosen, ranks.calls[r])

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(views))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


@pytest.mark.parametrize("seed", range(200))
def test_every_rank_ends_on_the_highest_step_all_ranks_hold_and_read(seed: int) -> None:
    rng = random.Random(seed)
    world = rng.choice((2, 3, 4))
    steps = range(0, 40, 2)
    views = [{s for s in steps if rng.random() < 0.6} for _ in range(world)]
    unreadable = [{s for s in v if rng.random() < 0.2} for v in views]
    newer_than, upto = rng.choice((-1, 4, 10)), rng.choice((20, 30, 38))
    results = run(views, unreadable, newer_than, upto)
    common = set.intersection(*views) - set.union(*unreadable)
    expected = max((s for s in common if newer_than < s <= upto), default=None)
    assert len({r for r in results}) == 1, results  # the same step, after the same number of all-reduces
    assert results[0][0] == expected

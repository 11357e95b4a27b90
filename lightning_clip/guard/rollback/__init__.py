"""The rollback pipeline of `ExplosionGuard`: one module per stage, called once per rollback.

1. `sources`: list this rank's candidate files, each peeked once for the step it holds and the run that
   wrote it (only this run's own files; remote folders are never listed);
2. `choose`: agree with the other ranks on the highest step every rank holds (a failure anywhere moves
   every rank to the next older step together);
3. `read`: read that file (bounded memory, regular files only, ``weights_only``, exact allowlists);
4. `validate`: check everything in it against the live run before anything is touched;
5. `restore`: load it, lower the learning rates, bring step-interval schedulers back on time.

`FileSources.newest` runs stages 1-4 and returns the state to restore (or None); the in-memory snapshot is
compared with it by `lightning_clip.guard.known_good.KnownGoodStates`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_clip.exceptions import LightningClipWarning
from lightning_clip.guard.rollback import read, restore, sources, validate
from lightning_clip.guard.rollback.choose import Ranks, agreed_steps
from lightning_clip.guard.rollback.sources import Candidate, Peeked, RunIdentity
from lightning_clip.guard.snapshot import TrainingState

if TYPE_CHECKING:
    from lightning_clip._compat import Trainer

__all__ = ["FileSources", "apply"]


class FileSources:
    """The Trainer's checkpoint files as rollback sources, with a memory of every file version peeked
    (refused ones are never read again).

    Args:
        trust: read with ``weights_only=False`` (``ExplosionGuard(trust_checkpoints=True)``).
    """

    def __init__(self, trust: bool = False) -> None:
        self.trust = trust
        self.peeked: dict[tuple[str, int, int, int], Peeked] = {}

    def reset(self) -> None:
        """Forget every file seen (a new fit)."""
        self.peeked = {}

    def refuse(self, candidate: Candidate, why: str) -> None:
        self.peeked[candidate.key] = Peeked(None, why)
        warn(candidate.path, why)

    def newest(
        self,
        trainer: Trainer,
        identity: RunIdentity,
        state_key: str,
        newer_than: int,
        siblings: Sequence[Any],
    ) -> TrainingState | None:
        """The newest state of this run's own files holding a step in ``(newer_than, global_step]`` that
        every rank read and validated; None when there is none. Collective: call it on every rank."""
        ranks = Ranks(trainer)
        candidates = sources.list_candidates(trainer, identity, self.peeked, self.trust, warn, state_key)
        limit = sources.read_budget(trainer)
        steps = agreed_steps(candidates, newer_than, trainer.global_step, ranks)
        step = next(steps, None)
        while step is not None:
            state = self._read(
                trainer, [c for c in candidates if c.step == step], state_key, limit, siblings, ranks
            )
            try:
                step = steps.send(ranks.all(state is not None))
            except StopIteration:
                return state
        return None

    def _read(
        self,
        trainer: Trainer,
        mine: list[Candidate],
        state_key: str,
        limit: int,
        siblings: Sequence[Any],
        ranks: Ranks,
    ) -> TrainingState | None:
        """Read and validate this rank's candidate of the agreed step (the first that works, of several
        files holding that step); the collective part of a directory's read runs on every rank alike."""
        prepared: dict[str, Any] | None = None
        chosen = mine[0]
        for candidate in mine:
            try:
                prepared = read.prepare(trainer, candidate, limit, self.trust)
            except read.UnsafeCheckpointError as err:
                self.refuse(candidate, f"is not read: {err}")
                continue
            except Exception as err:  # unreadable, truncated, incomplete, too large: an older state
                self.refuse(candidate, f"is unreadable ({type(err).__name__}: {err})")
                continue
            chosen = candidate
            break
        if not ranks.all(prepared is not None) or prepared is None:
            return None
        try:
            state = read.finish(trainer, chosen, prepared, state_key, limit, self.trust)
        except Exception as err:  # a directory's shards: raised on every rank alike
            self.refuse(chosen, f"is unreadable ({type(err).__name__}: {err})")
            return None
        found = validate.problem(state, trainer, siblings)
        if found is not None:
            self.refuse(chosen, f"is not restored: {found}")
            return None
        return state


def warn(path: str, why: str) -> None:
    rank_zero_warn(
        f"ExplosionGuard: checkpoint {path!r} {why}; falling back to an older good state.",
        category=LightningClipWarning,
    )


def apply(
    trainer: Trainer,
    state: TrainingState,
    siblings: Sequence[Any],
    lr_ratio: float,
    kinds: tuple[str, ...],
    fast_forward: bool,
) -> None:
    """Stage 5: restore a validated ``state`` (`restore.restore`), multiply every learning rate by
    ``lr_ratio``, and with ``fast_forward`` step each step-interval scheduler back to where it was before
    the restore. The other lightning-clip callbacks are told (``before_rollback`` / ``after_rollback``)."""
    memos = [(cb, cb.before_rollback()) for cb in siblings]
    positions = restore.schedule_positions(trainer)
    restore.restore(trainer, state, siblings)
    restore.scale_learning_rates(trainer, lr_ratio)
    if fast_forward:
        restore.fast_forward(trainer, positions)
    for cb, memo in memos:  # e.g. after a divergence, AdaptiveGradientClipping clips tighter
        cb.after_rollback(memo, kinds)

"""The statistics half of `AdaptiveGradientClipping` (`ClipStatisticsMixin`): each optimizer's threshold
rule, made on first use, fed once a step's fate is known, saved in checkpoints and carried across
`ExplosionGuard`'s rollbacks.

The callback's hooks measure, clip and log (`lightning_clip.callbacks.adaptive_clipping`); a clipped
step's norm waits here until the step's fate is known, so a step another callback skipped never counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from typing_extensions import override

from lightning_clip.callbacks._base import LightningClipCallback
from lightning_clip.functional.ceiling import LossAwareMeanThreshold
from lightning_clip.functional.thresholds import ThresholdRule
from lightning_clip.guard.decision import DIVERGENCE
from lightning_clip.step import GradMeasurement

if TYPE_CHECKING:
    from lightning_clip.callbacks._per_tensor import PerTensorClipping

__all__ = ["ClipStatisticsMixin"]


def _follows_loss(rule: ThresholdRule) -> TypeGuard[LossAwareMeanThreshold]:
    """Whether the loss cuts, probes or tightens this rule's ceiling (the loss-aware rule of an SGD-like
    optimizer; not `CautiousMeanThreshold`, the start alone for an optimizer that normalises)."""
    return isinstance(rule, LossAwareMeanThreshold) and rule.follows_loss


class ClipStatisticsMixin(LightningClipCallback):
    """The clipping statistics of each optimizer, a base of `AdaptiveGradientClipping` (it makes rules with
    the callback's ``_new_rule`` and reads its per-tensor modes' ``_per_tensor``, declared below).

    Optimizer ``i``'s rule is made on first use (`rule`), from its loaded state when one waits (a state is
    loaded before the rules exist). A clipped step waits in ``_uncommitted`` until its fate is known; then
    `_commit` feeds its norm into the rule, unless the update was skipped. `state_dict` commits first.
    Around `ExplosionGuard`'s rollback for a divergence, the loss-aware rules clip tighter
    (`before_rollback`, `after_rollback`), and `on_new_level` undoes it when the rise is by design.
    """

    _per_tensor: PerTensorClipping | None

    if TYPE_CHECKING:

        def _new_rule(self, index: int | None = None) -> ThresholdRule: ...

    def __init__(self) -> None:
        super().__init__()
        self._rules: dict[int, ThresholdRule] = {}
        self._saved: dict[int, dict[str, Any]] = {}  # loaded states of rules not created yet
        # optimizer index -> (the step's measurement, its threshold, its loss), until the step's fate is known
        self._uncommitted: dict[int, tuple[GradMeasurement, float, float | None]] = {}

    # ----------------------------------------------------------------------------------------- state
    def rule(self, index: int = 0) -> ThresholdRule:
        """The threshold statistics of optimizer ``index`` (created on first use), in the total-norm modes
        (the per-tensor modes keep theirs apart: `tensor_thresholds`)."""
        found = self._rules.get(index)
        if found is None:
            found = self._new_rule(index)
            if index in self._saved:
                found.load_state_dict(self._saved.pop(index))
            self._rules[index] = found
        return found

    def tensor_thresholds(self, index: int = 0) -> torch.Tensor | None:
        """Per-tensor modes: the threshold each parameter tensor of optimizer ``index`` meets at the next
        step (a CPU float32 tensor in param-group order, ∞ where there is none yet: warm-up, no gradient
        so far); None in the total-norm modes."""
        if self._per_tensor is None:
            return None
        self._per_tensor.commit(index)
        return self._per_tensor.rule(index).thresholds().detach().to("cpu", copy=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._per_tensor is not None:
            return self._per_tensor.state_dict()
        self._commit()
        rules = {str(i): r.state_dict() for i, r in self._rules.items()}
        rules.update({str(i): s for i, s in self._saved.items() if str(i) not in rules})
        return {"version": 1, "rules": rules}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._per_tensor is not None:
            self._per_tensor.load_state_dict(state_dict)
        self._uncommitted = {}
        self._rules = {}
        self._saved = {int(i): s for i, s in state_dict.get("rules", {}).items()}

    def _commit(self, index: int | None = None) -> None:
        """Feed the measured norms of finished steps whose update was applied into the statistics."""
        for i in [index] if index is not None else list(self._uncommitted):
            pending = self._uncommitted.pop(i, None)
            if pending is not None and not pending[0].skipped:
                measurement, threshold, loss = pending
                self.rule(i).update(measurement.total_norm, threshold, loss)

    # -------------------------------------------------------------------------------- rollbacks
    @override
    def before_rollback(self) -> dict[int, float]:
        """The threshold each optimizer's rule is at when `ExplosionGuard` rolls back (committed state)."""
        self._commit()
        if self._per_tensor is not None:
            self._per_tensor.commit()
        return {i: r.current() for i, r in self._rules.items() if _follows_loss(r)}

    @override
    def after_rollback(self, memo: dict[int, float], kinds: Sequence[str]) -> None:
        """After a rollback for a divergence, clip tighter than when it happened: each loss-aware rule's
        ceiling goes to half the threshold it was at (`LossAwareMeanThreshold.tighten`)."""
        if DIVERGENCE not in kinds:
            return
        for i, bound in memo.items():
            rule = self.rule(i)
            if _follows_loss(rule):
                rule.tighten(bound)

    @override
    def on_new_level(self) -> None:
        """The loss rose by design (`ExplosionGuard`'s restored known-good state sees it too): each
        loss-aware rule undoes what it cut or tightened for it (`LossAwareMeanThreshold.new_level`). A step
        not yet committed is fed to the fresh bands when it is (at the new level)."""
        for rule in self._rules.values():
            if _follows_loss(rule):
                rule.new_level()

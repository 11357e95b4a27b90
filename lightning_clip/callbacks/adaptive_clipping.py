"""AdaptiveGradientClipping: clip to a threshold learned from recent gradient norms."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_clip import _compat
from lightning_clip._validation import check_norm_type
from lightning_clip.callbacks._base import LightningClipCallback
from lightning_clip.exceptions import LightningClipWarning
from lightning_clip.functional.thresholds import RULE_DEFAULTS, ThresholdRule, check_max_norm, make_rule
from lightning_clip.step import GradMeasurement

if TYPE_CHECKING:
    from lightning_clip._compat import LightningModule, Trainer

RULE_ARGS = ("mode", *RULE_DEFAULTS)
"""The arguments that make the threshold rule (`make_rule`)."""

__all__ = ["AdaptiveGradientClipping"]


class AdaptiveGradientClipping(LightningClipCallback):
    r"""Clip the gradient norm to a threshold learned from a running mean of recent norms.

    Acts in ``on_before_optimizer_step``, where gradients are accumulated, AMP-unscaled and not yet
    clipped by Lightning: when the pre-clip total norm ``n`` exceeds the threshold ``c``, every gradient
    is scaled by ``c / n`` (direction kept). Nothing is written when no clipping is needed.

    Modes (``threshold_t`` is the threshold applied to step ``t``'s norm ``n_t``; only finite norms count):

    * ``"mean"`` (default): ``min(factor · μ̂_{t−1}, max_norm)`` where ``μ̂`` is the bias-corrected EMA
      of the norms as applied, ``min(n_t, threshold_t)`` (Pascanu et al. 2013 suggest the average norm as
      the threshold). A spike never inflates its own statistics; ``factor > 1`` lets the mean follow norms
      that grow steadily.
    * ``"zscore"``: ZClip (Kumar et al. 2025) — reproduces ``zclip.ZClip`` 1.0.0 (``mode="zscore"``,
      ``clip_option="adaptive_scaling"``, ``clip_factor=1``); pass ``warmup_steps=25, max_norm=1.0`` for
      ZClip's defaults.
    * ``"percentile"``: AutoClip (Seetharaman et al. 2020) — reproduces ``autoclip.torch.QuantileClip(
      quantile=percentile/100, history_length=window, global_threshold=True)`` 0.2.1.

    Warm-up: the first ``warmup_steps`` steps are capped by ``max_norm``; in ``zscore`` and ``percentile``
    modes, without ``max_norm``, by the ``mean`` rule from the second step on (no unprotected warm-up).

    Args:
        mode: ``"mean"`` | ``"zscore"`` | ``"percentile"``.
        factor: ``mean``: threshold = factor × running mean, ``> 1``.
        decay: ``mean``, ``zscore``: EMA decay of the running statistics, in ``[0, 1)``.
        z_threshold: ``zscore``: ZClip's ``z_thresh``, ``> 0``.
        percentile: ``percentile``: AutoClip's p, in ``[0, 100]``.
        window: ``percentile``: how many recent norms are kept, ``≥ 1``.
        warmup_steps: steps (``≥ 1``) before the mode's own rule applies; None: 1, or 25 for ``zscore``.
        max_norm: optional absolute cap (``> 0``), applied always, also during warm-up.
        norm_type: p of the p-norm, any ``p > 0`` or ``float("inf")``.

    Raises:
        ValueError / TypeError: at construction, for an argument out of range or of the wrong type.
        ValueError: at fit start (``on_fit_start``, the first hook where the optimizers exist), for a fused
            optimizer under 16-mixed with a GradScaler (its gradients are still scaled in the hook).

    Logged keys (through ``pl_module.log``, on the Trainer's logging steps):

    | key | meaning |
    |---|---|
    | ``grad/norm`` | pre-clip total gradient norm |
    | ``grad/clip_threshold`` | threshold applied this step (∞ until one exists) |
    | ``grad/clip_coef`` | factor the gradients were scaled by (≤ 1; 1 = not clipped) |

    With several optimizers each key gets the suffix ``_opt{i}``, ``i`` the optimizer's index in
    ``configure_optimizers`` (``grad/norm_opt0``, ``grad/norm_opt1``, …), and each optimizer keeps its
    own statistics.

    Notes:
        AMP: under ``16-mixed`` the gradients are already unscaled in the hook; a non-finite norm there
        (GradScaler calibration) is ignored and the scaler skips the step. DDP: gradients are all-reduced
        before the hook, so every rank computes the same threshold. FSDP2 / tensor parallelism
        (``ModelParallelStrategy``, ``DTensor`` gradients): the norm is the full gradients' (each rank's
        shards, one small all-reduce), so thresholds and clipping are identical on every rank. DeepSpeed,
        FSDP1 (``FSDPStrategy``) and XLA are refused at setup. ``Trainer(gradient_clip_val=...)`` still
        applies after this callback (a warning says so).

    Examples:
        >>> import pytorch_lightning as pl
        >>> from lightning_clip import AdaptiveGradientClipping
        >>> trainer = pl.Trainer(callbacks=[AdaptiveGradientClipping(factor=2.0)], logger=False)
    """

    def __init__(
        self,
        mode: str = "mean",
        factor: float = 1.5,
        decay: float = 0.97,
        z_threshold: float = 2.5,
        percentile: float = 10.0,
        window: int = 1000,
        warmup_steps: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
    ) -> None:
        super().__init__()
        self.mode = mode
        self.factor = factor
        self.decay = decay
        self.z_threshold = z_threshold
        self.percentile = percentile
        self.window = window
        self.warmup_steps = warmup_steps
        self.max_norm = check_max_norm(max_norm)
        self.norm_type = check_norm_type("norm_type", norm_type)
        self._new_rule()  # validates every argument of the rule
        self._rules: dict[int, ThresholdRule] = {}
        self._saved: dict[int, dict[str, Any]] = {}  # loaded states of rules not created yet
        self._multi = False
        # optimizer index -> (the step's measurement, its threshold), until the step's fate is known
        self._uncommitted: dict[int, tuple[GradMeasurement, float]] = {}
        #: figures of the last step, per optimizer index: (norm, threshold, coef)
        self.last: dict[int, tuple[float, float, float]] = {}

    def _new_rule(self) -> ThresholdRule:
        return make_rule(**{name: getattr(self, name) for name in RULE_ARGS})

    def _state_key_args(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*RULE_ARGS, "norm_type")}

    # ----------------------------------------------------------------------------------------- state
    def rule(self, index: int = 0) -> ThresholdRule:
        """The threshold statistics of optimizer ``index`` (created on first use)."""
        found = self._rules.get(index)
        if found is None:
            found = self._new_rule()
            if index in self._saved:
                found.load_state_dict(self._saved.pop(index))
            self._rules[index] = found
        return found

    @override
    def state_dict(self) -> dict[str, Any]:
        self._commit()
        rules = {str(i): r.state_dict() for i, r in self._rules.items()}
        rules.update({str(i): s for i, s in self._saved.items() if str(i) not in rules})
        return {"version": 1, "rules": rules}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._uncommitted = {}
        self._rules = {}
        self._saved = {int(i): s for i, s in state_dict.get("rules", {}).items()}

    # ----------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.gradient_clip_val:
            rank_zero_warn(
                "AdaptiveGradientClipping is attached and"
                f" `Trainer(gradient_clip_val={trainer.gradient_clip_val!r})` is set too: both apply,"
                " AdaptiveGradientClipping first, then Lightning's clipping on top. Remove"
                " `gradient_clip_val` to let the adaptive threshold decide alone.",
                category=LightningClipWarning,
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The optimizers exist only from here on (`setup` runs before `configure_optimizers`).
        if _compat.gradient_scaler(trainer) is not None:
            for opt in trainer.optimizers:
                if _compat.steps_inside_amp_scaling(opt):
                    raise ValueError(
                        f"AdaptiveGradientClipping cannot clip {type(opt).__name__} under a GradScaler"
                        " (precision='16-mixed'): this optimizer unscales its gradients inside `step()`"
                        " (fused), so they are still scaled when the callback runs. Use a non-fused optimizer"
                        " (e.g. `fused=False`) or precision='bf16-mixed'."
                    )
        self._multi = len(trainer.optimizers) > 1

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        index = _compat.optimizer_index(trainer, optimizer)
        state = self.step_state(_compat.unwrap_optimizer(optimizer), trainer.global_step)
        norm, threshold, coef = self.clip(state.measure(self.norm_type), index)
        if _compat.should_update_logs(trainer):
            suffix = f"_opt{index}" if self._multi else ""
            pl_module.log_dict(
                {
                    f"grad/norm{suffix}": norm,
                    f"grad/clip_threshold{suffix}": threshold,
                    f"grad/clip_coef{suffix}": coef,
                },
                on_step=True,
                on_epoch=False,
            )

    @override
    def on_train_batch_end(self, *args: Any) -> None:
        self._commit()

    def clip(self, measurement: GradMeasurement, index: int = 0) -> tuple[float, float, float]:
        """Clip in place to optimizer ``index``'s threshold for the measured pre-clip norm.

        Returns ``(norm, threshold, coef)``, also kept in `last`. A non-finite norm is not clipped
        (the step is left to `ExplosionGuard` or the GradScaler). Another clipping
        callback sharing the measurement may already have clipped: the gradients then end at the smaller of
        the two bounds (see `clip_`).

        The norm enters the statistics once the step's fate is known (at ``on_train_batch_end``, the next
        step, or ``state_dict``), and only if the update was applied: a step another callback skipped
        (``ExplosionGuard``: a spike, or a NaN on another DDP rank) never counts. So the statistics do not
        depend on the order of the callbacks, and stay identical on every rank.
        """
        self._commit(index)
        norm = measurement.total_norm
        threshold = self.rule(index).threshold(norm)
        coef = measurement.clip_(threshold)
        self._uncommitted[index] = (measurement, threshold)
        self.last[index] = (norm, threshold, coef)
        return norm, threshold, coef

    def _commit(self, index: int | None = None) -> None:
        """Feed the measured norms of finished steps whose update was applied into the statistics."""
        for i in [index] if index is not None else list(self._uncommitted):
            pending = self._uncommitted.pop(i, None)
            if pending is not None and not pending[0].skipped:
                self.rule(i).update(pending[0].total_norm, pending[1])

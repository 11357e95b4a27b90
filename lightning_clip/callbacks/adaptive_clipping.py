"""AdaptiveGradientClipping: clip to a threshold learned from recent gradient norms.

The hooks measure, clip and log; each optimizer's statistics (made on first use, committed once a step's
fate is known, saved, carried across rollbacks) are kept by its base class, in
`lightning_clip.callbacks._clip_statistics`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_clip import _compat
from lightning_clip._validation import check_choice, check_norm_type
from lightning_clip.callbacks._clip_statistics import ClipStatisticsMixin
from lightning_clip.callbacks._per_tensor import PerTensorClipping
from lightning_clip.callbacks._throttle import ThrottleWatch, throttle_message
from lightning_clip.exceptions import LightningClipWarning
from lightning_clip.functional.cautious import CautiousMeanThreshold
from lightning_clip.functional.optimizers import ceiling_applies
from lightning_clip.functional.per_tensor import PER_TENSOR_MODES
from lightning_clip.functional.thresholds import (
    MODES,
    RULE_DEFAULTS,
    MeanThreshold,
    ThresholdRule,
    check_max_norm,
    make_rule,
)
from lightning_clip.step import LOSS_RIDER, GradMeasurement, LossWindow

if TYPE_CHECKING:
    from lightning_clip._compat import LightningModule, Trainer

RULE_ARGS = ("mode", *RULE_DEFAULTS)
"""The arguments that make the threshold rule (`make_rule`)."""
ALL_MODES = (*MODES, *PER_TENSOR_MODES)
"""Every ``mode``: the total-norm rules, then the per-tensor ones (`lightning_clip.functional.per_tensor`)."""

__all__ = ["AdaptiveGradientClipping"]


class AdaptiveGradientClipping(ClipStatisticsMixin):
    r"""Clip the gradient norm to a threshold learned from a running mean of recent norms.

    Acts in ``on_before_optimizer_step``, where gradients are accumulated, AMP-unscaled and not yet
    clipped by Lightning: when the pre-clip total norm ``n`` exceeds the threshold ``c``, every gradient
    is scaled by ``c / n`` (direction kept). Nothing is written when no clipping is needed.

    Modes (``threshold_t`` is the threshold applied to step ``t``'s norm ``n_t``; only finite norms count):

    * ``"mean"`` (default): ``min(factor · μ̂_{t−1}, ceiling_t, max_norm)`` where ``μ̂`` is the
      bias-corrected EMA of the norms as the plain rule applies them (Pascanu et al. 2013 suggest the average
      norm as the threshold; a spike never inflates its own statistics) and ``ceiling`` an absolute bound
      learned from the training loss (`~lightning_clip.functional.ceiling.LossAwareMeanThreshold`):
      it starts at a tenth of the median of the first five norms, widens while the loss stays in its
      band, and is cut by the factor the smoothed loss rose when it climbs above its healthy level *and*
      the gradient norms confirm it (the smoothed norm more than twice its own level): the loss on its
      own never cuts it. No statistic of the norms alone can bound a runaway (the mean of clipped norms
      follows it up). The ceiling applies only to optimizers whose step is proportional to the gradient
      (SGD, with or without momentum: `~lightning_clip.functional.optimizers.ceiling_applies`): an
      optimizer that normalises the gradient's scale (Adam, AdamW, RMSprop, ...) takes the same step
      under any ceiling, so for it only the start applies, widened while it binds and never cut
      (`~lightning_clip.functional.cautious.CautiousMeanThreshold`: it keeps the first norms out of
      Adam's second moment). With ``loss_aware=False`` the first release's plain rule,
      ``min(factor · μ̂_{t−1}, max_norm)``, for every optimizer.
    * ``"zscore"``: ZClip (Kumar et al. 2025) — reproduces ``zclip.ZClip`` 1.0.0 (``mode="zscore"``,
      ``clip_option="adaptive_scaling"``, ``clip_factor=1``); pass ``warmup_steps=25, max_norm=1.0`` for
      ZClip's defaults.
    * ``"percentile"``: AutoClip (Seetharaman et al. 2020) — reproduces ``autoclip.torch.QuantileClip(
      quantile=percentile/100, history_length=window, global_threshold=True)`` 0.2.1.

    Per-tensor modes (`lightning_clip.functional.per_tensor`): each parameter tensor ``i`` is scaled by its
    own coefficient ``c_i ≤ 1`` (one fused multiply), its threshold learned from its own norms ``n_i``:

    * ``"adagc"``: AdaGC (Wang et al. 2025) — reproduces the clipping of ``pytorch_optimizer.AdaGC`` 4.1.0
      for any optimizer (AdaGC itself is Adam): during ``warmup_steps`` a global clip of the total norm to
      ``max_norm`` (AdaGC's ``lambda_abs``; without it the plain ``mean`` rule) and each tensor's ``γ_i``
      the minimum of its clipped norms; afterwards ``c_i = min(1, factor · γ_i / n_i)`` (``factor``: AdaGC's
      ``lambda_rel``), ``γ_i`` an EMA (``decay``: AdaGC's ``beta``) of its clipped norms. AdaGC's
      ``warmup_steps=W`` is ``warmup_steps=W − 1`` here (AdaGC counts from 1); None: 99 (AdaGC's default
      100). AdaGC's defaults: ``mode="adagc", max_norm=1.0, factor=1.05, decay=0.98``.
    * ``"mean_per_tensor"``: the ``mean`` rule per tensor: ``c_i = min(1, factor · μ̂_i / n_i)``, ``μ̂_i`` the
      bias-corrected EMA of tensor ``i``'s norms as applied, from its ``warmup_steps + 1``-th step; no
      absolute threshold unless ``max_norm`` (then a cap on the total norm after the per-tensor clip);
      not loss-aware.

    In both, a step whose norm is NaN/Inf is not clipped and never enters the statistics, and a skipped
    step never counts. The statistics of an optimizer are one stacked tensor on the gradients' device,
    saved in checkpoints and rewound by `ExplosionGuard`'s rollbacks; under DDP and FSDP2 a tensor's norm
    is its full norm, so they are identical on every rank. The per-tensor summary (how many tensors were
    clipped, which one most) rides on the step's one host transfer; nothing is read per tensor.

    Warm-up: the first ``warmup_steps`` steps are capped by ``max_norm``; in ``zscore`` and ``percentile``
    modes, without ``max_norm``, by the ``mean`` rule from the second step on (no unprotected warm-up).

    Args:
        mode: ``"mean"`` | ``"zscore"`` | ``"percentile"`` | ``"adagc"`` | ``"mean_per_tensor"``.
        factor: ``mean``, ``mean_per_tensor``: threshold = factor × running mean; ``adagc``: ``lambda_rel``;
            ``> 1``.
        decay: ``mean``, ``zscore``, the per-tensor modes: EMA decay of the running statistics, in
            ``[0, 1)``.
        z_threshold: ``zscore``: ZClip's ``z_thresh``, ``> 0``.
        percentile: ``percentile``: AutoClip's p, in ``[0, 100]``.
        window: ``percentile``: how many recent norms are kept, ``≥ 1``.
        warmup_steps: steps (``≥ 1``) before the mode's own rule applies; None: 1, 25 for ``zscore``, 99
            for ``adagc``.
        max_norm: optional absolute cap (``> 0``), applied always, also during warm-up; ``adagc``: the
            warm-up's global clip (``lambda_abs``) only.
        norm_type: p of the p-norm, any ``p > 0`` or ``float("inf")``.
        loss_aware: ``mean`` mode: the ceiling above (learned from the training loss for the optimizers
            it can act on, its cautious start alone for the others). False: the plain rule for every
            optimizer (for a loss that is not a signal of the step length: adversarial or curriculum
            objectives, RL).

    Raises:
        ValueError / TypeError: at construction, for an argument out of range or of the wrong type.
        ValueError: at fit start (``on_fit_start``, the first hook where the optimizers exist), for a fused
            optimizer under 16-mixed with a GradScaler (its gradients are still scaled in the hook).

    Warns (``LightningClipWarning``, rank zero, once per episode) when it throttles an optimizer
    persistently: the median clip coefficient of the last `throttle_window` (100) steps below
    `throttle_coef` (0.1). The episode ends when that median is back above 0.5.

    Logged keys (through ``pl_module.log``, on the Trainer's logging steps):

    | key | meaning |
    |---|---|
    | ``grad/norm`` | pre-clip total gradient norm |
    | ``grad/clip_threshold`` | threshold applied this step (∞ until one exists) |
    | ``grad/clip_coef`` | factor the gradients were scaled by (≤ 1; 1 = not clipped) |

    Per-tensor modes log ``grad/norm`` and ``grad/clip_coef`` (the total norm after clipping over the one
    before) and, instead of ``grad/clip_threshold``:

    | key | meaning |
    |---|---|
    | ``grad/clipped_fraction`` | fraction of the tensors with a gradient that were clipped |
    | ``grad/most_clipped/<name>`` | the most clipped tensor's coefficient, keyed by its parameter name |

    The last key is logged only on steps that clip, straight to the loggers (``Logger.log_metrics``);
    ``lightning-clip report`` lists the tensors that were the most clipped most often.

    With several optimizers each key gets the suffix ``_opt{i}``, ``i`` the optimizer's index in
    ``configure_optimizers`` (``grad/norm_opt0``, ``grad/norm_opt1``, …,
    ``grad/most_clipped_opt1/<name>``), and each optimizer keeps its own statistics.

    Notes:
        AMP: under ``16-mixed`` the gradients are already unscaled in the hook; a non-finite norm there
        (GradScaler calibration) is ignored and the scaler skips the step; the loss is unscaled too. DDP:
        gradients are all-reduced before the hook and the loss is averaged over the ranks in one small
        all-reduce per step (shared with `ExplosionGuard`'s when both are attached), so every rank
        computes the same threshold. The loss is the mean of the losses handed to ``backward`` since the
        last optimizer step (every micro-batch of an accumulation window); it rides on the step's single
        device-to-host transfer. FSDP2 / tensor parallelism
        (``ModelParallelStrategy``, ``DTensor`` gradients): the norm is the full gradients' (each rank's
        shards, one small all-reduce), so thresholds and clipping are identical on every rank. DeepSpeed,
        FSDP1 (``FSDPStrategy``) and XLA are refused at setup. ``Trainer(gradient_clip_val=...)`` still
        applies after this callback (a warning says so).

    Examples:
        >>> import pytorch_lightning as pl
        >>> from lightning_clip import AdaptiveGradientClipping
        >>> trainer = pl.Trainer(callbacks=[AdaptiveGradientClipping(factor=2.0)], logger=False)
    """

    clips = True
    throttle_window: int = 100
    """Steps over which the median clip coefficient is judged for the throttling warning."""
    throttle_coef: float = 0.1
    """A median coefficient below this over `throttle_window` steps is a persistent throttle (warned)."""
    throttle_release: float = 0.5
    """... and one back above this ends the episode (the next throttle is warned again)."""

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
        loss_aware: bool = True,
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
        self.loss_aware = loss_aware
        self._new_rule()  # validates every argument of the rule
        self._per_tensor = None  # mode="adagc" / "mean_per_tensor": each tensor clipped to its own threshold
        if mode in PER_TENSOR_MODES:
            self._per_tensor = PerTensorClipping(
                mode, factor, decay, warmup_steps, self.max_norm, self.norm_type
            )
        self._multi = False
        self._losses = LossWindow()  # mode="mean": the losses back-propagated since the last step
        self._last_loss: float | None = None
        #: figures of the last step, per optimizer index: (norm, threshold, coef)
        self.last: dict[int, tuple[float, float, float]] = {}
        self._ceiling_applies: dict[int, bool] = {}  # per optimizer index, from its `defaults` (fit start)
        self._throttle: dict[int, ThrottleWatch] = {}

    def _new_rule(self, index: int | None = None) -> ThresholdRule:
        arguments = {name: getattr(self, name) for name in RULE_ARGS}
        if check_choice("mode", self.mode, ALL_MODES) in PER_TENSOR_MODES:
            arguments["mode"] = "mean"  # validates the shared arguments (the per-tensor rules use their own)
        if index is not None and not self._ceiling_applies.get(index, True):
            arguments["loss_aware"] = False  # its step does not follow the gradient's scale: no loss feedback
            rule = make_rule(**arguments)
            if self.loss_aware and type(rule) is MeanThreshold:  # ``mode="mean"``: its cautious start
                return CautiousMeanThreshold(rule.factor, rule.decay, rule.warmup_steps, rule.max_norm)
            return rule
        return make_rule(**arguments)

    @property
    def uses_loss(self) -> bool:
        """``mode="mean"`` with ``loss_aware``, and (once the fit started) at least one optimizer the
        ceiling applies to: the threshold also follows the training loss (its ceiling)."""
        applies = not self._ceiling_applies or any(self._ceiling_applies.values())
        return self.mode == "mean" and self.loss_aware is True and applies

    def _state_key_args(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*RULE_ARGS, "norm_type")}

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
        self._ceiling_applies = {
            i: ceiling_applies(_compat.unwrap_optimizer(opt).defaults)
            for i, opt in enumerate(trainer.optimizers)
        }
        # a rule made before the fit (e.g. read through `rule(i)`) becomes the kind its optimizer takes
        for i, rule in list(self._rules.items()):
            fresh = self._new_rule(i)
            if type(fresh) is not type(rule):
                fresh.load_state_dict(rule.state_dict())
                self._rules[i] = fresh
        if self._per_tensor is not None:
            self._per_tensor.on_fit_start(pl_module)
        scaler = _compat.gradient_scaler(trainer)
        self._losses.clear()
        self._last_loss = None
        self._losses.scale = None if scaler is None else (lambda: _compat.loss_scale_tensor(scaler))

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self._per_tensor is not None and self.step_tracker is not None:
            self._per_tensor.ride_next_step(trainer, self.step_tracker)
        if self.uses_loss:
            self._losses.add(loss)
            if self.step_tracker is not None:
                self.step_tracker.ride_along(LOSS_RIDER, self._losses.unscaled_mean)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        index = _compat.optimizer_index(trainer, optimizer)
        state = self.step_state(_compat.unwrap_optimizer(optimizer), trainer.global_step)
        if self._per_tensor is not None:
            assert self.step_tracker is not None  # set by step_state
            figures = self._per_tensor.step(trainer, state, self.step_tracker, index)
            if figures is not None:
                self.last[index] = (figures.norm, figures.clipped_total, figures.coef)
                if _compat.should_update_logs(trainer):
                    self._per_tensor.log(trainer, pl_module, figures, f"_opt{index}" if self._multi else "")
            return
        measurement = state.measure(self.norm_type)
        loss = None
        if self.uses_loss:
            _ = measurement.total_norm  # the step's one host transfer, the loss riding along
            loss = state.mean_loss  # averaged over the ranks (rides on the step's one all-reduce)
            if loss is None:  # no backward since the last step (manual optimization: several optimizers
                loss = self._last_loss  # stepped after one backward): that backward's loss
            self._last_loss = loss
            self._losses.clear()
        norm, threshold, coef = self.clip(measurement, index, loss)
        if measurement.finite:
            self._watch_throttle(trainer, optimizer, index, coef)
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
        if self._per_tensor is not None:
            self._per_tensor.commit()

    def clip(
        self, measurement: GradMeasurement, index: int = 0, loss: float | None = None
    ) -> tuple[float, float, float]:
        """Clip in place to optimizer ``index``'s threshold for the measured pre-clip norm and the step's
        ``loss`` (its mean over the ranks; used by ``mode="mean"`` only).

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
        threshold = self.rule(index).threshold(norm, loss)
        coef = measurement.clip_(threshold)
        self._uncommitted[index] = (measurement, threshold, loss)
        self.last[index] = (norm, threshold, coef)
        return norm, threshold, coef

    def _watch_throttle(self, trainer: Trainer, optimizer: Any, index: int, coef: float) -> None:
        """Warn once per episode when the clip coefficient stays far below 1 (see the class docstring)."""
        watch = self._throttle.setdefault(index, ThrottleWatch(self.throttle_window))
        if watch.add(coef, self.throttle_coef, self.throttle_release) and trainer.is_global_zero:
            name = type(_compat.unwrap_optimizer(optimizer)).__name__
            figures = self.last[index]
            rank_zero_warn(
                throttle_message(index, name, watch, self.throttle_window, figures[1], figures[0]),
                category=LightningClipWarning,
            )

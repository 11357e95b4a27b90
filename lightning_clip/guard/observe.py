"""What `ExplosionGuard` observes at an optimizer step, before the ranks' flags are summed: this rank's
signals (`local_signals`) and the divergence detector's reading (`divergence_reading`)."""

from __future__ import annotations

import math

from lightning_clip.functional.divergence import DivergenceDetector, Reading
from lightning_clip.functional.thresholds import MeanThreshold
from lightning_clip.guard import decision as D
from lightning_clip.step import LOSS_RIDER, GradMeasurement, LossWindow, StepState

__all__ = ["divergence_reading", "is_spike", "local_signals"]


def is_spike(m: GradMeasurement, rule: MeanThreshold | None) -> bool:
    """A finite norm above the spike rule's threshold (never without a rule)."""
    return m.finite and rule is not None and m.total_norm > rule.current()


def local_signals(
    state: StepState, losses: LossWindow, spike_rule: MeanThreshold | None, has_scaler: bool
) -> D.LocalSignals:
    """What this rank saw at the step: a non-finite loss or norm, a spike."""
    measurement = state.measure(2.0)
    loss = state.rider(LOSS_RIDER)
    if loss is None:  # the loss was registered after the step's transfer: fetch it apart
        mean = losses.unscaled_mean()
        loss = None if mean is None else float(mean.item())
    return D.LocalSignals(
        nonfinite_loss=loss is not None and not math.isfinite(loss),
        nonfinite_norm=not measurement.finite,
        spike=is_spike(measurement, spike_rule),
        has_scaler=has_scaler,
    )


def divergence_reading(
    detector: DivergenceDetector, state: StepState, reduced: list[float], mean_loss: float | None
) -> Reading | None:
    """The divergence detector's view of the step, from values identical on every rank (the loss's mean
    over the ranks, the all-reduced gradients' norm); None when the step is not judged (a non-finite loss
    or norm anywhere: another kind covers it). Shared with the other callbacks as ``StepState.divergence``."""
    norm = state.measure(2.0).total_norm
    if any(v > 0 for v in reduced) or not math.isfinite(norm):
        return None
    if mean_loss is not None and not math.isfinite(mean_loss):
        return None
    reading = detector.peek(mean_loss, norm)
    state.divergence = reading
    return reading

"""The ``mean`` rule under the cautious start alone (`CautiousMeanThreshold`): the default of
``mode="mean"`` for an optimizer that normalises the gradient's scale (Adam's family, RMSprop, ...).

No Lightning and no tensors here, like `lightning_clip.functional.thresholds`, whose contract the rule
keeps: host-side floats once per optimizer step, a ``state_dict`` of plain values.
"""

from __future__ import annotations

from lightning_clip.functional.ceiling import LossAwareMeanThreshold

__all__ = ["CautiousMeanThreshold"]


class CautiousMeanThreshold(LossAwareMeanThreshold):
    """``min(factor · μ̂_{t−1}, ceiling_t, max_norm)`` with the ceiling of `LossAwareMeanThreshold` fed no
    loss: it starts at a tenth of the median of the first five finite norms and widens by a doubling per
    10 steps while it binds (not paced by the norms' noise: `fast_rate`). Nothing cuts it: no episode, no
    probe, no `tighten`.

    **Why, under Adam.** Adam's step does not follow the gradient's scale, so the start shortens no step.
    What it changes is the second-moment estimate: with ``β₂ = 0.999`` it averages about the last 1,000
    squared gradients, and the first norms of a run are often its largest (a fresh network's output layer,
    an untrained embedding). Left unclipped they fill that average, and every later step divides by it:
    a run whose norms fall 4× over its first few hundred steps takes steps about 2× shorter than its
    learning rate asks for, until the memory fades. With the start they enter at a tenth of the norms'
    own scale. (A fixed ``gradient_clip_val`` that binds early does the same by accident.) Measured on
    both do-no-harm zoos (``benchmarks/healthy.py``, ``benchmarks/healthy_b.py``).

    The loss is ignored (``loss`` is accepted for the rule protocol). `current`, `state_dict` and
    `load_state_dict` are the loss-aware rule's; its loss band stays empty.

    Examples:
        >>> rule = CautiousMeanThreshold()
        >>> [round(rule.step(n, loss=50.0), 3) for n in (4.0, 2.0, 1.0, 1.0, 1.0)]  # a tenth of the median
        [0.4, 0.3, 0.2, 0.15, 0.1]
        >>> round(rule.step(1.0), 4)  # binding: widened by 2^0.1
        0.1072
        >>> rule.cuts, rule.probes
        (0, 0)
    """

    follows_loss = False

    def fast_rate(self) -> float:
        """`fast_growth` (a doubling per 10 steps), whatever the noise of the norms. The loss-aware rule
        paces its widening by its norm band's window so as not to widen an SGD step into a runaway
        before the smoothed norm can show it; an Adam step does not follow the scale, so there is nothing
        to pace, and a start held for hundreds of steps by noisy norms (a GAN's generator) would only
        throttle the run for nothing."""
        return self.fast_growth

    def threshold(self, norm: float, loss: float | None = None) -> float:
        return super().threshold(norm, None)

    def update(self, norm: float, threshold: float, loss: float | None = None) -> None:
        super().update(norm, threshold, None)

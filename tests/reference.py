"""Independent references for the clipping tests: docs/design.md's ``mean`` formula written out (see
docs/design.md), the peer libraries driven through their own ``step()``, and callbacks that record the
pre-clip norms and the applied figures. Imported by the tests; holds no test itself."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytorch_lightning as pl
import torch

EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s eps, also used by the callback


def naive_norm(grads: list[torch.Tensor]) -> float:
    """Total 2-norm with a float64 per-tensor loop."""
    if not grads:
        return float("nan")
    return math.sqrt(sum(float(torch.sum(g.double() ** 2)) for g in grads))


def optimizer_index(trainer: pl.Trainer, optimizer: Any) -> int:
    raw = getattr(optimizer, "_optimizer", optimizer)
    return next(i for i, opt in enumerate(trainer.optimizers) if opt is raw)


class PreClipNorms(pl.Callback):
    """Pre-clip norms per optimizer index, measured naively; list it before the clipping callback."""

    def __init__(self) -> None:
        self.norms: dict[int, list[float]] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms.setdefault(optimizer_index(trainer, optimizer), []).append(naive_norm(grads))


class LastFigures(pl.Callback):
    """Collects the clipping callback's ``last`` figures (norm, threshold, coef) per optimizer, per step."""

    def __init__(self, clipper: Any) -> None:
        self.clipper = clipper
        self.figures: dict[int, list[tuple[float, float, float]]] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        index = optimizer_index(trainer, optimizer)
        self.figures.setdefault(index, []).append(self.clipper.last[index])

    def thresholds(self, index: int = 0) -> list[float]:
        return [f[1] for f in self.figures[index]]


def mean_thresholds(
    norms: list[float], factor: float, decay: float, warmup_steps: int = 1, max_norm: float | None = None
) -> list[float]:
    """docs/design.md ``mean`` mode: threshold per step, counting finite norms only."""
    cap = math.inf if max_norm is None else max_norm
    out = []
    m, t = 0.0, 0
    for n in norms:
        if t < warmup_steps:
            threshold = cap
        else:
            mu_hat = m / (1.0 - decay**t)
            threshold = min(factor * mu_hat, cap)
        out.append(threshold)
        if math.isfinite(n):
            t += 1
            m = decay * m + (1.0 - decay) * min(n, threshold)
    return out


def loss_band_readings(
    losses: list[float | None], max_smoothing: float = math.inf
) -> list[tuple[float, float, float] | None]:
    """`loss_band_windows`' readings."""
    return loss_band_windows(losses, max_smoothing)[0]


def loss_band_windows(
    losses: list[float | None], max_smoothing: float = math.inf
) -> tuple[list[tuple[float, float, float] | None], list[float], list[float | None], list[float | None]]:
    """`lightning_clip.functional.band.LossBand` written out from its documentation. Per value:
    ``(excess, elevated threshold, calm threshold)``, the thresholds as they stood before the value (None:
    not judged).

    ``x = ln(loss)``; noise ``σ`` = √π/2 × the bias-corrected EMA (0.98) of ``|x_t − x_{t−1}|`` over calm
    steps (excess ≤ ln(2)/2, and every step before the reference is set; from the 6th term on each capped
    at 4 × their bias-corrected mean); smoothing ``n = max(9, (5σ / ln 2)²)``, ``d = 1 − 2/(n + 1)``;
    ``fast`` = EMA with weight-sum bias correction; ``σ_f = σ·√((1−d)/(1+d))``; the spread of ``fast`` is
    ``σ·√(Σw²)/Σw``; ``ref = min(fast + √(spread² − σ_f²), ref + 0.001)``, set once the noise has 3
    terms (until then the excess is 0); excess = ``fast − ref``. ``max_smoothing`` caps ``n``. Thresholds: elevated ``= clip(5 σ_f,
    ln 1.25, ln 2)``, calm ``= clip(3 σ_f, ln 1.1, ln(2)/2)``. Also returned: the window ``n`` after each
    value (the next value's; unchanged by a value not judged), and ``fast`` after each value as the next
    value's smoothing weighs it (None: the value is not judged, or the reference is not set yet), and
    the *settled* ``fast`` after each value (the same None): ``fast + √(spread² − σ_f²)`` with ``σ``, ``n``
    and the weights as they stand after the value.
    """
    band = BandSteps(max_smoothing)
    steps = [band.step(loss) for loss in losses]
    return [r[0] for r in steps], [r[1] for r in steps], [r[2] for r in steps], [r[3] for r in steps]


class BandSteps:
    """`loss_band_windows` one value at a time (`step`), so that a rule may re-set the reference between
    values (`accept`: the reference becomes the last settled ``fast``, once it is set)."""

    def __init__(self, max_smoothing: float = math.inf) -> None:
        self.max_smoothing = max_smoothing
        self.n = min(9.0, max_smoothing)
        self.weights: list[float] = []  # the EMA's weight on each value seen so far (for Σw and Σw²)
        self.values: list[float] = []
        self.ref: float | None = None
        self.last: float | None = None
        self.jumps: list[float] = []  # the noise terms, oldest first
        self.low: float | None = None  # the last settled fast
        self.peeked = math.nan  # the last reading's fast (before its value was fed)

    def sigma(self) -> float:
        if not self.jumps:
            return 0.0
        k = len(self.jumps)
        ema = sum(0.02 * 0.98 ** (k - 1 - i) * j for i, j in enumerate(self.jumps))
        return (math.pi**0.5 / 2) * ema / (1 - 0.98**k)

    def accept(self) -> None:
        if self.ref is not None and self.low is not None:
            self.ref = self.low

    def step(
        self, loss: float | None
    ) -> tuple[tuple[float, float, float] | None, float, float | None, float | None]:
        """One value: its reading, the window after it, ``fast`` and the settled ``fast`` after it."""
        if loss is None or not math.isfinite(loss) or loss <= 0:
            return None, self.n, None, None
        max_smoothing, weights, values, jumps = self.max_smoothing, self.weights, self.values, self.jumps
        x = math.log(min(loss, 3.4028234663852886e38))
        s = self.sigma()
        n = min(max(9.0, (5 * s / math.log(2.0)) ** 2), max_smoothing)
        d = 1 - 2 / (n + 1)
        sigma_fast = s * math.sqrt((1 - d) / (1 + d))
        elevated = min(max(math.log(1.25), 5 * sigma_fast), math.log(2.0))
        calm = min(max(math.log(1.1), 3 * sigma_fast), math.log(2.0) / 2)
        w = [*(d * wi for wi in weights), 1 - d]
        fast = sum(wi * vi for wi, vi in zip(w, [*values, x], strict=True)) / sum(w)
        judged = len(jumps) >= 3
        if judged:
            spread = s * math.sqrt(sum(wi * wi for wi in w)) / sum(w)
            candidate = fast + math.sqrt(max(0.0, spread**2 - sigma_fast**2))
            new_ref = candidate if self.ref is None else min(candidate, self.ref + 0.001)
        else:
            new_ref = fast
        excess = fast - new_ref
        self.peeked = fast
        if self.last is not None and (not judged or excess <= math.log(2.0) / 2):
            jump = abs(x - self.last)
            if len(jumps) >= 5:
                k = len(jumps)
                mean = sum(0.02 * 0.98 ** (k - 1 - i) * j for i, j in enumerate(jumps)) / (1 - 0.98**k)
                jump = min(jump, 4 * mean)
            jumps.append(jump)
        s = self.sigma()
        self.n = min(max(9.0, (5 * s / math.log(2.0)) ** 2), max_smoothing)
        d = 1 - 2 / (self.n + 1)
        self.weights = weights = [*(d * wi for wi in weights), 1 - d]
        values.append(x)
        self.last = x
        if judged:
            self.ref = new_ref
        after = sum(wi * vi for wi, vi in zip(weights, values, strict=True)) / sum(weights)
        spread_after = s * math.sqrt(sum(wi * wi for wi in weights)) / sum(weights)
        sigma_fast_after = s * math.sqrt((1 - d) / (1 + d))
        low = after + math.sqrt(max(0.0, spread_after**2 - sigma_fast_after**2))
        self.low = low
        return (
            (excess, elevated, calm),
            self.n,
            None if self.ref is None else after,
            None if self.ref is None else low,
        )


def loss_band_excess(losses: list[float | None], max_smoothing: float = math.inf) -> list[float | None]:
    """`loss_band_readings`' excess per value (None: the value is not judged)."""
    return [None if r is None else r[0] for r in loss_band_readings(losses, max_smoothing)]


def loss_aware_thresholds(
    norms: list[float],
    losses: list[float | None],
    factor: float = 1.5,
    decay: float = 0.97,
    warmup_steps: int = 1,
    max_norm: float | None = None,
    paced: bool = True,
    conditions: bool = True,
) -> list[float]:
    """The default ``mean`` rule (loss-aware ceiling), written out from its documentation: the threshold
    per step for the pre-clip ``norms`` and the step ``losses`` (None: no loss), every step applied.
    ``conditions=False``: an episode opens on the norms' confirmation alone (neither the ceiling's bound
    against the mean term nor the loss's against where training began).
    ``paced=False`` with no losses: the cautious start alone of an optimizer that normalises the gradient
    (the ceiling widens by ``2**0.1`` on every binding step, whatever the norms' window).

    Ceiling: over the first 5 finite norms, 0.1 x their median so far (outside an episode), from there
    on as follows; an episode while the loss excess is above its elevated threshold
    (`loss_band_readings`), opened only when the norm's own band (the same band fed the norms) reads an
    excess above ln 2 (the norms confirm the rise; an open episode goes on without) while the ceiling
    is at most twice the mean term and the reading's ``fast`` is not more than ln 10 below the loss band's
    first reference (where training began); base = the threshold in force (a new episode's no lower than
    the last base taken, by any episode since the last one undone, unless the norm is over twice the mean
    term or the reading's ``fast`` is not ln 2 below where training began), re-based on the threshold in
    force after 10 steps, 3 bases at most; ceiling cut to ``base * max(exp(-excess), 1e-3)``, slow-start
    level = base / 2); otherwise, with the excess at
    most its calm threshold (or no loss) and the norm above the ceiling, the ceiling grows by
    ``min(2**0.1, 2**(1/w))`` below the slow-start level, ``w`` the norm band's window after
    the step, by ``1.002`` above it — neither while *drifted*: the loss band's ``fast`` after the step
    more than the calm threshold above its lowest value so far. Probes: outside an episode, once a *stall*
    (the same test against the lowest ``fast`` since the last probe undone) has lasted ``w`` binding steps
    (``w`` the longer of the two bands' windows after the step, rounded up to whole steps; a step that
    does not stall resets the count, one that stalls without binding leaves it), the ceiling halves; ``w``
    steps later it stays halved (and the slow-start level becomes no higher) if ``fast`` fell more than
    the calm threshold below where it stood when the probe began, else it goes back (the slow-start level
    untouched) and the stall's lowest value becomes the current settled ``fast`` (the drift's lowest value
    stays). The lowest values (drift and stall) are of the *settled* ``fast`` (`loss_band_windows`), not
    ``fast`` itself: a lucky low of a few values averaged is not a lowest level. An episode closes any probe and resets the count. The mean term is
    `mean_thresholds`'s, fed without the ceiling.

    Undone episodes: each base records the loss band's ``fast`` of its reading (before the value is fed)
    as its peak (then the highest such ``fast`` of its steps), and the highest single ``ln(loss)`` of its
    first 5 steps. At an elevated step of an episode with all 3 bases made, 10 or more steps after the
    third, whose reading's ``fast`` is neither above that highest single value nor more than the calm
    threshold below that peak, the episode ends undone: no cut, the ceiling back up to where it stood
    before the episode's first base (before the halving of a probe the base ended, if one was open; and the slow-start level to where it was then); after the step,
    both bands' references become their settled ``fast``, and so do the drift's and the stall's lowest
    values.
    """
    cap = math.inf if max_norm is None else max_norm
    loss_band, norm_band = BandSteps(), BandSteps()
    out = []
    m, t = 0.0, 0  # running mean of the norms (plain rule)
    ceiling, slow, base, age, bases = math.inf, math.inf, None, 0, 0
    best = math.inf  # the lowest smoothed log loss once the band's reference is set
    since = math.inf  # ... since the last probe the loss did not answer
    drift = 0  # binding steps of the current drift
    probe = None  # (smoothed log loss at its start, its age, the ceiling before it) of the open probe
    before_episode = None  # (ceiling, slow-start level) before the open episode's first base
    last = 0.0  # the last base any episode took (0 before the first, and after an undone episode)
    peak = highest = -math.inf  # the open base's peak fast and highest single log loss of its first steps
    start: list[float] | None = []  # the finite norms of the start (its first 5); None after
    began = None  # the loss band's first reference (where training began), as it stood before the value
    for n, loss in zip(norms, losses, strict=True):
        reading, lw, fast, low = loss_band.step(loss)
        peeked = loss_band.peeked
        learned = began is not None and reading is not None and peeked < began - math.log(10.0)
        if began is None and loss_band.ref is not None:
            began = loss_band.ref
        norm_reading, nw, _, _ = norm_band.step(n)
        undone = False
        excess, elevated, calm = (None, math.inf, math.inf) if reading is None else reading
        confirmed = norm_reading is not None and norm_reading[0] > math.log(2.0)
        mean_term = cap if t < warmup_steps else min(factor * m / (1.0 - decay**t), cap)
        if start is not None and base is None and math.isfinite(n) and n > 0:
            ceiling = 0.1 * statistics.median(
                [*start, n]
            )  # the first 5 finite norms: a tenth of their median
        rules = ceiling <= 2.0 * mean_term  # the ceiling is within twice the mean term
        opens = confirmed and ((rules and not learned) or not conditions)
        if excess is not None and excess > elevated and (opens or base is not None):
            assert loss is not None
            if base is None or (age >= 10 and bases < 3):
                current = min(ceiling, mean_term)
                escalates = n > 2.0 * mean_term or (began is not None and peeked >= began - math.log(2.0))
                if base is None and not escalates:  # no lower than the last base of any episode
                    current = max(current, last)
                if math.isfinite(current):
                    if base is None:  # an open probe ends: its halving is part of what is replaced
                        before_episode = (ceiling if probe is None else max(ceiling, probe[2]), slow)
                    base, age, bases = current, 0, bases + 1
                    slow, last = 0.5 * base, base
                    peak, highest = peeked, math.log(loss)
            elif age >= 10 and not (peeked > highest or peeked < peak - calm):
                undone, base, age, bases, last = True, None, 0, 0, 0.0
                assert before_episode is not None
                ceiling, slow = max(ceiling, before_episode[0]), before_episode[1]
            elif base is not None:
                peak = max(peak, peeked)
                if age < 5:
                    highest = max(highest, math.log(loss))
            if base is not None:
                ceiling = min(ceiling, base * max(math.exp(-excess), 1e-3))
            age = age + 1 if base is not None else 0
        else:
            base, age, bases = None, 0, 0
        if undone:
            loss_band.accept()
            norm_band.accept()
            best = since = loss_band.low
        threshold = min(mean_term, ceiling)
        out.append(threshold)
        healthy = excess is None or excess <= calm
        if fast is not None and low is not None and not undone:
            best, since = min(best, low), min(since, low)
        drifted = excess is not None and fast is not None and fast - best > calm
        stalled = excess is not None and fast is not None and fast - since > calm
        binding = math.isfinite(n) and n > ceiling
        window = math.ceil(max(lw, nw) - 1e-6)  # whole steps
        if base is not None:
            drift, probe = 0, None
        elif probe is not None:
            level, probe_age, before = probe
            probe = (level, probe_age + 1, before)
            if probe_age + 1 >= window and fast is not None:
                if fast >= level - calm:  # the loss did not answer the halving: undone
                    ceiling = max(ceiling, before)
                    since = low if low is not None else fast
                else:  # answered: kept, and the slow-start level follows
                    slow = min(slow, ceiling)
                probe, drift = None, 0
        else:
            drift = drift + (1 if binding else 0) if stalled else 0
            if drift >= window and fast is not None:
                probe = (fast, 0, ceiling)
                ceiling *= 0.5
                drift = 0
            elif healthy and binding and not drifted:
                fast = min(2.0**0.1, 2.0 ** (1.0 / nw)) if paced else 2.0**0.1
                ceiling *= fast if ceiling < slow else 1.002
        if math.isfinite(n) and n > 0:
            t += 1
            m = decay * m + (1.0 - decay) * min(n, mean_term)
            if start is not None:
                start = [*start, n] if t < 5 else None
    return out


class StepLosses(pl.Callback):
    """The mean training loss of each optimizer step (every micro-batch since the last step), recorded
    from ``on_before_backward``, divided by the GradScaler's scale under 16-mixed (``backward`` gets the
    scaled loss there); list it anywhere."""

    def __init__(self) -> None:
        self._window: list[float] = []
        self.losses: list[float] = []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = 1.0 if scaler is None else float(scaler.get_scale())
        self._window.append(float(loss.detach().double()) / scale)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.losses.append(sum(self._window) / len(self._window) if self._window else math.nan)
        self._window = []


def expected_applied(norms: list[float], thresholds: list[float]) -> list[float]:
    """``min(n, c)``, with the clip coefficient's eps as in ``clip_grad_norm_``."""
    return [n * c / (n + EPS) if n > c else n for n, c in zip(norms, thresholds, strict=True)]


def _one_param(norm: float) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    p.grad = torch.tensor([norm], dtype=torch.float64)
    return p


def zclip_applied(
    norms: list[float], z_threshold: float, decay: float, warmup_steps: int, max_norm: float
) -> list[float]:
    """The norm ZClip 1.0.0 (``zscore``, ``adaptive_scaling``) lets through at each step."""
    from zclip import ZClip

    zc = ZClip(alpha=decay, z_thresh=z_threshold, max_grad_norm=max_norm, warmup_steps=warmup_steps)
    out = []
    for n in norms:
        model = torch.nn.Module()
        model.p = _one_param(n)
        zc.step(model)
        out.append(float(model.p.grad))
    return out


def autoclip_applied(norms: list[float], percentile: float, window: int) -> list[float]:
    """The norm autoclip 0.2.1 ``QuantileClip(global_threshold=True)`` lets through at each step."""
    from autoclip.torch import QuantileClip

    p = _one_param(1.0)
    clipper = QuantileClip([p], quantile=percentile / 100.0, history_length=window, global_threshold=True)
    out = []
    for n in norms:
        p.grad = torch.tensor([n], dtype=torch.float64)
        clipper.step()
        out.append(float(p.grad))
    return out


def assert_clipped_some(norms: list[float], thresholds: list[float]) -> None:
    """The run is informative: some steps were clipped and some were not."""
    clipped = [n > c for n, c in zip(norms, thresholds, strict=True) if math.isfinite(n)]
    assert any(clipped), "no step was clipped: the test would not notice missing clipping"
    assert not all(clipped), "every step was clipped: the test would not notice clipping everything"


# ------------------------------------------------------------------------------ tests of the references

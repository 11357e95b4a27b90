"""One function per cause: the figures in, a `Cause` (decades explained, what was measured, the fixes) out."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_clip._numbers import median
from lightning_clip.diagnosis.records import (
    CAP,
    DEAD_SHARE,
    FLAT_SHARE,
    INIT_HIGH,
    INIT_LOW,
    NEGATIVE_BIAS,
    PRESENT_DECADES,
    RELU_LIKE,
    SATURATING,
    ZERO_GRADIENT,
    Cause,
    Fix,
    GateFigures,
    ModelFacts,
    Onset,
    ScaleFigures,
    SiteFigures,
)
from lightning_clip.diagnosis.text import fmt_num, fmt_pct, plural, tenth_power


# ---------------------------------------------------------------------------------------- the causes
def blowup_cause(onset: Onset | None, facts: ModelFacts) -> Cause | None:
    """Collapse after a blow-up: a jump of the loss or the gradient norm shortly before the onset."""
    if onset is None or onset.jump_step is None:
        return None
    what = "training loss" if onset.jump_what == "loss" else "gradient norm"
    if math.isfinite(onset.jump_value):
        value = f"{fmt_num(onset.jump_value)} (×{onset.jump_value / onset.jump_before:.3g})"
    else:
        value = f"{onset.jump_value} (not finite)"
    lead = onset.first_flagged - onset.jump_step
    healthy = (
        f"; the check at step {onset.healthy_before} was healthy" if onset.healthy_before is not None else ""
    )
    lr = f"; the learning rate was {onset.lr:g}" if onset.lr is not None else ""
    figures = (
        f"the {what} jumped from {fmt_num(onset.jump_before)} (median of the {plural(onset.jump_window, 'step')}"
        f" before) to {value} at step"
        f" {onset.jump_step}, {plural(lead, 'step')} before the vanishing was first flagged (step"
        f" {onset.first_flagged}){healthy}{lr}. The network collapsed after a blow-up: the learning rate is"
        " the likely cause."
    )
    lr_now = f"{onset.lr:g}; " if onset.lr is not None else ""
    fixes = [Fix("lr", f"a lower learning rate ({lr_now}try a tenth of it)")]
    warmup = "a learning-rate warm-up"
    if facts.post_ln:
        warmup += (
            f": the {plural(facts.post_ln, 'transformer layer')} with norm_first=False (post-LN) need one"
            " (Xiong et al. 2020), or norm_first=True"
        )
    fixes.append(Fix("warmup", warmup))
    if not facts.clipping:
        fixes.append(
            Fix("clip", "gradient clipping (AdaptiveGradientClipping) to bound the step that blew up")
        )
    if not facts.guard:
        fixes.append(Fix("guard", "ExplosionGuard, to roll a blown-up run back to its last good state"))
    return Cause("blowup", "Collapse after a blow-up", math.inf, figures, tuple(fixes))


def saturation_cause(
    sites: Sequence[SiteFigures], scales: Sequence[ScaleFigures], facts: ModelFacts
) -> Cause | None:
    """Sigmoid / tanh layers: the product of their derivatives across depth, and flat units."""
    sat = [s for s in sites if s.kind in SATURATING]
    if not sat:
        return None
    decades = -sum(math.log10(max(s.mean_derivative, 1e-300)) for s in sat)
    worst = max(sat, key=lambda s: s.flat_share)
    if decades < PRESENT_DECADES and worst.flat_share < FLAT_SHARE:
        return None
    kinds = [k for k in SATURATING if any(s.kind == k for s in sat)]
    counts = " and ".join(plural(sum(s.kind == k for s in sat), f"{k} layer") for k in kinds)
    parts = [counts]
    n_sig = sum(s.kind == "sigmoid" for s in sat)
    if n_sig:
        parts.append(f"σ' ≤ 0.25 at each sigmoid: at most 0.25^{n_sig} = {fmt_num(0.25**n_sig)} across depth")
    flat = sum(s.flat_share * s.elements for s in sat) / max(1, sum(s.elements for s in sat))
    where = f", most at `{worst.layer}` ({fmt_pct(worst.flat_share)})" if worst.flat_share > 0 else ""
    parts.append(
        f"measured: the product of their mean derivatives is {tenth_power(decades)}, and {fmt_pct(flat)} of"
        f" their units are in the flat region (derivative below 10% of its maximum){where}"
    )
    big = [c for c in scales if c.kind in SATURATING and c.ratio > INIT_HIGH]
    if big:
        parts.append(
            f"{plural(len(big), 'layer')} feeding them {'has' if len(big) == 1 else 'have'} rms(W)·√fan_in"
            f" {fmt_num(median([c.scale for c in big]))}, above the {fmt_num(big[0].gain)} the activation needs"
        )
    fixes = [
        Fix("relu", f"ReLU-family activations (ReLU, GELU, SiLU) instead of {'/'.join(kinds)} between layers")
    ]
    if not facts.normalisation:
        fixes.append(Fix("norm", "normalisation layers (LayerNorm, BatchNorm) before the activations"))
    if facts.residual is False:
        fixes.append(Fix("residual", "residual (skip) connections around blocks of layers"))
    if big:
        fixes.append(
            Fix("init", "a smaller initialisation (nn.init.xavier_uniform_) of the layers feeding them")
        )
    return Cause("saturation", "Saturating activations", decades, "; ".join(parts) + ".", tuple(fixes))


def dead_cause(
    sites: Sequence[SiteFigures], scales: Sequence[ScaleFigures], facts: ModelFacts
) -> Cause | None:
    """ReLU layers whose units are never active over the batch: no gradient passes them."""
    relu = [s for s in sites if s.kind in ZERO_GRADIENT]
    dead = sorted((s for s in relu if s.dead_share >= DEAD_SHARE), key=lambda s: -s.dead_share)
    if not dead:
        return None
    decades = min(CAP, -sum(math.log10(max(1.0 - s.dead_share, 10**-CAP)) for s in relu))
    listed = ", ".join(f"`{s.layer}` {fmt_pct(s.dead_share)} of {s.units}" for s in dead[:5])
    more = f" and {len(dead) - 5} more" if len(dead) > 5 else ""
    figures = (
        f"{plural(len(dead), 'ReLU layer')} of {len(relu)} {'has' if len(dead) == 1 else 'have'} at least"
        f" {fmt_pct(DEAD_SHARE)} of {'its' if len(dead) == 1 else 'their'} units never active over the check's"
        f" batch (no gradient passes them): {listed}{more}"
    )
    by_layer = {c.layer: c for c in scales}
    biased = [
        by_layer[s.layer]
        for s in dead
        if s.layer in by_layer and (by_layer[s.layer].bias_mean or 0.0) < NEGATIVE_BIAS
    ]
    if biased:
        mean_bias = median([c.bias_mean for c in biased if c.bias_mean is not None])
        figures += (
            f"; the layers feeding them have negative biases (mean {fmt_num(mean_bias)}, median over layers)"
        )
    fixes = [Fix("leaky", "LeakyReLU, GELU or SiLU instead of ReLU (no zero-gradient region)")]
    if biased:
        names = ", ".join(f"`{c.layer}`" for c in biased[:4]) + (" …" if len(biased) > 4 else "")
        fixes.append(Fix("bias", f"biases initialised at 0 (nn.init.zeros_) in {names}"))
    if not facts.normalisation:
        fixes.append(Fix("norm", "normalisation (BatchNorm, LayerNorm) before the ReLUs, to re-centre them"))
    fixes.append(Fix("lr", "a lower learning rate, if the units died during training"))
    return Cause("dead", "Dead units", decades, figures + ".", tuple(fixes))


def init_cause(scales: Sequence[ScaleFigures], facts: ModelFacts) -> Cause | None:
    """Weights too small for their activation, compounding across depth."""
    low = [c for c in scales if c.ratio < INIT_LOW]
    decades = -sum(math.log10(c.ratio) for c in scales if 0 < c.ratio < 1.0)
    if not low or decades < PRESENT_DECADES:
        return None
    kinds = sorted({c.kind for c in low})
    gains = ", ".join(f"{k} needs {fmt_num(next(c.gain for c in low if c.kind == k))}" for k in kinds)
    figures = (
        f"{plural(len(low), 'layer')} feeding an activation {'has' if len(low) == 1 else 'have'} rms(W)·√fan_in"
        f" {fmt_num(median([c.scale for c in low]))} (median) where {gains} (nn.init.calculate_gain):"
        f" ×{fmt_num(median([c.ratio for c in low]))} per layer,"
        f" {tenth_power(decades)} across depth"
    )
    inits = []
    if any(k in RELU_LIKE for k in kinds):
        inits.append("nn.init.kaiming_normal_(weight, nonlinearity='relu')")
    if any(k in SATURATING for k in kinds):
        inits.append("nn.init.xavier_uniform_(weight, gain=nn.init.calculate_gain('tanh'))")
    fixes = [
        Fix(
            "init",
            "an initialisation scaled to the activation: " + " / ".join(inits or ["nn.init.xavier_uniform_"]),
        )
    ]
    if not facts.normalisation:
        fixes.append(
            Fix("norm", "normalisation layers (LayerNorm, BatchNorm), which undo a wrong weight scale")
        )
    return Cause("init", "Initialisation", decades, figures + ".", tuple(fixes))


def depth_causes(
    sites: Sequence[SiteFigures], scales: Sequence[ScaleFigures], facts: ModelFacts, onset: Onset | None
) -> list[Cause]:
    """The named causes of a vanishing through depth, strongest first (a blow-up first of all)."""
    found = [
        blowup_cause(onset, facts),
        saturation_cause(sites, scales, facts),
        dead_cause(sites, scales, facts),
        init_cause(scales, facts),
    ]
    return sorted((c for c in found if c is not None), key=lambda c: -c.decades)


def _radius_cause(
    name: str, radii: dict[str, float], h: GateFigures | None, span: int, tanh: bool
) -> Cause | None:
    radius = max(radii.values()) if radii else math.nan
    if not (math.isfinite(radius) and radius < 1.0):
        return None
    decades = -span * math.log10(max(radius, 1e-300))
    figures = (
        f"the spectral radius of `{name}.weight_hh_l0` is {radius:.3g} (< 1): the gradient through time"
        f" shrinks like {radius:.3g}^T, {tenth_power(decades)} over the {span} steps between the ends"
    )
    if h is not None and tanh:
        per_step = radius * h.mean_derivative
        decades = -span * math.log10(max(per_step, 1e-300))
        figures += (
            f"; with the mean tanh' of its units ({h.mean_derivative:.2g}), about ×{per_step:.2g} per step"
        )
    fixes = (
        Fix(
            "orthogonal",
            f"an orthogonal recurrent weight in `{name}` (nn.init.orthogonal_(weight_hh_l0): radius 1)",
        ),
        Fix(
            "gated",
            f"a gated cell (nn.LSTM / nn.GRU) instead of `{name}`: its additive state carries the error back",
        ),
    )
    return Cause("radius", "Recurrent spectral radius", decades, figures + ".", fixes)


def _saturated_state_cause(name: str, h: GateFigures | None, span: int) -> Cause | None:
    """A tanh RNN whose hidden units sit in the flat region: each step multiplies by their tanh'."""
    if h is None or h.flat_share < FLAT_SHARE:
        return None
    decades = -span * math.log10(max(h.mean_derivative, 1e-300))
    figures = (
        f"{fmt_pct(h.flat_share)} of the hidden activations of `{name}` are in the flat region of tanh (mean"
        f" tanh' {h.mean_derivative:.2g}; {fmt_pct(h.stuck_share)} of the units over the whole batch): every"
        f" step multiplies the gradient by tanh', {tenth_power(decades)} over the {span} steps"
    )
    fixes = (
        Fix("lr", "a lower learning rate, if the units saturated during training"),
        Fix(
            "gated",
            f"a gated cell (nn.LSTM / nn.GRU) instead of `{name}`: its additive state carries the error back",
        ),
    )
    return Cause("saturation", "Saturated hidden units", decades, figures + ".", fixes)


def _gate_cause(name: str, mode: str, hidden: int, gate: GateFigures, span: int) -> Cause | None:
    """LSTM forget gates / GRU update gates that let the state decay: credited with what even the most
    open unit loses over the span (the gradient through time follows the units that keep their state)."""
    if not math.isfinite(gate.best_log10):
        return None
    decades = -span * gate.best_log10
    if decades < PRESENT_DECADES:
        return None
    rows = f"{hidden}:{2 * hidden}"
    if mode == "LSTM":
        key, title, what, state = "forget", "Closed forget gates", "forget gates", "cell state"
        target = (
            "a higher forget-gate bias, 3 to 5,"
            if (gate.bias or 0.0) >= 0.5
            else "a forget-gate bias of 1 to 5"
        )
        fix = Fix(
            "forget",
            f"open the forget gates: {target} in `{name}` (`bias_hh_l0[{rows}]` and `bias_ih_l0[{rows}]`,"
            " gate order i, f, g, o; Gers et al. 2000)",
        )
    else:
        key, title, what, state = "update", "Update gates that forget", "update gates", "hidden state"
        fix = Fix(
            "update",
            f"bias the update gates of `{name}` towards keeping the state (`bias_hh_l0[{rows}]` > 0)",
        )
    bias = f"; their bias is {gate.bias:.2g} (bias_ih + bias_hh, mean)" if gate.bias is not None else ""
    figures = (
        f"the {what} of `{name}` (layer 0) average {gate.mean:.2g}{bias}. Even the unit that keeps its"
        f" {state} best keeps ×{10**gate.best_log10:.2g} of it per step (geometric mean over the batch):"
        f" {tenth_power(decades)} over the {span} steps between the ends"
    )
    if gate.stuck_share > 0:
        figures += f"; {fmt_pct(gate.stuck_share)} of the units' gates are saturated over the whole batch"
    return Cause(key, title, decades, figures + ".", (fix,))


def time_causes(
    name: str,
    mode: str,
    hidden: int,
    radii: dict[str, float],
    gates: dict[str, GateFigures],
    span: int,
    facts: ModelFacts,
    onset: Onset | None,
) -> list[Cause]:
    """The named causes of a vanishing through time in the recurrent layer ``name`` (``mode``:
    ``RNN_TANH``, ``RNN_RELU``, ``LSTM``, ``GRU``), strongest first.

    Examples:
        >>> f = GateFigures("f", 0.0, 0.0, 0.045, 0.048, -1.32, best_log10=-1.2)
        >>> [c.title for c in time_causes("rnn", "LSTM", 16, {}, {"f": f}, 90, ModelFacts(), None)]
        ['Closed forget gates']
    """
    found: list[Cause | None] = [blowup_cause(onset, facts)]
    if mode.startswith("RNN"):
        found.append(_radius_cause(name, radii, gates.get("h"), span, mode == "RNN_TANH"))
        found.append(_saturated_state_cause(name, gates.get("h"), span) if mode == "RNN_TANH" else None)
    elif mode == "LSTM" and "f" in gates:
        found.append(_gate_cause(name, mode, hidden, gates["f"], span))
    elif mode == "GRU" and "z" in gates:
        found.append(_gate_cause(name, mode, hidden, gates["z"], span))
    return sorted((c for c in found if c is not None), key=lambda c: -c.decades)

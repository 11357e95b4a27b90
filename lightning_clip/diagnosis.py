"""Why gradients vanish: measured evidence in, causes ranked by how much they explain, and the fixes that
fit the model. The cause model of `VanishingGradientMonitor`; plain Python (no
torch, no Lightning), so it is driven and tested directly.

A cause is credited with the decades (powers of ten) of attenuation its figures account for, and named
when that is at least `PRESENT_DECADES` (or one of its share rules fires):

==============  ====================================================  ==========================================
cause           figures                                               decades credited
==============  ====================================================  ==========================================
``blowup``      the loss or the gradient norm jumped between the      ranked first: the layers were healthy
                last healthy check and the first flagged one          before it
``saturation``  sigmoid / tanh layers: mean derivative, share of      ``-Σ log10(mean derivative)``
                elements in the flat region; sigmoid: σ' ≤ 0.25
``dead``        ReLU layers: share of units never active              ``-Σ log10(1 - dead share)``
``init``        ``rms(W)·√fan_in`` of the layers feeding an           ``-Σ log10(scale / gain)`` over the
                activation, against ``nn.init.calculate_gain``        layers below their gain
``radius``      RNN: spectral radius of ``weight_hh`` (< 1)           ``-span·log10(radius · mean tanh')``
``forget``      LSTM: forget-gate values (mean, geometric mean)       ``-span·mean log10 f``
``update``      GRU: update-gate values                               ``-span·mean log10 z``
==============  ====================================================  ==========================================

``span`` is the number of time steps between the two ends the through-time decay compares.

Examples:
    >>> facts = ModelFacts(activations={"sigmoid": 29})
    >>> sites = [SiteFigures("sigmoid", f"hidden.{i}", 256, 0.0, 16, 0.0, 0.24) for i in range(29)]
    >>> [c.key for c in depth_causes(sites, [], facts, onset=None)]
    ['saturation']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "DEAD_SHARE",
    "FLAT_SHARE",
    "INIT_HIGH",
    "INIT_LOW",
    "NEGATIVE_BIAS",
    "PRESENT_DECADES",
    "Cause",
    "Fix",
    "GateFigures",
    "ModelFacts",
    "Onset",
    "ScaleFigures",
    "SiteFigures",
    "cause_block",
    "depth_causes",
    "generic_fixes",
    "plural",
    "time_causes",
]

PRESENT_DECADES = 2.0
"""A cause is named when its figures account for at least this many decades (a factor of 100)."""
FLAT_SHARE = 0.5
"""Saturation is also named when a sigmoid / tanh layer has at least this share of its elements flat."""
DEAD_SHARE = 0.5
"""Dead units are named when a ReLU layer has at least this share of its units never active."""
INIT_LOW = 0.5
"""A layer's initialisation counts as too small below this share of the gain its activation needs ..."""
INIT_HIGH = 2.0
"""... and as too large above this multiple of it (reported with saturation)."""
NEGATIVE_BIAS = -0.1
"""Dead units are blamed on the biases of the layers feeding them when their mean is below this."""
_SATURATING = ("sigmoid", "tanh")
_ZERO_GRADIENT = ("relu", "relu6", "hardtanh")
_RELU_LIKE = ("relu", "relu6", "leaky_relu", "gelu", "silu", "elu")
_CAP = 300.0  # decades credited to a layer that stops the gradient completely


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class SiteFigures:
    """One activation site (see `lightning_clip.functional.causes.site_figures`)."""

    kind: str
    layer: str | None
    elements: int
    flat_share: float
    units: int
    dead_share: float
    mean_derivative: float


@dataclass(frozen=True)
class GateFigures:
    """One gate of layer 0 of a recurrent module (see `gate_figures`)."""

    gate: str
    flat_share: float
    stuck_share: float
    mean_derivative: float
    mean: float
    mean_log10: float
    best_log10: float = math.nan  # the most open unit: largest per-unit mean log10
    bias: float | None = None  # mean bias of the gate (bias_ih + bias_hh), when it has one


@dataclass(frozen=True)
class ScaleFigures:
    """``rms(W)·√fan_in`` of a layer feeding an activation, the gain that activation needs, its mean bias."""

    layer: str
    kind: str
    scale: float
    gain: float
    bias_mean: float | None = None

    @property
    def ratio(self) -> float:
        return self.scale / self.gain if self.gain > 0 else math.inf


@dataclass
class ModelFacts:
    """What the model contains (the fixes suggest only what it lacks)."""

    normalisation: bool = False
    residual: bool | None = None  # None: not known
    recurrent: dict[str, str] = field(default_factory=dict)  # layer -> "RNN" | "LSTM" | "GRU"
    activations: dict[str, int] | None = field(default_factory=dict)  # kind -> sites; None: not known
    clipping: bool = False  # AdaptiveGradientClipping or Trainer(gradient_clip_val=...)
    guard: bool = False  # ExplosionGuard
    post_ln: int = 0  # transformer layers with norm_first=False (they need a learning-rate warm-up)


@dataclass(frozen=True)
class Onset:
    """When the vanishing began (the step of the first flagged check of the streak), the last check before
    it that was not flagged (None: there was none), a jump between the two, the learning rate then."""

    first_flagged: int
    healthy_before: int | None = None
    jump_what: str | None = None  # "loss" | "grad_norm"
    jump_step: int | None = None
    jump_before: float = math.nan
    jump_value: float = math.nan
    jump_window: int = 0  # the number of values the median ``jump_before`` is taken over
    lr: float | None = None


@dataclass(frozen=True)
class Fix:
    """A suggested change; fixes of several causes with the same ``key`` are given once."""

    key: str
    text: str


@dataclass(frozen=True)
class Cause:
    """A named cause: ``decades`` of attenuation it accounts for (``inf``: ranked first), its figures."""

    key: str
    title: str
    decades: float
    figures: str
    fixes: tuple[Fix, ...]


# ----------------------------------------------------------------------------------------- text bits
def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 layer``, ``2 layers``.

    Examples:
        >>> plural(1, "layer"), plural(3, "layer"), plural(2, "ReLU layer")
        ('1 layer', '3 layers', '2 ReLU layers')
    """
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x == 0 or x >= 0.01 else f"{100 * x:.1g}%"


def _num(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return str(0 if x == 0 else x)
    return f"{x:.2g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.1e}"


def _tenth_power(decades: float) -> str:
    """``10^-decades`` written out (``1e-120`` style beyond float range)."""
    if decades >= _CAP:
        return "0"
    return _num(10.0 ** (-decades)) if decades < 307 else f"1e-{decades:.0f}"


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# ---------------------------------------------------------------------------------------- the causes
def blowup_cause(onset: Onset | None, facts: ModelFacts) -> Cause | None:
    """Collapse after a blow-up: a jump of the loss or the gradient norm shortly before the onset."""
    if onset is None or onset.jump_step is None:
        return None
    what = "training loss" if onset.jump_what == "loss" else "gradient norm"
    if math.isfinite(onset.jump_value):
        value = f"{_num(onset.jump_value)} (×{onset.jump_value / onset.jump_before:.3g})"
    else:
        value = f"{onset.jump_value} (not finite)"
    lead = onset.first_flagged - onset.jump_step
    healthy = (
        f"; the check at step {onset.healthy_before} was healthy" if onset.healthy_before is not None else ""
    )
    lr = f"; the learning rate was {onset.lr:g}" if onset.lr is not None else ""
    figures = (
        f"the {what} jumped from {_num(onset.jump_before)} (median of the {plural(onset.jump_window, 'step')}"
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
    sat = [s for s in sites if s.kind in _SATURATING]
    if not sat:
        return None
    decades = -sum(math.log10(max(s.mean_derivative, 1e-300)) for s in sat)
    worst = max(sat, key=lambda s: s.flat_share)
    if decades < PRESENT_DECADES and worst.flat_share < FLAT_SHARE:
        return None
    kinds = [k for k in _SATURATING if any(s.kind == k for s in sat)]
    counts = " and ".join(plural(sum(s.kind == k for s in sat), f"{k} layer") for k in kinds)
    parts = [counts]
    n_sig = sum(s.kind == "sigmoid" for s in sat)
    if n_sig:
        parts.append(f"σ' ≤ 0.25 at each sigmoid: at most 0.25^{n_sig} = {_num(0.25**n_sig)} across depth")
    flat = sum(s.flat_share * s.elements for s in sat) / max(1, sum(s.elements for s in sat))
    where = f", most at `{worst.layer}` ({_pct(worst.flat_share)})" if worst.flat_share > 0 else ""
    parts.append(
        f"measured: the product of their mean derivatives is {_tenth_power(decades)}, and {_pct(flat)} of"
        f" their units are in the flat region (derivative below 10% of its maximum){where}"
    )
    big = [c for c in scales if c.kind in _SATURATING and c.ratio > INIT_HIGH]
    if big:
        parts.append(
            f"{plural(len(big), 'layer')} feeding them {'has' if len(big) == 1 else 'have'} rms(W)·√fan_in"
            f" {_num(_median([c.scale for c in big]))}, above the {_num(big[0].gain)} the activation needs"
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
    relu = [s for s in sites if s.kind in _ZERO_GRADIENT]
    dead = sorted((s for s in relu if s.dead_share >= DEAD_SHARE), key=lambda s: -s.dead_share)
    if not dead:
        return None
    decades = min(_CAP, -sum(math.log10(max(1.0 - s.dead_share, 10**-_CAP)) for s in relu))
    listed = ", ".join(f"`{s.layer}` {_pct(s.dead_share)} of {s.units}" for s in dead[:5])
    more = f" and {len(dead) - 5} more" if len(dead) > 5 else ""
    figures = (
        f"{plural(len(dead), 'ReLU layer')} of {len(relu)} {'has' if len(dead) == 1 else 'have'} at least"
        f" {_pct(DEAD_SHARE)} of {'its' if len(dead) == 1 else 'their'} units never active over the check's"
        f" batch (no gradient passes them): {listed}{more}"
    )
    by_layer = {c.layer: c for c in scales}
    biased = [
        by_layer[s.layer]
        for s in dead
        if s.layer in by_layer and (by_layer[s.layer].bias_mean or 0.0) < NEGATIVE_BIAS
    ]
    if biased:
        mean_bias = _median([c.bias_mean for c in biased if c.bias_mean is not None])
        figures += (
            f"; the layers feeding them have negative biases (mean {_num(mean_bias)}, median over layers)"
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
    gains = ", ".join(f"{k} needs {_num(next(c.gain for c in low if c.kind == k))}" for k in kinds)
    figures = (
        f"{plural(len(low), 'layer')} feeding an activation {'has' if len(low) == 1 else 'have'} rms(W)·√fan_in"
        f" {_num(_median([c.scale for c in low]))} (median) where {gains} (nn.init.calculate_gain):"
        f" ×{_num(_median([c.ratio for c in low]))} per layer,"
        f" {_tenth_power(decades)} across depth"
    )
    inits = []
    if any(k in _RELU_LIKE for k in kinds):
        inits.append("nn.init.kaiming_normal_(weight, nonlinearity='relu')")
    if any(k in _SATURATING for k in kinds):
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
        f" shrinks like {radius:.3g}^T, {_tenth_power(decades)} over the {span} steps between the ends"
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
        f"{_pct(h.flat_share)} of the hidden activations of `{name}` are in the flat region of tanh (mean"
        f" tanh' {h.mean_derivative:.2g}; {_pct(h.stuck_share)} of the units over the whole batch): every"
        f" step multiplies the gradient by tanh', {_tenth_power(decades)} over the {span} steps"
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
        f" {_tenth_power(decades)} over the {span} steps between the ends"
    )
    if gate.stuck_share > 0:
        figures += f"; {_pct(gate.stuck_share)} of the units' gates are saturated over the whole batch"
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


# ---------------------------------------------------------------------------------------------- text
def generic_fixes(facts: ModelFacts, through_time: bool) -> list[Fix]:
    """When nothing measured stands out: the usual fixes, only those the model lacks."""
    fixes = []
    plain = [n for n, t in facts.recurrent.items() if t == "RNN"]
    if plain:
        fixes.append(
            Fix("gated", "gated cells (nn.LSTM / nn.GRU) instead of " + ", ".join(f"`{n}`" for n in plain))
        )
    if through_time:
        if any(t == "LSTM" for t in facts.recurrent.values()):
            fixes.append(Fix("forget", "a forget-gate bias of 1 to 5 in the LSTMs"))
        return fixes
    if facts.activations is None:
        fixes.append(
            Fix("relu", "ReLU-family activations (ReLU, GELU, SiLU) instead of sigmoid/tanh, if it uses them")
        )
    elif any(k in _SATURATING for k in facts.activations):
        fixes.append(Fix("relu", "ReLU-family activations (ReLU, GELU, SiLU) instead of sigmoid/tanh"))
    fixes.append(
        Fix("init", "an initialisation scaled to the activation (Kaiming for ReLU, Xavier for tanh)")
    )
    if not facts.normalisation:
        fixes.append(Fix("norm", "normalisation layers (LayerNorm, BatchNorm)"))
    if facts.residual is False:
        fixes.append(Fix("residual", "residual (skip) connections"))
    return fixes


def cause_block(causes: Sequence[Cause], facts: ModelFacts, through_time: bool, measured: bool = True) -> str:
    """The part of a warning that says why and what to do (begins with a newline).

    Examples:
        >>> print(cause_block([], ModelFacts(normalisation=True, residual=True), through_time=False))
        <BLANKLINE>
          No measured cause stands out (saturation, dead units, initialisation and a blow-up were checked).
          Fixes to try: an initialisation scaled to the activation (Kaiming for ReLU, Xavier for tanh).
    """
    if not causes:
        generic = generic_fixes(facts, through_time)
        checked = (
            "forget gates and update gates, the spectral radius"
            if through_time
            else "saturation, dead units, initialisation"
        )
        head = (
            f"\n  No measured cause stands out ({checked} and a blow-up were checked)."
            if measured
            else "\n  Causes were not measured (measure_causes=False)."
        )
        return head + ("\n  Fixes to try: " + "; ".join(f.text for f in generic) + "." if generic else "")
    lines = ["\n  Why, strongest measured cause first:"]
    lines += [f"  {i}. {c.title}: {c.figures}" for i, c in enumerate(causes, 1)]
    fixes: dict[str, str] = {}
    for c in causes:
        for f in c.fixes:
            fixes.setdefault(f.key, f.text)
    lines.append(
        "  Fixes that fit this model, for those causes in that order: " + "; ".join(fixes.values()) + "."
    )
    return "\n".join(lines)

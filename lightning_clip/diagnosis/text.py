"""The wording of the causes and fixes: counts, numbers, and the block appended to a warning."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_clip.diagnosis.records import CAP, SATURATING, Cause, Fix, ModelFacts


# ----------------------------------------------------------------------------------------- text bits
def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 layer``, ``2 layers``.

    Examples:
        >>> plural(1, "layer"), plural(3, "layer"), plural(2, "ReLU layer")
        ('1 layer', '3 layers', '2 ReLU layers')
    """
    return f"{n} {word if n == 1 else (many or word + 's')}"


def fmt_pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x == 0 or x >= 0.01 else f"{100 * x:.1g}%"


def fmt_num(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return str(0 if x == 0 else x)
    return f"{x:.2g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.1e}"


def tenth_power(decades: float) -> str:
    """``10^-decades`` written out (``1e-120`` style beyond float range)."""
    if decades >= CAP:
        return "0"
    return fmt_num(10.0 ** (-decades)) if decades < 307 else f"1e-{decades:.0f}"


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
    elif any(k in SATURATING for k in facts.activations):
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

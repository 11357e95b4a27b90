"""The records the cause model is fed and returns, and its documented constants."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
SATURATING = ("sigmoid", "tanh")
ZERO_GRADIENT = ("relu", "relu6", "hardtanh")
RELU_LIKE = ("relu", "relu6", "leaky_relu", "gelu", "silu", "elu")
CAP = 300.0  # decades credited to a layer that stops the gradient completely


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

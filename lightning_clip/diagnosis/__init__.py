"""Why gradients vanish: measured evidence in, causes ranked by how much they explain, and the fixes that
fit the model. The cause model of `VanishingGradientMonitor`; plain Python (no
torch, no Lightning), so it is driven and tested directly.

Three modules: `records` (the figures and facts it is fed, the constants), `causes` (one function per
cause, and the two that rank them through depth and through time) and `text` (the wording).

A cause is credited with the decades (powers of ten) of attenuation its figures account for, and named
when that is at least `PRESENT_DECADES` (or one of its share rules fires):

| cause | figures | decades credited |
|---|---|---|
| ``blowup`` | the loss or the gradient norm jumped between the last healthy check and the first flagged one | ranked first: the layers were healthy before it |
| ``saturation`` | sigmoid / tanh layers: mean derivative, share of elements in the flat region; sigmoid: σ' ≤ 0.25 | ``-Σ log10(mean derivative)`` |
| ``dead`` | ReLU layers: share of units never active | ``-Σ log10(1 - dead share)`` |
| ``init`` | ``rms(W)·√fan_in`` of the layers feeding an activation, against ``nn.init.calculate_gain`` | ``-Σ log10(scale / gain)`` over the layers below their gain |
| ``radius`` | RNN: spectral radius of ``weight_hh`` (< 1) | ``-span·log10(radius · mean tanh')`` |
| ``forget`` | LSTM: forget-gate values (mean, geometric mean) | ``-span·mean log10 f`` |
| ``update`` | GRU: update-gate values | ``-span·mean log10 z`` |

``span`` is the number of time steps between the two ends the through-time decay compares.

Examples:
    >>> facts = ModelFacts(activations={"sigmoid": 29})
    >>> sites = [SiteFigures("sigmoid", f"hidden.{i}", 256, 0.0, 16, 0.0, 0.24) for i in range(29)]
    >>> [c.key for c in depth_causes(sites, [], facts, onset=None)]
    ['saturation']
"""

from lightning_clip.diagnosis.causes import (
    blowup_cause,
    dead_cause,
    depth_causes,
    init_cause,
    saturation_cause,
    time_causes,
)
from lightning_clip.diagnosis.records import (
    DEAD_SHARE,
    FLAT_SHARE,
    INIT_HIGH,
    INIT_LOW,
    NEGATIVE_BIAS,
    PRESENT_DECADES,
    Cause,
    Fix,
    GateFigures,
    ModelFacts,
    Onset,
    ScaleFigures,
    SiteFigures,
)
from lightning_clip.diagnosis.text import cause_block, generic_fixes, plural

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
    "blowup_cause",
    "cause_block",
    "dead_cause",
    "depth_causes",
    "generic_fixes",
    "init_cause",
    "plural",
    "saturation_cause",
    "time_causes",
]

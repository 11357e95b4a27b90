"""The state `VanishingGradientMonitor`'s two halves share (`VanishingState`), declared once.

The monitor's ``__init__`` sets every attribute declared here; its check
(`lightning_clip.callbacks._vanishing_check`) and its output (`lightning_clip.callbacks._vanishing_output`)
read them, each declaring beside it only what it alone reads.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_clip.callbacks._base import LightningClipCallback
from lightning_clip.callbacks._vanishing_probe import CauseProbe
from lightning_clip.functional import health

__all__ = ["VanishingState"]


class VanishingState(LightningClipCallback):
    """The settings and state both mixins of `VanishingGradientMonitor` read (declarations only)."""

    depth_threshold: float
    time_threshold: float
    tracker: health.PatienceTracker
    probe: CauseProbe
    history: list[dict[str, Any]]
    layer_names: list[str]
    last: dict[str, Any]
    _recurrent: dict[str, nn.RNNBase]

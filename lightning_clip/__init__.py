"""lightning-clip: PyTorch Lightning callbacks that keep gradient-based training healthy.

>>> from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor
>>> callbacks = [AdaptiveGradientClipping(), ExplosionGuard(), VanishingGradientMonitor()]
"""

from lightning_clip import functional
from lightning_clip.callbacks import AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor
from lightning_clip.exceptions import GradientExplosionError, LightningClipWarning, VanishingGradientWarning

__version__ = "0.1.0"

__all__ = [
    "AdaptiveGradientClipping",
    "ExplosionGuard",
    "GradientExplosionError",
    "LightningClipWarning",
    "VanishingGradientMonitor",
    "VanishingGradientWarning",
    "__version__",
    "functional",
]

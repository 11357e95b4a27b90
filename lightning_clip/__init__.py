"""lightning-clip: PyTorch Lightning callbacks that keep gradient-based training healthy.

The callbacks and ``functional`` are loaded on first access (PEP 562), so that importing a light
submodule, e.g. ``lightning_clip.report`` behind the ``lightning-clip`` console script, imports neither
torch nor Lightning.

>>> from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor
>>> callbacks = [AdaptiveGradientClipping(), ExplosionGuard(), VanishingGradientMonitor()]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_clip.exceptions import GradientExplosionError, LightningClipWarning, VanishingGradientWarning

if TYPE_CHECKING:
    from lightning_clip import functional
    from lightning_clip.callbacks import AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor

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

_LAZY = {
    "AdaptiveGradientClipping": "lightning_clip.callbacks",
    "ExplosionGuard": "lightning_clip.callbacks",
    "VanishingGradientMonitor": "lightning_clip.callbacks",
    "functional": "lightning_clip.functional",
}
"""Public name -> the module that defines it (a module name alone: the name is that submodule)."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    imported = importlib.import_module(module)
    value = imported if module.endswith(f".{name}") else getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

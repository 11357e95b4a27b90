"""The public callbacks, one per module."""

from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping
from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from lightning_clip.callbacks.vanishing_monitor import VanishingGradientMonitor

__all__ = ["AdaptiveGradientClipping", "ExplosionGuard", "VanishingGradientMonitor"]

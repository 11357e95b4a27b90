"""The public callbacks, one per module."""

from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping

__all__ = ["AdaptiveGradientClipping"]

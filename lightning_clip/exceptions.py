"""The package's exception and warning types."""

from __future__ import annotations

__all__ = ["GradientExplosionError", "LightningClipWarning", "VanishingGradientWarning"]


class GradientExplosionError(RuntimeError):
    """Training exploded and could not be recovered.

    Raised by `ExplosionGuard` with ``action="raise"`` at the first event, when the
    rollback budget (``max_rollbacks``) is spent, or when there is no known-good state to go back to.
    The message says what happened, at which step, which parameters went bad first and what to try.
    """


class LightningClipWarning(UserWarning):
    """Base class of every warning lightning-clip emits (filter them all with this one category)."""


class VanishingGradientWarning(LightningClipWarning, RuntimeWarning):
    """Some layers' gradients stay vanishingly small, or never arrive.

    A ``RuntimeWarning`` subclass, filterable with `warnings`::

        import warnings
        from lightning_clip import VanishingGradientWarning
        warnings.filterwarnings("ignore", category=VanishingGradientWarning)
    """

"""Shared base of lightning-clip's callbacks."""

from __future__ import annotations

import pytorch_lightning as pl


class LightningClipCallback(pl.Callback):
    """Marker base: :class:`~lightning_clip.ExplosionGuard` snapshots and restores the ``state_dict`` of
    every other callback of this type, so a rollback also rewinds e.g. the clipping statistics."""

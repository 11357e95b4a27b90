"""Shared base of lightning-clip's callbacks."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl


class LightningClipCallback(pl.Callback):
    """Marker base: :class:`~lightning_clip.ExplosionGuard` snapshots and restores the ``state_dict`` of
    every other callback of this type, so a rollback also rewinds e.g. the clipping statistics.

    ``state_key`` is built once from :meth:`_state_key_args` and cached: Lightning reads it on every hook
    call (it names the profiler action), and the arguments that define behaviour do not change after
    construction.
    """

    _lc_state_key: str | None = None

    def _state_key_args(self) -> dict[str, Any]:
        """The arguments that define this callback's behaviour (they name its saved state)."""
        return {}

    @property
    def state_key(self) -> str:
        if self._lc_state_key is None:
            self._lc_state_key = self._generate_state_key(**self._state_key_args())
        return self._lc_state_key

"""The training losses of one optimizer step, kept on the device until its host transfer. No Lightning import.

`LossWindow` collects the losses handed to ``backward`` since the last optimizer step (every micro-batch
of an accumulation window); its `LossWindow.unscaled_mean` is the provider a callback registers as the
step's loss rider (`lightning_clip.step.LOSS_RIDER`), so the loss reaches the host with the gradient norm
in the step's one transfer (see `lightning_clip.step` for the step's lifecycle). Re-exported by
`lightning_clip.step`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lightning_clip.step import StepState

__all__ = ["LossWindow"]


class LossWindow:
    """The training losses back-propagated since the last optimizer step (every micro-batch of an
    accumulation window), kept as tensors: their mean rides on the step's single host transfer.

    Examples:
        >>> window = LossWindow()
        >>> window.add(torch.tensor(1.0)); window.add(torch.tensor(3.0))
        >>> float(window.mean())
        2.0
    """

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []
        #: returns the loss scale to divide by (16-mixed), or None; set by the callback at fit start
        self.scale: Callable[[], torch.Tensor | None] | None = None

    def add(self, loss: torch.Tensor) -> None:
        """Record a loss handed to ``backward`` (detached; shares storage, so it sees later in-place edits)."""
        self._losses.append(loss.detach())

    def clear(self) -> None:
        self._losses = []

    def mean(self) -> torch.Tensor | None:
        """Mean of the recorded losses (a 0-d float32 tensor; no host transfer), or None when empty."""
        if not self._losses:
            return None
        device = self._losses[0].device
        return torch.stack([t.float().mean().to(device) for t in self._losses]).mean()

    def unscaled_mean(self) -> torch.Tensor | None:
        """`mean` divided by `scale` when one is set (the GradScaler's scale under 16-mixed, where
        ``backward`` receives the scaled loss), on the device: the provider of the loss rider.

        Examples:
            >>> window = LossWindow()
            >>> window.add(torch.tensor(8.0))
            >>> window.scale = lambda: torch.tensor(4.0)
            >>> float(window.unscaled_mean())
            2.0
        """
        mean = self.mean()
        factor = None if self.scale is None else self.scale()
        if mean is None or factor is None:
            return mean
        return mean / factor.to(mean.device, torch.float32)

    def take(self, state: StepState, rider: str) -> float | None:
        """The mean loss on the host, from the step's transfer (``rider``: the key it was registered
        under), or fetched apart when it was registered too late for it; then the window is emptied."""
        value = state.rider(rider)
        if value is None and self._losses:
            mean = self.unscaled_mean()
            value = None if mean is None else float(mean.item())
        self.clear()
        return value

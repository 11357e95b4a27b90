"""What `VanishingGradientMonitor` reports (`VanishingOutputMixin`): the warnings a check makes due, each
with the causes measured and what happened before its streak of flagged checks began, and the
gradient-flow figure at the end of fit.

The text of the warnings is written by `lightning_clip.callbacks._vanishing_messages` and the causes are
ranked by `lightning_clip.diagnosis`; which warnings are due is decided by the check
(`lightning_clip.callbacks._vanishing_check`). ``LOSS_JUMP`` and ``NORM_JUMP`` are re-exported by
`lightning_clip.callbacks.vanishing_monitor`.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_only, rank_zero_warn
from torch import nn

from lightning_clip import _namespace, diagnosis
from lightning_clip.callbacks import _vanishing_messages as messages
from lightning_clip.callbacks._vanishing_probe import Evidence
from lightning_clip.callbacks._vanishing_state import VanishingState
from lightning_clip.diagnosis import Onset
from lightning_clip.exceptions import VanishingGradientWarning

__all__ = ["LOSS_JUMP", "NORM_JUMP", "VanishingOutputMixin"]

log = logging.getLogger("lightning_clip.callbacks.vanishing_monitor")  # the monitor's logger, name unchanged

if TYPE_CHECKING:
    from lightning_clip._compat import Trainer

LOSS_JUMP = 1.5
"""A training loss above this × the median of the (up to 10) steps before it, and above every loss before it,
between the last healthy check and the first flagged one, is a blow-up."""
NORM_JUMP = 10.0
"""The same for the gradient norm (of the steps where a lightning-clip callback measured it)."""


class VanishingOutputMixin(VanishingState):
    """The warnings and the gradient-flow figure of `VanishingGradientMonitor`, a base of it (it reads the
    monitor's settings, its patience state, the last check's figures and the cause measurements, declared
    below)."""

    check_every_n_steps: int
    patience: int
    measure_causes: bool
    _recent: dict[int, deque[int]]

    # --------------------------------------------------------------------------------- messages
    def _warn_due(self, figures: dict[str, Any], due: list[str]) -> None:
        figures["causes"] = {}
        depth_due = [k.split(":", 1)[1] for k in due if k.startswith("depth:")]
        if depth_due:
            self._warn(self._depth_warning(figures, depth_due))
        for key in due:
            if key.startswith("time:"):
                self._warn(self._time_warning(figures, key.split(":", 1)[1]))
        nograd_due = [k.split(":", 1)[1] for k in due if k.startswith("nograd:")]
        if nograd_due:
            layers = {n: figures["no_grad"][n] for n in nograd_due}
            self._warn(messages.no_grad_message(figures["step"], self.patience, layers))

    def _onset(self, keys: list[str]) -> Onset:
        """When the streak of the keys' flagged checks began (the longest streak among them) and what
        happened just before it."""
        index = next((i for i, d in self._recent.items() if d and d[-1] == self.last["step"]), 0)
        recent = list(self._recent.get(index, [self.last["step"]]))
        streak = min(max(self.tracker.flagged_count(k) for k in keys), len(recent))
        first = recent[-streak]
        healthy = recent[-streak - 1] if streak < len(recent) else None
        return self.probe.onset(first, healthy, LOSS_JUMP, NORM_JUMP)

    def _kind(self, name: str) -> str:
        mod = self._recurrent[name]
        return type(mod).__name__ + (f", {mod.nonlinearity}" if isinstance(mod, nn.RNN) else "")

    def _depth_warning(self, fig: dict[str, Any], due: list[str]) -> str:
        ev: Evidence | None = fig["evidence"]
        onset = self._onset([f"depth:{n}" for n in due])
        found = diagnosis.depth_causes(
            ev.sites if ev else [], ev.scales if ev else [], self.probe.facts, onset
        )
        fig["causes"]["depth"] = found
        below = [
            n for n, r in zip(fig["layers"], fig["depth_ratios"], strict=True) if r < self.depth_threshold
        ]
        reported = [n for n in below if n not in due and self.tracker.alerted(f"depth:{n}")]
        radii = fig["spectral_radius"]
        extra = "".join(
            messages.recurrent_line(n, self._kind(n), radii.get(n, {})) for n in due if n in self._recurrent
        )
        depth = messages.DepthFigures(
            fig["step"], fig["layers"], fig["norms"], fig["depth_ratios"], fig["grad_to_weight"]
        )
        return messages.depth_message(
            depth,
            due,
            reported,
            self.depth_threshold,
            self.patience,
            self.check_every_n_steps,
            found,
            self.probe.facts,
            extra,
            measured=self.measure_causes,
        )

    def _time_warning(self, fig: dict[str, Any], name: str) -> str:
        ev: Evidence | None = fig["evidence"]
        decay, k, steps = fig["time_decay"][name]
        mod = self._recurrent[name]
        radii = fig["spectral_radius"].get(name, {})
        gates = ev.gates.get(name, {}) if ev else {}
        onset = self._onset([f"time:{name}"])
        found = diagnosis.time_causes(
            name, mod.mode, mod.hidden_size, radii, gates, steps - k, self.probe.facts, onset
        )
        fig["causes"][f"time:{name}"] = found
        return messages.time_message(
            name,
            self._kind(name),
            fig["step"],
            decay,
            k,
            steps,
            self.patience,
            self.time_threshold,
            found,
            self.probe.facts,
            messages.recurrent_line(name, self._kind(name), radii),
            self.measure_causes,
        )

    @staticmethod
    def _warn(message: str) -> None:
        rank_zero_warn(message, category=VanishingGradientWarning)

    # ----------------------------------------------------------------------------------- figure
    @rank_zero_only
    def _save_figure(self, trainer: Trainer, directory: str) -> None:
        try:
            from lightning_clip.report.plot import plot_gradient_flow

            fig = plot_gradient_flow(self.history, self.layer_names)
        except ImportError:
            log.info(
                "matplotlib is not installed: no gradient-flow figure (pip install 'lightning-clip[plot]')."
            )
            return
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "gradient_flow.png")
        fig.savefig(path, dpi=100)
        log.info("Gradient-flow figure saved to %s", path)
        for logger in trainer.loggers:
            if _namespace.is_tensorboard_logger(logger):  # either namespace's TensorBoardLogger
                experiment: Any = logger.experiment  # type: ignore[attr-defined, union-attr, unused-ignore]
                experiment.add_figure("grad_health/gradient_flow", fig, global_step=trainer.global_step)

"""One check of `VanishingGradientMonitor` (`VanishingCheckMixin`): per-layer gradient and weight norms,
spectral radii and through-time profiles brought to the host in one transfer, read back into the check's
figures, and the patience state updated with the layers they flag; and the window of parameters that got
no gradient since the last check, kept on every step for the next one.

The monitor's hooks decide when a check runs and gather what it needs
(`lightning_clip.callbacks.vanishing_monitor`); the warnings a check makes due are written by its other
base, `VanishingOutputMixin` (`lightning_clip.callbacks._vanishing_output`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_clip import _compat
from lightning_clip.callbacks._vanishing_probe import TimeTap
from lightning_clip.callbacks._vanishing_state import VanishingState
from lightning_clip.functional import health
from lightning_clip.functional.norms import grad_norms, group_norms
from lightning_clip.step import StepState, optimizer_params

__all__ = ["VanishingCheckMixin"]


class VanishingCheckMixin(VanishingState):
    """The check of `VanishingGradientMonitor`, a base of it (it reads the monitor's settings, layers and
    recurrent captures, declared below, and warns through ``_warn_due``, of its other base
    `VanishingOutputMixin`).

    `check` measures, updates the patience state and warns; the figures of the last check stay in ``last``
    and a thinned history of the per-layer norms in ``history`` (the gradient-flow figure's). Between
    checks, ``_note_gradients`` keeps each optimizer's parameters that got no gradient yet (``_unseen``).
    """

    log_layer_metrics: bool
    max_history: int
    _layers: list[tuple[str, nn.Module]]
    _layer_of: dict[int, int]
    _tap: TimeTap
    _weight_norms: dict[int, torch.Tensor]
    _unseen: dict[int, list[torch.Tensor]]

    if TYPE_CHECKING:

        def _warn_due(self, figures: dict[str, Any], due: list[str]) -> None: ...

    # ------------------------------------------------------------------------------------ check
    def check(
        self,
        params: list[torch.Tensor],
        per_param: torch.Tensor,
        trainable: list[torch.Tensor],
        step: int,
        no_grad: list[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """One check: measure, update the patience state, warn. Returns the check's figures (also kept
        in `last`), or ``{}`` when the gradients are not finite (such a check does not count).

        Args:
            params: parameters with a gradient; ``per_param`` their gradient norms (a 1-D tensor).
            trainable: every trainable parameter of the optimizer.
            step: the Trainer's ``global_step``, quoted in the warnings.
            no_grad: the trainable parameters that got no gradient on any step since the last check
                (reported); None: those of ``trainable`` without a gradient now (a window of this step).
        """
        other = len(self.layer_names) - 1
        layer_idx = [self._layer_of.get(id(p), other) for p in params]
        present = sorted(set(layer_idx))
        pieces, profiles, radius_names = self._device_pieces(params, per_param, layer_idx, present)
        extra = self.probe.pieces(self._weight_norms)
        device = per_param.device
        everything = [p.reshape(-1).float().to(device) for p in pieces + extra]
        flat = torch.cat(everything).tolist() if everything else []  # the check's one host transfer
        n_own = sum(p.numel() for p in pieces)
        evidence = self.probe.unpack(flat[n_own:], step)  # the per-step series grow even if not finite
        figures = self._read_back(flat[:n_own], present, profiles, radius_names, step)
        if not figures:
            return {}
        figures["evidence"] = evidence
        if no_grad is None:
            with_grad = {id(p) for p in params}
            no_grad = [p for p in trainable if id(p) not in with_grad and p.grad is None]
        figures["no_grad"] = self._no_grad_layers(no_grad)
        due = self._update_patience(figures, trainable)
        figures["warned"] = due
        self.last = figures
        self.history.append({"step": step, "layers": list(present), "norms": list(figures["norms"])})
        self.history = health.thin_history(self.history, self.max_history)
        self._warn_due(figures, due)
        return figures

    def _device_pieces(
        self, params: list[torch.Tensor], per_param: torch.Tensor, layer_idx: list[int], present: list[int]
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, list[str]]]:
        """The check's own tensors for the single host transfer: per-layer gradient and weight norms,
        spectral radii (when needed), through-time profiles."""
        local = {g: i for i, g in enumerate(present)}
        pieces: list[torch.Tensor] = []
        device = per_param.device
        if params:
            group = torch.tensor([local[g] for g in layer_idx], device=device)
            with torch.no_grad():
                _, w_per = grad_norms([p.detach() for p in params])
            self._weight_norms = {id(p): w_per[i] for i, p in enumerate(params)}  # reused by the causes
            pieces += [
                group_norms(per_param.to(torch.float32), group, len(present)),
                group_norms(w_per.to(device), group, len(present)),
            ]
        present_names = {self.layer_names[g] for g in present}
        profiles = self._tap.take(present_names)
        radius_names: dict[str, list[str]] = {}
        for name, mod in self._recurrent.items():
            may_warn = any(self.tracker.may_alert(f"{kind}:{name}") for kind in ("depth", "time"))
            # sharded weights are gathered (collective): then on every check step, whatever this rank's state
            sharded = any(_compat.is_dtensor(p) for p in mod.parameters())
            if name in present_names and (self.log_layer_metrics or may_warn or sharded):
                radius_names[name], radii = health.spectral_radii(mod)
                pieces.append(radii.to(device))
        pieces += [p.to(device) for p in profiles.values()]
        return pieces, profiles, radius_names

    def _read_back(
        self,
        flat: list[float],
        present: list[int],
        profiles: dict[str, torch.Tensor],
        radius_names: dict[str, list[str]],
        step: int,
    ) -> dict[str, Any]:
        """The check's figures from the host values of `_device_pieces` ({} if not finite)."""
        n = len(present)
        norms, w_norms, pos = flat[:n], flat[n : 2 * n], 2 * n
        if any(not math.isfinite(v) for v in norms):
            return {}
        radii_of: dict[str, dict[str, float]] = {}
        for name, blocks in radius_names.items():
            radii_of[name] = dict(zip(blocks, flat[pos : pos + len(blocks)], strict=True))
            pos += len(blocks)
        decays: dict[str, tuple[float, int, int]] = {}
        for name, prof in profiles.items():
            values = flat[pos : pos + prof.numel()]
            pos += prof.numel()
            decays[name] = (*health.time_decay(values), len(values))
        return {
            "step": step,
            "layers": [self.layer_names[g] for g in present],
            "norms": norms,
            "depth_ratios": health.depth_ratios(norms),
            "grad_to_weight": [g / w if w > 0 else math.nan for g, w in zip(norms, w_norms, strict=True)],
            "time_decay": decays,
            "spectral_radius": radii_of,
        }

    def _update_patience(self, figures: dict[str, Any], trainable: list[torch.Tensor]) -> list[str]:
        """Flag this check's keys (``depth:``, ``time:``, ``nograd:`` + layer) and return those now due."""
        pairs = list(zip(figures["layers"], figures["depth_ratios"], strict=True))
        flagged = {f"depth:{name}" for name, r in pairs if r < self.depth_threshold}
        flagged |= {f"time:{n}" for n, (d, _, _) in figures["time_decay"].items() if d < self.time_threshold}
        flagged |= {f"nograd:{name}" for name in figures["no_grad"]}
        observed = [f"depth:{name}" for name, r in pairs if math.isfinite(r)]
        observed += [f"time:{n}" for n, (d, _, _) in figures["time_decay"].items() if math.isfinite(d)]
        other = len(self.layer_names) - 1
        trainable_layers = dict.fromkeys(
            self.layer_names[self._layer_of.get(id(p), other)] for p in trainable
        )
        observed += [f"nograd:{name}" for name in trainable_layers]
        return self.tracker.update(flagged, observed)

    def _no_grad_layers(self, no_grad: list[torch.Tensor]) -> dict[str, list[str]]:
        """``layer -> names of its parameters`` in ``no_grad``."""
        out: dict[str, list[str]] = {}
        other = len(self.layer_names) - 1
        for p in no_grad:
            layer = self._layer_of.get(id(p), other)
            mod = self._layers[layer][1] if layer < len(self._layers) else None
            pname = "?"
            if mod is not None:
                pname = next((n for n, q in mod.named_parameters(recurse=False) if q is p), "?")
            out.setdefault(self.layer_names[layer], []).append(pname)
        return out

    # ---------------------------------------------------------------------------- no-gradient window
    def _note_gradients(self, index: int, optimizer: torch.optim.Optimizer, state: StepState) -> None:
        """Keep, for optimizer ``index``, the trainable parameters that got no gradient on any step since its
        last check: only those not seen yet are looked at (a ``.grad is None`` read each, no kernel, no
        transfer), so after a window's first step the cost is that of the few that are still unseen. A step
        another callback skipped before this hook (its gradients already dropped) counts through what it
        measured."""
        unseen = self._unseen.get(index)
        if unseen is None:
            unseen = [p for p in optimizer_params(optimizer) if p.requires_grad]
        if state.skipped:
            measured = next(iter(state.measurements.values()), None)
            seen = {id(p) for p in measured.params} if measured is not None else set()
            self._unseen[index] = [p for p in unseen if id(p) not in seen]
        else:
            self._unseen[index] = [p for p in unseen if p.grad is None]

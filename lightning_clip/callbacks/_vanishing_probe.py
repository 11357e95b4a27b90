"""The cause measurements of `VanishingGradientMonitor`, gathered from hooks.

Lifecycle:

* every step: the training loss (``on_before_backward``) and, when another lightning-clip callback
  measured the step, its gradient norm (``on_train_batch_end``) are kept as tensors (no host transfer);
  the learning rate as a number;
* on an *analysed* check step (one at which a warning may be due): the autograd graph of the loss is read
  before ``backward`` (activation sites, structure) and every recurrent layer's gates are recomputed in a
  forward hook; the figures stay on the device;
* at the check, `CauseProbe.pieces` hands every pending tensor to the monitor's single host
  transfer and `CauseProbe.unpack` turns the host values into `Evidence`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from lightning_clip import _compat
from lightning_clip.diagnosis import GateFigures, ModelFacts, Onset, ScaleFigures, SiteFigures
from lightning_clip.functional import causes, health
from lightning_clip.functional import gates as recurrent

__all__ = ["CauseProbe", "Evidence", "TimeTap"]

_ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.ELU: "elu",
    nn.Hardtanh: "hardtanh",
}


@dataclass
class Evidence:
    """The cause figures of one analysed check."""

    step: int
    sites: list[SiteFigures] = field(default_factory=list)
    gates: dict[str, dict[str, GateFigures]] = field(default_factory=dict)
    scales: list[ScaleFigures] = field(default_factory=list)


class CauseProbe:
    """Collects the cause figures (see the module docstring); ``max_series`` bounds the per-step series."""

    def __init__(self, max_series: int = 1000) -> None:
        self.analyse = False
        self.facts = ModelFacts()
        self.structure: causes.Structure | None = None
        #: host series, step order: (step, mean training loss), (step, gradient norm), (step, learning rate)
        self.losses: deque[tuple[int, float]] = deque(maxlen=max_series)
        self.norms: deque[tuple[int, float]] = deque(maxlen=max_series)
        self.lrs: deque[tuple[int, float]] = deque(maxlen=max_series)
        self._layers: list[tuple[str, nn.Module]] = []
        self._layer_of: dict[int, int] = {}
        self._pending_losses: list[tuple[int, torch.Tensor]] = []
        self._pending_norms: list[tuple[int, torch.Tensor]] = []
        self._sites: list[tuple[str, int | None, torch.Tensor]] = []
        self._gates: dict[str, dict[str, torch.Tensor]] = {}
        self._scales: list[tuple[str, str, float]] = []
        self._graph_read = False

    # ----------------------------------------------------------------------------------------- setup
    def attach(
        self,
        model: nn.Module,
        layers: list[tuple[str, nn.Module]],
        layer_of: dict[int, int],
        recurrent: dict[str, nn.RNNBase],
        measure: bool = True,
    ) -> list[Any]:
        """Start on ``model`` (its ``layers``, ``id(parameter) -> layer index``, its recurrent layers): the
        facts its modules show; with ``measure``, forward hooks on the recurrent layers (returned, for
        removal) and the graph read on analysed steps."""
        self._layers, self._layer_of = layers, layer_of
        self.structure = None
        modules = list(model.modules())
        transformer = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
        kinds: dict[str, int] = {}
        for m in modules:
            kind = _ACTIVATION_MODULES.get(type(m))
            if kind is not None:
                kinds[kind] = kinds.get(kind, 0) + 1
        self.facts = ModelFacts(
            normalisation=any(isinstance(m, _compat.norm_modules()) for m in modules),
            recurrent={n: type(m).__name__ for n, m in recurrent.items()},
            activations=kinds or None,  # None: not known (activations may be called as functions)
            post_ln=sum(isinstance(m, transformer) and not m.norm_first for m in modules),
        )
        if not measure:
            return []
        return [m.register_forward_hook(self._gate_hook(n), with_kwargs=True) for n, m in recurrent.items()]

    # ------------------------------------------------------------------------------------ every step
    def record_loss(self, step: int, loss: torch.Tensor) -> None:
        self._pending_losses.append((step, loss.detach()))

    def record_norm(self, step: int, total: torch.Tensor | float) -> None:
        """The step's gradient norm: a host value when another callback already fetched it, else a tensor."""
        if isinstance(total, torch.Tensor):
            self._pending_norms.append((step, total))
        elif not self.norms or self.norms[-1][0] != step:
            self.norms.append((step, float(total)))

    def known_loss(self, step: int, value: float) -> None:
        """The step's mean loss is already on the host (another callback fetched it): keep that value and
        drop this step's pending tensors (nothing of it rides on the next check's transfer)."""
        self._pending_losses = [(s, t) for s, t in self._pending_losses if s != step]
        if not self.losses or self.losses[-1][0] != step:  # else a check at this step brought it already
            self.losses.append((step, value))

    def record_lr(self, step: int, lr: float) -> None:
        if not self.lrs or self.lrs[-1][0] != step:
            self.lrs.append((step, lr))

    def end_step(self) -> None:
        """The step is over: analysis figures that no check consumed are dropped."""
        self.analyse = False
        self._graph_read = False
        self._sites, self._gates, self._scales = [], {}, []

    # ---------------------------------------------------------------------------------- check steps
    def read_graph(self, loss: torch.Tensor) -> None:
        """Activation sites and structure of the loss's graph (the first micro-batch of an analysed step)."""
        if not self.analyse or self._graph_read or loss.grad_fn is None:
            return
        self._graph_read = True
        nodes = causes.graph_nodes(loss.grad_fn)
        if self.structure is None:
            self.structure = causes.graph_structure(nodes)
            self.facts.normalisation |= self.structure.norm_nodes > 0
            self.facts.residual = (
                None if self.structure.residual_adds < 0 else self.structure.residual_adds > 0
            )
        kinds: dict[str, int] = {}
        for site in causes.activation_sites(nodes, self._layer_of):
            layer = self._layers[site.layer][1] if site.layer is not None else None
            if isinstance(layer, nn.RNNBase):
                continue  # measured from the recurrent layer's gates, on every device alike
            d, top = causes.derivative(site.kind, site.tensor, site.args)
            figures = causes.site_figures(d, top, causes.unit_dim(layer, d.ndim))
            self._sites.append((site.kind, site.layer, figures))
            kinds[site.kind] = kinds.get(site.kind, 0) + 1
            if site.layer is not None:
                self._scales.append((site.kind, self._layers[site.layer][0], site.args.get("slope", 0.01)))
        self.facts.activations = kinds

    def _gate_hook(self, name: str) -> Callable[..., None]:
        def hook(mod: nn.RNNBase, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            if not self.analyse or name in self._gates or not mod.training or not torch.is_grad_enabled():
                return
            x = args[0] if args else kwargs.get("input")
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            found = recurrent.recurrent_gates(mod, x, hx, out[0] if isinstance(out, tuple) else out)
            if found:
                figures = recurrent.gate_figures(mod.mode, found)
                carry = {"LSTM": "f", "GRU": "z"}.get(mod.mode)
                if carry is not None:  # the bias that keeps the state: its mean rides along
                    figures[carry] = torch.cat([figures[carry], self._carry_bias(mod).reshape(1)])
                self._gates[name] = figures

        return hook

    @staticmethod
    def _carry_bias(mod: nn.RNNBase) -> torch.Tensor:
        """Mean of ``bias_ih + bias_hh`` over the forget (LSTM) / update (GRU) rows of layer 0; NaN without bias."""
        if not mod.bias:
            return torch.tensor(math.nan, device=recurrent.layer0_param(mod, "weight_hh_l0").device)
        rows = slice(mod.hidden_size, 2 * mod.hidden_size)
        both = recurrent.layer0_param(mod, "bias_ih_l0") + recurrent.layer0_param(mod, "bias_hh_l0")
        return both[rows].mean()

    def pieces(self, weight_norms: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Every pending tensor, for the check's single host transfer (order read back by `unpack`).

        ``weight_norms``: ``id(parameter) -> ‖parameter‖₂`` already measured at this check (the weight
        scales then cost no pass over the weights)."""
        weight_norms = weight_norms or {}
        out = [t.float().mean().reshape(1) for _, t in self._pending_losses]
        out += [t.float().reshape(1) for _, t in self._pending_norms]
        out += [f for _, _, f in self._sites]
        out += [f for per_gate in self._gates.values() for f in per_gate.values()]
        for _, layer, _, _ in self._scale_layers():
            weight: torch.Tensor = layer.weight  # type: ignore[assignment]  # checked in _scale_layers
            bias = getattr(layer, "bias", None)
            b = (
                bias.detach().float().mean()
                if isinstance(bias, torch.Tensor)
                else weight.new_tensor(math.nan)
            )
            scale = causes.weight_scale(weight, weight_norms.get(id(weight)))
            out.append(torch.stack([scale, b.float().to(scale.device)]))
        return out

    def _scale_layers(self) -> list[tuple[str, nn.Module, str, float]]:
        """``(name, layer, activation, gain it needs)`` of the layers feeding an activation directly (a
        weight of 2+ dims; normalisation layers excluded), each once."""
        found: dict[str, tuple[str, nn.Module, str, float]] = {}
        modules = dict(self._layers)
        for kind, name, slope in self._scales:
            mod = modules[name]
            w = getattr(mod, "weight", None)
            if (
                name in found
                or isinstance(mod, _compat.norm_modules())
                or not isinstance(w, torch.Tensor)
                or w.ndim < 2
            ):
                continue
            found[name] = (name, mod, kind, causes.needed_gain(kind, {"slope": slope}))
        return list(found.values())

    def unpack(self, values: list[float], step: int) -> Evidence | None:
        """Read back what `pieces` sent; the per-step series grow; the analysis figures of this
        check become `Evidence` (None when the step was not analysed)."""
        pos = self._read_series(values)
        if not self._sites and not self._gates:
            return None
        evidence = Evidence(step)
        for kind, layer, _ in self._sites:
            e, flat, units, dead, mean_d = values[pos : pos + 5]
            pos += 5
            name = self._layers[layer][0] if layer is not None else None
            evidence.sites.append(SiteFigures(kind, name, int(e), flat, int(units), dead, mean_d))
        for name, per_gate in self._gates.items():
            for gate, t in per_gate.items():
                _, flat, _, stuck, mean_d, mean, logs, best, *carry = values[pos : pos + t.numel()]
                pos += t.numel()
                b = carry[0] if carry and math.isfinite(carry[0]) else None
                evidence.gates.setdefault(name, {})[gate] = GateFigures(
                    gate, flat, stuck, mean_d, mean, logs, best, b
                )
        for name, _, kind, gain in self._scale_layers():
            scale, bias = values[pos : pos + 2]
            pos += 2
            evidence.scales.append(
                ScaleFigures(name, kind, scale, gain, bias if math.isfinite(bias) else None)
            )
        return evidence

    def _read_series(self, values: list[float]) -> int:
        """Append the host values of the pending losses (mean per step) and norms; returns how many it read."""
        pos = 0
        by_step: dict[int, list[float]] = {}
        for s, _ in self._pending_losses:
            by_step.setdefault(s, []).append(values[pos])
            pos += 1
        self.losses.extend((s, sum(v) / len(v)) for s, v in by_step.items())
        for s, _ in self._pending_norms:
            self.norms.append((s, values[pos]))
            pos += 1
        self._pending_losses, self._pending_norms = [], []
        return pos

    # ----------------------------------------------------------------------------------------- onset
    def onset(
        self, first_flagged: int, healthy_before: int | None, loss_factor: float, norm_factor: float
    ) -> Onset:
        """A loss or gradient-norm jump between the last healthy check and the first flagged one."""
        start = healthy_before if healthy_before is not None else -1
        jump = causes.recent_jump("loss", sorted(self.losses), start, first_flagged, loss_factor)
        if jump is None:
            jump = causes.recent_jump("grad_norm", sorted(self.norms), start, first_flagged, norm_factor)
        at = jump.step if jump is not None else first_flagged
        lr = next((v for s, v in reversed(self.lrs) if s <= at), None)
        if jump is None:
            return Onset(first_flagged, healthy_before, lr=lr)
        return Onset(
            first_flagged,
            healthy_before,
            jump.what,
            jump.step,
            jump.before,
            jump.value,
            jump.before_steps,
            lr,
        )

    def state_dict(self) -> dict[str, Any]:
        """The series (host values) and the values still pending (0-d tensors: no transfer for a snapshot)."""
        return {
            "losses": [list(p) for p in self.losses],
            "norms": [list(p) for p in self.norms],
            "lrs": [list(p) for p in self.lrs],
            "pending_losses": [[s, t.float().mean()] for s, t in self._pending_losses],
            "pending_norms": [[s, t.float().reshape(())] for s, t in self._pending_norms],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("losses", "norms", "lrs"):
            series: deque[tuple[int, float]] = getattr(self, key)
            series.clear()
            series.extend((int(s), float(v)) for s, v in state.get(key, []))
        self._pending_losses = [(int(s), torch.as_tensor(t)) for s, t in state.get("pending_losses", [])]
        self._pending_norms = [(int(s), torch.as_tensor(t)) for s, t in state.get("pending_norms", [])]


class TimeTap:
    """Through time: on armed steps a forward pre-hook swaps a recurrent layer's input for a fresh node
    whose gradient is exactly ``∂L/∂x``, and keeps ``‖∂L/∂x_t‖²`` per time step (summed over micro-batches)."""

    def __init__(self) -> None:
        self.armed = False
        self.profiles: dict[str, torch.Tensor] = {}

    def hook(self, name: str, module: nn.RNNBase) -> Callable[..., tuple[Any, ...] | None]:
        def pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not self.armed or not mod.training or not torch.is_grad_enabled() or not args:
                return None
            x = args[0]
            packed = isinstance(x, PackedSequence)
            data = x.data if packed else x
            if not isinstance(data, torch.Tensor) or not data.is_floating_point():
                return None
            tap = data.view_as(data) if data.requires_grad else data.detach().requires_grad_(True)
            sizes = x.batch_sizes if packed else None

            def grad_hook(grad: torch.Tensor) -> None:
                prof = health.time_profile(grad, module.batch_first, sizes)
                prev = self.profiles.get(name)
                self.profiles[name] = prof if prev is None or prev.shape != prof.shape else prev + prof

            tap.register_hook(grad_hook)
            return ((x._replace(data=tap) if packed else tap), *args[1:])

        return pre_hook

    def take(self, names: set[str]) -> dict[str, torch.Tensor]:
        """The profiles of the layers ``names`` (removed from the tap)."""
        return {n: self.profiles.pop(n) for n in list(self.profiles) if n in names}

    def clear(self) -> None:
        self.armed = False
        self.profiles = {}

"""VanishingGradientMonitor: per-layer gradient health, warnings and the gradient-flow figure."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from typing_extensions import override

from lightning_clip import _compat
from lightning_clip._validation import check_bool, check_int, check_number
from lightning_clip.callbacks._base import LightningClipCallback
from lightning_clip.exceptions import VanishingGradientWarning
from lightning_clip.functional import health
from lightning_clip.functional.norms import grad_norms, group_norms
from lightning_clip.step import optimizer_params

__all__ = ["VanishingGradientMonitor"]

log = logging.getLogger(__name__)

FIXES = (
    "Likely fixes: gated recurrent units (nn.LSTM / nn.GRU, whose additive cell state carries the error back"
    " unchanged; a high forget-gate bias such as 1 to 5 keeps it open); ReLU-family activations (ReLU, GELU,"
    " SiLU) instead of sigmoid/tanh; an initialisation scaled to the activation (nn.init.kaiming_normal_ for"
    " ReLU, nn.init.xavier_uniform_ / orthogonal for tanh); normalisation layers (LayerNorm, BatchNorm);"
    " residual (skip) connections."
)
MAX_LISTED = 12
"""At most this many layers are listed in one warning (the rest are counted)."""
OTHER_LAYER = "<unowned>"
"""Layer name of optimizer parameters that no module of the LightningModule owns."""


def _fmt(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) else str(x)


class VanishingGradientMonitor(LightningClipCallback):
    r"""Diagnose vanishing gradients: which layers, how small, why — and warn before a run is wasted.

    Vanishing gradients cannot be clipped away: backpropagation multiplies Jacobians
    ``diag(σ'(·)) W`` layer after layer (and, in a recurrent net, time step after time step), and when
    their scale stays below 1 the gradient reaching the input side shrinks geometrically — like ``λ^T``
    through ``T`` time steps when ``λ``, the spectral radius of the recurrent weights, is below 1
    (Bengio et al. 1994; Pascanu et al. 2013, "On the difficulty of training recurrent neural networks").
    The monitor measures it and names the layers, so the architecture can be changed.

    Acts in ``on_before_optimizer_step`` every ``check_every_n_steps`` optimizer steps (per optimizer),
    on the accumulated, unscaled, pre-clip gradients; on other steps every hook returns at once. A check:

    * **Through depth.** Per-layer gradient norms (a layer is a module that directly owns parameters,
      named by its qualified name; depth is registration order) from the per-parameter norms that
      lightning-clip measures once per step, and gradient-to-weight ratios from one fused norm pass over
      the weights. A layer is *flagged* when its gradient norm is below ``depth_threshold`` × the largest
      layer's (of the same optimizer).
    * **Through time.** For every ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (unidirectional), a hook on the
      module's input captures ``‖∂L/∂x_t‖`` for each time step of the check step's batch. The module is
      flagged when the mean over the earliest 10% of the time steps is below ``time_threshold`` × the
      mean over the latest 10%.
    * **No gradient.** Trainable parameters of the optimizer (``requires_grad=True``) whose ``.grad`` is
      ``None`` (unused in the forward pass, or detached from the loss). Frozen parameters are ignored.

    A layer flagged at ``patience`` consecutive checks raises one `VanishingGradientWarning`
    (rank zero) naming the layers, their gradient norms, ratios to the largest layer, gradient-to-weight
    ratios, the step, the input-side / output-side ratio, the through-time decay and the spectral radius of
    each recurrent weight block (per gate), with the likely fixes. It warns once per layer per episode:
    the episode ends when the layer has been healthy at ``patience`` consecutive checks. Parameters that
    get no gradient raise their own warning under the same rule.

    Calibration (``tests/integration/test_vanishing_calibration.py``, a few hundred steps each, default
    arguments): it warns on a 30-layer sigmoid MLP with default init (input-side ratios underflow to 0)
    and on a tanh RNN over 100 steps with recurrent spectral radius 0.5 (decay underflows to 0); it stays
    silent on the same MLP with ReLU and residual connections (smallest ratio ≈ 1e-1) or with ReLU and
    LayerNorm (≈ 1e-4 at worst), a small transformer encoder, a small CNN with BatchNorm and an LSTM with
    forget-gate bias 5 on the same sequences (decay ≥ 1e-2). A healthy deep net's layers typically differ
    by 1e-1 to 1e-4 through depth (small layers such as LayerNorm get small norms), hence
    ``depth_threshold=1e-5``.

    Args:
        check_every_n_steps: optimizer steps between checks (``≥ 1``); the first check is the first step.
        patience: consecutive flagged checks before a warning (``≥ 1``).
        depth_threshold: a layer's gradient norm / the largest layer's below this is flagged, in ``(0, 1)``.
        time_threshold: earliest / latest ``‖∂L/∂x_t‖`` of a recurrent module below this is flagged,
            in ``(0, 1)``.
        log_layer_metrics: also log per-layer figures at each check (keys below).
        save_figure: at the end of fit, save the gradient-flow figure (per-layer gradient norm against
            depth, one line per check, log scale) as ``gradient_flow.png`` in the log directory and add it
            to TensorBoard with a ``TensorBoardLogger``; needs matplotlib (the ``plot`` extra).

    Raises:
        ValueError / TypeError: at construction, for an argument out of range or of the wrong type.

    Logged keys (with ``log_layer_metrics=True``, through ``pl_module.log`` at each check; the logger
    writes those that fall on its ``log_every_n_steps``, so make ``check_every_n_steps`` a multiple of it):

    | key | meaning |
    |---|---|
    | ``grad_health/<layer>/norm`` | the layer's gradient 2-norm |
    | ``grad_health/<layer>/ratio`` | gradient norm / weight norm of the layer |
    | ``grad_health/<layer>/depth_ratio`` | gradient norm / the largest layer's |
    | ``grad_health/<layer>/time_decay`` | recurrent: earliest / latest ``‖∂L/∂x_t‖`` |
    | ``grad_health/<layer>/spectral_radius/<block>`` | recurrent: spectral radius of a recurrent weight block, ``<block>`` = ``l0`` (RNN), ``l0.r``, ``l0.z``, ``l0.n`` (GRU), ``l0.i`` … ``l0.o`` (LSTM) |

    Notes:
        Cost: nothing on other steps; on a check step one fused norm pass over the weights (the gradients'
        norms are shared with the other lightning-clip callbacks), one small reduction per recurrent
        input, and one device-to-host transfer. Spectral radii (an eigenvalue solve per block) are computed
        only when logging them or when a recurrent layer's warning may be due. AMP: the gradients are
        unscaled in the hook. DDP: gradients are all-reduced, so every rank sees the same depth figures;
        through-time profiles are per rank (the warning comes from rank zero). Bidirectional recurrent
        modules are checked through depth only. Sharded strategies (FSDP, DeepSpeed) are not supported.

    Examples:
        >>> import pytorch_lightning as pl
        >>> from lightning_clip.callbacks.vanishing_monitor import VanishingGradientMonitor
        >>> trainer = pl.Trainer(callbacks=[VanishingGradientMonitor(check_every_n_steps=50)], logger=False)
    """

    def __init__(
        self,
        check_every_n_steps: int = 25,
        patience: int = 3,
        depth_threshold: float = 1e-5,
        time_threshold: float = 1e-4,
        log_layer_metrics: bool = False,
        save_figure: bool = True,
    ) -> None:
        super().__init__()
        self.check_every_n_steps = check_int("check_every_n_steps", check_every_n_steps, low=1)
        self.patience = check_int("patience", patience, low=1)
        self.depth_threshold = check_number(
            "depth_threshold", depth_threshold, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
        )
        self.time_threshold = check_number(
            "time_threshold", time_threshold, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
        )
        self.log_layer_metrics = check_bool("log_layer_metrics", log_layer_metrics)
        self.save_figure = check_bool("save_figure", save_figure)
        self.max_history = 200
        self.tracker = health.PatienceTracker(self.patience)
        #: optimizer steps seen, per optimizer index
        self.steps: dict[int, int] = {}
        #: one entry per check: {"step", "layers" (indices into ``layer_names``), "norms"}
        self.history: list[dict[str, Any]] = []
        self.layer_names: list[str] = []
        #: the figures of the last check (see `check`)
        self.last: dict[str, Any] = {}
        self._layers: list[tuple[str, nn.Module]] = []
        self._layer_of: dict[int, int] = {}
        self._recurrent: dict[str, nn.RNNBase] = {}
        self._handles: list[Any] = []
        self._armed = False
        self._stepped = False
        self._profiles: dict[str, torch.Tensor] = {}

    @override
    def _state_key_args(self) -> dict[str, Any]:
        return dict(
            check_every_n_steps=self.check_every_n_steps,
            patience=self.patience,
            depth_threshold=self.depth_threshold,
            time_threshold=self.time_threshold,
        )

    # ----------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "steps": {str(i): n for i, n in self.steps.items()},
            "tracker": self.tracker.state_dict(),
            "history": [dict(h) for h in self.history],
            "layer_names": list(self.layer_names),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = {int(i): int(n) for i, n in state_dict.get("steps", {}).items()}
        self.tracker.load_state_dict(state_dict.get("tracker", {}))
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.layer_names = list(state_dict.get("layer_names", []))

    # ----------------------------------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = health.model_layers(pl_module)
        self._layer_of = health.param_layer_index(self._layers)
        names = [name for name, _ in self._layers]
        if self.layer_names and self.layer_names[: len(names)] != names:
            self.history = []  # another model: the restored history does not describe it
        self.layer_names = [*names, OTHER_LAYER]
        self._remove_hooks()
        self._recurrent = {}
        for name, mod in self._layers:
            if isinstance(mod, nn.RNNBase) and mod.mode in health.RECURRENT_GATES:
                self._recurrent[name] = mod
                if not mod.bidirectional:
                    self._handles.append(mod.register_forward_pre_hook(self._make_input_hook(name, mod)))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        n_opt = max(1, len(trainer.optimizers))
        self._armed = any(self.steps.get(i, 0) % self.check_every_n_steps == 0 for i in range(n_opt))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        index = _compat.optimizer_index(trainer, optimizer)
        count = self.steps.get(index, 0)
        self.steps[index] = count + 1
        self._stepped = True
        if count % self.check_every_n_steps:
            return
        raw = _compat.unwrap_optimizer(optimizer)
        measurement = self.step_state(raw, trainer.global_step).measure(2.0)
        if measurement.skipped:
            return
        trainable = [p for p in optimizer_params(raw) if p.requires_grad]
        figures = self.check(measurement.params, measurement.per_param, trainable, trainer.global_step)
        if figures and self.log_layer_metrics:
            pl_module.log_dict(self._metrics(figures), on_step=True, on_epoch=False)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stepped:  # the step is over: profiles no check consumed are stale
            self._stepped = False
            self._armed = False
            self._profiles = {}

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if self.save_figure and self.history:
            self._save_figure(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------------------ through time
    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._profiles = {}

    def _make_input_hook(self, name: str, module: nn.RNNBase) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not self._armed or not mod.training or not torch.is_grad_enabled() or not args:
                return None
            x = args[0]
            packed = isinstance(x, PackedSequence)
            data = x.data if packed else x
            if not isinstance(data, torch.Tensor) or not data.is_floating_point():
                return None
            # a fresh node: its gradient is exactly what flows back through this module's input
            tap = data.view_as(data) if data.requires_grad else data.detach().requires_grad_(True)
            sizes = x.batch_sizes if packed else None

            def grad_hook(grad: torch.Tensor) -> None:
                prof = health.time_profile(grad, module.batch_first, sizes)
                prev = self._profiles.get(name)
                self._profiles[name] = prof if prev is None or prev.shape != prof.shape else prev + prof

            tap.register_hook(grad_hook)
            new_x = x._replace(data=tap) if packed else tap
            return (new_x, *args[1:])

        return hook

    # ------------------------------------------------------------------------------------ check
    def check(
        self,
        params: list[torch.Tensor],
        per_param: torch.Tensor,
        trainable: list[torch.Tensor],
        step: int,
    ) -> dict[str, Any]:
        """One check: measure, update the patience state, warn. Returns the check's figures (also kept
        in `last`), or ``{}`` when the gradients are not finite (such a check does not count).

        Args:
            params: parameters with a gradient; ``per_param`` their gradient norms (a 1-D tensor).
            trainable: every trainable parameter of the optimizer (those without gradient are reported).
            step: the Trainer's ``global_step``, quoted in the warnings.
        """
        other = len(self.layer_names) - 1
        layer_idx = [self._layer_of.get(id(p), other) for p in params]
        present = sorted(set(layer_idx))
        local = {g: i for i, g in enumerate(present)}
        pieces: list[torch.Tensor] = []
        device = per_param.device
        if params:
            group = torch.tensor([local[g] for g in layer_idx], device=device)
            with torch.no_grad():
                _, w_per = grad_norms([p.detach() for p in params])
            pieces += [
                group_norms(per_param.to(torch.float32), group, len(present)),
                group_norms(w_per.to(device), group, len(present)),
            ]
        present_names = {self.layer_names[g] for g in present}
        profiles = {n: p for n, p in self._profiles.items() if n in present_names}
        for name in profiles:
            self._profiles.pop(name)
        radius_names: dict[str, list[str]] = {}
        for name, mod in self._recurrent.items():
            if name not in present_names:
                continue
            may_warn = any(self.tracker.may_alert(f"{kind}:{name}") for kind in ("depth", "time"))
            if self.log_layer_metrics or may_warn:
                blocks, radii = health.spectral_radii(mod)
                radius_names[name] = blocks
                pieces.append(radii.to(device))
        pieces += [p.to(device) for p in profiles.values()]
        flat = torch.cat([p.reshape(-1).to(torch.float32) for p in pieces]).tolist() if pieces else []

        # ---- unpack (host side from here on)
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
            decay, k = health.time_decay(values)
            decays[name] = (decay, k, len(values))
        ratios = health.depth_ratios(norms)
        layers = [self.layer_names[g] for g in present]
        figures: dict[str, Any] = {
            "step": step,
            "layers": layers,
            "norms": norms,
            "depth_ratios": ratios,
            "grad_to_weight": [g / w if w > 0 else math.nan for g, w in zip(norms, w_norms, strict=True)],
            "time_decay": decays,
            "spectral_radius": radii_of,
        }
        no_grad_layers = self._no_grad_layers(params, trainable)
        figures["no_grad"] = no_grad_layers

        flagged = {
            f"depth:{name}" for name, r in zip(layers, ratios, strict=True) if r < self.depth_threshold
        }
        flagged |= {f"time:{name}" for name, (d, _, _) in decays.items() if d < self.time_threshold}
        flagged |= {f"nograd:{name}" for name in no_grad_layers}
        observed = [f"depth:{name}" for name, r in zip(layers, ratios, strict=True) if math.isfinite(r)]
        observed += [f"time:{name}" for name, (d, _, _) in decays.items() if math.isfinite(d)]
        trainable_layers = dict.fromkeys(
            self.layer_names[self._layer_of.get(id(p), other)] for p in trainable
        )
        observed += [f"nograd:{name}" for name in trainable_layers]
        due = self.tracker.update(flagged, observed)
        figures["warned"] = due
        self.last = figures
        self.history.append({"step": step, "layers": list(present), "norms": list(norms)})
        self.history = health.thin_history(self.history, self.max_history)

        depth_due = [k.split(":", 1)[1] for k in due if k.startswith("depth:")]
        if depth_due:
            self._warn(self._depth_message(figures, depth_due))
        for key in due:
            if key.startswith("time:"):
                self._warn(self._time_message(figures, key.split(":", 1)[1]))
        nograd_due = [k.split(":", 1)[1] for k in due if k.startswith("nograd:")]
        if nograd_due:
            self._warn(self._no_grad_message(step, {n: no_grad_layers[n] for n in nograd_due}))
        return figures

    def _no_grad_layers(
        self, params: list[torch.Tensor], trainable: list[torch.Tensor]
    ) -> dict[str, list[str]]:
        with_grad = {id(p) for p in params}
        out: dict[str, list[str]] = {}
        other = len(self.layer_names) - 1
        for p in trainable:
            if id(p) in with_grad or p.grad is not None:
                continue
            layer = self._layer_of.get(id(p), other)
            mod = self._layers[layer][1] if layer < len(self._layers) else None
            pname = "?"
            if mod is not None:
                pname = next((n for n, q in mod.named_parameters(recurse=False) if q is p), "?")
            out.setdefault(self.layer_names[layer], []).append(pname)
        return out

    # --------------------------------------------------------------------------------- messages
    def _recurrent_line(self, figures: dict[str, Any], name: str) -> str:
        radii = figures["spectral_radius"].get(name)
        if not radii:
            return ""
        mod = self._recurrent[name]
        blocks = ", ".join(f"{b} {r:.3g}" for b, r in radii.items())
        return (
            f"\n  `{name}` ({type(mod).__name__}) spectral radius of the recurrent weights per block: {blocks}"
            " (below 1 the gradient shrinks like λ^T through T time steps, above 1 it grows)."
        )

    def _depth_message(self, fig: dict[str, Any], due: list[str]) -> str:
        layers, norms, ratios, gw = fig["layers"], fig["norms"], fig["depth_ratios"], fig["grad_to_weight"]
        top = max(range(len(norms)), key=lambda i: norms[i])
        flagged = [i for i, r in enumerate(ratios) if r < self.depth_threshold]
        named = [i for i in flagged if layers[i] in due]
        width = max(len(layers[i]) for i in named[:MAX_LISTED])
        lines = [
            f"  {layers[i]:<{width}}  grad norm {_fmt(norms[i])}  ×{_fmt(ratios[i])} of the largest"
            f"  grad/weight {_fmt(gw[i])}"
            for i in named[:MAX_LISTED]
        ]
        if len(named) > MAX_LISTED:
            rest = ", ".join(layers[i] for i in named[MAX_LISTED:])
            lines.append(f"  … and {len(named) - MAX_LISTED} more: {rest}")
        if len(named) < len(flagged):
            lines.append(f"  (and {len(flagged) - len(named)} layers already reported)")
        first, last = 0, len(layers) - 1
        io_ratio = _fmt(norms[first] / norms[last]) if norms[last] > 0 else "n/a"
        recurrent = "".join(self._recurrent_line(fig, n) for n in due if n in self._recurrent)
        return (
            f"Vanishing gradients through depth at step {fig['step']}: {len(flagged)} of {len(layers)} layers"
            f" get less than {self.depth_threshold:g} of the gradient norm of the largest layer"
            f" (`{layers[top]}`, {_fmt(norms[top])}), {self.patience} checks in a row"
            f" (every {self.check_every_n_steps} steps), input side first:\n"
            + "\n".join(lines)
            + f"\n  Input-side / output-side gradient norm (`{layers[first]}` / `{layers[last]}`): {io_ratio}."
            + recurrent
            + f"\n{FIXES}"
        )

    def _time_message(self, fig: dict[str, Any], name: str) -> str:
        decay, k, steps = fig["time_decay"][name]
        mod = self._recurrent[name]
        kind = f"{type(mod).__name__}" + (f", {mod.nonlinearity}" if isinstance(mod, nn.RNN) else "")
        if decay > 0:
            rate = f"about ×{decay ** (1.0 / max(1, steps - k)):.3g} per time step"
        else:
            rate = "it underflows float32: nothing arrives"
        hint = ""
        if isinstance(mod, nn.LSTM):
            hint = (
                f"\n  For this LSTM: open the forget gates, e.g. set the forget-gate bias to 1 to 5"
                f" (`{name}.bias_ih_l0[H:2H]`, gate order i, f, g, o); at ≈ sigmoid(0) = 0.5 they halve the"
                " error at every step."
            )
        return (
            f"Vanishing gradients through time in `{name}` ({kind}) at step {fig['step']}: the earliest {k} of"
            f" {steps} time steps get {_fmt(decay)} of the gradient ‖∂L/∂x_t‖ that reaches the latest {k}"
            f" ({rate}), {self.patience} checks in a row (threshold {self.time_threshold:g}): the loss can"
            " hardly learn from early inputs." + self._recurrent_line(fig, name) + hint + f"\n{FIXES}"
        )

    def _no_grad_message(self, step: int, layers: dict[str, list[str]]) -> str:
        listed = "; ".join(f"`{n}` ({', '.join(ps)})" for n, ps in list(layers.items())[:MAX_LISTED])
        more = f" and {len(layers) - MAX_LISTED} more layers" if len(layers) > MAX_LISTED else ""
        return (
            f"Trainable parameters got no gradient at step {step}, {self.patience} checks in a row: {listed}{more}."
            " They are not used in the forward pass, or their output is detached from the loss. Reconnect them,"
            " remove them, or freeze them (`requires_grad_(False)`); under DDP unused parameters also need"
            " `strategy=DDPStrategy(find_unused_parameters=True)`."
        )

    @staticmethod
    def _warn(message: str) -> None:
        rank_zero_warn(message, category=VanishingGradientWarning)

    def _metrics(self, fig: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, norm, ratio, gw in zip(
            fig["layers"], fig["norms"], fig["depth_ratios"], fig["grad_to_weight"], strict=True
        ):
            out[f"grad_health/{name}/norm"] = norm
            out[f"grad_health/{name}/ratio"] = gw
            out[f"grad_health/{name}/depth_ratio"] = ratio
        for name, (decay, _, _) in fig["time_decay"].items():
            out[f"grad_health/{name}/time_decay"] = decay
        for name, radii in fig["spectral_radius"].items():
            for block, r in radii.items():
                out[f"grad_health/{name}/spectral_radius/{block}"] = r
        return out

    # ----------------------------------------------------------------------------------- figure
    @rank_zero_only
    def _save_figure(self, trainer: pl.Trainer) -> None:
        try:
            from lightning_clip.report.plot import plot_gradient_flow

            fig = plot_gradient_flow(self.history, self.layer_names)
        except ImportError:
            log.info(
                "matplotlib is not installed: no gradient-flow figure (pip install 'lightning-clip[plot]')."
            )
            return
        directory = _compat.log_dir(trainer)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "gradient_flow.png")
        fig.savefig(path, dpi=100)
        log.info("Gradient-flow figure saved to %s", path)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(
                    "grad_health/gradient_flow", fig, global_step=trainer.global_step
                )

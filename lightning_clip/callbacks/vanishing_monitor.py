"""VanishingGradientMonitor: per-layer gradient health, warnings and the gradient-flow figure."""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_only, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_clip import _compat, _namespace, diagnosis
from lightning_clip._validation import check_bool, check_int, check_number
from lightning_clip.callbacks import _vanishing_messages as messages
from lightning_clip.callbacks._base import LightningClipCallback
from lightning_clip.callbacks._vanishing_probe import CauseProbe, Evidence, TimeTap
from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping
from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from lightning_clip.diagnosis import Onset
from lightning_clip.exceptions import VanishingGradientWarning
from lightning_clip.functional import health
from lightning_clip.functional.norms import grad_norms, group_norms
from lightning_clip.guard.events import run_log_dir
from lightning_clip.step import LOSS_RIDER, StepState, optimizer_params

__all__ = ["VanishingGradientMonitor"]

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from lightning_clip._compat import LightningModule, Trainer

MAX_LISTED = messages.MAX_LISTED
OTHER_LAYER = "<unowned>"
"""Layer name of optimizer parameters that no module of the LightningModule owns."""
RECENT_CHECKS = 64
"""Check steps remembered per optimizer (to date the start of a streak of flagged checks)."""
LOSS_JUMP = 1.5
"""A training loss above this × the median of the (up to 10) steps before it, and above every loss before it,
between the last healthy check and the first flagged one, is a blow-up."""
NORM_JUMP = 10.0
"""The same for the gradient norm (of the steps where a lightning-clip callback measured it)."""


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
    * **No gradient.** Trainable parameters of the optimizer (``requires_grad=True``) that got no gradient
      (``.grad`` is ``None``: unused in the forward pass, or detached from the loss) on *any* optimizer step
      since the previous check (at the first check of a fit: on that step). A head used on some steps
      only (multi-task heads taken in turn, an auxiliary loss every few steps) is not flagged. Tracked on
      every step by reading ``.grad is None`` of the parameters not seen yet in the window (no kernel, no
      transfer). Frozen parameters are ignored.

    A layer flagged at ``patience`` consecutive checks raises one `VanishingGradientWarning`
    (rank zero) naming the layers, their gradient norms, ratios to the largest layer, gradient-to-weight
    ratios, the step, the input-side / output-side ratio, the through-time decay and the spectral radius of
    each recurrent weight block (per gate), then **why**: the causes measured at that check, strongest
    first, and the fixes that fit the model. It warns once per layer per episode: the episode ends when the
    layer has been healthy at ``patience`` consecutive checks. Parameters that get no gradient raise their
    own warning under the same rule.

    **Causes** (`lightning_clip.diagnosis` ranks them; ``docs/callbacks/vanishing_monitor.md`` shows
    each with a real warning). Measured only at a check where a warning may be due (a layer flagged
    ``patience - 1`` checks in a row), or at every check with ``log_layer_metrics=True``:

    * *Saturating activations*: every sigmoid / tanh of the autograd graph (modules and functions alike,
      read before ``backward`` from the tensors autograd saved): the share of units in the flat region and
      the product of the mean derivatives across depth, against the bound ``0.25^n`` of ``n`` sigmoids.
    * *Dead units*: ReLU-family layers, the share of units never active over the check's batch, and the
      mean bias of the layer feeding them.
    * *Initialisation*: ``rms(W)·√fan_in`` of each layer feeding an activation, against the gain the
      activation needs (``nn.init.calculate_gain``).
    * *Through time*: the spectral radius of an RNN's recurrent weights (with its mean ``tanh'``), the
      forget gates of an LSTM and the update gates of a GRU (layer 0, recomputed from the layer's input,
      output and weights: the fused kernels keep them to themselves), with their bias.
    * *Collapse after a blow-up*: a training loss (every step, kept as a tensor until the next check) or a
      gradient norm (the steps another lightning-clip callback measured) that jumped between the last
      healthy check and the first flagged one: the step, the figures and the learning rate. Ranked first.

    The fixes are only those the model lacks: no normalisation for a model that has it, no residual
    connections for one that has them (found in the graph), no gated cell for a model without recurrent
    layers, no clipping callback when one is in the Trainer.

    Calibration (``tests/integration/test_vanishing_calibration.py``, a few hundred steps each, default
    arguments): it warns on a 30-layer sigmoid MLP with default init (input-side ratios underflow to 0)
    and on a tanh RNN over 100 steps with recurrent spectral radius 0.5 (decay underflows to 0); it stays
    silent on the same MLP with ReLU and residual connections (smallest ratio ≈ 1e-1) or with ReLU and
    LayerNorm (≈ 1e-4 at worst), a small transformer encoder, a small CNN with BatchNorm and an LSTM with
    forget-gate bias 5 on the same sequences (decay ≥ 1e-2). A healthy deep net's layers typically differ
    by 1e-1 to 1e-4 through depth (small layers such as LayerNorm get small norms), hence
    ``depth_threshold=1e-5``. The causes are checked in ``tests/integration/test_vanishing_causes.py``
    against independent references (float64 recomputations, numpy's eigenvalues, the model's own loss).

    Args:
        check_every_n_steps: optimizer steps between checks (``≥ 1``); the first check is the first step.
        patience: consecutive flagged checks before a warning (``≥ 1``).
        depth_threshold: a layer's gradient norm / the largest layer's below this is flagged, in ``(0, 1)``.
        time_threshold: earliest / latest ``‖∂L/∂x_t‖`` of a recurrent module below this is flagged,
            in ``(0, 1)``.
        log_layer_metrics: also log per-layer figures at each check (keys below).
        save_figure: at the end of fit, save the gradient-flow figure (per-layer gradient norm against
            depth, one line per check, log scale) as ``gradient_flow.png`` in the run's directory (the
            logger's ``log_dir``; without one ``<default_root_dir>/lightning_clip_logs/version_<N>``, as
            the event log) and add it
            to TensorBoard with a ``TensorBoardLogger``; needs matplotlib (the ``plot`` extra).
        measure_causes: measure the causes (above) for the warnings; ``False`` keeps only the generic
            fixes that fit the model's modules, and costs nothing beyond the checks themselves.

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
    | ``grad_health/<layer>/flat_share`` | the activation fed by the layer: share of its elements in the flat region (derivative below 10% of its maximum) |
    | ``grad_health/<layer>/dead_share`` | the same activation: share of its units flat over the whole batch (ReLU: never active) |
    | ``grad_health/<layer>/gate/<gate>`` | recurrent: mean value of a gate of layer 0, ``i f g o`` (LSTM), ``r z n`` (GRU), ``h`` (RNN) |

    Notes:
        Cost (``benchmarks/monitor_check.py``): on other steps the training loss is kept as a tensor and
        the learning rate read (no kernel, no transfer); on a check step one fused norm pass over the
        weights (the gradients' norms are shared with the other lightning-clip callbacks), one small
        reduction per recurrent input, and one device-to-host transfer. Measuring the causes adds, at the
        checks where a warning may be due, a walk of the autograd graph, a few reductions per activation
        and a recomputation of the recurrent layers' gates (about one forward of those layers), riding on
        the same transfer. Spectral radii (an eigenvalue solve per block) are computed only when logging
        them or when a recurrent layer's warning may be due. AMP: the gradients are unscaled in the hook.
        DDP: gradients are all-reduced, so every rank sees the same depth figures; through-time profiles and
        causes are per rank (the warning comes from rank zero; causes never change a decision).
        Bidirectional recurrent modules are checked through depth only. Activations inside compiled
        regions (``torch.compile``) or recomputed by activation checkpointing are not seen. FSDP2 / tensor
        parallelism (``ModelParallelStrategy``): per-layer gradient and weight norms are those of the full
        parameters (one small all-reduce each on check steps), spectral radii are computed from the full
        recurrent weights (gathered on check steps). DeepSpeed, FSDP1 (``FSDPStrategy``) and XLA are
        refused at setup.

    Examples:
        >>> import pytorch_lightning as pl
        >>> from lightning_clip.callbacks.vanishing_monitor import VanishingGradientMonitor
        >>> trainer = pl.Trainer(callbacks=[VanishingGradientMonitor(check_every_n_steps=50)], logger=False)
        >>> quiet = VanishingGradientMonitor(measure_causes=False)  # the checks only
    """

    def __init__(
        self,
        check_every_n_steps: int = 25,
        patience: int = 3,
        depth_threshold: float = 1e-5,
        time_threshold: float = 1e-4,
        log_layer_metrics: bool = False,
        save_figure: bool = True,
        measure_causes: bool = True,
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
        self.measure_causes = check_bool("measure_causes", measure_causes)
        self.max_history = 200
        self.tracker = health.PatienceTracker(self.patience)
        #: optimizer steps seen, per optimizer index
        self.steps: dict[int, int] = {}
        #: one entry per check: {"step", "layers" (indices into ``layer_names``), "norms"}
        self.history: list[dict[str, Any]] = []
        self.layer_names: list[str] = []
        #: the figures of the last check (see `check`)
        self.last: dict[str, Any] = {}
        #: the cause measurements (see `CauseProbe`)
        self.probe = CauseProbe()
        self._recent: dict[int, deque[int]] = {}  # the latest check steps, per optimizer index
        self._layers: list[tuple[str, nn.Module]] = []
        self._layer_of: dict[int, int] = {}
        self._recurrent: dict[str, nn.RNNBase] = {}
        self._handles: list[Any] = []
        self._tap = TimeTap()  # the through-time profiles of recurrent inputs
        self._stepped = False
        self._norm_seen: int | None = None  # id() of the last StepState whose norm was recorded
        self._weight_norms: dict[int, torch.Tensor] = {}  # id(parameter) -> its norm, at this check
        self._log_dir: str | None = None  # where the figure goes (known from setup on)
        # optimizer index -> its trainable parameters that got no gradient since its last check
        self._unseen: dict[int, list[torch.Tensor]] = {}

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
            "version": 2,
            "steps": {str(i): n for i, n in self.steps.items()},
            "tracker": self.tracker.state_dict(),
            "history": [dict(h) for h in self.history],
            "layer_names": list(self.layer_names),
            "recent_checks": {str(i): list(d) for i, d in self._recent.items()},
            "series": self.probe.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = {int(i): int(n) for i, n in state_dict.get("steps", {}).items()}
        self.tracker.load_state_dict(state_dict.get("tracker", {}))
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.layer_names = list(state_dict.get("layer_names", []))
        recent = state_dict.get("recent_checks", {})
        self._recent = {int(i): deque((int(s) for s in d), maxlen=RECENT_CHECKS) for i, d in recent.items()}
        self.probe.load_state_dict(state_dict.get("series", {}))

    # ----------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.save_figure:
            self._log_dir = run_log_dir(trainer)  # the run's own folder, also without a logger (collective)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._layers = health.model_layers(pl_module)
        self._layer_of = health.param_layer_index(self._layers)
        names = [name for name, _ in self._layers]
        if self.layer_names and self.layer_names[: len(names)] != names:
            self.history = []  # another model: the restored history does not describe it
        self.layer_names = [*names, OTHER_LAYER]
        self._unseen = {}
        self._remove_hooks()
        self._recurrent = {}
        for name, mod in self._layers:
            if isinstance(mod, nn.RNNBase) and mod.mode in health.RECURRENT_GATES:
                self._recurrent[name] = mod
                if not mod.bidirectional:
                    self._handles.append(mod.register_forward_pre_hook(self._tap.hook(name, mod)))
        self._handles += self.probe.attach(
            pl_module, self._layers, self._layer_of, self._recurrent, self.measure_causes
        )
        callbacks = list(getattr(trainer, "callbacks", []))  # None when a test drives the hook directly
        self.probe.facts.guard = any(isinstance(cb, ExplosionGuard) for cb in callbacks)
        self.probe.facts.clipping = bool(getattr(trainer, "gradient_clip_val", None)) or any(
            isinstance(cb, AdaptiveGradientClipping) for cb in callbacks
        )

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        n_opt = max(1, len(trainer.optimizers))
        armed = any(self.steps.get(i, 0) % self.check_every_n_steps == 0 for i in range(n_opt))
        self._tap.armed = armed
        self.probe.analyse = self.measure_causes and armed and (self.log_layer_metrics or self._may_warn())

    def _may_warn(self) -> bool:
        """True when this check could raise a warning that needs causes (one more flagged check)."""
        if self.patience == 1:
            return True
        keys = (k for k in self.tracker.counts if not k.startswith("nograd:"))
        return any(self.tracker.may_alert(k) for k in keys)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self.measure_causes:  # every step: the loss stays a tensor until the next check's transfer
            self.probe.record_loss(trainer.global_step, loss)
            self.probe.read_graph(loss)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        index = _compat.optimizer_index(trainer, optimizer)
        count = self.steps.get(index, 0)
        self.steps[index] = count + 1
        self._stepped = True
        raw = _compat.unwrap_optimizer(optimizer)
        if self.measure_causes and index == 0:
            self.probe.record_lr(trainer.global_step, float(raw.param_groups[0]["lr"]))
        state = self.step_state(raw, trainer.global_step)
        self._note_gradients(index, raw, state)
        if count % self.check_every_n_steps:
            return
        measurement = state.measure(2.0)
        if measurement.skipped:
            return
        trainable = [p for p in optimizer_params(raw) if p.requires_grad]
        self._recent.setdefault(index, deque(maxlen=RECENT_CHECKS)).append(trainer.global_step)
        unseen = self._unseen.pop(index, [])  # the next step opens a new window
        figures = self.check(
            measurement.params, measurement.per_param, trainable, trainer.global_step, no_grad=unseen
        )
        if figures and self.log_layer_metrics:
            pl_module.log_dict(messages.layer_metrics(figures), on_step=True, on_epoch=False)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._stepped:
            return
        state = self.step_tracker.current if self.step_tracker is not None else None
        if self.measure_causes and state is not None and id(state) != self._norm_seen:
            self._norm_seen = id(state)
            self._share_step(state)
        self._stepped = False  # the step is over: profiles and figures no check consumed are stale
        self._tap.clear()
        self.probe.end_step()

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

    def _share_step(self, state: StepState) -> None:
        """What the other lightning-clip callbacks measured at this step, for the blow-up signal: the
        gradient norm (a host value if one of them read it, else the tensor, no transfer) and the training
        loss when ``ExplosionGuard`` brought it to the host (then the monitor's own copy is dropped)."""
        measured = state.measurements.get(2.0)
        if measured is not None:
            host = measured.fetched_total_norm
            self.probe.record_norm(state.step, host if host is not None else measured.total)
        loss = state.fetched_rider(LOSS_RIDER)
        if loss is not None:
            self.probe.known_loss(state.step, loss)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        if self.save_figure and self.history:
            self._save_figure(trainer, self._log_dir or _compat.log_dir(trainer))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._tap.clear()

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

"""VanishingGradientMonitor: per-layer gradient health, warnings and the gradient-flow figure.

The hooks decide when a check runs and gather what it needs (layers, recurrent inputs, the causes);
the check and the window of parameters without a gradient are kept by its base `VanishingCheckMixin`
(`lightning_clip.callbacks._vanishing_check`), the warnings and the figure by its base
`VanishingOutputMixin` (`lightning_clip.callbacks._vanishing_output`, with ``LOSS_JUMP`` and
``NORM_JUMP``, re-exported here).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from typing_extensions import override

from lightning_clip import _compat
from lightning_clip._validation import check_bool, check_int, check_number
from lightning_clip.callbacks import _vanishing_messages as messages
from lightning_clip.callbacks._vanishing_check import VanishingCheckMixin
from lightning_clip.callbacks._vanishing_output import LOSS_JUMP as LOSS_JUMP
from lightning_clip.callbacks._vanishing_output import NORM_JUMP as NORM_JUMP
from lightning_clip.callbacks._vanishing_output import VanishingOutputMixin
from lightning_clip.callbacks._vanishing_output import log as log
from lightning_clip.callbacks._vanishing_probe import CauseProbe, TimeTap
from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping
from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from lightning_clip.functional import health
from lightning_clip.guard.events import run_log_dir
from lightning_clip.step import LOSS_RIDER, StepState, optimizer_params

__all__ = ["VanishingGradientMonitor"]

if TYPE_CHECKING:
    from lightning_clip._compat import LightningModule, Trainer

MAX_LISTED = messages.MAX_LISTED
OTHER_LAYER = "<unowned>"
"""Layer name of optimizer parameters that no module of the LightningModule owns."""
RECENT_CHECKS = 64
"""Check steps remembered per optimizer (to date the start of a streak of flagged checks)."""


class VanishingGradientMonitor(VanishingCheckMixin, VanishingOutputMixin):  # type: ignore[misc, unused-ignore]
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

"""Tools to test a training setup's recovery policy in CI: `FaultInjector`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from typing_extensions import override

from lightning_clip._validation import check_choice, check_int
from lightning_clip.callbacks._base import CallbackBase
from lightning_clip.functional.norms import dense_values

if TYPE_CHECKING:
    from lightning_clip._compat import LightningModule, Trainer

__all__ = ["FaultInjector"]

TARGETS = ("loss", "grad", "weight", "input", "forward")


def _check_indices(name: str, value: Any) -> frozenset[int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"`{name}` must be a list of integers ≥ 0, got {value!r}.")
    items = list(value)
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in items):
        raise ValueError(f"`{name}` must be a list of integers ≥ 0, got {value!r}.")
    return frozenset(items)


def _poison_(obj: Any, value: float) -> int:
    """Fill every floating-point tensor inside ``obj`` (nested collections) with ``value``; returns how many."""
    filled: list[int] = []

    def fill(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() or t.is_complex():
            t.fill_(value)
            filled.append(1)
        return t

    apply_to_collection(obj, torch.Tensor, fill)
    return len(filled)


class FaultInjector(CallbackBase):
    """Inject NaN or Inf into the loss, the gradients, the weights, the input batch or the forward pass, on
    chosen steps.

    Attach it next to `ExplosionGuard` to check in CI that a training setup
    survives faults. It is a plain ``Callback`` (not a lightning-clip callback): the guard never snapshots
    or restores it, and it has no checkpointed state.

    When it fires: on the batches that start while ``trainer.global_step`` is in ``steps`` (a transient
    fault: the step counter never goes back, also after a rollback), or on the batches whose index in the
    epoch is in ``batches`` (every time that batch is seen, every epoch: a persistent data fault). With
    gradient accumulation a step covers several batches; all of them are hit.

    What each ``target`` does (only through public hooks):

    * ``"input"``: ``on_train_batch_start`` fills every floating-point tensor of the batch with ``value``,
      in place, so the forward pass and the loss come out non-finite. (A batch that shares memory with
      the dataset poisons the dataset too.)
    * ``"loss"``: automatic optimization: for that batch, ``training_step`` is wrapped (an instance
      attribute set in ``on_train_batch_start``, removed in ``on_train_batch_end``) so that the loss it
      returns is multiplied by ``value``: the loss Lightning back-propagates, logs and hands to
      ``on_train_batch_end`` is non-finite, and so are the gradients. Manual optimization: the loss given
      to ``manual_backward`` is multiplied in place in ``on_before_backward`` (under 16-mixed that is the
      scaled loss).
    * ``"grad"``: ``on_after_backward`` fills the gradients of the parameters matching ``param_pattern``
      (all when None) with ``value``. Under DDP the gradients are already all-reduced there, so a fault on
      one rank stays on that rank.
    * ``"weight"``: ``on_train_batch_end`` (after the optimizer step) fills the parameters matching
      ``param_pattern`` with ``value``; the next forward pass turns non-finite.
    * ``"forward"``: for that batch, a forward hook on every module of the LightningModule that directly
      owns parameters turns its floating-point outputs into ``value`` (``0 * output + value``, so the graph
      stays connected): the loss ``training_step`` computes, *and every value it logs from it*, are
      non-finite, whatever the batch holds (token ids included), and so are the gradients. This is the
      target that shows, in a user's CI, whether a recovered step still reaches the logged metrics (e.g.
      an ``EarlyStopping`` watching ``train_loss_epoch``); ``"loss"`` multiplies the value returned after
      ``training_step`` logged it, so what was logged stays finite. The hooks are removed at the end of
      the batch.

    Args:
        target: ``"loss"`` | ``"grad"`` | ``"weight"`` | ``"input"`` | ``"forward"``.
        value: the value injected: ``float("nan")``, ``float("inf")`` or ``float("-inf")``.
        steps: global steps to fire at (integers ``≥ 0``). Exactly one of ``steps`` and ``batches``.
        batches: batch indices within the epoch to fire at, every epoch (integers ``≥ 0``).
        param_pattern: regular expression searched in the parameter names (``re.search``), for ``"grad"``
            and ``"weight"``; None: every parameter.
        rank: fire on this global rank only (``≥ 0``); None: on every rank.

    Attributes:
        injected: one dict per fault injected on this process: ``step``, ``batch``, ``target``, ``rank``.

    Examples:
        >>> import pytorch_lightning as pl
        >>> from lightning_clip import ExplosionGuard
        >>> from lightning_clip.testing import FaultInjector
        >>> faults = FaultInjector(target="grad", value=float("inf"), steps=[3], param_pattern=r"weight$")
        >>> trainer = pl.Trainer(callbacks=[ExplosionGuard(), faults], max_steps=10, logger=False)
    """

    def __init__(
        self,
        target: str = "grad",
        value: float = float("nan"),
        steps: Iterable[int] | None = None,
        batches: Iterable[int] | None = None,
        param_pattern: str | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        self.target = check_choice("target", target, TARGETS)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isfinite(value):
            raise ValueError(f"`value` must be float('nan'), float('inf') or float('-inf'), got {value!r}.")
        self.value = float(value)
        self.steps = _check_indices("steps", steps)
        self.batches = _check_indices("batches", batches)
        if self.steps is None and self.batches is None:
            raise ValueError("`steps` must be a list of global steps when `batches` is None, got None.")
        if self.steps is not None and self.batches is not None:
            raise ValueError(f"`batches` must be None when `steps` is given, got {batches!r}.")
        if param_pattern is not None:
            if not isinstance(param_pattern, str):
                raise TypeError(
                    f"`param_pattern` must be a regular expression string or None, got {param_pattern!r}."
                )
            if target not in ("grad", "weight"):
                raise ValueError(
                    f"`param_pattern` must be None for target={target!r}, got {param_pattern!r}."
                )
            try:
                re.compile(param_pattern)
            except re.error:
                raise ValueError(
                    f"`param_pattern` must be a valid regular expression, got {param_pattern!r}."
                ) from None
        self.param_pattern = param_pattern
        self.rank = None if rank is None else check_int("rank", rank, low=0, optional=True)
        self.injected: list[dict[str, Any]] = []
        self._active = False
        self._step = -1
        self._batch = -1
        self._wrapped: LightningModule | None = None
        self._hooks: list[Any] = []  # target="forward": the forward hooks of the current batch

    def _fires(self, trainer: Trainer, batch_idx: int) -> bool:
        if self.rank is not None and trainer.global_rank != self.rank:
            return False
        if self.steps is not None:
            return trainer.global_step in self.steps
        return self.batches is not None and batch_idx in self.batches

    def _params(self, pl_module: LightningModule) -> list[tuple[str, torch.nn.Parameter]]:
        pattern = None if self.param_pattern is None else re.compile(self.param_pattern)
        return [(n, p) for n, p in pl_module.named_parameters() if pattern is None or pattern.search(n)]

    def _note(self, trainer: Trainer) -> None:
        self.injected.append(
            {"step": self._step, "batch": self._batch, "target": self.target, "rank": trainer.global_rank}
        )

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step, self._batch = trainer.global_step, batch_idx
        self._active = self._fires(trainer, batch_idx)
        if self._active and self.target == "input" and _poison_(batch, self.value):
            self._note(trainer)
        if self._active and self.target == "loss" and pl_module.automatic_optimization:
            self._wrap_training_step(pl_module)
        if self._active and self.target == "forward":
            self._poison_forward(trainer, pl_module)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self._active and self.target == "loss":
            if self._wrapped is None:  # manual optimization
                loss.mul_(self.value)
            self._note(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._unwrap()

    def _poison_forward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        value = self.value
        noted: list[bool] = []

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if not noted:
                noted.append(True)
                self._note(trainer)
            return apply_to_collection(
                output,
                torch.Tensor,
                lambda t: t * 0 + value if t.is_floating_point() or t.is_complex() else t,
            )

        owners = [m for m in pl_module.modules() if next(m.parameters(recurse=False), None) is not None]
        self._hooks = [m.register_forward_hook(hook) for m in owners]

    def _wrap_training_step(self, pl_module: LightningModule) -> None:
        original = pl_module.training_step
        value = self.value

        def poisoned(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                return out * value
            if isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor):
                return {**out, "loss": out["loss"] * value}
            return out

        pl_module.training_step = poisoned  # type: ignore[method-assign]
        self._wrapped = pl_module

    def _unwrap(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("training_step", None)
            self._wrapped = None

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self._active and self.target == "grad"):
            return
        hit = False
        for _, p in self._params(pl_module):
            if p.grad is not None:
                dense_values(p.grad, coalesce=False).fill_(self.value)  # a sparse gradient: its values
                hit = True
        if hit:
            self._note(trainer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._active and self.target == "weight":
            with torch.no_grad():
                for _, p in self._params(pl_module):
                    p.fill_(self.value)
            self._note(trainer)
        self._unwrap()
        self._active = False

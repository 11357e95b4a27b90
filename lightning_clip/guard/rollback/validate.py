"""Stage 4 of a rollback: is a state that was read fit to be restored into the live run? Nothing is
touched before it says yes.

`problem` returns why not (None: fit). It checks, in this order:

* structure: nesting at most `MAX_DEPTH` levels (a deeper state is refused before any recursive walk);
* the model: the same parameter and buffer names as the live model, each with the same shape;
* the optimizers: as many as the Trainer's, the same number of parameter groups and of parameters per
  group; every number in the groups finite, learning rates ``>= 0``;
* the LR schedulers: as many as the Trainer's, no NaN in their state, their learning rates finite and
  ``>= 0``;
* the precision plugin: a GradScaler's scale finite and ``> 0``;
* the other lightning-clip callbacks' states: what each says of its own (``state_problem``); the
  guard's own: ``lr_scale`` finite and ``> 0``, no NaN in its divergence detector;
* the weights and optimizer states: finite (one fused pass).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_clip.guard.snapshot import LocalShard, TrainingState

if TYPE_CHECKING:
    from lightning_clip._compat import Trainer

__all__ = ["MAX_DEPTH", "problem", "valid_lr_scale"]

MAX_DEPTH = 64
"""The deepest nesting of dicts, lists and tuples a restored state may have."""


def _walk(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of nested dicts / lists / tuples with its path, iteratively (no recursion, any depth);
    raises ``ValueError`` past `MAX_DEPTH` levels."""
    stack: list[tuple[str, Any, int]] = [(path, obj, 0)]
    while stack:
        where, item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise ValueError(f"it is nested deeper than {MAX_DEPTH} levels (at {where[:80]!r})")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend((f"{where}.{k}", v, depth + 1) for k, v in pairs)
        else:
            yield where, item


def _bad_number(value: Any, allow_inf: bool) -> bool:
    """A NaN (or, unless ``allow_inf``, an infinity) in a Python number or a small tensor."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return math.isnan(value) or (not allow_inf and math.isinf(value))
    local = value.local if isinstance(value, LocalShard) else value
    if isinstance(local, torch.Tensor) and (local.is_floating_point() or local.is_complex()):
        good = ~torch.isnan(local) if allow_inf else torch.isfinite(local)
        return not bool(good.all())
    return False


def _numbers(obj: Any, what: str, allow_inf: bool = False) -> str | None:
    for where, leaf in _walk(obj):
        if isinstance(leaf, torch.Tensor) and leaf.numel() > 1:
            continue  # large tensors: the fused finite pass below
        if _bad_number(leaf, allow_inf):
            return f"{what}{where} is {leaf!r}"
    return None


def _shape(t: Any) -> tuple[int, ...] | None:
    if isinstance(t, (torch.Tensor, LocalShard)):
        return tuple(t.shape)
    return None


def _model(state: TrainingState, live: dict[str, Any]) -> str | None:
    if not isinstance(state.model, dict):
        return "its model state is not a dict"
    missing = sorted(set(live) - set(state.model))
    extra = sorted(set(state.model) - set(live))
    if missing or extra:
        return (
            f"its model does not match the live model (missing: {missing[:3]}, unexpected: {extra[:3]});"
            " a file of another model"
        )
    for name, t in live.items():
        saved = _shape(state.model[name])
        if saved != tuple(t.shape):
            return f"its {name!r} has shape {list(saved) if saved is not None else None}, the live model's {list(t.shape)}"
    return None


def _optimizers(state: TrainingState, trainer: Trainer) -> str | None:
    live = trainer.optimizers
    if not isinstance(state.optimizers, list) or len(state.optimizers) != len(live):
        return f"it holds {len(state.optimizers) if isinstance(state.optimizers, list) else '?'} optimizer state(s), the Trainer has {len(live)} optimizer(s)"
    for i, (opt, saved) in enumerate(zip(live, state.optimizers, strict=True)):
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not isinstance(groups, list) or not isinstance(saved.get("state"), dict):
            return f"optimizer {i}'s state is not an optimizer state_dict"
        if len(groups) != len(opt.param_groups):
            return f"optimizer {i} has {len(groups)} parameter groups, the live one {len(opt.param_groups)}"
        for g, (group, live_group) in enumerate(zip(groups, opt.param_groups, strict=True)):
            if not isinstance(group, dict) or len(group.get("params", ())) != len(live_group["params"]):
                return f"optimizer {i}, group {g} holds another number of parameters than the live one"
            bad = _numbers({k: v for k, v in group.items() if k != "params"}, f"optimizer {i}, group {g}")
            if bad is not None:
                return bad
            lr = group.get("lr")
            if isinstance(lr, (int, float, torch.Tensor)) and float(lr) < 0:
                return f"optimizer {i}, group {g} has a negative learning rate {lr!r}"
    return None


def _schedulers(state: TrainingState, trainer: Trainer) -> str | None:
    live = list(trainer.lr_scheduler_configs)
    if not isinstance(state.schedulers, list) or len(state.schedulers) != len(live):
        return f"it holds another number of LR scheduler states than the Trainer's {len(live)}"
    for i, saved in enumerate(state.schedulers):
        if not isinstance(saved, dict):
            return f"LR scheduler {i}'s state is not a dict"
        # no NaN anywhere (``ReduceLROnPlateau``'s ``best`` starts infinite); learning rates finite, >= 0
        bad = _numbers(saved, f"LR scheduler {i}: ", allow_inf=True)
        if bad is None:
            rates = {k: v for k, v in saved.items() if isinstance(k, str) and "lr" in k}
            bad = _numbers(rates, f"LR scheduler {i}: ")
            negative = [v for _, v in _walk(rates) if isinstance(v, (int, float)) and v < 0]
            if bad is None and negative:
                bad = f"LR scheduler {i} holds a negative learning rate {negative[0]!r}"
        if bad is not None:
            return bad
    return None


def _precision(state: TrainingState) -> str | None:
    if state.precision is None:
        return None
    if not isinstance(state.precision, dict):
        return "its precision plugin state is not a dict"
    scale = state.precision.get("scale")
    if scale is not None and (_bad_number(scale, False) or float(scale) <= 0):
        return f"its GradScaler scale is {scale!r} (must be finite and > 0)"
    return _numbers(state.precision, "precision plugin: ")


def _callbacks(state: TrainingState, siblings: Sequence[Any]) -> str | None:
    if not isinstance(state.callbacks, dict):
        return "its callback states are not a dict"
    for cb in siblings:
        saved = state.callbacks.get(cb.state_key)
        found = cb.state_problem(saved) if saved is not None and hasattr(cb, "state_problem") else None
        if found is not None:
            return f"{cb.state_key}: {found}"
    return None


def valid_lr_scale(value: Any) -> bool:
    """The guard's ``lr_scale``: a finite real number ``> 0``."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf


def _guard(state: TrainingState) -> str | None:
    lr_scale = state.lr_scale
    if not valid_lr_scale(lr_scale):
        return f"the guard's saved lr_scale is {lr_scale!r} (must be finite and > 0)"
    if state.guard is not None:
        return _numbers(state.guard, "the guard's state: ", allow_inf=True)
    return None


def problem(state: TrainingState, trainer: Trainer, siblings: Sequence[Any]) -> str | None:
    """Why ``state`` must not be restored into ``trainer`` (None: it may). Never raises for bad content."""
    try:
        for _ in _walk(
            [state.model, state.optimizers, state.schedulers, state.precision, state.callbacks, state.guard]
        ):
            pass
        checks = (
            lambda: _model(state, trainer.lightning_module.state_dict()),
            lambda: _optimizers(state, trainer),
            lambda: _schedulers(state, trainer),
            lambda: _precision(state),
            lambda: _callbacks(state, siblings),
            lambda: _guard(state),
        )
        for check in checks:
            found = check()
            if found is not None:
                return found
        if not state.finite():
            return "holds non-finite values"
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError, RuntimeError) as err:
        return f"is not a valid training state ({err})"
    return None

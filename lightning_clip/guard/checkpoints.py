r"""Checkpoint files as rollback sources for `ExplosionGuard`: find, read, rewrite.

* `checkpoint_candidates`: the files the Trainer's ``ModelCheckpoint`` callbacks wrote, newest first.
* `read_state`: one file as a `TrainingState`.
* `CheckpointFiles`: the newest readable, finite file newer than a given step; files found
  unreadable or non-finite are remembered (by path and modification time) and not read again.
* `write_state`: put the live (restored) state into a checkpoint dict about to be written.

Files are read with ``torch.load(weights_only=True)`` (torch's default): everything Lightning itself writes
into a checkpoint (loops, callbacks' states, schedulers, the GradScaler, lightning-clip's own state) loads
so. A file that needs more (typically hyper-parameters holding a ``pathlib.Path``, an ``Enum``, an
``argparse.Namespace`` or a module) gives a warning naming the types and is skipped as a rollback source,
unless the guard was told to trust the files (``ExplosionGuard(trust_checkpoints=True)``), or the types were
allowed with ``torch.serialization.add_safe_globals``.

Under ``ModelParallelStrategy`` (FSDP2) a checkpoint is a directory (a ``torch.distributed.checkpoint`` with
Lightning's ``meta.pt``): each rank reads its own shards into fresh ``DTensor``\ s (the live state is not
touched until the state is found finite on every rank); reading is collective, so every rank reads the
same candidates in the same order and agrees on each outcome.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_clip import _compat
from lightning_clip.exceptions import LightningClipWarning
from lightning_clip.guard.snapshot import TrainingState, copy_to_cpu, materialize

if TYPE_CHECKING:
    from lightning_clip._compat import Trainer

__all__ = ["CheckpointFiles", "UnsafeCheckpointError", "checkpoint_candidates", "read_state", "write_state"]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs types outside torch's ``weights_only`` allowlist to load."""


Agree = Callable[[list[int]], list[int]]
"""Sums integer flags over the ranks (identity on one process)."""


def checkpoint_candidates(trainer: Trainer) -> list[str]:
    """Checkpoint files of the Trainer's ``ModelCheckpoint`` callbacks, newest (by mtime) first."""
    paths: set[str] = set()
    for cb in trainer.checkpoint_callbacks:
        for attr in ("best_model_path", "last_model_path"):
            p = getattr(cb, attr, "")
            if p:
                paths.add(os.fspath(p))
        paths.update(os.fspath(p) for p in getattr(cb, "best_k_models", {}))
        dirpath = getattr(cb, "dirpath", None)
        if dirpath and os.path.isdir(dirpath):
            extension = getattr(cb, "FILE_EXTENSION", ".ckpt")
            paths.update(os.path.join(dirpath, f) for f in os.listdir(dirpath) if f.endswith(extension))
    found = (p for p in paths if os.path.isfile(p) or _compat.dcp_is_checkpoint_dir(p))
    return sorted(found, key=lambda p: (_mtime(p), p), reverse=True)


def _mtime(path: str) -> int:
    """Modification time of a file, or of a distributed checkpoint's ``meta.pt`` (written last, by rank 0)."""
    if os.path.isdir(path):
        path = os.path.join(path, _compat.dcp_metadata_filename())
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def _load(load: Callable[[], Any], path: str, trust: bool) -> Any:
    """Run ``load`` (a ``weights_only`` read unless ``trust``), turning torch's refusal into
    :class:`UnsafeCheckpointError` naming the types the file needs."""
    try:
        return load()
    except Exception as err:  # torch: UnpicklingError; torch.distributed.checkpoint wraps it per rank
        if trust or not any(marker in str(err) for marker in _REFUSALS):
            raise
        names = _compat.unsafe_globals(path) if os.path.isfile(path) else []
        if not names and not any(marker in str(err) for marker in _UNSAFE):
            raise  # the unpickler refused bytes, not a type: a damaged file (e.g. "Unsupported operand")
        listed = ", ".join(names) if names else "see the error below"
        raise UnsafeCheckpointError(
            f"it needs types outside torch's `weights_only` allowlist to load ({listed}); such types usually sit"
            " in the saved hyper-parameters. If you trust the file, pass `ExplosionGuard(trust_checkpoints=True)`,"
            " or allow exactly those types with `torch.serialization.add_safe_globals([...])`."
            f" torch said: {_first_line(err)}"
        ) from err


_REFUSALS = ("Weights only load failed", "weights_only reading refused")
"""How torch's ``weights_only`` unpickler, and the DCP metadata reader in ``_compat``, say no (an unreadable
file, e.g. truncated, fails with other messages)."""


_UNSAFE = ("GLOBAL", "unrecognized function", "weights_only reading refused")
"""What a refusal for a type says (torch: an unsupported global, a reduce call of a function outside the
allowlist; the DCP metadata reader in ``_compat``); other refusals are damaged bytes."""


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if any(m in line for m in _REFUSALS)), lines[0] if lines else "")


def read_state(
    trainer: Trainer, path: str, own_state_key: str | None = None, trust: bool = False
) -> TrainingState:
    """Read a checkpoint file (or distributed checkpoint directory) into a :class:`TrainingState` (raises if
    unreadable, unsafe or incomplete).

    Args:
        own_state_key: the guard's ``state_key``; its saved ``lr_scale`` tells how far the file's learning
            rates were already lowered.
        trust: read with ``weights_only=False`` (any pickled object; only for files you trust).
    """
    if _compat.dcp_is_checkpoint_dir(path):
        return _read_distributed(trainer, path, own_state_key, trust)
    if any(_compat.is_dtensor(p) for p in trainer.lightning_module.parameters()):
        raise ValueError(
            "a single-file checkpoint of a sharded model (`ModelParallelStrategy(save_distributed_checkpoint="
            "False)`) is not used as a rollback source: the strategy would load it straight into the live model."
            " Keep the default `save_distributed_checkpoint=True` (a directory per checkpoint)"
        )
    ckpt = _load(lambda: trainer.strategy.load_checkpoint(path, weights_only=not trust), path, trust)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "optimizer_states" not in ckpt:
        raise ValueError(f"{path} holds no full training state (saved with `save_weights_only=True`?)")
    return _state(trainer, ckpt, ckpt["state_dict"], list(ckpt["optimizer_states"]), path, own_state_key)


def _state(
    trainer: Trainer,
    meta: dict[str, Any],
    model: dict[str, Any],
    optimizers: list[Any],
    path: str,
    own_state_key: str | None,
) -> TrainingState:
    callbacks = dict(meta.get("callbacks", {}))
    own = callbacks.get(own_state_key, {}) if own_state_key is not None else {}
    return TrainingState(
        step=int(meta.get("global_step", -1)),
        source="checkpoint",
        model=model,
        optimizers=optimizers,
        schedulers=list(meta.get("lr_schedulers", [])),
        precision=meta.get(_compat.precision_checkpoint_key(trainer)),
        callbacks=callbacks,
        lr_scale=float(own.get("lr_scale", 1.0)) if isinstance(own, dict) else 1.0,
        path=os.fspath(path),
        guard=own if isinstance(own, dict) and own else None,
    )


def _read_distributed(trainer: Trainer, path: str, own_state_key: str | None, trust: bool) -> TrainingState:
    """A ``ModelParallelStrategy`` checkpoint directory: Lightning's ``meta.pt`` with ``weights_only``, then
    this rank's shards into fresh ``DTensor`` templates (collective). The live state is left untouched."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    meta_path = os.path.join(path, _compat.dcp_metadata_filename())
    meta = _load(lambda: torch.load(meta_path, map_location="cpu", weights_only=not trust), meta_path, trust)
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} holds no checkpoint metadata")
    module = trainer.lightning_module
    device = trainer.strategy.root_device
    model = {k: v.detach().clone() for k, v in module.state_dict().items()}  # fresh DTensors, same layout
    _load(lambda: _compat.dcp_load({"state_dict": model}, path, weights_only=not trust), path, trust)
    optimizers = []
    for i, opt in enumerate(trainer.optimizers):
        # the layout Lightning saved (parameter names as keys), as fresh DTensors
        template = materialize(copy_to_cpu(get_optimizer_state_dict(module, opt)), device)

        def load_optimizer(template: dict[str, Any] = template, key: str = f"optimizer_{i}") -> None:
            _compat.dcp_load({key: template}, path, weights_only=not trust)

        _load(load_optimizer, path, trust)
        optimizers.append(_by_index(template))
    return _state(trainer, meta, copy_to_cpu(model), copy_to_cpu(optimizers), path, own_state_key)


def _by_index(named: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (``torch.distributed.checkpoint.state_dict``'s layout) in
    ``Optimizer.state_dict()``'s layout: parameters numbered in param-group order."""
    index: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**group, "params": ids})
    state = {index[name]: value for name, value in named["state"].items()}
    return {"state": state, "param_groups": groups}


class CheckpointFiles:
    """The Trainer's checkpoint files as rollback sources, with a memory of the bad ones."""

    def __init__(self, trust: bool = False) -> None:
        self.trust = trust
        self._bad: set[tuple[str, int]] = set()

    def reset(self) -> None:
        """Forget the files found bad (a new fit)."""
        self._bad = set()

    def newest_good(
        self, trainer: Trainer, newer_than: int, own_state_key: str, agree: Agree | None = None
    ) -> TrainingState | None:
        """The newest readable, finite state saved after step ``newer_than`` and at or before the current
        ``global_step`` (a file from another run into the same folder is passed over), or None.

        A file that cannot be read, is unsafe to read (see the module docstring), is incomplete or holds
        non-finite values gives a warning (once) and the next older file is tried. ``agree`` sums flags over
        the ranks: a file is taken only when every rank read it and found it finite, so the ranks always
        pick the same state (shards are checked where they are).
        A file written while the guard did not judge training healthy (its saved state says ``healthy:
        False``: during a runaway) is passed over, silently.
        """
        agree = agree or (lambda flags: flags)
        for path in checkpoint_candidates(trainer):
            key = (path, _mtime(path))
            if key[1] < 0 or key in self._bad:
                continue
            state: TrainingState | None = None
            why = ""
            try:
                state = read_state(trainer, path, own_state_key, trust=self.trust)
            except UnsafeCheckpointError as err:
                why = f"is not read: {err}"
            except Exception as err:  # unreadable, truncated, incomplete: fall back to an older state
                why = f"is unreadable ({type(err).__name__}: {err})"
            failed, nonfinite = agree([int(state is None), int(state is not None and not state.finite())])
            if failed:
                self._refuse(key, why or "is unreadable on another rank")
                continue
            assert state is not None
            if state.step > trainer.global_step:
                continue
            if state.step <= newer_than:
                return None
            if state.guard is not None and state.guard.get("healthy", True) is False:
                continue  # written during a runaway: never a known-good state
            if nonfinite:
                self._refuse(key, "holds non-finite values")
                continue
            return state
        return None

    def _refuse(self, key: tuple[str, int], why: str) -> None:
        self._bad.add(key)
        rank_zero_warn(
            f"ExplosionGuard: checkpoint {key[0]!r} {why}; falling back to an older good state.",
            category=LightningClipWarning,
        )


def write_state(checkpoint: dict[str, Any], trainer: Trainer, callbacks: Sequence[Any]) -> None:
    """Overwrite the training state inside ``checkpoint`` (about to be written by the Trainer) with the live
    one: model, and when the checkpoint holds them, optimizers, schedulers, precision plugin and the
    ``state_dict`` of ``callbacks``."""
    checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()
    if "optimizer_states" in checkpoint:
        checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(o) for o in trainer.optimizers]
        checkpoint["lr_schedulers"] = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
        precision = trainer.precision_plugin.state_dict()
        if precision:
            checkpoint[_compat.precision_checkpoint_key(trainer)] = precision
    if "callbacks" in checkpoint:
        for cb in callbacks:
            checkpoint["callbacks"][cb.state_key] = cb.state_dict()

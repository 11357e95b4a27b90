r"""Stage 3 of a rollback: read the chosen file into a `TrainingState`.

Single files are read with ``torch.load(weights_only=True)`` (torch's default) from a file opened as a
regular file of bounded size whose zip records are uncompressed (`files`). Everything Lightning itself
writes into a checkpoint loads so. A file that needs more (typically hyper-parameters holding a
``pathlib.Path``, an ``Enum``, an ``argparse.Namespace``) gives a warning naming the types and is skipped,
unless the guard was told to trust the files (``ExplosionGuard(trust_checkpoints=True)``), or the types were
allowed with ``torch.serialization.add_safe_globals``.

Under ``ModelParallelStrategy`` (FSDP2) a checkpoint is a directory (a ``torch.distributed.checkpoint`` with
Lightning's ``meta.pt``): each rank reads its own shards into fresh ``DTensor``\ s (the live state is not
touched); that read is collective, which `choose` makes safe: every rank reads the directory of the same
step, or none does.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from lightning_clip import _compat
from lightning_clip.guard.rollback import files
from lightning_clip.guard.rollback.sources import Candidate
from lightning_clip.guard.snapshot import TrainingState, copy_to_cpu, materialize

if TYPE_CHECKING:
    from lightning_clip._compat import Trainer

__all__ = ["UnsafeCheckpointError", "finish", "guard_state", "load_guarded", "moved_guard_state", "prepare"]

GUARD_PREFIX = "ExplosionGuard"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs types outside torch's ``weights_only`` allowlist to load."""


_REFUSALS = ("Weights only load failed", "weights_only reading refused")
"""How torch's ``weights_only`` unpickler, and the DCP metadata reader in `files`, say no."""

_UNSAFE = ("GLOBAL", "unrecognized function", "weights_only reading refused")
"""What a refusal for a type says; other refusals are damaged bytes."""


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if any(m in line for m in _REFUSALS)), lines[0] if lines else "")


def _refusal(err: Exception, path: str, trust: bool) -> Exception:
    """torch's refusal of a type as :class:`UnsafeCheckpointError` naming the types; ``err`` otherwise."""
    if trust or not any(marker in str(err) for marker in _REFUSALS):
        return err
    names = _compat.unsafe_globals(path) if os.path.isfile(path) else []
    if not names and not any(marker in str(err) for marker in _UNSAFE):
        return err  # the unpickler refused bytes, not a type: a damaged file
    listed = ", ".join(names) if names else "see the error below"
    return UnsafeCheckpointError(
        f"it needs types outside torch's `weights_only` allowlist to load ({listed}); such types usually sit"
        " in the saved hyper-parameters. If you trust the file, pass `ExplosionGuard(trust_checkpoints=True)`,"
        " or allow exactly those types with `torch.serialization.add_safe_globals([...])`."
        f" torch said: {_first_line(err)}"
    )


def _guarded(load: Callable[[], Any], path: str, trust: bool) -> Any:
    try:
        return load()
    except Exception as err:
        converted = _refusal(err, path, trust)
        if converted is err:
            raise
        raise converted from err


def load_guarded(path: str, limit: int, trust: bool, mmap: bool = False) -> Any:
    """``torch.load`` of a regular file of at most ``limit`` bytes whose records are uncompressed, on the CPU,
    with ``weights_only`` unless ``trust``. ``mmap``: map the tensor data instead of reading it (peeking)."""
    with files.open_regular(path, limit) as f:
        files.check_zip_records(f, path, limit)
        if not mmap:
            return _guarded(lambda: torch.load(f, map_location="cpu", weights_only=not trust), path, trust)
    return _guarded(
        lambda: torch.load(path, map_location="cpu", weights_only=not trust, mmap=True), path, trust
    )


def guard_state(meta: dict[str, Any], state_key: str) -> dict[str, Any]:
    """The guard's own saved state in a checkpoint: under ``state_key``, else under the one other
    ``ExplosionGuard`` key (the guard's arguments changed since; empty when there is none or several)."""
    callbacks = meta.get("callbacks")
    if not isinstance(callbacks, dict):
        return {}
    own = callbacks.get(state_key)
    if own is None:
        others = [k for k in callbacks if isinstance(k, str) and k.startswith(GUARD_PREFIX)]
        own = callbacks[others[0]] if len(others) == 1 else None
    return own if isinstance(own, dict) else {}


def moved_guard_state(checkpoint: dict[str, Any], state_key: str) -> tuple[str | None, dict[str, Any]]:
    """On resume: when ``checkpoint`` holds no state under ``state_key`` but one under another
    ``ExplosionGuard`` key (the guard's arguments changed since), that key and its state; else None, {}."""
    callbacks = checkpoint.get("callbacks")
    if not isinstance(callbacks, dict) or state_key in callbacks:
        return None, {}
    own = guard_state(checkpoint, state_key)
    old = next((k for k in callbacks if callbacks[k] is own), None) if own else None
    return old, own


def prepare(trainer: Trainer, candidate: Candidate, limit: int, trust: bool = False) -> dict[str, Any]:
    """The part of a read each rank does alone: a single file in full, or a directory's ``meta.pt``
    (raises if unreadable, unsafe or incomplete)."""
    if candidate.directory:
        meta = load_guarded(os.path.join(candidate.path, _compat.dcp_metadata_filename()), limit, trust)
    else:
        meta = load_guarded(candidate.path, limit, trust)
        if isinstance(meta, dict) and ("state_dict" not in meta or "optimizer_states" not in meta):
            raise ValueError(f"{candidate.path} holds no full training state")
    if not isinstance(meta, dict):
        raise ValueError(f"{candidate.path} holds no checkpoint")
    return meta


def finish(
    trainer: Trainer,
    candidate: Candidate,
    prepared: dict[str, Any],
    state_key: str,
    limit: int,
    trust: bool = False,
) -> TrainingState:
    """The `TrainingState` of a prepared candidate; for a directory this reads the shards (collective: every
    rank calls it for the same step, or none does)."""
    if candidate.directory:
        return _read_distributed(trainer, candidate.path, prepared, state_key, limit, trust)
    optimizers = prepared["optimizer_states"]
    optimizers = list(optimizers) if isinstance(optimizers, (list, tuple)) else optimizers
    return _state(trainer, prepared, prepared["state_dict"], optimizers, candidate.path, state_key)


def _state(
    trainer: Trainer,
    meta: dict[str, Any],
    model: Any,
    optimizers: list[Any],
    path: str,
    state_key: str,
) -> TrainingState:
    callbacks = meta.get("callbacks", {})
    own = guard_state(meta, state_key)
    schedulers = meta.get("lr_schedulers", [])
    return TrainingState(
        step=int(meta.get("global_step", -1)),
        source="checkpoint",
        model=model,
        optimizers=optimizers,
        schedulers=list(schedulers) if isinstance(schedulers, (list, tuple)) else schedulers,
        precision=meta.get(_compat.precision_checkpoint_key(trainer)),
        callbacks=dict(callbacks) if isinstance(callbacks, dict) else {},
        lr_scale=own.get("lr_scale", 1.0),  # checked by `validate` before anything uses it
        path=os.fspath(path),
        guard=own or None,
    )


def _read_distributed(
    trainer: Trainer, path: str, meta: dict[str, Any], state_key: str, limit: int, trust: bool
) -> TrainingState:
    """A ``ModelParallelStrategy`` checkpoint directory: this rank's shards into fresh ``DTensor`` templates
    (collective), the metadata through the exact allowlist of `files`. The live state is left untouched."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    module = trainer.lightning_module
    device = trainer.strategy.root_device

    def read_metadata(_: str) -> Any:
        return files.read_dcp_metadata(path, limit)

    def load(state: dict[str, Any]) -> None:
        _guarded(
            lambda: _compat.dcp_load(state, path, weights_only=not trust, read_metadata=read_metadata),
            path,
            trust,
        )

    model = {k: v.detach().clone() for k, v in module.state_dict().items()}  # fresh DTensors, same layout
    load({"state_dict": model})
    optimizers = []
    for i, opt in enumerate(trainer.optimizers):
        # the layout Lightning saved (parameter names as keys), as fresh DTensors
        template = materialize(copy_to_cpu(get_optimizer_state_dict(module, opt)), device)
        load({f"optimizer_{i}": template})
        optimizers.append(_by_index(template))
    return _state(trainer, meta, copy_to_cpu(model), copy_to_cpu(optimizers), path, state_key)


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

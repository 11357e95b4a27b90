r"""Stage 1 of a rollback: list this rank's candidate files, each with the step it holds.

The candidates are the files (and, for a sharded model, the distributed checkpoint directories) in the
folder of every ``ModelCheckpoint`` of the Trainer. Each is *peeked* once per version (path, inode, size,
mtime): its metadata read without its tensor data (a ``torch.save`` file memory-mapped, a distributed
checkpoint's ``meta.pt`` and ``.metadata``), which gives

* the ``global_step`` it holds (candidates are ordered by it, never by modification time);
* the run identity the guard wrote into it (`RunIdentity`): only this run's own files are candidates.

A file refused here (not a regular file, too large, compressed, unsafe to unpickle, unreadable, another
run's) is remembered and never read again; a warning names it once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_clip import _compat
from lightning_clip.exceptions import LightningClipWarning
from lightning_clip.guard.rollback import files
from lightning_clip.guard.snapshot import nbytes

if TYPE_CHECKING:
    from lightning_clip._compat import Trainer

__all__ = [
    "RUN_KEY",
    "Candidate",
    "Peeked",
    "RunIdentity",
    "check_folders",
    "is_remote",
    "list_candidates",
    "read_budget",
]

log = logging.getLogger(__name__)

RUN_KEY = "lightning_clip_run"
"""The key `ExplosionGuard` adds to every checkpoint it sees written: ``{"run_id", "fit_id", "step"}``."""


def check_folders(trainer: Trainer, snapshot_every_n_steps: int) -> None:
    """At setup: remote ``ModelCheckpoint`` folders are no rollback sources. Without a snapshot and without a
    local folder there is no rollback source at all (``ValueError``); with a snapshot, a warning."""
    callbacks: list[Any] = list(trainer.checkpoint_callbacks)
    folders = [os.fspath(getattr(cb, "dirpath", None) or trainer.default_root_dir) for cb in callbacks]
    remote = [f for f in folders if is_remote(f)]
    if snapshot_every_n_steps == 0 and len(remote) == len(folders):
        raise ValueError(
            "ExplosionGuard(snapshot_every_n_steps=0) rolls back to checkpoint files only, but the Trainer"
            " has no ModelCheckpoint writing to a local folder"
            + (f" (remote folders are not rollback sources: {', '.join(remote)})" if remote else "")
            + ". Add `ModelCheckpoint(dirpath=<local folder>, every_n_train_steps=...)` to `callbacks`, or"
            " set `snapshot_every_n_steps` > 0 to keep an in-memory snapshot."
        )
    if remote:
        rank_zero_warn(
            f"ExplosionGuard: checkpoint files in remote folders ({', '.join(remote)}) are not rollback"
            " sources; rollbacks use the in-memory snapshot (`snapshot_every_n_steps`) and local folders.",
            category=LightningClipWarning,
        )


def is_remote(path: Any) -> bool:
    """True for a remote URL (``s3://``, ``gs://``, ``hdfs://``, ...): never a rollback source."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return "://" in text and not text.startswith("file://")


@dataclass(frozen=True)
class RunIdentity:
    """Who may be restored: files of run ``run_id`` (kept across resumes) written by this fit
    (``fit_id``), or by an earlier fit of the same run at or before the step this fit started from."""

    run_id: str
    fit_id: str
    start_step: int

    def refusal(self, saved: Any, step: int) -> str | None:
        """Why a file with identity ``saved`` holding ``step`` is not this run's own (None: it is)."""
        if not isinstance(saved, dict) or not isinstance(saved.get("run_id"), str):
            return "was not written by this run (it carries no lightning-clip run identity)"
        if saved["run_id"] != self.run_id:
            return f"was written by another run (run {saved['run_id'][:12]}, this run is {self.run_id[:12]})"
        if saved.get("fit_id") != self.fit_id and step > self.start_step:
            return "silent"  # an abandoned continuation of this run, past the point this fit resumed from
        return None


@dataclass(frozen=True)
class Candidate:
    """One readable file of this run: where, which version, the step it holds, whether it is a directory."""

    path: str
    key: tuple[str, int, int, int]
    step: int
    directory: bool


@dataclass(frozen=True)
class Peeked:
    """What peeking one file version found: a candidate, or why it is not one (``quiet``: no warning)."""

    candidate: Candidate | None
    why: str = ""
    quiet: bool = False


def read_budget(trainer: Trainer) -> int:
    """The most bytes one read may take: 64 MiB plus 4 times this rank's live model and optimizer state."""
    module = trainer.lightning_module  # parameters and buffers, not state_dict(): never a collective
    live = nbytes([*module.parameters(), *module.buffers()])
    live += sum(nbytes(list(opt.state.values())) for opt in trainer.optimizers)
    return 64 * 2**20 + 4 * live


def _folders(trainer: Trainer) -> list[str]:
    out = []
    for cb in trainer.checkpoint_callbacks:
        dirpath = getattr(cb, "dirpath", None)
        if dirpath and not is_remote(dirpath) and os.path.isdir(dirpath):
            out.append(os.fspath(dirpath))
    return list(dict.fromkeys(out))


def list_candidates(
    trainer: Trainer,
    identity: RunIdentity,
    peeked: dict[tuple[str, int, int, int], Peeked],
    trust: bool,
    warn: Any,
    state_key: str,
) -> list[Candidate]:
    """This rank's candidates, highest step first (ties: by path). ``peeked`` caches what each file
    version was found to be (refusals included); ``warn(path, why)`` is called once per refused version."""
    sharded = any(_compat.is_dtensor(p) for p in trainer.lightning_module.parameters())
    budget: int | None = None
    found: list[Candidate] = []
    for folder in _folders(trainer):
        extension = ".ckpt"
        names = sorted(os.listdir(folder), reverse=True)
        for name in names:
            if not name.endswith(extension):
                continue
            path = os.path.join(folder, name)
            key = files.file_key(path)
            if key is None:
                continue
            if key not in peeked:
                if budget is None:
                    budget = read_budget(trainer)
                result = _peek(trainer, path, key, sharded, identity, trust, budget, state_key)
                peeked[key] = result
                if result.candidate is None and not result.quiet:
                    warn(path, result.why)
            candidate = peeked[key].candidate
            if candidate is not None:
                found.append(candidate)
    return sorted(found, key=lambda c: (-c.step, c.path))


def _peek(
    trainer: Trainer,
    path: str,
    key: tuple[str, int, int, int],
    sharded: bool,
    identity: RunIdentity,
    trust: bool,
    budget: int,
    state_key: str,
) -> Peeked:
    from lightning_clip.guard.rollback.read import UnsafeCheckpointError, guard_state, load_guarded

    directory = os.path.isdir(path)
    if directory and not sharded:
        return Peeked(None, quiet=True)  # a distributed checkpoint is read only by a sharded model
    if sharded and not directory:
        return Peeked(
            None,
            "is not read: a single-file checkpoint of a sharded model (`ModelParallelStrategy("
            "save_distributed_checkpoint=False)`) is not used as a rollback source; keep the default"
            " `save_distributed_checkpoint=True` (a directory per checkpoint)",
        )
    try:
        if directory:
            meta_path = os.path.join(path, _compat.dcp_metadata_filename())
            meta = load_guarded(meta_path, budget, trust)
            files.read_dcp_metadata(path, budget)
        else:
            meta = load_guarded(path, budget, trust, mmap=True)
    except UnsafeCheckpointError as err:
        return Peeked(None, f"is not read: {err}")
    except files.RefusedFile as err:
        return Peeked(None, f"is not read: {err}")
    except Exception as err:  # unreadable, truncated, damaged, nested too deep
        return Peeked(None, f"is unreadable ({type(err).__name__}: {err})")
    if not isinstance(meta, dict) or not isinstance(meta.get("global_step"), int):
        return Peeked(None, "is unreadable (it holds no Lightning checkpoint)")
    if not directory and ("state_dict" not in meta or "optimizer_states" not in meta):
        return Peeked(None, "holds no full training state (saved with `save_weights_only=True`?)")
    step = int(meta["global_step"])
    why = identity.refusal(meta.get(RUN_KEY), step)
    healthy = guard_state(meta, state_key).get("healthy", True) is not False
    del meta
    if why is not None:
        return Peeked(None, why, quiet=why == "silent")
    if not healthy:  # written while the guard did not judge training healthy: never a known-good state
        return Peeked(None, quiet=True)
    return Peeked(Candidate(path=path, key=key, step=step, directory=directory))

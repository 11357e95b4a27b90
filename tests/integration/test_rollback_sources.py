"""What a rollback trusts (issue 18), each item through a real fit and real files: only this run's own files,
ordered by the step they hold, validated against the live run before anything is touched, read within a
memory bound, never a FIFO or a compressed bomb; the DCP metadata reader's exact allowlist; the snapshot
cadence aligned to ``global_step`` (resume, then fault: bit-exact to the uninterrupted run); event-log write
failures; a changed ``state_key`` on resume; remote folders."""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from lightning_clip.exceptions import LightningClipWarning
from lightning_clip.guard.rollback import files
from lightning_clip.testing import FaultInjector
from tests.models import Crash, RegressionModel, assert_same, make_trainer, regression_loader
from tests.reliability.scenarios import ResumableLoader, ScenarioModel, make_data

FAULT = 11  # files at steps 2, 4, 6, 8, 10 exist when the fault's batch starts


class AtStep(pl.Callback):
    """Runs ``action(dirpath)`` when the batch of global step ``at`` starts (rank zero)."""

    def __init__(self, at: int, dirpath: Path, action: Callable[[Path], None]) -> None:
        self.at, self.dirpath, self.action = at, dirpath, action

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at and trainer.is_global_zero:
            self.action(self.dirpath)


class WeightsAfter(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step, self.model = step, None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.model = {k: v.clone() for k, v in pl_module.state_dict().items()}


def fit(
    tmp_path: Path,
    action: Callable[[Path], None] | None = None,
    faults: tuple[int, ...] = (FAULT,),
    snapshot_every: int = 0,
    model: pl.LightningModule | None = None,
    **guard_kwargs: Any,
) -> tuple[ExplosionGuard, WeightsAfter, list[str]]:
    """Files ``step=2.ckpt`` ... every 2 steps; ``action`` runs on the folder when the first fault's batch
    starts; returns the guard, the weights right after the first rollback and the lightning-clip warnings."""
    ckpt_dir = tmp_path / "ckpt"
    guard = ExplosionGuard(snapshot_every_n_steps=snapshot_every, **guard_kwargs)
    after = WeightsAfter(faults[0] + 1)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    callbacks: list[Any] = [guard, FaultInjector(target="grad", steps=list(faults)), after, ckpt]
    if action is not None:
        callbacks.insert(0, AtStep(faults[0], ckpt_dir, action))
    torch.manual_seed(0)
    trainer = make_trainer(
        tmp_path, callbacks=callbacks, max_steps=max(faults) + 2, enable_checkpointing=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model or RegressionModel(optimizer="adam", scheduler=True), regression_loader())
    lc = [str(w.message) for w in caught if issubclass(w.category, LightningClipWarning)]
    return guard, after, lc


def restored(guard: ExplosionGuard) -> list[tuple[str, int, str]]:
    return [
        (r["restored"]["source"], r["restored"]["step"], os.path.basename(r["restored"]["path"] or ""))
        for r in guard.records
    ]


def edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)


def assert_restored_from(after: WeightsAfter, path: Path) -> None:
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert_same(after.model, saved)


# ------------------------------------------------------------------------------------- code execution
def payload(marker: Path) -> bytes:
    """A protocol-4 pickle asking for ``os.system`` through the DCP metadata module (which imports
    ``os``) with a dotted name, and calling it to create ``marker``."""

    def text(s: str) -> bytes:
        b = s.encode()
        return b"\x8c" + struct.pack("<B", len(b)) + b

    command = f"touch {marker}"
    return (
        b"\x80\x04"
        + text("torch.distributed.checkpoint.metadata")
        + text("os.system")
        + b"\x93"  # STACK_GLOBAL
        + text(command)
        + b"\x85R."  # TUPLE1, REDUCE, STOP
    )


def test_the_payload_is_live_and_the_metadata_reader_refuses_it(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    pickle.loads(payload(marker))  # what torch's own reader (plain pickle) would do: it runs
    assert marker.exists()
    marker.unlink()
    directory = tmp_path / "evil.ckpt"
    directory.mkdir()
    (directory / ".metadata").write_bytes(payload(marker))
    with pytest.raises(pickle.UnpicklingError, match="exact allowlist"):
        files.read_dcp_metadata(str(directory), limit=2**20)
    assert not marker.exists()
    # every pair of the allowlist is a single attribute of its module; dotted names never resolve
    for _module, name in files.DCP_METADATA_GLOBALS:
        assert "." not in name


def test_a_distributed_checkpoint_directory_is_never_read_by_an_unsharded_fit(tmp_path: Path) -> None:
    marker = tmp_path / "marker"

    def plant(folder: Path) -> None:
        evil = folder / "step=10x.ckpt"  # sorts above every file
        evil.mkdir()
        torch.save({"global_step": 10, "state_dict": {}}, evil / "meta.pt")
        (evil / ".metadata").write_bytes(payload(marker))

    guard, _after, lc = fit(tmp_path, plant)
    assert restored(guard) == [("checkpoint", 10, "step=10.ckpt")]
    assert not marker.exists() and lc == []


def test_dcp_shard_paths_must_stay_inside_the_directory(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    for rel in ("/etc/passwd", "../outside.distcp", "sub/dir.distcp", "/dev/zero"):
        meta = Metadata(state_dict_metadata={}, storage_data={MetadataIndex("w"): _StorageInfo(rel, 0, 1)})
        with pytest.raises(files.RefusedFile, match="outside the directory"):
            files.check_storage_paths(meta, str(tmp_path))


def test_a_fifo_never_hangs_the_rollback(tmp_path: Path) -> None:
    directory = tmp_path / "dcp.ckpt"
    directory.mkdir()
    os.mkfifo(directory / ".metadata")
    with pytest.raises(files.RefusedFile, match="not a regular file"):
        files.read_dcp_metadata(str(directory), limit=2**20)
    # and as a candidate file in a real fit
    guard, _after, lc = fit(tmp_path / "fit", lambda folder: os.mkfifo(folder / "step=12.ckpt"))
    assert restored(guard) == [("checkpoint", 10, "step=10.ckpt")]
    assert len(lc) == 1 and "step=12.ckpt' is not read" in lc[0] and "not a regular file" in lc[0]


# ------------------------------------------------------------------------------------- whose files
def test_another_runs_file_is_never_restored(tmp_path: Path) -> None:
    other = tmp_path / "other"
    torch.manual_seed(1)
    trainer = make_trainer(
        other,
        callbacks=[
            ExplosionGuard(),
            ModelCheckpoint(dirpath=other, filename="{step}", every_n_train_steps=12),
        ],
        max_steps=12,
        enable_checkpointing=True,
    )
    trainer.fit(RegressionModel(optimizer="adam", scheduler=True), regression_loader(seed=1))
    foreign = other / "step=12.ckpt"
    no_identity = tmp_path / "plain.pt"
    ckpt = torch.load(foreign, weights_only=True)
    del ckpt["lightning_clip_run"]
    torch.save(ckpt, no_identity)

    def plant(folder: Path) -> None:
        (folder / "step=10.ckpt").write_bytes(foreign.read_bytes())  # same shapes, another run, same name
        (folder / "step=11.ckpt").write_bytes(no_identity.read_bytes())  # written by another program

    guard, after, lc = fit(tmp_path, plant)
    assert restored(guard) == [("checkpoint", 8, "step=8.ckpt")]
    assert_restored_from(after, tmp_path / "ckpt" / "step=8.ckpt")
    assert any("step=10.ckpt' was written by another run" in w for w in lc)
    assert any("step=11.ckpt' was not written by this run" in w for w in lc)


def widen(ckpt: dict[str, Any]) -> None:
    """The file now holds a wider first layer (a copy of a wider model's file)."""
    sd = ckpt["state_dict"]
    sd["net.0.weight"] = torch.zeros(32, 8)
    sd["net.0.bias"] = torch.zeros(32)
    sd["net.2.weight"] = torch.zeros(1, 32)


def nan_lr(ckpt: dict[str, Any]) -> None:
    ckpt["optimizer_states"][0]["param_groups"][0]["lr"] = float("nan")


def zero_lr_scale(ckpt: dict[str, Any]) -> None:
    key = next(k for k in ckpt["callbacks"] if k.startswith("ExplosionGuard"))
    ckpt["callbacks"][key]["lr_scale"] = 0.0


def nan_scheduler(ckpt: dict[str, Any]) -> None:
    ckpt["lr_schedulers"][0]["base_lrs"] = [float("inf")]


def nan_scale_state(ckpt: dict[str, Any]) -> None:
    key = next(k for k in ckpt["callbacks"] if k.startswith("ExplosionGuard"))
    ckpt["callbacks"][key]["divergence"]["loss"]["ema"] = float("nan")


def deep(ckpt: dict[str, Any]) -> None:
    key = next(k for k in ckpt["callbacks"] if k.startswith("ExplosionGuard"))
    nested: list[Any] = []
    for _ in range(20000):
        nested = [nested]
    ckpt["callbacks"][key]["divergence"] = {"history": nested}


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (widen, "'net.0.weight' has shape [32, 8], the live model's [16, 8]"),
        (nan_lr, "group 0.lr is nan"),
        (zero_lr_scale, "lr_scale is 0.0 (must be finite and > 0)"),
        (nan_scheduler, "LR scheduler 0: .base_lrs.0 is inf"),
        (nan_scale_state, "the guard's state: .divergence.loss.ema is nan"),
        (deep, "nested deeper than 64 levels"),
    ],
)
def test_an_invalid_own_file_is_a_warning_and_the_next_older_state(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], why: str
) -> None:
    """The run's own newest file, changed: nothing is touched, a warning names the problem, the next older
    file is restored bit-exactly, and the run goes on finite."""
    if change is deep:
        import sys

        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 50000))  # torch.save recurses while writing the test file
        try:
            guard, after, lc = fit(tmp_path, lambda folder: edit(folder / "step=10.ckpt", change))
        finally:
            sys.setrecursionlimit(limit)
    else:
        guard, after, lc = fit(tmp_path, lambda folder: edit(folder / "step=10.ckpt", change))
    assert restored(guard) == [("checkpoint", 8, "step=8.ckpt")]
    assert_restored_from(after, tmp_path / "ckpt" / "step=8.ckpt")
    assert len(lc) == 1 and "step=10.ckpt' is not restored" in lc[0] and why in lc[0], lc
    assert guard.lr_scale == 1.0


# ------------------------------------------------------------------------------------- which is newest
@pytest.mark.parametrize("how", ["touched", "equal"])
def test_candidates_are_ordered_by_the_step_they_hold(tmp_path: Path, how: str) -> None:
    """A touched (or copied) old file, or equal modification times, never sends the rollback to an older
    step than the newest one (by mtime or by name this was step 2, or step 8 before step 10)."""

    def touch(folder: Path) -> None:
        names = [folder / f"step={s}.ckpt" for s in (2, 4, 6, 8, 10)]
        if how == "touched":
            future = names[-1].stat().st_mtime + 1000
            os.utime(names[0], (future, future))
        else:
            for n in names:
                os.utime(n, (1_000_000_000, 1_000_000_000))

    guard, after, lc = fit(tmp_path, touch)
    assert restored(guard) == [("checkpoint", 10, "step=10.ckpt")] and lc == []
    assert_restored_from(after, tmp_path / "ckpt" / "step=10.ckpt")


# ------------------------------------------------------------------------------------- memory bound
def bomb(folder: Path) -> None:
    """A torch.save file rewritten with deflated records, plus a 256 MiB record of zeros (about 256 KiB)."""
    source = folder / "step=10.ckpt"
    with zipfile.ZipFile(source) as z:
        records = [(i.filename, z.read(i)) for i in z.infolist()]
    target = folder / "step=10-bomb.ckpt"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in records:
            z.writestr(name, data)
        z.writestr(records[0][0].split("/")[0] + "/data/999", bytes(256 * 2**20))
    source.unlink()


def test_a_compressed_file_is_refused_once_and_remembered(tmp_path: Path) -> None:
    guard, _after, lc = fit(tmp_path, bomb, faults=(FAULT, FAULT + 2))
    assert restored(guard) == [("checkpoint", 8, "step=8.ckpt"), ("checkpoint", 12, "step=12.ckpt")]
    assert len(lc) == 1 and "compressed records" in lc[0]  # refused once, not read at the second rollback
    assert os.path.getsize(tmp_path / "ckpt" / "step=10-bomb.ckpt") < 2**20


def test_a_file_larger_than_the_bound_is_not_opened(tmp_path: Path) -> None:
    def huge(folder: Path) -> None:
        with open(folder / "step=10-huge.ckpt", "wb") as f:
            f.truncate(8 * 2**30)  # sparse: 8 GiB by its size, nothing on disk

    guard, _after, lc = fit(tmp_path, huge)
    assert restored(guard) == [("checkpoint", 10, "step=10.ckpt")]
    assert len(lc) == 1 and "more than this run can hold" in lc[0]


def test_a_file_from_the_future_is_peeked_once(tmp_path: Path) -> None:
    def future(folder: Path) -> None:
        ckpt = torch.load(folder / "step=4.ckpt", weights_only=True)
        ckpt["global_step"] = 100
        torch.save(ckpt, folder / "step=100.ckpt")

    guard, _after, lc = fit(tmp_path, future, faults=(FAULT, FAULT + 2))
    assert [s for _, s, _ in restored(guard)] == [10, 12] and lc == []
    peeked = [p for key, p in guard._known_good.files.peeked.items() if key[0].endswith("step=100.ckpt")]
    assert len(peeked) == 1 and peeked[0].candidate is not None and peeked[0].candidate.step == 100


# ------------------------------------------------------------------------------------- resume cadence


def resumable_fit(
    root: Path, crash_at: int | None = None, ckpt_path: str | None = None
) -> tuple[pl.Trainer, ExplosionGuard]:
    pl.seed_everything(0, verbose=False)
    guard = ExplosionGuard()  # the default cadence: a snapshot at every multiple of 50
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", filename="{step}", every_n_train_steps=20, save_top_k=-1)
    callbacks: list[Any] = [guard, FaultInjector(target="grad", steps=[57]), ckpt]
    if crash_at is not None:
        callbacks.insert(0, Crash(crash_at))
    trainer = make_trainer(root, callbacks=callbacks, max_steps=64, enable_checkpointing=True)
    loader = ResumableLoader(make_data("mlp", n=48), batch_size=4)
    trainer.fit(ScenarioModel("mlp", "adam", lr=0.01, scheduler="step"), loader, ckpt_path=ckpt_path)
    return trainer, guard


def test_resume_then_fault_at_the_default_cadence_is_bit_exact(tmp_path: Path) -> None:
    """Resumed at step 40, the run snapshots step 50 as the uninterrupted run does (not 40 + 50): the
    fault at step 57 restores the same state, and the runs end bit-identical."""
    full, full_guard = resumable_fit(tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        resumable_fit(tmp_path / "run", crash_at=45)
    resumed, resumed_guard = resumable_fit(
        tmp_path / "run", ckpt_path=str(tmp_path / "run" / "ckpt" / "step=40.ckpt")
    )
    assert [(r["step"], r["restored"]["step"]) for r in full_guard.records] == [(57, 50)]
    assert [(r["step"], r["restored"]["step"]) for r in resumed_guard.records] == [(57, 50)]
    assert_same(resumed.lightning_module.state_dict(), full.lightning_module.state_dict(), "model")
    assert_same(resumed.optimizers[0].state_dict(), full.optimizers[0].state_dict(), "optimizer")


# ------------------------------------------------------------------------------------- smaller items
def test_an_event_log_write_failure_is_a_warning(tmp_path: Path) -> None:
    # without a logger the log goes to <root>/lightning_clip_logs/version_<N>/: a file holds that folder's
    # name, so the run's folder cannot be made and every write fails
    (tmp_path / "lightning_clip_logs").write_text("")
    guard = ExplosionGuard(snapshot_every_n_steps=2)
    trainer = make_trainer(tmp_path, callbacks=[guard, FaultInjector(target="grad", steps=[3])], max_steps=6)
    with pytest.warns(LightningClipWarning, match="could not write the event log"):
        trainer.fit(RegressionModel(), regression_loader())
    assert guard.events_path == str(
        tmp_path / "lightning_clip_logs" / "version_0" / "lightning_clip_events.jsonl"
    )
    assert trainer.global_step == 6 and [r["step"] for r in guard.records] == [3]


def test_a_changed_state_key_on_resume_keeps_the_counters(tmp_path: Path) -> None:
    first = ExplosionGuard(snapshot_every_n_steps=2, lr_factor=0.5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=6)
    trainer = make_trainer(
        tmp_path,
        callbacks=[first, FaultInjector(target="grad", steps=[3]), ckpt],
        max_steps=6,
        enable_checkpointing=True,
    )
    trainer.fit(RegressionModel(), regression_loader())
    assert (first.rollbacks, first.lr_scale) == (1, 0.5)
    second = ExplosionGuard(snapshot_every_n_steps=2, lr_factor=0.5, spike_factor=50.0)  # another state_key
    assert second.state_key != first.state_key
    trainer = make_trainer(tmp_path, callbacks=[second], max_steps=8)
    with pytest.warns(LightningClipWarning, match='under "ExplosionGuard.*carried over'):
        trainer.fit(RegressionModel(), regression_loader(), ckpt_path=str(tmp_path / "ckpt" / "step=6.ckpt"))
    assert (second.rollbacks, second.lr_scale, second.run_id) == (1, 0.5, first.run_id)


def test_remote_folders_are_refused_at_setup(tmp_path: Path) -> None:
    remote = ModelCheckpoint(dirpath="memory://bucket/ckpt", every_n_train_steps=2)
    trainer = make_trainer(
        tmp_path, callbacks=[ExplosionGuard(snapshot_every_n_steps=0), remote], enable_checkpointing=True
    )
    with pytest.raises(
        ValueError, match=r"no ModelCheckpoint writing to a local folder \(remote folders are not"
    ):
        trainer.fit(RegressionModel(), regression_loader())
    remote = ModelCheckpoint(dirpath="memory://bucket/ckpt2", every_n_train_steps=2)
    trainer = make_trainer(
        tmp_path, callbacks=[ExplosionGuard(), remote], max_steps=4, enable_checkpointing=True
    )
    with pytest.warns(LightningClipWarning, match=r"memory://bucket/ckpt2\) are not rollback sources"):
        trainer.fit(RegressionModel(), regression_loader())

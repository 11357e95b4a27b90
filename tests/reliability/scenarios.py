"""A seeded generator of training scenarios with injected faults, and the runner that checks each one.

A :class:`Scenario` is drawn from ``random.Random(seed)``: a tiny model (MLP, GRU or small CNN), an
optimizer (SGD with momentum, Adam, AdamW), an optional step-interval LR scheduler, a precision (fp32,
bf16-mixed, or 16-mixed with a real ``GradScaler``), gradient accumulation, one to three faults
(:class:`~lightning_clip.testing.FaultInjector`: loss / grad / weight / input, NaN / ±Inf) placed at step 0,
during the clipping warm-up, on consecutive steps, right after a ``ModelCheckpoint`` save or mid-run, an
optional truncation of the newest checkpoint file at a seeded byte offset, and the guard's action and
budget. ``AdaptiveGradientClipping``, ``ExplosionGuard`` and ``VanishingGradientMonitor`` are always attached,
in a seeded order.

:func:`run_scenario` fits it and classifies the end. Accepted ends:

* ``"completed"``: ``fit`` returned after ``max_steps`` with finite weights;
* ``GradientExplosionError`` with the message of a documented reason that the scenario allows:
  ``"budget"`` (``max_rollbacks`` spent), ``"raise"`` (``action="raise"``), ``"unrepairable"``
  (``action="skip"`` facing non-finite weights), ``"no_good_state"`` (``snapshot_every_n_steps=0`` and no
  readable checkpoint file yet).

Anything else fails the test: another exception type, a hang (pytest-timeout), non-finite weights after a
completed fit, a checkpoint file that does not load or holds a non-finite value (every ``.ckpt`` written is
loaded and every floating-point tensor in it scanned), an unexpected lightning-clip warning.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping
from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from lightning_clip.callbacks.vanishing_monitor import VanishingGradientMonitor
from lightning_clip.exceptions import GradientExplosionError, LightningClipWarning, VanishingGradientWarning
from lightning_clip.report import load_events
from lightning_clip.testing import FaultInjector
from tests.models import ExplodingRNN, adding_loader

ARCHS = ("mlp", "gru", "cnn")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = (None, "step", "cosine", "exponential")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
TARGETS = ("loss", "grad", "weight", "input")
VALUES = (float("nan"), float("inf"), float("-inf"))
# a pattern matching the first layer's parameters only, per architecture
FIRST_LAYER = {"mlp": r"^net\.0\.", "gru": r"^rnn\.", "cnn": r"^conv\."}

# GradientExplosionError reasons: the message fragment that identifies each one
REASONS = {
    "budget": "The rollback budget is spent",
    "raise": "`action='raise'` stops training at the first event.",
    "unrepairable": "`action='skip'` cannot repair this",
    "no_good_state": "There is no known-good state to go back to",
}


# ------------------------------------------------------------------------------------------ models, data
class ScenarioModel(pl.LightningModule):
    """A tiny regressor: ``mlp`` (8 → 16 → 1), ``gru`` (6 steps × 4 features, 8 hidden) or ``cnn``
    (1 × 6 × 6 image, 4 channels)."""

    def __init__(
        self, arch: str = "mlp", optimizer: str = "adam", lr: float = 0.01, scheduler: str | None = None
    ) -> None:
        super().__init__()
        self.arch, self.optimizer_name, self.lr, self.scheduler_name = arch, optimizer, lr, scheduler
        if arch == "mlp":
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        elif arch == "gru":
            self.rnn = nn.GRU(4, 8, batch_first=True)
            self.head = nn.Linear(8, 1)
        elif arch == "cnn":
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.head = nn.Linear(4 * 2 * 2, 1)
        else:
            raise ValueError(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch == "mlp":
            return self.net(x)
        if self.arch == "gru":
            out, _ = self.rnn(x)
            return self.head(out[:, -1])
        h = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2)
        return self.head(h.flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x).float(), y)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        elif self.optimizer_name == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        if self.scheduler_name is None:
            return opt
        sched: torch.optim.lr_scheduler.LRScheduler
        if self.scheduler_name == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        elif self.scheduler_name == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        else:
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ShardedScenarioModel(ScenarioModel):
    """:class:`ScenarioModel` sharded with FSDP2: every Linear / Conv2d, then the whole module."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in list(self.modules()):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)


def make_data(arch: str, n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (8,), "gru": (6, 4), "cnn": (1, 6, 6)}[arch]
    x = torch.randn(n, *shape, generator=g)
    y = x.flatten(1).sum(1, keepdim=True).tanh() + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class ResumableLoader:
    """A batch iterable whose position is saved in checkpoints (Lightning calls ``state_dict`` /
    ``load_state_dict`` on stateful train loaders), so a run resumed mid-epoch sees the same batches as an
    uninterrupted one. The order is a fixed permutation per epoch (seeded by the epoch number).

    The state is the number of batches drawn in the current epoch: Lightning asks for it when it saves a
    checkpoint after a batch, and (for a sized loader) has not drawn the next batch yet. After the epoch's
    last batch the state points at the start of the next epoch.
    """

    def __init__(self, dataset: TensorDataset, batch_size: int = 8, seed: int = 0) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch = 0  # the epoch the next ``iter()`` starts (Lightning calls it once per epoch)
        self._current = 0
        self._served = 0
        self._start = 0

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # Lightning stops after ``len(self)`` batches without exhausting the iterator: count epochs here
        self._current, self.epoch = self.epoch, self.epoch + 1
        start, self._start = self._start, 0
        self._served = start
        g = torch.Generator().manual_seed(self.seed + self._current)
        order = torch.randperm(len(self.dataset), generator=g)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            self._served = b + 1
            yield tuple(t[idx].clone() for t in self.dataset.tensors)

    def state_dict(self) -> dict[str, int]:
        if self._served >= len(self):  # saved after the epoch's last batch: resume with the next epoch
            return {"epoch": self._current + 1, "batch": 0}
        return {"epoch": self._current, "batch": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._start = int(state["epoch"]), int(state["batch"])


# ------------------------------------------------------------------------------------------ scenarios
@dataclass(frozen=True)
class Fault:
    target: str
    value: float
    steps: tuple[int, ...]
    param_pattern: str | None
    when: str  # "step0" | "warmup" | "consecutive" | "after_ckpt" | "mid"
    rank: int | None = None


@dataclass(frozen=True)
class Scenario:
    seed: int
    arch: str
    optimizer: str
    lr: float
    scheduler: str | None
    precision: str
    accumulate: int
    max_steps: int
    ckpt_every: int | None
    faults: tuple[Fault, ...]
    action: str
    snapshot_every: int
    max_rollbacks: int
    skip_batches: int
    lr_factor: float
    spike_factor: float | None
    agc: dict[str, Any]
    vgm_every: int
    corrupt_at: int | None  # truncate the newest checkpoint file when this global step's batch starts
    order: tuple[int, ...]  # permutation of the callbacks
    ddp: bool = False
    fsdp: bool = False  # 2 ranks under ModelParallelStrategy + fully_shard (ddp is True too)
    extra: dict[str, Any] = field(default_factory=dict)
    # a hazard in the checkpoint folder when the batch of ``hazard_at`` starts (a NaN follows at that step):
    # "foreign" (another run's file holding the newest step), "touched" (the oldest file's mtime moved to
    # the future), "lagging" (DDP: rank 1 lists its own view of the folder, one file behind)
    hazard: str | None = None
    hazard_at: int | None = None

    def describe(self) -> str:
        faults = ", ".join(f"{f.target}={f.value} at {list(f.steps)} ({f.when})" for f in self.faults)
        return (
            f"seed={self.seed} {self.arch}/{self.optimizer}/{self.scheduler}/{self.precision} acc={self.accumulate}"
            f" steps={self.max_steps} ckpt={self.ckpt_every} action={self.action} snap={self.snapshot_every}"
            f" budget={self.max_rollbacks} skip={self.skip_batches} lr_factor={self.lr_factor}"
            f" spike={self.spike_factor} agc={self.agc} corrupt_at={self.corrupt_at} ddp={self.ddp}"
            f" fsdp={self.fsdp} hazard={self.hazard}@{self.hazard_at}; {faults}"
        )


def generate(seed: int, ddp: bool = False, fsdp: bool = False) -> Scenario:
    """Draw one scenario from ``random.Random(seed)`` (``ddp``: a 2-rank scenario with rank-local faults;
    ``fsdp``: the same under FSDP2, ``ModelParallelStrategy`` + ``fully_shard``: MLP or CNN, fp32 or
    bf16-mixed, and a truncated checkpoint is one rank's shard file of a distributed checkpoint)."""
    ddp = ddp or fsdp
    rng = random.Random(seed)
    arch = rng.choice(ARCHS)
    if fsdp and arch == "gru":
        arch = "mlp"  # nn.GRU's flattened weights do not go through fully_shard
    optimizer = rng.choice(OPTIMIZERS)
    lr = {"sgd": 0.02, "adam": 0.01, "adamw": 0.01}[optimizer]
    precision = rng.choice(PRECISIONS)
    if fsdp and precision == "16-mixed":
        precision = "bf16-mixed"  # a GradScaler for sharded gradients is out of scope
    accumulate = rng.choice((1, 1, 2, 3))
    max_steps = rng.randint(8, 12) if ddp else rng.randint(10, 16)
    ckpt_every = rng.choice((None, 2, 3, 4, 5))
    action = rng.choice(("rollback", "rollback", "rollback", "skip", "raise"))
    snapshot_every = rng.choice((0, 1, 2, 3, 5, 50)) if ckpt_every else rng.choice((1, 2, 3, 5, 50))
    mode = rng.choice(("mean", "zscore", "percentile"))
    agc: dict[str, Any] = {"mode": mode, "warmup_steps": rng.randint(2, 5)}
    if rng.random() < 0.3:
        agc["max_norm"] = rng.choice((0.5, 1.0, 5.0))

    def step_for(when: str) -> list[int]:
        if when == "step0":
            return [0]
        if when == "warmup":
            return [rng.randint(1, agc["warmup_steps"])]
        if when == "consecutive":
            k = rng.randint(1, max_steps - 3)
            return list(range(k, k + rng.choice((2, 3))))
        if when == "after_ckpt" and ckpt_every:
            return [ckpt_every * rng.randint(1, max(1, (max_steps - 1) // ckpt_every))]
        return [rng.randint(1, max_steps - 1)]

    faults = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        target = rng.choice(TARGETS)
        when = rng.choice(("step0", "warmup", "consecutive", "after_ckpt", "mid"))
        pattern = FIRST_LAYER[arch] if target in ("grad", "weight") and rng.random() < 0.3 else None
        faults.append(
            Fault(
                target=target,
                value=rng.choice(VALUES),
                steps=tuple(step_for(when)),
                param_pattern=pattern,
                when=when if (when != "after_ckpt" or ckpt_every) else "mid",
                rank=rng.choice((0, 1)) if ddp else None,
            )
        )
    corrupt_at = None
    if ckpt_every and ckpt_every + 1 <= max_steps - 1 and rng.random() < 0.35:
        # the newest file is cut right before a gradient fault, with no snapshot newer than that file:
        # a rollback must read the files, find the newest unreadable and fall back to an older state
        corrupt_at = rng.randint(ckpt_every + 1, max_steps - 1)
        snapshot_every = rng.choice((0, 50))
        faults.append(
            Fault(
                "loss" if ddp and precision == "16-mixed" else "grad",
                float("nan"),
                (corrupt_at,),
                None,
                "after_corruption",
                rng.choice((0, 1)) if ddp else None,
            )
        )
    # drawn apart (its own generator), so the scenarios of earlier campaigns stay as they were
    hz = random.Random(10_007 * seed + 17)
    hazard = hazard_at = None
    if (
        ckpt_every
        and corrupt_at is None
        and not fsdp
        and ckpt_every + 1 <= max_steps - 1
        and hz.random() < 0.4
    ):
        hazard = "lagging" if ddp else hz.choice(("foreign", "touched"))
        hazard_at = hz.randint(ckpt_every + 1, max_steps - 1)
    return Scenario(
        hazard=hazard,
        hazard_at=hazard_at,
        seed=seed,
        arch=arch,
        optimizer=optimizer,
        lr=lr,
        scheduler=rng.choice(SCHEDULERS),
        precision=precision,
        accumulate=accumulate,
        max_steps=max_steps,
        ckpt_every=ckpt_every,
        faults=tuple(faults),
        action=action,
        snapshot_every=snapshot_every,
        max_rollbacks=rng.choice((0, 1, 2, 3, 5)),
        skip_batches=rng.choice((0, 0, 1, 2)),
        lr_factor=rng.choice((1.0, 0.5)),
        spike_factor=rng.choice((None, None, 10.0)),
        agc=agc,
        vgm_every=rng.randint(1, 5),
        corrupt_at=corrupt_at,
        order=tuple(rng.sample(range(3 + len(faults)), 3 + len(faults))),
        ddp=ddp,
        fsdp=fsdp,
    )


# ------------------------------------------------------------------------------------------ helpers
def float_tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every floating-point tensor inside nested dicts / lists / tuples, with its path."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, o = stack.pop()
        if isinstance(o, torch.Tensor):
            if o.is_floating_point():
                yield path, o
        elif isinstance(o, dict):
            stack.extend((f"{path}.{k}", v) for k, v in o.items())
        elif isinstance(o, (list, tuple)):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(o))


def _model_checkpoint_bound(name: str) -> bool:
    """``ModelCheckpoint``'s own ``kth_value`` is ±inf by design until a monitored score exists."""
    return name.startswith((".callbacks.ModelCheckpoint", ".callbacks.LaggingView")) and name.endswith(
        ".kth_value"
    )


def _load_any(path: Path) -> Any:
    """A checkpoint file, or a distributed checkpoint directory (FSDP2) converted to one in memory."""
    if not path.is_dir():
        return torch.load(path, weights_only=True, map_location="cpu")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    converted = path.parent / f".{path.name}.scan.pt"
    dcp_to_torch_save(path, converted)  # one process, no process group: every rank's shards assembled
    try:
        ckpt = torch.load(converted, weights_only=False, map_location="cpu")  # our own conversion
    finally:
        converted.unlink()
    ckpt.update(torch.load(path / "meta.pt", weights_only=True, map_location="cpu"))
    return ckpt


def scan_checkpoints(root: Path, skip: set[str]) -> int:
    """Load every ``.ckpt`` under ``root`` (files, and the directories FSDP2 writes; except the deliberately
    truncated ones) and check that every floating-point tensor in it is finite. Returns how many were scanned."""
    scanned = 0
    for path in sorted(root.rglob("*.ckpt")):
        if str(path) in skip:
            continue
        ckpt = _load_any(path)
        bad = [
            name
            for name, t in float_tensors(ckpt)
            if not bool(torch.isfinite(t).all()) and not _model_checkpoint_bound(name)
        ]
        assert not bad, f"{path} holds non-finite values: {bad[:5]}"
        scanned += 1
    return scanned


class TruncateNewestCheckpoint(pl.Callback):
    """When the batch of global step ``at`` starts, cut the newest checkpoint file at a seeded byte offset."""

    def __init__(self, dirpath: Path, at: int, seed: int) -> None:
        self.dirpath, self.at, self.rng = dirpath, at, random.Random(seed)
        self.truncated: dict[str, int] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self.at or self.truncated or not self.dirpath.is_dir():
            return
        files = sorted(self.dirpath.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
        if not files or trainer.global_rank != 0:
            return
        newest = files[-1]
        if newest.is_dir():  # a distributed checkpoint (FSDP2): cut rank 1's shard file only
            self.truncated[str(newest)] = -1
            newest = newest / "__1_0.distcp"
        data = newest.read_bytes()
        offset = self.rng.randrange(len(data))
        newest.write_bytes(data[:offset])
        self.truncated.setdefault(str(files[-1]), offset)
        (self.dirpath.parent / "truncated.json").write_text(json.dumps(self.truncated))  # DDP: from the child


class FolderHazard(pl.Callback):
    """When the batch of global step ``at`` starts (rank zero), plant a hazard in the checkpoint folder:
    ``"foreign"``: another run's file (the newest own file, perturbed, under another run identity) holding
    the current step; ``"touched"``: the oldest file's modification time set to the future. Records the
    newest own step then (the rollback of that step must not go back further)."""

    def __init__(self, dirpath: Path, at: int, kind: str) -> None:
        self.dirpath, self.at, self.kind = dirpath, at, kind
        self.newest_step = -1
        self.foreign: str | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step != self.at or not trainer.is_global_zero or not self.dirpath.is_dir():
            return
        if self.newest_step >= 0:  # once (with accumulation several batches start at that step)
            return
        own = {p: torch.load(p, weights_only=True, map_location="cpu") for p in self.dirpath.glob("*.ckpt")}
        if not own:
            return
        by_step = sorted(own, key=lambda p: own[p]["global_step"])
        self.newest_step = own[by_step[-1]]["global_step"]
        if self.kind == "foreign":
            ckpt = own[by_step[-1]]
            ckpt["lightning_clip_run"] = {"run_id": "f" * 32, "fit_id": "f" * 32, "step": trainer.global_step}
            ckpt["global_step"] = trainer.global_step
            ckpt["state_dict"] = {
                k: v + 1.0 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()
            }
            self.foreign = str(self.dirpath / f"zz-foreign-step={trainer.global_step}.ckpt")
            torch.save(ckpt, self.foreign)
        else:
            future = max(p.stat().st_mtime for p in own) + 3600
            os.utime(by_step[0], (future, future))


class LaggingView(ModelCheckpoint):
    """DDP: rank 1 lists its own view of the folder (``<root>/view1``), which receives rank 0's files one
    file behind before each batch (``ModelCheckpoint`` broadcasts rank 0's ``dirpath`` at setup; the view is
    set after)."""

    def __init__(self, view: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.view, self.source = view, Path(str(kwargs["dirpath"]))

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.global_rank == 1:
            self.view.mkdir(parents=True, exist_ok=True)
            self.dirpath = str(self.view)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank != 1 or not self.source.is_dir():
            return
        files = sorted(self.source.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
        for f in files[:-1]:
            if not (self.view / f.name).exists():
                shutil.copy2(f, self.view / f.name)


def truncated_files(root: Path) -> set[str]:
    path = root / "truncated.json"
    return set(json.loads(path.read_text())) if path.exists() else set()


class RankReport(pl.Callback):
    """DDP: each rank writes its end (weights, counters, error) to files in ``out`` (the parent's objects
    are not updated under ``ddp_fork``, and a child's exception reaches no callback hook)."""

    def __init__(self, out: Path, guard: ExplosionGuard, injectors: list[FaultInjector]) -> None:
        self.out, self.guard, self.injectors = out, guard, injectors

    def write(self, trainer: pl.Trainer, error: BaseException | None) -> None:
        r = trainer.global_rank
        weights = {k: v.detach().clone() for k, v in trainer.lightning_module.state_dict().items()}
        torch.save(weights, self.out / f"rank{r}.pt")
        report = {
            "rank": r,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "error_type": None if error is None else type(error).__name__,
            "error": None if error is None else str(error),
            "events": self.guard.events,
            "rollbacks": self.guard.rollbacks,
            "skipped_steps": self.guard.skipped_steps,
            "injected": sum(len(i.injected) for i in self.injectors),
            "records": [(rec["step"], rec["kind"], rec["action"]) for rec in self.guard.records],
        }
        (self.out / f"rank{r}.json").write_text(json.dumps(report))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, None)


class ReportingGuard(ExplosionGuard):
    """DDP scenarios: the guard whose every ``GradientExplosionError`` is written to the rank's report
    first. Both ranks must raise at the same step: they meet at a barrier before raising (the launcher
    kills the other rank as soon as one raises); a rank that did not raise would hang there, which the
    test's timeout turns into a failure."""

    report: RankReport | None = None

    def _fail(self, trainer: pl.Trainer, record: dict[str, Any], reason: str) -> Any:
        try:
            super()._fail(trainer, record, reason)
        except GradientExplosionError as err:
            if self.report is not None:
                self.report.write(trainer, err)
                torch.distributed.barrier()
            raise


def classify(message: str) -> str | None:
    for reason, fragment in REASONS.items():
        if fragment in message:
            return reason
    return None


def check_error(sc: Scenario, reason: str | None, message: str, rollbacks: int) -> None:
    """A GradientExplosionError must carry the message of a reason this scenario allows."""
    assert reason is not None, f"GradientExplosionError with an unknown message: {message}"
    assert message.startswith("ExplosionGuard: ") and "What to try:" in message, message
    if reason == "budget":
        assert sc.action == "rollback", message
        assert f"{sc.max_rollbacks} rollback(s) already done (max_rollbacks={sc.max_rollbacks}" in message
        assert rollbacks == sc.max_rollbacks
    elif reason == "raise":
        assert sc.action == "raise", message
    elif reason == "unrepairable":
        assert sc.action == "skip" and "non-finite weights" in message, message
        assert any(f.target == "weight" for f in sc.faults), message
    else:  # no_good_state: only without in-memory snapshots
        assert sc.action == "rollback" and sc.snapshot_every == 0, message


def check_hazard(sc: Scenario, hazard: FolderHazard | None, records: list[dict[str, Any]]) -> None:
    """Another run's file is never restored; a touched old file never sends the rollback of the hazard's
    step further back than the newest own file it found."""
    if hazard is None:
        return
    for r in records:
        if r["restored"] and hazard.foreign is not None:
            assert r["restored"]["path"] != hazard.foreign, f"another run's file was restored: {r}"
        if r["step"] == hazard.at and r["action"] == "rollback" and r["restored"]:
            assert r["restored"]["step"] >= hazard.newest_step, (
                f"an older state than the newest own file: {r}"
            )


def detectable(sc: Scenario, injected: list[dict[str, Any]]) -> bool:
    """True when an injected fault must be an event (under 16-mixed a non-finite gradient is the
    GradScaler's calibration, not an event)."""
    return any(i["target"] != "grad" or sc.precision != "16-mixed" for i in injected)


def build(sc: Scenario, root: Path) -> tuple[pl.Trainer, ScenarioModel, Any, dict[str, Any]]:
    pl.seed_everything(sc.seed, verbose=False)
    model = (ShardedScenarioModel if sc.fsdp else ScenarioModel)(sc.arch, sc.optimizer, sc.lr, sc.scheduler)
    guard = (ReportingGuard if sc.ddp and not sc.fsdp else ExplosionGuard)(
        action=sc.action,
        spike_factor=sc.spike_factor,
        snapshot_every_n_steps=sc.snapshot_every,
        max_rollbacks=sc.max_rollbacks,
        skip_batches=sc.skip_batches,
        lr_factor=sc.lr_factor,
    )
    agc = AdaptiveGradientClipping(**sc.agc)
    vgm = VanishingGradientMonitor(check_every_n_steps=sc.vgm_every, save_figure=False)
    injectors = [
        FaultInjector(
            target=f.target, value=f.value, steps=list(f.steps), param_pattern=f.param_pattern, rank=f.rank
        )
        for f in sc.faults
    ]
    pool: list[pl.Callback] = [agc, guard, vgm, *injectors]
    callbacks: list[pl.Callback] = [pool[i] for i in sc.order]
    ckpt_dir = root / "ckpt"
    truncate = None
    if sc.corrupt_at is not None:
        truncate = TruncateNewestCheckpoint(ckpt_dir, sc.corrupt_at, sc.seed)
        callbacks.insert(0, truncate)
    hazard = None
    if sc.hazard is not None and sc.hazard_at is not None:
        # the NaN that makes the rollback read the folder (16-mixed: a gradient overflow is calibration)
        target = "loss" if sc.precision == "16-mixed" else "grad"
        injectors.append(FaultInjector(target=target, steps=[sc.hazard_at], rank=0 if sc.ddp else None))
        callbacks.append(injectors[-1])
        if sc.hazard != "lagging":
            hazard = FolderHazard(ckpt_dir, sc.hazard_at, sc.hazard)
            callbacks.insert(0, hazard)
    if sc.ckpt_every and sc.hazard == "lagging":
        callbacks.append(
            LaggingView(root / "view1", dirpath=ckpt_dir, every_n_train_steps=sc.ckpt_every, save_top_k=-1)
        )
    elif sc.ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=sc.ckpt_every, save_top_k=-1))
    kwargs: dict[str, Any] = {}
    if sc.precision == "16-mixed":
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    else:
        kwargs["precision"] = sc.precision
    if sc.fsdp:  # each forked rank builds its own Trainer (tests/distributed/launch.py)
        from pytorch_lightning.strategies import ModelParallelStrategy

        kwargs.update(devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    elif sc.ddp:
        kwargs.update(devices=2, strategy="ddp_fork")
        report = RankReport(root, guard, injectors)
        guard.report = report  # type: ignore[attr-defined]
        callbacks.append(report)
    else:
        kwargs.update(devices=1, deterministic=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=sc.max_steps,
        default_root_dir=str(root),
        logger=False,
        enable_checkpointing=bool(sc.ckpt_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        accumulate_grad_batches=sc.accumulate,
        callbacks=callbacks,
        **kwargs,
    )
    parts = {
        "guard": guard,
        "agc": agc,
        "vgm": vgm,
        "injectors": injectors,
        "truncate": truncate,
        "hazard": hazard,
    }
    return trainer, model, DataLoader(make_data(sc.arch, seed=sc.seed), batch_size=4), parts


def check_warnings(sc: Scenario, caught: list[warnings.WarningMessage], truncated: bool) -> dict[str, int]:
    counts = {"vanishing": 0, "unreadable_checkpoint": 0, "foreign_checkpoint": 0}
    for w in caught:
        if not issubclass(w.category, LightningClipWarning):
            continue
        text = str(w.message)
        if issubclass(w.category, VanishingGradientWarning):
            counts["vanishing"] += 1
        elif "is unreadable" in text and truncated:
            counts["unreadable_checkpoint"] += 1
        elif "was written by another run" in text and sc.hazard == "foreign":
            counts["foreign_checkpoint"] += 1
        else:
            raise AssertionError(f"unexpected lightning-clip warning: {w.category.__name__}: {text}")
    return counts


def run_scenario(sc: Scenario, root: Path) -> dict[str, Any]:
    """Fit ``sc`` in this process and check its end; returns the facts counted by the campaign."""
    trainer, model, loader, parts = build(sc, root)
    guard: ExplosionGuard = parts["guard"]
    error: GradientExplosionError | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(model, loader)
        except GradientExplosionError as err:  # any other exception type fails the test
            error = err
    truncated = truncated_files(root)
    warn_counts = check_warnings(sc, caught, bool(truncated))
    injected = [i for inj in parts["injectors"] for i in inj.injected]
    if error is None:
        outcome = "completed"
        assert trainer.global_step == sc.max_steps
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), "non-finite weights at the end"
        assert guard.rollbacks <= sc.max_rollbacks
        if sc.action == "raise":
            assert guard.events == 0
    else:
        outcome = classify(str(error)) or "unknown"
        check_error(sc, classify(str(error)), str(error), guard.rollbacks)
    if detectable(sc, injected):
        assert guard.events >= 1, "an injected fault went unnoticed"
    # every event is one line of the JSONL log, with the action taken
    logged = load_events(guard.events_path) if guard.records else []
    assert [(e["step"], e["kind"], e["action"]) for e in logged] == [
        (r["step"], r["kind"], r["action"]) for r in guard.records
    ]
    assert guard.events == len(guard.records)
    assert guard.rollbacks == sum(r["action"] == "rollback" for r in guard.records)
    if not injected and sc.spike_factor is None:
        assert guard.events == 0, f"events without any fault: {guard.records}"
    divergences = sum(r["kind"] == "divergence" for r in guard.records)
    assert divergences == 0, f"a divergence in a scenario without a runaway: {guard.records}"
    check_hazard(sc, parts["hazard"], guard.records)
    scanned = scan_checkpoints(root, truncated)
    return {
        "seed": sc.seed,
        "ddp": False,
        "hazard": sc.hazard,
        "outcome": outcome,
        "divergence_events": divergences,
        "faults_injected": len(injected),
        "events": guard.events,
        "rollbacks": guard.rollbacks,
        "skipped_steps": guard.skipped_steps,
        "checkpoints_scanned": scanned,
        "checkpoints_truncated": len(truncated),
        **warn_counts,
    }


def run_ddp_scenario(sc: Scenario, root: Path) -> dict[str, Any]:
    """Fit a 2-rank ``ddp_fork`` scenario; every rank must end the same way with the same weights."""
    assert sc.ddp
    trainer, model, loader, _ = build(sc, root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(model, loader)
        except Exception as err:  # a child's exception arrives wrapped: the rank reports say what it was
            parent_error: BaseException | None = err
        else:
            parent_error = None
    truncated = truncated_files(root)
    reports = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    errors = {(r["error_type"], classify(r["error"] or "")) for r in reports}
    assert len(errors) == 1, f"the ranks ended differently: {reports}"
    error_type, reason = errors.pop()
    assert (error_type is None) == (parent_error is None), parent_error
    if parent_error is not None:  # the child's exception, as the launcher re-raised it
        assert "GradientExplosionError" in str(parent_error), parent_error
    weights = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    if error_type is None:
        outcome = "completed"
        assert [r["global_step"] for r in reports] == [sc.max_steps] * 2
        for name, w in weights[0].items():
            assert torch.isfinite(w).all(), name
            assert torch.equal(w, weights[1][name]), f"ranks diverged: {name}"
        assert all(r["rollbacks"] <= sc.max_rollbacks for r in reports)
    else:
        assert error_type == "GradientExplosionError", reports
        outcome = reason or "unknown"
        check_error(sc, reason, reports[0]["error"], reports[0]["rollbacks"])
    # the guard's decisions are reduced over the ranks: both saw the same events and took the same actions
    assert reports[0]["records"] == reports[1]["records"], reports
    injected = sum(r["injected"] for r in reports)
    # under 16-mixed a gradient overflow is the GradScalers' calibration (every rank skips it), not an event
    calibration_only = sc.precision == "16-mixed" and all(f.target == "grad" for f in sc.faults)
    if injected and sc.spike_factor is None and not calibration_only:
        assert reports[0]["events"] >= 1
    if not injected and sc.spike_factor is None:
        assert reports[0]["events"] == 0
    scanned = scan_checkpoints(root, truncated)
    warn_counts = check_warnings(sc, caught, bool(truncated))
    return {
        "seed": sc.seed,
        "ddp": True,
        "hazard": sc.hazard,
        "outcome": outcome,
        "faults_injected": injected,
        "events": reports[0]["events"],
        "rollbacks": reports[0]["rollbacks"],
        "skipped_steps": reports[0]["skipped_steps"],
        "checkpoints_scanned": scanned,
        "checkpoints_truncated": len(truncated),
        **warn_counts,
    }


def _fsdp_rank(rank: int, sc: Scenario, root: Path) -> dict[str, Any]:
    """One rank of an FSDP2 scenario: fit, then report the end, the full (gathered) weights and the warnings."""
    trainer, model, loader, parts = build(sc, root)
    guard: ExplosionGuard = parts["guard"]
    error: GradientExplosionError | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(model, loader)
        except GradientExplosionError as err:  # any other exception type fails the scenario
            error = err
    weights = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.state_dict().items()
    }  # collective: both ranks get here only if they ended at the same point
    return {
        "rank": rank,
        "global_step": trainer.global_step,
        "error": None if error is None else str(error),
        "events": guard.events,
        "rollbacks": guard.rollbacks,
        "skipped_steps": guard.skipped_steps,
        "injected": sum(len(i.injected) for i in parts["injectors"]),
        "records": [(r["step"], r["kind"], r["action"]) for r in guard.records],
        "weights": weights,
        "warnings": [(w.category, str(w.message)) for w in caught],
    }


def run_fsdp_scenario(sc: Scenario, root: Path) -> dict[str, Any]:
    """Fit a 2-rank FSDP2 scenario (forked ranks): both ranks must end the same way, with the same full
    weights and the same event records; every checkpoint directory must hold finite values only."""
    from tests.distributed.launch import run_ranks

    assert sc.fsdp
    reports = run_ranks(_fsdp_rank, sc, root, timeout=150)
    truncated = truncated_files(root)
    reasons = {classify(r["error"]) if r["error"] else None for r in reports}
    assert len(reasons) == 1 and len({r["error"] is None for r in reports}) == 1, (
        f"the ranks ended differently: {reports}"
    )
    reason = reasons.pop()
    if reports[0]["error"] is None:
        outcome = "completed"
        assert [r["global_step"] for r in reports] == [sc.max_steps] * 2
        assert all(r["rollbacks"] <= sc.max_rollbacks for r in reports)
    else:
        outcome = reason or "unknown"
        check_error(sc, reason, reports[0]["error"], reports[0]["rollbacks"])
    for name, w in reports[0]["weights"].items():
        assert torch.equal(w, reports[1]["weights"][name]), f"ranks diverged: {name}"
        if reports[0]["error"] is None:
            assert torch.isfinite(w).all(), name
    assert reports[0]["records"] == reports[1]["records"], reports
    injected = sum(r["injected"] for r in reports)
    if injected and sc.spike_factor is None:
        assert reports[0]["events"] >= 1, "an injected fault went unnoticed"
    if not injected and sc.spike_factor is None:
        assert reports[0]["events"] == 0
    scanned = scan_checkpoints(root, truncated)
    caught = [warnings.WarningMessage(text, cat, "", 0) for cat, text in reports[0]["warnings"]]
    warn_counts = check_warnings(sc, caught, bool(truncated))
    return {
        "seed": sc.seed,
        "ddp": True,
        "fsdp": True,
        "outcome": outcome,
        "faults_injected": injected,
        "events": reports[0]["events"],
        "rollbacks": reports[0]["rollbacks"],
        "skipped_steps": reports[0]["skipped_steps"],
        "checkpoints_scanned": scanned,
        "checkpoints_truncated": len(truncated),
        **warn_counts,
    }


def scenario_dict(sc: Scenario) -> dict[str, Any]:
    return asdict(sc)


# ------------------------------------------------------------------------------------------ runaways
RADII = (1.1, 1.2, 1.5, 2.0)
RUNAWAY_LRS = (0.05, 0.2, 0.5, 1.0)
RUNAWAY_CLIPPERS = ("none", "defaults", "defaults+max_norm")


@dataclass
class RunawayScenario:
    """The demo's exploding tanh RNN (radius, SGD lr, model seed) with ``ExplosionGuard()`` at defaults and
    optionally ``AdaptiveGradientClipping`` (defaults, or with ``max_norm=5``): a finite runaway, no fault
    injected. Accepted ends: completed with finite weights, or a ``GradientExplosionError`` once the
    rollback budget is spent."""

    seed: int
    radius: float
    lr: float
    clipper: str
    steps: int = 150

    def describe(self) -> str:
        return f"runaway seed={self.seed} radius={self.radius} lr={self.lr} clipper={self.clipper}"


def generate_runaway(seed: int) -> RunawayScenario:
    rng = random.Random(seed)
    return RunawayScenario(seed, rng.choice(RADII), rng.choice(RUNAWAY_LRS), rng.choice(RUNAWAY_CLIPPERS))


def run_runaway_scenario(sc: RunawayScenario, root: Path) -> dict[str, Any]:
    torch.manual_seed(sc.seed)
    model = ExplodingRNN(radius=sc.radius, lr=sc.lr)
    guard = ExplosionGuard()
    callbacks: list[pl.Callback] = [guard]
    if sc.clipper != "none":
        clipper = AdaptiveGradientClipping(max_norm=5.0 if sc.clipper.endswith("max_norm") else None)
        callbacks.insert(sc.seed % 2, clipper)  # either order
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=sc.steps,
        default_root_dir=str(root),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    error: GradientExplosionError | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(model, adding_loader(sc.steps, seed=sc.seed))
        except GradientExplosionError as err:
            error = err
    # the clipper holding a runaway throttles it for long: its throttle warning is the documented report
    # of that (once per episode); every other lightning-clip warning is unexpected
    throttles = [
        w for w in caught if issubclass(w.category, LightningClipWarning) and "throttled" in str(w.message)
    ]
    assert not throttles or sc.clipper != "none"
    for w in caught:
        if w not in throttles:
            assert not issubclass(w.category, LightningClipWarning), f"unexpected warning: {w.message}"
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), "non-finite weights at the end"
    if error is None:
        outcome = "completed"
        assert trainer.global_step == sc.steps
    else:
        outcome = classify(str(error)) or "unknown"
        assert outcome == "budget", str(error)
        assert guard.rollbacks == guard.max_rollbacks
    logged = load_events(guard.events_path) if guard.records else []
    assert [(e["step"], e["kind"]) for e in logged] == [(r["step"], r["kind"]) for r in guard.records]
    # every rollback went back to a state from before the runaway: a snapshot taken while healthy
    for r in guard.records:
        if r["action"] == "rollback":
            assert r["restored"]["step"] <= r["step"]
    return {
        "seed": sc.seed,
        "ddp": False,
        "runaway": True,
        "outcome": outcome,
        "radius": sc.radius,
        "lr": sc.lr,
        "clipper": sc.clipper,
        "events": guard.events,
        "divergence_events": sum(r["kind"] == "divergence" for r in guard.records),
        "rollbacks": guard.rollbacks,
        "skipped_steps": guard.skipped_steps,
        "max_loss": max(model.losses),
        "final_loss": sum(model.losses[-10:]) / 10,
    }

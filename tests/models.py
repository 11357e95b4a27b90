"""Small real models and Trainer factories shared by the tests (no mocks: real optimizers, real fits)."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.reference import naive_norm


def regression_loader(n: int = 64, features: int = 8, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class RegressionModel(pl.LightningModule):
    """An MLP regressor with a configurable optimizer and scheduler."""

    def __init__(
        self,
        features: int = 8,
        hidden: int = 16,
        optimizer: str = "sgd",
        lr: float = 0.05,
        scheduler: bool = False,
        loss_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.optimizer_name = optimizer
        self.lr = lr
        self.use_scheduler = scheduler
        self.loss_scale = loss_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_scale * nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        elif self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if not self.use_scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer writing into ``tmp_path``; keyword arguments override the defaults."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=10,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class StepNormRecorder:
    """Records the total 2-norm of the gradients the optimizer actually applied, independently of the
    library (a naive float64 per-tensor loop in a ``register_step_post_hook``: the step reads but does
    not modify the gradients). NaN is recorded for a step with no gradients (a skipped update)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.norms: list[float] = []
        optimizer.register_step_post_hook(self._hook)

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            self.norms.append(float("nan"))
            return
        per = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])
        self.norms.append(float(torch.linalg.vector_norm(per)))


class RecordedModel(RegressionModel):
    """RegressionModel whose optimizer gets a StepNormRecorder (the norm actually applied)."""

    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        opt = config["optimizer"] if isinstance(config, dict) else config
        self.recorder = StepNormRecorder(opt)
        return config


class DropUpdate(pl.Callback):
    """Reference without lightning-clip: the update of the given global steps is simply not applied
    (the gradients are set to None, which leaves weights and optimizer state untouched)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step in self.steps:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bit-for-bit equality of nested states (tensors: same dtype and values), naming the first mismatch."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), path  # the same NaN on both sides (a fault step's norm)
    else:
        assert a == b, path


class TwoOptimizerModel(pl.LightningModule):
    """An encoder and a head, each with its own SGD, stepped by hand; the pre-clip norms are measured
    naively right before each ``opt.step()``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.pre: dict[int, list[float]] = {0: [], 1: []}
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt0, opt1 = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.encoder(x)), y)
        self.losses.append(float(loss.detach()))
        opt0.zero_grad()
        opt1.zero_grad()
        self.manual_backward(loss)
        for i, (opt, module) in enumerate(((opt0, self.encoder), (opt1, self.head))):
            self.pre[i].append(naive_norm([p.grad for p in module.parameters()]))
            opt.step()

    def configure_optimizers(self) -> Any:
        opt0 = torch.optim.SGD(self.encoder.parameters(), lr=0.3, momentum=0.9)
        opt1 = torch.optim.SGD(self.head.parameters(), lr=0.05, momentum=0.9)
        self.recorders = [StepNormRecorder(opt0), StepNormRecorder(opt1)]
        return [opt0, opt1]


class ShardedRegressionModel(RegressionModel):
    """RegressionModel sharded with FSDP2 in ``configure_model`` (for ``ModelParallelStrategy``): every
    ``nn.Linear`` and the whole net are ``fully_shard``-ed over the data-parallel mesh, so parameters,
    gradients and optimizer states are ``DTensor`` shards."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def rank_loader(rank: int, world: int = 2, n: int = 64, batch_size: int = 4) -> DataLoader:
    """Rank ``rank``'s part of :func:`regression_loader`'s data (samples ``rank::world``), so a test knows
    exactly which samples make up each global batch (use with ``use_distributed_sampler=False``)."""
    x, y = regression_loader(n=n).dataset.tensors  # type: ignore[attr-defined]
    return DataLoader(TensorDataset(x[rank::world], y[rank::world]), batch_size=batch_size, shuffle=False)


def global_batches(
    world: int = 2, n: int = 64, batch_size: int = 4
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """For each step, the ranks' batches of :func:`rank_loader` (the global batch, split as the ranks see it)."""
    loaders = [list(rank_loader(r, world, n, batch_size)) for r in range(world)]
    return [list(step) for step in zip(*loaders, strict=True)]


class LossBlowUp(RegressionModel):
    """A `RegressionModel` whose training loss (and with it every gradient) is multiplied by ``factor`` on
    the batches of the global steps in ``steps``: a finite blow-up at known steps. ``value_only``: only the
    loss's value is multiplied, its gradient stays the same (a loss that is elevated, training unchanged)."""

    def __init__(
        self, steps: tuple[int, ...] = (), factor: float = 1e3, value_only: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.blow_steps = set(steps)
        self.factor = factor
        self.value_only = value_only

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.global_step not in self.blow_steps:
            return loss
        if self.value_only:
            return loss + (self.factor - 1.0) * loss.detach()
        return loss * self.factor


class TargetsRise(RegressionModel):
    """A `RegressionModel` whose targets are ×``factor`` from global step ``at`` on, for good: the loss
    (×~900) and the gradients (×~30) rise by design, and the steps stay sound (SGD's stability does not
    depend on the targets: training converges to the new optimum)."""

    def __init__(self, at: int, factor: float = 30.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.at, self.factor = at, factor
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        scale = self.factor if self.global_step >= self.at else 1.0
        loss = torch.nn.functional.mse_loss(self(x), scale * y)
        self.losses.append(float(loss.detach()))
        return loss


def adding_batch(
    batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adding problem (two marked values to sum over a sequence of ``seq_len`` pairs)."""
    values = torch.rand(batch_size, seq_len, generator=generator)
    markers = torch.zeros(batch_size, seq_len)
    rows = torch.arange(batch_size)
    half = seq_len // 2
    markers[rows, torch.randint(0, half, (batch_size,), generator=generator)] = 1.0
    markers[rows, torch.randint(half, seq_len, (batch_size,), generator=generator)] = 1.0
    return torch.stack([values, markers], dim=-1), (values * markers).sum(dim=1, keepdim=True)


def adding_loader(steps: int, batch_size: int = 64, seq_len: int = 20, seed: int = 0) -> DataLoader:
    """``steps`` fresh batches of the adding problem (one batch per step)."""
    g = torch.Generator().manual_seed(seed)
    batches = [adding_batch(batch_size, seq_len, g) for _ in range(steps)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class ExplodingRNN(pl.LightningModule):
    """The demo's exploding case: a 32-unit tanh RNN whose recurrent weights are ``radius`` × a random
    orthogonal matrix, trained with plain SGD on the adding problem (lr 0.2, radius 1.2: the loss runs
    away within ten steps without clipping). Records the training loss of every step in ``losses``."""

    def __init__(self, radius: float = 1.2, lr: float = 0.2, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="tanh", batch_first=True)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(hidden, hidden))
            self.rnn.weight_hh_l0.copy_(radius * q)
        self.head = nn.Linear(hidden, 1)
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class CountReduces(pl.Callback):
    """Counts the collectives run between each batch's start and its optimizer step's end (wraps the
    strategy's ``reduce``, which the callbacks call; the real reduction still happens). List it first."""

    def __init__(self) -> None:
        self.calls = 0
        self._inside = False

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        real = trainer.strategy.reduce

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += int(self._inside)
            return real(*args, **kwargs)

        trainer.strategy.reduce = counting  # type: ignore[method-assign]

    def on_train_batch_start(self, *args: Any) -> None:
        self._inside = True

    def on_train_batch_end(self, *args: Any) -> None:
        self._inside = False


class Crash(pl.Callback):
    """Stops the run abruptly when the batch of global step ``at`` starts."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")

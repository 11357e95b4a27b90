"""The adding problem: exploding and vanishing gradients on a real task, and what lightning-clip does.

The task (Hochreiter & Schmidhuber 1997; the benchmark of Pascanu, Mikolov & Bengio 2013, "On the
difficulty of training recurrent neural networks"): each input is a sequence of ``T`` pairs
``(value, marker)``, values uniform in ``[0, 1]``, exactly two markers set (one in each half of the
sequence). The target is the sum of the two marked values. Predicting the mean, 1, scores an MSE of
``Var(U1 + U2) = 1/6 ≈ 0.167``; a model below 0.05 has learnt to carry the first marked value across the
sequence.

Variants, each a real Lightning fit writing a ``CSVLogger`` run directory under ``--out``:

* ``rnn_unclipped``: a tanh RNN whose recurrent weights have spectral radius 1.2 (> 1: gradients through
  time can grow like 1.2^T), plain SGD, no clipping. It explodes: the run is stopped at the first
  non-finite (or > 1e6) training loss and reported as such.
* ``rnn_clip_val``: the same with ``Trainer(gradient_clip_val=1.0)``.
* ``rnn_adaptive_nocap``: the same with ``AdaptiveGradientClipping()`` at its defaults, no ``max_norm``.
  The threshold is the running mean's multiple under a ceiling learned from the training loss: it starts
  at a tenth of the median of the first five norms, widens while the loss stays in its band, and is cut
  by the factor the loss rose when it jumps, so the run trains through the runaway without an absolute
  threshold.
* ``rnn_adaptive``: ``AdaptiveGradientClipping(max_norm=1.0)``: the adaptive threshold under a ceiling.
* ``rnn_guard``: the same plus ``ExplosionGuard`` while a ``FaultInjector`` fills the gradients with NaN
  on two steps mid-run: the guard never applies those updates, rolls back and the run finishes.
* ``rnn_vanishing``: a tanh RNN with spectral radius 0.5 on long sequences (Adam): the gradient reaching
  the first marker vanishes like 0.5^T; ``VanishingGradientMonitor`` warns (the warnings are recorded).
* ``lstm``: an LSTM on the same long sequences (Adam): its additive cell state carries the error back, it
  learns the long dependency; the monitor stays silent.

Run ``python examples/adding_problem.py`` (about 75 s on a busy 2-core CPU), ``--full`` for longer
sequences and more steps, ``--out DIR`` for the outputs (default ``./runs/adding_problem``). Afterwards,
``lightning-clip report runs/adding_problem/rnn_guard`` summarises any of the run directories.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torchmetrics import MeanSquaredError

from lightning_clip import (
    AdaptiveGradientClipping,
    ExplosionGuard,
    GradientExplosionError,
    VanishingGradientMonitor,
    VanishingGradientWarning,
    functional,
    report,
)
from lightning_clip.testing import FaultInjector

TRIVIAL_MSE = 1.0 / 6.0
"""MSE of the best constant predictor (1): the variance of the sum of two uniform values."""
SOLVED_MSE = 0.05
"""A model below this validation MSE has learnt the long dependency."""


# ----------------------------------------------------------------------------------------------- data
def adding_batch(
    batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the adding problem: inputs ``(batch, seq_len, 2)`` and targets ``(batch, 1)``.

    Channel 0 holds values uniform in ``[0, 1]``; channel 1 marks two positions, one in each half.

    Example:
        >>> x, y = adding_batch(4, 10, torch.Generator().manual_seed(0))
        >>> x.shape, y.shape, x[..., 1].sum(dim=1).tolist()
        (torch.Size([4, 10, 2]), torch.Size([4, 1]), [2.0, 2.0, 2.0, 2.0])
        >>> torch.allclose(y[:, 0], (x[..., 0] * x[..., 1]).sum(dim=1))
        True
    """
    if seq_len < 2:
        raise ValueError(f"`seq_len` must be an integer ≥ 2, got {seq_len!r}.")
    values = torch.rand(batch_size, seq_len, generator=generator)
    markers = torch.zeros(batch_size, seq_len)
    half = seq_len // 2
    rows = torch.arange(batch_size)
    markers[rows, torch.randint(0, half, (batch_size,), generator=generator)] = 1.0
    markers[rows, torch.randint(half, seq_len, (batch_size,), generator=generator)] = 1.0
    targets = (values * markers).sum(dim=1, keepdim=True)
    return torch.stack([values, markers], dim=-1), targets


class AddingProblem(IterableDataset):
    """An endless stream of fresh training batches (a new sample every step), reproducible from ``seed``."""

    def __init__(self, batch_size: int, seq_len: int, seed: int = 0) -> None:
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield adding_batch(self.batch_size, self.seq_len, generator)


def validation_set(size: int, seq_len: int, seed: int = 1234) -> TensorDataset:
    """A fixed validation set (the same for every variant of a given ``seq_len``)."""
    x, y = adding_batch(size, seq_len, torch.Generator().manual_seed(seed))
    return TensorDataset(x, y)


# ---------------------------------------------------------------------------------------------- model
class SequenceRegressor(pl.LightningModule):
    """A one-layer tanh RNN or LSTM reading the whole sequence, a linear head on the last hidden state.

    Args:
        cell: ``"rnn"`` (``nn.RNN``, tanh) or ``"lstm"``.
        hidden: hidden units.
        spectral_radius: RNN only: the recurrent weights are set to ``spectral_radius`` × a random
            orthogonal matrix, whose eigenvalues all have modulus ``spectral_radius``.
        optimizer: ``"sgd"`` (plain SGD, no momentum, as in Pascanu et al. 2013) or ``"adam"``.
        lr: learning rate.
        log_grad_norm: log ``grad/norm`` (pre-clip total 2-norm) every step, for variants without
            ``AdaptiveGradientClipping`` (which logs it itself).
        reference_clip: with ``log_grad_norm``, also log the threshold and the coefficient that
            ``Trainer(gradient_clip_val=reference_clip)`` applies after this hook (``grad/clip_threshold``,
            ``grad/clip_coef``), so every run reads the same way.
        stop_on_divergence: stop the fit at the first training loss that is non-finite or above
            ``divergence_loss`` (recorded in ``diverged``); off when ``ExplosionGuard`` handles it.
        divergence_loss: see ``stop_on_divergence``.
        forget_bias: LSTM only: initial forget-gate bias (``bias_hh``; ``bias_ih`` keeps its default init).
    """

    def __init__(
        self,
        cell: str = "rnn",
        hidden: int = 32,
        spectral_radius: float | None = None,
        optimizer: str = "sgd",
        lr: float = 0.2,
        log_grad_norm: bool = False,
        reference_clip: float | None = None,
        stop_on_divergence: bool = True,
        divergence_loss: float = 1e6,
        forget_bias: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(2, hidden, batch_first=True)
            with torch.no_grad():  # a high forget-gate bias: the gate starts open (Gers et al. 2000)
                self.rnn.bias_hh_l0[hidden : 2 * hidden].fill_(forget_bias)
        elif cell == "rnn":
            self.rnn = nn.RNN(2, hidden, nonlinearity="tanh", batch_first=True)
            if spectral_radius is not None:
                with torch.no_grad():
                    q, _ = torch.linalg.qr(torch.randn(hidden, hidden))
                    self.rnn.weight_hh_l0.copy_(spectral_radius * q)
        else:
            raise ValueError(f"`cell` must be one of 'rnn' | 'lstm', got {cell!r}.")
        self.head = nn.Linear(hidden, 1)
        self.val_mse = MeanSquaredError()
        #: (global step, validation MSE) after each validation
        self.val_history: list[tuple[int, float]] = []
        #: (global step, training loss) of the first diverged step, when stopped
        self.diverged: tuple[int, float] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        if self.hparams.stop_on_divergence and self.diverged is None:
            value = float(loss.detach())
            if not math.isfinite(value) or value > self.hparams.divergence_loss:
                self.diverged = (self.global_step, value)
                self.trainer.should_stop = True
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs after the callbacks' hook and before Lightning's own `gradient_clip_val` clipping.
        if not self.hparams.log_grad_norm:
            return
        total, _ = functional.grad_norms(functional.collect_grads(self.parameters()))
        metrics = {"grad/norm": total}
        clip = self.hparams.reference_clip
        if clip is not None:
            metrics["grad/clip_threshold"] = torch.tensor(float(clip))
            metrics["grad/clip_coef"] = functional.clip_coef(total, clip)
        self.log_dict(metrics, on_step=True, on_epoch=False)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_mse.update(self(x), y)

    def on_validation_epoch_end(self) -> None:
        value = self.val_mse.compute()
        self.val_mse.reset()
        self.log("val/mse", value)
        self.val_history.append((self.global_step, float(value)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


@torch.no_grad()
def evaluate(model: SequenceRegressor, data: TensorDataset, batch_size: int = 500) -> float:
    """Validation MSE of ``model`` on ``data`` (torchmetrics ``MeanSquaredError``)."""
    metric = MeanSquaredError()
    was_training = model.training
    model.eval()
    for x, y in DataLoader(data, batch_size=batch_size):
        metric.update(model(x), y)
    model.train(was_training)
    return float(metric.compute())


def gradient_through_time(model: SequenceRegressor, data: TensorDataset, size: int = 256) -> list[float]:
    """``‖∂L/∂x_t‖`` for each time step ``t`` (the norm over the batch and the two input channels) of the
    MSE on the first ``size`` sequences of ``data``: how much error signal reaches each input.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = SequenceRegressor("rnn", 8, spectral_radius=0.5)
        >>> profile = gradient_through_time(model, validation_set(16, 30))
        >>> len(profile), profile[0] < 1e-6 * profile[-1]
        (30, True)
    """
    x, y = data.tensors[0][:size].clone().requires_grad_(True), data.tensors[1][:size]
    was_training = model.training
    model.eval()
    loss = nn.functional.mse_loss(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    model.train(was_training)
    return torch.linalg.vector_norm(grad, dim=(0, 2)).tolist()


# ------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Settings:
    """Sizes of a demo run (``Settings()`` is the default run, ``Settings.full()`` the long one)."""

    short_len: int = 20
    long_len: int = 100
    explode_steps: int = 3000
    long_steps: int = 1200
    vanishing_steps: int = 500
    val_every: int = 100
    batch_size: int = 64
    hidden: int = 32
    val_size: int = 1000
    fault_steps: tuple[int, ...] = (1000, 2000)
    monitor_every: int = 25
    seed: int = 0

    @classmethod
    def full(cls) -> Settings:
        return cls(
            long_len=200, explode_steps=8000, long_steps=3000, vanishing_steps=1000, fault_steps=(2500, 5000)
        )


@dataclass
class Variant:
    """One fit of the demo."""

    name: str
    description: str
    cell: str
    seq_len: int
    steps: int
    optimizer: str
    lr: float
    spectral_radius: float | None = None
    gradient_clip_val: float | None = None
    log_grad_norm: bool = True
    reference_clip: float | None = None
    stop_on_divergence: bool = True
    profile_through_time: bool = False
    callbacks: Callable[[], list[pl.Callback]] = list


def make_variants(s: Settings) -> list[Variant]:
    """The demo's variants for the sizes ``s``."""
    explode: dict[str, Any] = dict(
        cell="rnn", seq_len=s.short_len, steps=s.explode_steps, optimizer="sgd", lr=0.2, spectral_radius=1.2
    )
    long: dict[str, Any] = dict(seq_len=s.long_len, optimizer="adam", lr=0.01)
    return [
        Variant("rnn_unclipped", "tanh RNN, spectral radius 1.2, SGD, no clipping", **explode),
        Variant(
            "rnn_clip_val",
            "same + Trainer(gradient_clip_val=1.0)",
            gradient_clip_val=1.0,
            reference_clip=1.0,
            **explode,
        ),
        Variant(
            "rnn_adaptive_nocap",
            "same + AdaptiveGradientClipping() (defaults, no max_norm)",
            log_grad_norm=False,
            callbacks=lambda: [AdaptiveGradientClipping()],
            **explode,
        ),
        Variant(
            "rnn_adaptive",
            "same + AdaptiveGradientClipping(max_norm=1.0)",
            log_grad_norm=False,
            callbacks=lambda: [AdaptiveGradientClipping(max_norm=1.0)],
            **explode,
        ),
        Variant(
            "rnn_guard",
            f"same + ExplosionGuard, NaN gradients injected at steps {', '.join(map(str, s.fault_steps))}",
            log_grad_norm=False,
            stop_on_divergence=False,
            callbacks=lambda: [
                AdaptiveGradientClipping(max_norm=1.0),
                ExplosionGuard(),
                FaultInjector(target="grad", value=float("nan"), steps=list(s.fault_steps)),
            ],
            **explode,
        ),
        Variant(
            "rnn_vanishing",
            f"tanh RNN, spectral radius 0.5, T={s.long_len}, Adam + VanishingGradientMonitor",
            cell="rnn",
            steps=s.vanishing_steps,
            spectral_radius=0.5,
            profile_through_time=True,
            callbacks=lambda: [VanishingGradientMonitor(check_every_n_steps=s.monitor_every)],
            **long,
        ),
        Variant(
            "lstm",
            f"LSTM, T={s.long_len}, Adam + VanishingGradientMonitor",
            cell="lstm",
            steps=s.long_steps,
            profile_through_time=True,
            callbacks=lambda: [VanishingGradientMonitor(check_every_n_steps=s.monitor_every)],
            **long,
        ),
    ]


@dataclass
class Result:
    """What one variant gave (one row of the table)."""

    name: str
    description: str
    run_dir: str
    final_mse: float
    steps_to_solve: int | None
    max_grad_norm: float
    clip_fraction: float | None
    rollbacks: int
    vanishing_warnings: int
    status: str
    seconds: float
    val_history: list[tuple[int, float]] = field(default_factory=list)
    warning_messages: list[str] = field(default_factory=list)
    #: "init" / "trained" -> ‖∂L/∂x_t‖ for t = 1..T (variants with ``profile_through_time``)
    through_time: dict[str, list[float]] = field(default_factory=dict)


def run_variant(variant: Variant, out_dir: str, s: Settings) -> Result:
    """Fit ``variant`` with a ``CSVLogger`` in ``out_dir/<name>`` (replaced if it exists)."""
    run_dir = os.path.join(out_dir, variant.name)
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    pl.seed_everything(s.seed, verbose=False)
    model = SequenceRegressor(
        cell=variant.cell,
        hidden=s.hidden,
        spectral_radius=variant.spectral_radius,
        optimizer=variant.optimizer,
        lr=variant.lr,
        log_grad_norm=variant.log_grad_norm,
        reference_clip=variant.reference_clip,
        stop_on_divergence=variant.stop_on_divergence,
    )
    train = DataLoader(AddingProblem(s.batch_size, variant.seq_len, seed=s.seed), batch_size=None)
    val_data = validation_set(s.val_size, variant.seq_len)
    val = DataLoader(val_data, batch_size=500)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=variant.steps,
        logger=CSVLogger(save_dir=out_dir, name="", version=variant.name),
        callbacks=variant.callbacks(),
        gradient_clip_val=variant.gradient_clip_val,
        val_check_interval=min(s.val_every, variant.steps),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    through_time = {}
    if variant.profile_through_time:
        through_time["init"] = gradient_through_time(model, val_data)
    status = "finished"
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", VanishingGradientWarning)
        try:
            trainer.fit(model, train, val)
        except GradientExplosionError as err:
            status = f"GradientExplosionError: {str(err).splitlines()[0][:60]}"
    seconds = time.perf_counter() - start
    vanishing = [str(w.message) for w in caught if issubclass(w.category, VanishingGradientWarning)]
    if model.diverged is not None:
        step, loss = model.diverged
        status = (
            f"NaN loss at step {step}"
            if not math.isfinite(loss)
            else f"diverged at step {step} (loss {loss:.1e})"
        )
    final = evaluate(model, val_data)
    if variant.profile_through_time:
        through_time["trained"] = gradient_through_time(model, val_data)
    if status == "finished" and not math.isfinite(final):
        status = "NaN weights"
    trainer.logger.save()  # type: ignore[union-attr]
    summary = report.summarize(report.load_run(run_dir))
    norms = summary.norms[0] if summary.norms else None
    solved = next((step for step, mse in model.val_history if mse < SOLVED_MSE), None)
    return Result(
        name=variant.name,
        description=variant.description,
        run_dir=run_dir,
        final_mse=final,
        steps_to_solve=solved,
        max_grad_norm=norms.max if norms else math.nan,
        clip_fraction=norms.clip_rate if norms else None,
        rollbacks=summary.rollbacks,
        vanishing_warnings=len(vanishing),
        status=status,
        seconds=seconds,
        val_history=list(model.val_history),
        warning_messages=vanishing,
        through_time=through_time,
    )


# ---------------------------------------------------------------------------------------------- output
def _num(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.1e}"


def format_table(results: Sequence[Result]) -> str:
    """The results as a Markdown table."""
    head = (
        "| variant | final val MSE | steps to MSE < 0.05 | max grad norm | steps clipped | rollbacks"
        " | vanishing warnings | outcome | time (s) |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in results:
        clip = "—" if r.clip_fraction is None else f"{100 * r.clip_fraction:.0f}%"
        solved = "—" if r.steps_to_solve is None else str(r.steps_to_solve)
        lines.append(
            f"| {r.name} | {_num(r.final_mse)} | {solved} | {_num(r.max_grad_norm)} | {clip} | {r.rollbacks}"
            f" | {r.vanishing_warnings} | {r.status} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def plot_validation(results: Sequence[Result], path: str) -> None:
    """Validation MSE against steps for every variant, with the trivial and the solved levels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, r in enumerate(results):
        pts = [(s, v) for s, v in r.val_history if math.isfinite(v)]
        label = r.name if r.status == "finished" else f"{r.name}: {r.status}"
        ax.plot(
            [s for s, _ in pts],
            [v for _, v in pts],
            marker=".",
            markersize=3,
            linewidth=1,
            color=f"C{i}",
            label=label,
        )
    ax.axhline(TRIVIAL_MSE, color="grey", linestyle="--", linewidth=1, label="predict the mean (1/6)")
    ax.axhline(SOLVED_MSE, color="green", linestyle=":", linewidth=1, label="solved (0.05)")
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation MSE")
    ax.set_title("Adding problem: validation MSE (a diverged run's curve stops)", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.savefig(path, dpi=100)


def plot_through_time(results: Sequence[Result], path: str) -> None:
    """``‖∂L/∂x_t‖`` against the time step, at initialisation and after training, per profiled variant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    values = [
        v for r in results for prof in r.through_time.values() for v in prof if v > 0 and math.isfinite(v)
    ]
    floor = min(values) / 10 if values else 1e-30
    for i, r in enumerate(results):
        for when, style in (("init", ":"), ("trained", "-")):
            prof = r.through_time.get(when)
            if prof:
                ys = [max(v, floor) if math.isfinite(v) else math.nan for v in prof]
                ax.plot(
                    range(1, len(prof) + 1),
                    ys,
                    linestyle=style,
                    color=f"C{i}",
                    linewidth=1.3,
                    label=f"{r.name}, {'at initialisation' if when == 'init' else 'after training'}",
                )
    ax.set_yscale("log")
    ax.set_xlabel("time step t (the first marker is in the first half)")
    ax.set_ylabel("‖∂L/∂x_t‖")
    ax.set_title(
        "Error signal reaching each input: vanishing through time (RNN) vs carried (LSTM)", fontsize=10
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=100)


def write_figures(results: Sequence[Result], out_dir: str) -> list[str]:
    """Every figure of the demo in ``out_dir/figures``; returns their paths (none without matplotlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no figures (pip install 'lightning-clip[plot]').")
        return []
    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    paths = []
    for r in results:
        path = os.path.join(fig_dir, f"{r.name}_grad_norm.png")
        report.plot_norms(report.load_run(r.run_dir), path, title=f"{r.name}: {r.description}")
        paths.append(path)
        flow = os.path.join(r.run_dir, "gradient_flow.png")
        if os.path.exists(flow):
            target = os.path.join(fig_dir, f"{r.name}_gradient_flow.png")
            shutil.copyfile(flow, target)
            paths.append(target)
    path = os.path.join(fig_dir, "validation_mse.png")
    plot_validation(results, path)
    paths.append(path)
    if any(r.through_time for r in results):
        path = os.path.join(fig_dir, "gradient_through_time.png")
        plot_through_time(results, path)
        paths.append(path)
    return paths


DOCS_FIGURES = {
    "rnn_guard_grad_norm.png": "adding_guard_grad_norm.png",
    "rnn_adaptive_nocap_grad_norm.png": "adding_adaptive_nocap_grad_norm.png",
    "validation_mse.png": "adding_validation_mse.png",
    "gradient_through_time.png": "adding_gradient_through_time.png",
}
"""The figures the README shows: demo figure -> file name under ``docs/images``."""


def save_docs_copies(fig_dir: str, target_dir: str, colors: int = 64) -> list[str]:
    """Small copies (a ``colors``-colour palette, a few tens of KB) of :data:`DOCS_FIGURES`."""
    from PIL import Image  # a matplotlib dependency

    os.makedirs(target_dir, exist_ok=True)
    written = []
    for source, name in DOCS_FIGURES.items():
        src = os.path.join(fig_dir, source)
        if os.path.exists(src):
            dst = os.path.join(target_dir, name)
            with Image.open(src) as image:
                image.convert("RGB").quantize(colors=colors).save(dst, optimize=True)
            written.append(dst)
    return written


def main(argv: Sequence[str] | None = None, settings: Settings | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--full", action="store_true", help="longer sequences and more steps")
    parser.add_argument("--out", default=os.path.join("runs", "adding_problem"), help="output directory")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--docs-images", metavar="DIR", default=None, help="also write small copies of the key figures"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|isinstance.treespec).*")
    s = settings if settings is not None else (Settings.full() if args.full else Settings())
    os.makedirs(args.out, exist_ok=True)
    variants = [v for v in make_variants(s) if args.only is None or v.name in args.only]
    results = []
    start = time.perf_counter()
    for v in variants:
        print(f"[{v.name}] {v.description}: {v.steps} steps, T={v.seq_len} ...", flush=True)
        r = run_variant(v, args.out, s)
        print(f"[{v.name}] {r.status}, final val MSE {_num(r.final_mse)} ({r.seconds:.1f} s)", flush=True)
        if r.warning_messages:
            print(f"[{v.name}] VanishingGradientWarning: {r.warning_messages[0].splitlines()[0][:160]}")
        results.append(r)
    print()
    print(format_table(results))
    print(f"\ntrivial predictor: {TRIVIAL_MSE:.3f}; total fit time {time.perf_counter() - start:.0f} s")
    figures = write_figures(results, args.out)
    for path in figures:
        print(f"figure: {path}")
    if args.docs_images and figures:
        for path in save_docs_copies(os.path.join(args.out, "figures"), args.docs_images):
            print(f"small copy: {path}")
    print(f"run directories: {args.out}/<variant>  (try: lightning-clip report {results[-1].run_dir})")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

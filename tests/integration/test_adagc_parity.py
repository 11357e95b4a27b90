"""``mode="adagc"`` with ``torch.optim.AdamW`` reproduces ``pytorch_optimizer.AdaGC`` 4.1.0.

The reference is the library itself: AdaGC (Adam with its clipping fused in) stepping the same model on
the same batches in a plain loop. Ours is a real Lightning fit: AdamW with decoupled weight decay, and
`AdaptiveGradientClipping(mode="adagc")` with AdaGC's settings translated (``lambda_abs`` ->
``max_norm``, ``lambda_rel`` -> ``factor``, ``beta`` -> ``decay``, ``warmup_steps=W`` ->
``warmup_steps=W - 1``: AdaGC counts from 1 and its step ``W`` is already per-tensor).

A NaN gradient is injected on the step that would have been the first per-tensor one: our
`ExplosionGuard(action="skip")` drops it, the reference skips ``step()`` on that batch (AdaGC has no NaN
handling: its ``γ`` and weights would turn NaN). The warm-up boundary then comes one batch later in both.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard
from lightning_clip.testing import FaultInjector
from tests.models import make_trainer

pytest.importorskip("pytorch_optimizer")

STEPS = 200
WARMUP = 30  # AdaGC's warmup_steps
NAN_STEP = WARMUP - 1  # global_step (0-based) of AdaGC's step WARMUP: the first per-tensor step
LR, WEIGHT_DECAY, BETAS, EPS = 3e-3, 0.1, (0.9, 0.999), 1e-8
LAMBDA_ABS, LAMBDA_REL, BETA = 0.5, 1.05, 0.98


def noisy_loader(steps: int = STEPS, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """Regression batches with heavy-tailed noise: the per-tensor norms jump around, so AdaGC clips."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * batch_size, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    noise = torch.distributions.StudentT(2.0).sample((steps * batch_size, 1))
    return DataLoader(TensorDataset(x, x @ w + noise), batch_size=batch_size, shuffle=False)


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


class Weights(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.rows.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def reference() -> tuple[list[dict[str, torch.Tensor]], int]:
    """pytorch_optimizer.AdaGC on the same batches; ``step()`` skipped on the NaN batch. Also returns how
    many (tensor, step) pairs the per-tensor rule clipped (read from AdaGC's own state)."""
    from pytorch_optimizer import AdaGC

    model = Net()
    opt = AdaGC(
        model.parameters(),
        lr=LR,
        betas=BETAS,
        beta=BETA,
        lambda_abs=LAMBDA_ABS,
        lambda_rel=LAMBDA_REL,
        warmup_steps=WARMUP,
        weight_decay=WEIGHT_DECAY,
        weight_decouple=True,
        eps=EPS,
    )
    rows, clipped = [], 0
    for step, (x, y) in enumerate(noisy_loader()):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if step != NAN_STEP:
            if opt.param_groups[0].get("step", 0) + 1 >= WARMUP:
                for p in model.parameters():
                    gamma = opt.state[p]["gamma"]
                    clipped += int(p.grad.norm() > LAMBDA_REL * gamma.clamp_min(EPS))
            opt.step()
        rows.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return rows, clipped


def test_adagc_mode_with_adamw_reproduces_pytorch_optimizer_adagc(tmp_path: Any) -> None:
    clipper = AdaptiveGradientClipping(
        mode="adagc", max_norm=LAMBDA_ABS, factor=LAMBDA_REL, decay=BETA, warmup_steps=WARMUP - 1
    )
    guard = ExplosionGuard(action="skip", snapshot_every_n_steps=0)
    faults = FaultInjector(target="grad", value=float("nan"), steps=[NAN_STEP], param_pattern=r"^net\.2\.")
    weights = Weights()
    trainer = make_trainer(
        tmp_path, callbacks=[faults, guard, clipper, weights], max_steps=STEPS, log_every_n_steps=50
    )
    trainer.fit(Net(), noisy_loader())
    assert guard.skipped_steps == 1
    expected, clipped = reference()
    assert clipped > 50  # the per-tensor rule clips often on this run
    assert len(weights.rows) == len(expected) == STEPS
    worst = 0.0
    for step, (ours, ref) in enumerate(zip(weights.rows, expected, strict=True)):
        for name in ref:
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-7, msg=f"{name} {step}")
            worst = max(worst, float((ours[name] - ref[name]).norm() / ref[name].norm()))
    print(f"AdaGC parity: worst ||ours - ref|| / ||ref|| of a tensor over {STEPS} steps: {worst:.2e}")
    print(f"per-tensor clips in the reference: {clipped}")
    # the warm-up statistics: every tensor's γ starts as its clipped norm (a global clip to λ_abs)
    assert clipper._per_tensor is not None
    assert clipper._per_tensor.rule(0).steps == STEPS - 1

"""Slow, obviously right references of the per-tensor modes: one Python float per tensor, a plain loop.

`NaivePerTensor` restates each rule from its definition (AdaGC's from ``pytorch_optimizer.AdaGC`` 4.1.0's
source, the ``mean_per_tensor`` rule from its docstring) without tensors; `reference_fit` runs a model
through an optimizer in a plain loop, clipping each gradient tensor by the naive coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

ADAGC_EPS = 1e-8
MEAN_EPS = 1e-6


class NaivePerTensor:
    """``mode`` ``"adagc"`` or ``"mean_per_tensor"``, fed the per-tensor norms of each applied step."""

    def __init__(
        self, mode: str, factor: float, decay: float, warmup_steps: int, max_norm: float | None = None
    ) -> None:
        self.mode, self.factor, self.decay, self.warmup_steps, self.max_norm = (
            mode,
            factor,
            decay,
            warmup_steps,
            max_norm,
        )
        self.stat: dict[int, float] = {}  # tensor -> γ (adagc) or EMA (mean)
        self.count: dict[int, int] = {}
        self.steps = 0

    def thresholds(self, n: int) -> list[float]:
        out = []
        for i in range(n):
            if self.mode == "adagc":
                warm = self.steps < self.warmup_steps or i not in self.stat
                out.append(math.inf if warm else self.factor * max(self.stat[i], ADAGC_EPS))
            else:
                k = self.count.get(i, 0)
                mean = self.stat.get(i, 0.0) / (1 - self.decay**k) if k else 0.0
                out.append(self.factor * mean if k >= self.warmup_steps else math.inf)
        return out

    def coefs(self, norms: list[float]) -> list[float]:
        """The coefficient of each tensor at this step (no state change)."""
        total = math.sqrt(sum(n * n for n in norms))
        if self.mode == "adagc":
            warm_coef = min(1.0, self.max_norm / (total + ADAGC_EPS)) if self.max_norm else 1.0
            out = []
            for i, (n, t) in enumerate(zip(norms, self.thresholds(len(norms)), strict=True)):
                warm = self.steps < self.warmup_steps or i not in self.stat
                out.append(warm_coef if warm else min(1.0, t / max(n, ADAGC_EPS)))
            return out
        out = [min(1.0, t / (n + MEAN_EPS)) for n, t in zip(norms, self.thresholds(len(norms)), strict=True)]
        if self.max_norm is not None:
            after = math.sqrt(sum((c * n) ** 2 for c, n in zip(out, norms, strict=True)))
            cap = min(1.0, self.max_norm / (after + MEAN_EPS))
            out = [c * cap for c in out]
        return out

    def update(self, norms: list[float], coefs: list[float]) -> None:
        for i, (n, c) in enumerate(zip(norms, coefs, strict=True)):
            if self.mode == "adagc":
                if i not in self.stat:
                    self.stat[i] = c * n
                elif self.steps < self.warmup_steps:
                    self.stat[i] = min(self.stat[i], c * n)
                else:
                    self.stat[i] += (1 - self.decay) * (c * n - self.stat[i])
                self.count[i] = self.count.get(i, 0) + 1
            elif n > 0:
                self.stat[i] = self.decay * self.stat.get(i, 0.0) + (1 - self.decay) * c * n
                self.count[i] = self.count.get(i, 0) + 1
        self.steps += 1


def reference_fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    rule: NaivePerTensor,
    skip: Iterable[int] = (),
) -> list[dict[str, Any]]:
    """Train in a plain loop, clipping each tensor by ``rule``; the steps in ``skip`` are not applied.
    Returns, per step, the pre-clip norms, the coefficients, the thresholds the next step meets and the
    weights after the step."""
    rows = []
    skipped = set(skip)
    for step, batch in enumerate(batches):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        norms = [math.sqrt(sum(float(x) ** 2 for x in p.grad.detach().double().flatten())) for p in params]
        coefs = rule.coefs(norms)
        if step not in skipped:
            for p, c in zip(params, coefs, strict=True):
                p.grad.mul_(c)
            optimizer.step()
            rule.update(norms, coefs)
        rows.append(
            {
                "norms": norms,
                "coefs": coefs,
                "thresholds": rule.thresholds(len(params)),
                "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            }
        )
    return rows

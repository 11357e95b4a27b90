"""The clipping step alone, on identical gradients: lightning-clip vs torch vs ZClip vs AutoClip.

Each round restores the same gradients (untimed), then times one call of each variant, in an order that
rotates every round; the table shows the median time per call and its ratio to the **floor**: the least
any norm-clipping step can do on these gradients, one bare fused norm pass (``torch._foreach_norm``), plus
one fused multiply (``torch._foreach_mul_``) when clipping is needed.
Run: ``python benchmarks/clip_step.py [--rounds N] [--threads T] [--shapes 8 400 2000]``.

Variants (each measures the total norm, updates its statistics if it has any, and clips in place):

* ``floor``: the bare fused passes above, no statistics, no host transfer.
* ``norm+mul``: one ``_foreach_norm`` and one ``_foreach_mul_`` whether clipping is needed or not: the floor
  as issue 20 states its bar (≤ 1.2× for the per-tensor modes, at every shape); a second table gives the
  per-tensor modes' ratios to it.
* ``gather bound``: what any per-tensor rule pays before deciding anything: the norm pass, gathering its
  per-tensor norms into one vector (``torch.stack``; on the CPU ``_foreach_norm`` returns one tensor per
  gradient), and one fused multiply by a coefficient per tensor (views of one buffer).

* ``lightning-clip``: what ``AdaptiveGradientClipping`` does per step — one fused ``_foreach_norm`` pass,
  one host transfer, the ``mean`` rule, and a fused ``_foreach_mul_`` only when clipping is needed.
* ``per-tensor adagc`` / ``per-tensor mean``: what ``AdaptiveGradientClipping(mode="adagc")`` /
  ``mode="mean_per_tensor"`` does per step — the same measurement, the per-tensor coefficients on the
  device, the step's one host transfer (the total norm with the per-tensor summary riding along), one fused
  ``_foreach_mul_`` with a coefficient per tensor only when a tensor needs clipping, and the statistics'
  update on the device. Their statistics are restored (untimed) before each call, like the gradients,
  so each call decides the same: thresholds below every tensor's norm (clip) or far above (no clip).
* ``clip_grad_norm_``: ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` (always multiplies).
* ``ZClip.step``: zclip 1.0.0 (a per-parameter ``.norm()`` loop, then a per-parameter ``mul_`` loop).
* ``QuantileClip.step``: autoclip 0.2.1 ``global_threshold=True`` (``clip_grad_norm_`` + ``torch.quantile``).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_clip import functional
from lightning_clip.functional.per_tensor import (
    AdaGCRule,
    MeanPerTensorRule,
    PerTensorRule,
    PerTensorScaler,
)
from lightning_clip.functional.thresholds import MeanThreshold

SHAPES = {"8 x 1.25M": (8, 1_250_000), "400 x 25k": (400, 25_000), "2000 x 500": (2000, 500)}


def make_params(count: int, size: int) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = []
    for _ in range(count):
        p = nn.Parameter(torch.empty(size))
        p.grad = torch.randn(size, generator=g) / math.sqrt(count * size)  # total norm ≈ 1
        params.append(p)
    return params


class _Holder(nn.Module):
    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.ps = nn.ParameterList(params)


def primed_rule(rule: PerTensorRule, grads: list[torch.Tensor], clip: bool) -> Callable[[], None]:
    """Put ``rule`` past its warm-up with thresholds below (``clip``) or far above each tensor's norm;
    returns the (untimed) restore of that state."""
    _, per_tensor = functional.grad_norms(grads)
    target = per_tensor * (0.5 if clip else 10.0)  # the thresholds wanted
    # adagc: threshold = factor · γ; mean: factor · EMA / (1 − decay^k), with k large
    stat = target / float(getattr(rule, "factor"))  # noqa: B009
    count = torch.full_like(stat, 1000.0)
    saved = torch.stack([stat, count])
    rule.steps = 1000

    def restore() -> None:
        rule.stats = saved.clone()
        rule.steps = 1000
        rule.limits()  # as after a committed step, whose plan made the next step's limits

    restore()
    return restore


def per_tensor_step(rule: PerTensorRule, scaler: PerTensorScaler, grads: list[torch.Tensor]) -> object:
    """One step of a per-tensor mode, as the callback does it (see the module docstring)."""
    total, per_tensor = functional.grad_norms(grads)  # type: ignore[arg-type]
    plan = rule.plan(per_tensor, total)
    host = torch.cat([total.reshape(1), plan.summary]).tolist()  # the step's one transfer
    norm, clipped = host[0], host[1]
    if clipped > 0 and math.isfinite(norm):
        scaler.scale_(grads, plan.coefs)  # type: ignore[arg-type]
    rule.commit(plan, math.isfinite(norm), norm)
    return norm


def variants(
    params: list[nn.Parameter], clip: bool
) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], None]]]:
    """Build one callable per variant, and the untimed resets of the stateful ones; ``clip`` chooses
    thresholds below (clip) or above the norm (≈1)."""
    from autoclip.torch import QuantileClip
    from zclip import ZClip

    cap = 0.5 if clip else 10.0
    rule = MeanThreshold(factor=1.5, decay=0.97, warmup_steps=1, max_norm=cap)
    grads = [p.grad for p in params]

    coef = torch.tensor(0.5, dtype=torch.float32)

    def floor() -> object:
        norms = torch._foreach_norm(grads, 2.0)  # type: ignore[arg-type]
        if clip:
            torch._foreach_mul_(grads, coef)  # type: ignore[arg-type]
        return norms

    def norm_mul() -> object:
        norms = torch._foreach_norm(grads, 2.0)  # type: ignore[arg-type]
        torch._foreach_mul_(grads, coef)  # type: ignore[arg-type]
        return norms

    views = list(torch.full((len(grads),), 0.5).unbind())

    def gather_bound() -> object:
        norms = torch.stack(torch._foreach_norm(grads, 2.0))  # type: ignore[arg-type]
        torch._foreach_mul_(grads, views)  # type: ignore[arg-type]
        return norms

    def ours() -> object:
        total, _ = functional.grad_norms(grads)  # type: ignore[arg-type]
        norm = float(total.item())
        return functional.clip_grads_(grads, rule.step(norm), norm)  # type: ignore[arg-type]

    def torch_clip() -> object:
        return torch.nn.utils.clip_grad_norm_(params, cap)

    zclip = ZClip(warmup_steps=1, max_grad_norm=cap)
    holder = _Holder(params)

    def zclip_step() -> object:
        return zclip.step(holder)

    qclip = QuantileClip(params, quantile=0.1, history_length=1000, global_threshold=True)
    # Prime the history so the threshold is below (clip) or far above (no clip) the norm of ≈ 1.
    qclip.state["global_history"] = torch.full((1000,), 0.5 if clip else 1e6)

    def autoclip_step() -> object:
        qclip.state["global_history"] = torch.full((1000,), 0.5 if clip else 1e6)
        return qclip.step()

    adagc, mean_pt = AdaGCRule(warmup_steps=1), MeanPerTensorRule()
    scalers = (PerTensorScaler(), PerTensorScaler())
    resets = {
        "per-tensor adagc": primed_rule(adagc, grads, clip),  # type: ignore[arg-type]
        "per-tensor mean": primed_rule(mean_pt, grads, clip),  # type: ignore[arg-type]
    }
    return {
        "floor": floor,
        "norm+mul": norm_mul,
        "gather bound": gather_bound,
        "lightning-clip": ours,
        "per-tensor adagc": lambda: per_tensor_step(adagc, scalers[0], grads),  # type: ignore[arg-type]
        "per-tensor mean": lambda: per_tensor_step(mean_pt, scalers[1], grads),  # type: ignore[arg-type]
        "clip_grad_norm_": torch_clip,
        "ZClip.step": zclip_step,
        "QuantileClip.step": autoclip_step,
    }, resets


def bench(rounds: int, shapes: list[str] | None = None) -> list[tuple[str, str, dict[str, float]]]:
    rows = []
    for shape_name, (count, size) in SHAPES.items():
        if shapes and shape_name.split(" x ")[0] not in shapes:
            continue
        params = make_params(count, size)
        saved = [p.grad.clone() for p in params]  # type: ignore[union-attr]
        for clip in (True, False):
            fns, resets = variants(params, clip)
            names = list(fns)
            times: dict[str, list[float]] = {n: [] for n in names}
            for r in range(rounds + 3):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    for p, g in zip(params, saved, strict=True):
                        p.grad.copy_(g)  # type: ignore[union-attr]
                    if name in resets:
                        resets[name]()
                    start = time.perf_counter()
                    fns[name]()
                    elapsed = time.perf_counter() - start
                    if r >= 3:  # warm-up rounds are not counted
                        times[name].append(elapsed)
            rows.append(
                (
                    shape_name,
                    "clip needed" if clip else "no clip needed",
                    {n: statistics.median(t) for n, t in times.items()},
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", nargs="*", help="tensor counts to run (8, 400, 2000); default all")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# clip_step: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), median of {args.rounds} alternating rounds"
    )
    rows = bench(args.rounds, args.shapes)
    header = f"| shape | case | {' | '.join(rows[0][2])} |"
    print(header)
    print("|" + "---|" * (2 + len(rows[0][2])))
    for shape, case, med in rows:
        base = med["floor"]
        cells = [f"{med[n] * 1e3:.3f} ms ({med[n] / base:.2f}×)" for n in med]
        print(f"| {shape} | {case} | {' | '.join(cells)} |")
    modes = ("gather bound", "per-tensor adagc", "per-tensor mean")
    print("\nThe per-tensor modes against issue 20's floor (`norm+mul`; bar ≤ 1.2× at every shape):\n")
    print(f"| shape | case | {' | '.join(modes)} |")
    print("|---|---|---|---|---|")
    for shape, case, med in rows:
        base = med["norm+mul"]
        print(f"| {shape} | {case} | {' | '.join(f'{med[n] / base:.2f}×' for n in modes)} |")


if __name__ == "__main__":
    main()

"""The clipping step alone, on identical gradients: lightning-clip vs torch vs ZClip vs AutoClip.

Each round restores the same gradients (untimed), then times one call of each variant, in an order that
rotates every round; the table shows the median time per call and its ratio to the **floor**: the least
any norm-clipping step can do on these gradients, one bare fused norm pass (``torch._foreach_norm``), plus
one fused multiply (``torch._foreach_mul_``) when clipping is needed.
Run: ``python benchmarks/clip_step.py [--rounds N] [--threads T]``.

Variants (each measures the total norm, updates its statistics if it has any, and clips in place):

* ``floor``: the bare fused passes above, no statistics, no host transfer.

* ``lightning-clip``: what ``AdaptiveGradientClipping`` does per step — one fused ``_foreach_norm`` pass,
  one host transfer, the ``mean`` rule, and a fused ``_foreach_mul_`` only when clipping is needed.
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


def variants(params: list[nn.Parameter], clip: bool) -> dict[str, Callable[[], object]]:
    """Build one callable per variant; ``clip`` chooses thresholds below (clip) or above the norm (≈1)."""
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

    return {
        "floor": floor,
        "lightning-clip": ours,
        "clip_grad_norm_": torch_clip,
        "ZClip.step": zclip_step,
        "QuantileClip.step": autoclip_step,
    }


def bench(rounds: int) -> list[tuple[str, str, dict[str, float]]]:
    rows = []
    for shape_name, (count, size) in SHAPES.items():
        params = make_params(count, size)
        saved = [p.grad.clone() for p in params]  # type: ignore[union-attr]
        for clip in (True, False):
            fns = variants(params, clip)
            names = list(fns)
            times: dict[str, list[float]] = {n: [] for n in names}
            for r in range(rounds + 3):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    for p, g in zip(params, saved, strict=True):
                        p.grad.copy_(g)  # type: ignore[union-attr]
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# clip_step: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), median of {args.rounds} alternating rounds"
    )
    rows = bench(args.rounds)
    header = f"| shape | case | {' | '.join(rows[0][2])} |"
    print(header)
    print("|" + "---|" * (2 + len(rows[0][2])))
    for shape, case, med in rows:
        base = med["floor"]
        cells = [f"{med[n] * 1e3:.3f} ms ({med[n] / base:.2f}×)" for n in med]
        print(f"| {shape} | {case} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()

"""Cost of lightning-clip's gradient measurement as the model grows, against the floor.

The floor is one read of the same number of gradient values held in a single contiguous tensor
(``torch.linalg.vector_norm`` of one flat buffer): no per-tensor overhead, pure memory traffic. The
measurement is what every lightning-clip callback shares per step (``functional.grad_norms``: total and
per-tensor norms in one fused pass) plus the single host transfer. ``clip_grad_norm_``'s measurement
(``get_total_norm``) is shown for reference. Variants are alternated; medians of many rounds.

Run: ``python benchmarks/scaling.py [--rounds N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time
from collections.abc import Callable

import torch

from lightning_clip import functional

SIZES = [  # (total parameters, number of tensors)
    (1_000_000, 10),
    (10_000_000, 10),
    (100_000_000, 10),
    (10_000_000, 100),
    (10_000_000, 1000),
    (10_000_000, 5000),
    (1_000_000, 5000),
]


def _floor(flat: torch.Tensor) -> float:
    return torch.linalg.vector_norm(flat).item()


def _ours(grads: list[torch.Tensor]) -> float:
    return functional.grad_norms(grads)[0].item()


def _torch_total(grads: list[torch.Tensor]) -> float:
    return torch.nn.utils.get_total_norm(grads).item()


def median_time(fn: Callable[[], object], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# scaling: torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), median of {args.rounds}"
    )
    print(
        "| parameters | tensors | floor (one read) | lightning-clip measure | ratio to floor | get_total_norm | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for total, count in SIZES:
        flat = torch.randn(total)
        grads = list(flat.split([total // count] * count))
        grads = [g.clone() for g in grads]

        fns: dict[str, Callable[[], object]] = {
            "floor": functools.partial(_floor, flat),
            "ours": functools.partial(_ours, grads),
            "torch": functools.partial(_torch_total, grads),
        }
        res: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(3):  # alternate blocks of rounds
            for k in list(fns)[r % 3 :] + list(fns)[: r % 3]:
                res[k].append(median_time(fns[k], max(3, args.rounds // 3)))
        med = {k: statistics.median(v) for k, v in res.items()}
        print(
            f"| {total / 1e6:.0f}M | {count} | {med['floor'] * 1e3:.2f} ms | {med['ours'] * 1e3:.2f} ms | "
            f"{med['ours'] / med['floor']:.2f}× | {med['torch'] * 1e3:.2f} ms | {med['torch'] / med['floor']:.2f}× |"
        )


if __name__ == "__main__":
    main()

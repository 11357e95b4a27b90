"""Run a function on 2 ranks in forked processes, torchrun-style (``MASTER_ADDR``, ``MASTER_PORT``,
``WORLD_SIZE``, ``LOCAL_RANK`` set), so a Lightning strategy that only launches through the command line
(``ModelParallelStrategy``) runs inside pytest without re-launching it. Results come back through a queue."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(
    rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...], queue: Any
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    try:
        buffer = io.BytesIO()  # bytes, not tensors: torch would share them through file descriptors
        torch.save(fn(rank, *args), buffer)
        queue.put((rank, None, buffer.getvalue()))
    except BaseException:
        queue.put((rank, traceback.format_exc(), None))


def run_ranks(fn: Callable[..., Any], *args: Any, world: int = 2, timeout: float = 240.0) -> list[Any]:
    """``[fn(0, *args), fn(1, *args), ...]``, each computed in its own forked process."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in procs:
            rank, error, value = queue.get(timeout=timeout)
            if error is not None:
                errors.append(f"rank {rank}:\n{error}")
            if value is not None:
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("a rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]

"""``ExplosionGuard(action="skip")`` is exact: a run with a transient gradient fault at step ``k`` ends with
the same weights and optimizer state, bit for bit, as a run where that step's update was simply not
applied. The reference run has no lightning-clip code: its own callback sets the gradients to None at
step ``k`` (the way LIGHTNING_FACTS.md verified a clean skip).

Extends ``tests/callbacks/test_explosion_guard.py::test_action_fault_matrix`` (fp32, Adam, one fault) to
other models, optimizers, bf16-mixed, gradient accumulation, Inf and NaN, partial faults and consecutive
steps. A rollback restoring the saved state bit-exactly is covered by
``tests/integration/test_rollback_exact.py`` (snapshot under fp16 with Adam, scheduler and GradScaler;
checkpoint files in fp32 and bf16; corrupted newest file) and not repeated here.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from lightning_clip.testing import FaultInjector
from tests.models import DropUpdate
from tests.reliability.scenarios import FIRST_LAYER, ScenarioModel, make_data


def fit(tmp_path: Any, arch: str, optimizer: str, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    model = ScenarioModel(arch, optimizer, lr=0.05, scheduler="step")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=8,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(model, DataLoader(make_data(arch, n=48), batch_size=4))
    return trainer


def state(trainer: pl.Trainer) -> dict[str, Any]:
    return {
        "model": trainer.lightning_module.state_dict(),
        "optimizer": trainer.optimizers[0].state_dict()["state"],
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
    }


CASES = [
    # arch, optimizer, precision, accumulate, fault steps, value, partial (first layer only)
    ("mlp", "sgd", "32-true", 1, [0], float("nan"), False),
    ("mlp", "adamw", "bf16-mixed", 2, [3], float("inf"), True),
    ("gru", "adam", "32-true", 1, [2, 3], float("-inf"), False),
    ("gru", "sgd", "bf16-mixed", 1, [5], float("nan"), True),
    ("cnn", "adamw", "32-true", 3, [1], float("inf"), False),
    ("cnn", "adam", "bf16-mixed", 1, [4, 5, 6], float("nan"), False),
]


@pytest.mark.parametrize(("arch", "optimizer", "precision", "accumulate", "steps", "value", "partial"), CASES)
def test_skip_equals_not_applying_the_update(
    tmp_path: Any,
    arch: str,
    optimizer: str,
    precision: str,
    accumulate: int,
    steps: list[int],
    value: float,
    partial: bool,
) -> None:
    kw = {"precision": precision, "accumulate_grad_batches": accumulate}
    guard = ExplosionGuard(action="skip")
    faults = FaultInjector(
        target="grad", value=value, steps=steps, param_pattern=FIRST_LAYER[arch] if partial else None
    )
    skipped = fit(tmp_path / "guard", arch, optimizer, [guard, faults], **kw)
    assert [r["step"] for r in guard.records] == steps
    assert guard.skipped_steps == len(steps) and guard.rollbacks == 0

    reference = fit(tmp_path / "ref", arch, optimizer, [DropUpdate(steps)], **kw)
    plain = fit(tmp_path / "plain", arch, optimizer, [], **kw)

    a, b = state(skipped), state(reference)
    assert a["lr"] == b["lr"]
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), name
    for i, per_param in a["optimizer"].items():
        for key, v in per_param.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"][i][key])), (i, key)
    # the test can fail: applying the updates ends elsewhere
    assert any(not torch.equal(w, plain.lightning_module.state_dict()[n]) for n, w in a["model"].items())

"""ExplosionGuard: argument validation (one test per message), state_key, state_dict round trip, setup."""

from __future__ import annotations

import re

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from tests.models import RegressionModel, make_trainer, regression_loader


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        (
            {"action": "rewind"},
            ValueError,
            "`action` must be one of 'rollback' | 'skip' | 'raise', got 'rewind'.",
        ),
        ({"spike_factor": "2"}, TypeError, "`spike_factor` must be a real number > 1 or None, got '2'."),
        ({"spike_factor": 1.0}, ValueError, "`spike_factor` must be a number > 1, got 1.0."),
        ({"spike_factor": float("nan")}, ValueError, "`spike_factor` must be a finite number > 1, got nan."),
        (
            {"snapshot_every_n_steps": 2.5},
            TypeError,
            "`snapshot_every_n_steps` must be an integer >= 0, got 2.5.",
        ),
        (
            {"snapshot_every_n_steps": -1},
            ValueError,
            "`snapshot_every_n_steps` must be an integer >= 0, got -1.",
        ),
        ({"max_rollbacks": True}, TypeError, "`max_rollbacks` must be an integer >= 0, got True."),
        ({"max_rollbacks": -2}, ValueError, "`max_rollbacks` must be an integer >= 0, got -2."),
        ({"detect_divergence": "no"}, TypeError, "`detect_divergence` must be True or False, got 'no'."),
        ({"skip_batches": None}, TypeError, "`skip_batches` must be an integer >= 0, got None."),
        ({"skip_batches": -1}, ValueError, "`skip_batches` must be an integer >= 0, got -1."),
        ({"lr_factor": "half"}, TypeError, "`lr_factor` must be a real number in (0, 1], got 'half'."),
        ({"lr_factor": 0.0}, ValueError, "`lr_factor` must be a number in (0, 1], got 0.0."),
        ({"lr_factor": 1.5}, ValueError, "`lr_factor` must be a number in (0, 1], got 1.5."),
        ({"lr_factor": float("inf")}, ValueError, "`lr_factor` must be a finite number in (0, 1], got inf."),
        (
            {"schedulers_after_rollback": "rewind"},
            ValueError,
            "`schedulers_after_rollback` must be one of 'fast_forward' | 'restore', got 'rewind'.",
        ),
        (
            {"schedulers_after_rollback": None},
            TypeError,
            "`schedulers_after_rollback` must be one of 'fast_forward' | 'restore', got None.",
        ),
    ],
)
def test_argument_errors(kwargs: dict, exc: type, message: str) -> None:
    with pytest.raises(exc, match=f"^{re.escape(message)}$"):
        ExplosionGuard(**kwargs)


def test_valid_arguments_are_kept() -> None:
    g = ExplosionGuard(
        action="skip", spike_factor=4, snapshot_every_n_steps=0, max_rollbacks=0, skip_batches=3, lr_factor=1
    )
    assert (
        g.action,
        g.spike_factor,
        g.snapshot_every_n_steps,
        g.max_rollbacks,
        g.skip_batches,
        g.lr_factor,
    ) == (
        "skip",
        4.0,
        0,
        0,
        3,
        1.0,
    )


def test_state_key_is_pinned() -> None:
    assert ExplosionGuard().state_key == "ExplosionGuard{'action': 'rollback', 'spike_factor': None}"
    assert ExplosionGuard(action="skip", spike_factor=3.0).state_key == (
        "ExplosionGuard{'action': 'skip', 'spike_factor': 3.0}"
    )
    # the other arguments may change on resume without losing the counters
    assert ExplosionGuard(max_rollbacks=1, lr_factor=0.5).state_key == ExplosionGuard().state_key


def test_state_dict_round_trip() -> None:
    g = ExplosionGuard(spike_factor=3.0)
    for n in (1.0, 2.0, 1.5, 1.2):
        g._spike.step(n)  # type: ignore[union-attr]
    g.events, g.rollbacks, g.skipped_steps, g.lr_scale = 4, 2, 7, 0.25
    g._skip_remaining, g._overflow_streak = 1, 3
    state = g.state_dict()
    assert all(isinstance(v, (int, float, str, dict, type(None))) for v in state.values())
    g._run_id = "a" * 32
    state = g.state_dict()
    h = ExplosionGuard(spike_factor=3.0)
    h.load_state_dict(state)
    assert h.state_dict() == state
    assert (h.events, h.rollbacks, h.skipped_steps, h.lr_scale, h.run_id) == (4, 2, 7, 0.25, "a" * 32)
    assert h._spike.current() == g._spike.current()  # type: ignore[union-attr]
    # older / partial states load with defaults
    k = ExplosionGuard()
    k.load_state_dict({"rollbacks": 1})
    assert (k.events, k.rollbacks, k.skipped_steps, k.lr_scale) == (0, 1, 0, 1.0)


def test_state_dict_survives_torch_load_weights_only(tmp_path) -> None:
    g = ExplosionGuard(spike_factor=2.0)
    g._spike.step(1.0)  # type: ignore[union-attr]
    g.rollbacks = 3
    torch.save(g.state_dict(), tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True) == g.state_dict()


def test_snapshot_zero_without_model_checkpoint_is_an_error_at_setup(tmp_path) -> None:
    trainer = make_trainer(tmp_path, callbacks=[ExplosionGuard(snapshot_every_n_steps=0)], max_steps=2)
    with pytest.raises(ValueError, match=r"snapshot_every_n_steps=0\) rolls back to checkpoint files only"):
        trainer.fit(RegressionModel(), regression_loader())


def test_snapshot_zero_with_model_checkpoint_is_accepted(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1)
    trainer = make_trainer(
        tmp_path,
        callbacks=[ExplosionGuard(snapshot_every_n_steps=0), ckpt],
        max_steps=2,
        enable_checkpointing=True,
    )
    trainer.fit(RegressionModel(), regression_loader())
    assert trainer.global_step == 2

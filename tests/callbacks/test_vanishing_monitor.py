"""VanishingGradientMonitor with real Trainers: arguments, state, resume, checks only on check steps, logged
figures against naive references, the no-gradient warning, the figure, several optimizers."""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip.callbacks.vanishing_monitor import VanishingGradientMonitor
from lightning_clip.exceptions import VanishingGradientWarning
from tests.models import RegressionModel, make_trainer, regression_loader

# ------------------------------------------------------------------------------------------ arguments
BAD_ARGS = [
    ("check_every_n_steps", 0, ValueError, "`check_every_n_steps` must be an integer >= 1, got 0."),
    ("check_every_n_steps", 2.0, TypeError, "`check_every_n_steps` must be an integer >= 1, got 2.0."),
    ("patience", 0, ValueError, "`patience` must be an integer >= 1, got 0."),
    ("patience", True, TypeError, "`patience` must be an integer >= 1, got True."),
    ("depth_threshold", 0.0, ValueError, "`depth_threshold` must be a number in (0, 1), got 0.0."),
    ("depth_threshold", 1, ValueError, "`depth_threshold` must be a number in (0, 1), got 1."),
    (
        "depth_threshold",
        "1e-5",
        TypeError,
        "`depth_threshold` must be a real number in (0, 1), got '1e-5'.",
    ),
    (
        "depth_threshold",
        math.nan,
        ValueError,
        "`depth_threshold` must be a finite number in (0, 1), got nan.",
    ),
    ("time_threshold", -1e-4, ValueError, "`time_threshold` must be a number in (0, 1), got -0.0001."),
    ("time_threshold", None, TypeError, "`time_threshold` must be a real number in (0, 1), got None."),
    ("log_layer_metrics", 1, TypeError, "`log_layer_metrics` must be True or False, got 1."),
    ("save_figure", "yes", TypeError, "`save_figure` must be True or False, got 'yes'."),
    ("measure_causes", None, TypeError, "`measure_causes` must be True or False, got None."),
]


@pytest.mark.parametrize("name,value,error,message", BAD_ARGS, ids=[f"{a}={b!r}" for a, b, _, _ in BAD_ARGS])
def test_argument_validation(name: str, value: Any, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        VanishingGradientMonitor(**{name: value})
    assert str(info.value) == message


def test_state_key_is_pinned() -> None:
    assert VanishingGradientMonitor().state_key == (
        "VanishingGradientMonitor{'check_every_n_steps': 25, 'patience': 3, 'depth_threshold': 1e-05,"
        " 'time_threshold': 0.0001}"
    )
    assert VanishingGradientMonitor(log_layer_metrics=True).state_key == VanishingGradientMonitor().state_key


# ------------------------------------------------------------------------------------------ models
class WithUnused(RegressionModel):
    """A regression MLP plus a trainable layer the forward pass never uses and a frozen unused one."""

    def __init__(self) -> None:
        super().__init__(optimizer="adam", lr=1e-2)
        self.unused = nn.Linear(3, 3)
        self.frozen = nn.Linear(3, 3).requires_grad_(False)


class TinyRNN(pl.LightningModule):
    """A tanh RNN over 20 steps, loss on the last output; records naive per-layer figures, the weights and
    the batch before each optimizer step (the LightningModule hook runs after every callback's, before
    the update)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, 4, batch_first=True)
        self.head = nn.Linear(4, 1)
        self.seen: dict[int, dict[str, Any]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        rec = self.seen.setdefault(self.global_step, {"batches": []})
        rec["batches"].append((x.clone(), y.clone()))
        rec["batch"] = rec["batches"][-1]
        return nn.functional.mse_loss(self(x), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        rec = self.seen[self.global_step]
        for name, mod in (("rnn", self.rnn), ("head", self.head)):
            ps = list(mod.parameters(recurse=False))
            rec[name] = (
                math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ps)),
                math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in ps)),
            )
        rec["radius"] = float(
            np.abs(np.linalg.eigvals(self.rnn.weight_hh_l0.detach().double().numpy())).max()
        )
        rec["weights"] = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def input_grad(self, step: int, micro_batch: int = -1) -> torch.Tensor:
        """Reference ∂L/∂x of step ``step``: a fresh copy of the model (no hooks) with that step's weights."""
        copy = type(self)()
        copy.load_state_dict(self.seen[step]["weights"])
        x, y = self.seen[step]["batches"][micro_batch]
        x = x.double().requires_grad_(True)
        copy.double()
        (gx,) = torch.autograd.grad(nn.functional.mse_loss(copy(x), y.double()), x)
        return gx

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def seq_loader(n: int = 32, seq_len: int = 20) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, seq_len, 2, generator=g)
    return DataLoader(TensorDataset(x, x[:, :3, 0].mean(1, keepdim=True)), batch_size=8)


# ------------------------------------------------------------------------------------------ behaviour
def test_healthy_model_is_silent_and_checks_only_on_check_steps(tmp_path: Any) -> None:
    calls: list[int] = []

    class Counting(VanishingGradientMonitor):
        def check(self, params: Any, per_param: Any, trainable: Any, step: int, **kw: Any) -> dict[str, Any]:
            calls.append(step)
            return super().check(params, per_param, trainable, step, **kw)

    monitor = Counting(check_every_n_steps=3, save_figure=False)
    make_trainer(tmp_path, max_steps=10, callbacks=[monitor]).fit(RegressionModel(), regression_loader())
    assert calls == [0, 3, 6, 9]
    assert monitor.steps == {0: 10}
    assert [h["step"] for h in monitor.history] == [0, 3, 6, 9]


def test_input_of_recurrent_module_is_tapped_on_check_steps_only(tmp_path: Any) -> None:
    model = TinyRNN()
    tapped: list[tuple[int, bool]] = []
    # a forward hook sees the input as the module received it, after the monitor's pre-hook
    model.rnn.register_forward_hook(
        lambda m, args, out: tapped.append((model.global_step, args[0].requires_grad))
    )
    monitor = VanishingGradientMonitor(check_every_n_steps=2, patience=5, save_figure=False)
    make_trainer(tmp_path, max_steps=5, callbacks=[monitor]).fit(model, seq_loader())
    assert tapped == [(0, True), (1, False), (2, True), (3, False), (4, True)]
    assert monitor._handles == []  # hooks removed at the end of fit
    model.rnn(torch.randn(1, 3, 2))  # and the module works without them
    assert len(tapped) == 6 and tapped[-1][1] is False


def test_logged_layer_metrics_match_naive_references(tmp_path: Any) -> None:
    model = TinyRNN()
    monitor = VanishingGradientMonitor(
        check_every_n_steps=2, patience=5, log_layer_metrics=True, save_figure=False
    )
    trainer = make_trainer(tmp_path, max_steps=5, callbacks=[monitor])
    trainer.fit(model, seq_loader())
    got = {k: float(v) for k, v in trainer.callback_metrics.items()}
    ref = model.seen[4]  # the last check step
    top = max(ref["rnn"][0], ref["head"][0])
    for name in ("rnn", "head"):
        grad, weight = ref[name]
        assert got[f"grad_health/{name}/norm"] == pytest.approx(grad, rel=1e-5)
        assert got[f"grad_health/{name}/ratio"] == pytest.approx(grad / weight, rel=1e-5)
        assert got[f"grad_health/{name}/depth_ratio"] == pytest.approx(grad / top, rel=1e-5)
    assert got["grad_health/rnn/spectral_radius/l0"] == pytest.approx(ref["radius"], rel=1e-5)
    per_t = model.input_grad(4).pow(2).sum(dim=(0, 2)).sqrt().tolist()
    expected_decay = (sum(per_t[:2]) / 2) / (sum(per_t[-2:]) / 2)  # 10% of 20 steps at each end
    assert got["grad_health/rnn/time_decay"] == pytest.approx(expected_decay, rel=1e-4)
    assert monitor.last["time_decay"]["rnn"][1:] == (2, 20)


def test_unused_trainable_parameters_get_their_own_warning_frozen_never(tmp_path: Any) -> None:
    monitor = VanishingGradientMonitor(check_every_n_steps=2, patience=2, save_figure=False)
    with pytest.warns(VanishingGradientWarning) as record:
        make_trainer(tmp_path, max_steps=12, callbacks=[monitor]).fit(WithUnused(), regression_loader())
    messages = [str(w.message) for w in record if w.category is VanishingGradientWarning]
    assert len(messages) == 1  # once per episode, although every later check is flagged too
    msg = messages[0]
    assert msg.startswith(
        "Trainable parameters got no gradient on any step up to step 2 since the check before, 2 checks in a"
        " row: `unused` (weight, bias)."
    )
    assert "frozen" not in msg.replace("freeze them", "")
    assert monitor.last["no_grad"] == {"unused": ["weight", "bias"]}


def test_non_finite_gradients_do_not_count(tmp_path: Any) -> None:
    model = RegressionModel()
    monitor = VanishingGradientMonitor(patience=1, save_figure=False)
    monitor.on_fit_start(None, model)  # type: ignore[arg-type]  # only the module is read
    params = list(model.parameters())
    per_param = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    assert monitor.check(params, per_param, params, step=0) == {}
    assert monitor.tracker.counts == {} and monitor.history == []


def test_depth_decision_driven_directly() -> None:
    """The decision on given norms (no training): a layer below 1e-5 × the largest, three checks in a row."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 2), nn.Linear(2, 1))
    monitor = VanishingGradientMonitor(save_figure=False)
    monitor.on_fit_start(None, model)  # type: ignore[arg-type]
    params = list(model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    # per-tensor norms (weight, bias) of layers `0`, `2`, `3`: layer norms 2e-6, 1, 0.5
    per_param = torch.tensor([2e-6, 0.0, 1.0, 0.0, 0.5, 0.0])
    figures = [monitor.check(params, per_param, params, step=s) for s in (0, 25)]
    assert [f["warned"] for f in figures] == [[], []]
    assert figures[0]["depth_ratios"] == pytest.approx([2e-6, 1.0, 0.5])
    with pytest.warns(
        VanishingGradientWarning, match=r"at step 50: 1 of 3 layers get less than 1e-05"
    ) as rec:
        figures.append(monitor.check(params, per_param, params, step=50))
    assert figures[-1]["warned"] == ["depth:0"]
    assert "  0  grad norm 2.00e-06  ×2.00e-06 of the largest" in str(rec[0].message)
    assert "(`0` / `3`): 4.00e-06." in str(rec[0].message)


def test_depth_message_counts_and_wording_driven_directly() -> None:
    """Each count of a message against the monitor's own figures: a layer flagged for the first time is
    not yet due (never "already reported"), one warned about before is "already reported", plurals agree."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 2), nn.Linear(2, 1))
    monitor = VanishingGradientMonitor(save_figure=False, measure_causes=False)
    monitor.on_fit_start(None, model)  # type: ignore[arg-type]
    params = list(model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    quiet = torch.tensor([2e-6, 0.0, 1.0, 0.0, 1.0, 0.0])  # layer norms `0`, `2`, `3`: only `0` below 1e-5
    both = torch.tensor([2e-6, 0.0, 5e-6, 0.0, 1.0, 0.0])  # `0` and `2` below
    for step in (0, 25):
        monitor.check(params, quiet, params, step)
    with pytest.warns(VanishingGradientWarning) as rec:
        fig = monitor.check(params, both, params, 50)
    assert fig["warned"] == ["depth:0"]
    msg = str(rec[0].message)
    assert msg.startswith("Vanishing gradients through depth at step 50: 1 of 3 layers get less than 1e-05")
    assert "3 checks in a row (every 25 steps)" in msg
    assert "\n  (1 more layer below the threshold at this check, not yet 3 checks in a row: 2)\n" in msg
    assert "already reported" not in msg and "1 layers" not in msg
    assert monitor.check(params, both, params, 75)["warned"] == []
    with pytest.warns(VanishingGradientWarning) as rec:
        fig = monitor.check(params, both, params, 100)
    assert fig["warned"] == ["depth:2"]
    msg = str(rec[0].message)
    assert re.findall(r"^  (\S+)\s+grad norm", msg, flags=re.MULTILINE) == ["2"]
    assert "\n  (1 more layer below the threshold, already reported in this episode)\n" in msg
    assert "not yet" not in msg


def test_state_dict_round_trip(tmp_path: Any) -> None:
    monitor = VanishingGradientMonitor(check_every_n_steps=2, patience=5, save_figure=False)
    make_trainer(tmp_path, max_steps=7, callbacks=[monitor]).fit(WithUnused(), regression_loader())
    state = monitor.state_dict()
    path = tmp_path / "state.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    other = VanishingGradientMonitor(check_every_n_steps=2, patience=5)
    other.load_state_dict(loaded)
    assert other.state_dict() == state
    assert state["steps"] == {"0": 7}
    assert state["tracker"]["counts"] == {"nograd:unused": [4, 0, 0]}  # checks at steps 0, 2, 4, 6
    assert [h["step"] for h in state["history"]] == [0, 2, 4, 6]


def run_no_grad(
    tmp_path: Any, steps: int, ckpt: str | None = None, save: str | None = None
) -> tuple[Any, list[str]]:
    torch.manual_seed(0)
    monitor = VanishingGradientMonitor(check_every_n_steps=2, patience=3, save_figure=False)
    trainer = make_trainer(tmp_path, max_steps=steps, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", VanishingGradientWarning)
        trainer.fit(WithUnused(), regression_loader(), ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return monitor, [str(w.message) for w in record if w.category is VanishingGradientWarning]


def test_resume_continues_patience_and_step_counters(tmp_path: Any) -> None:
    ckpt = str(tmp_path / "half.ckpt")
    first, msgs = run_no_grad(tmp_path / "a", 4, save=ckpt)  # checks at 0, 2: two flagged, no warning
    assert msgs == [] and first.tracker.state_dict()["counts"] == {"nograd:unused": [2, 0, 0]}
    resumed, msgs = run_no_grad(tmp_path / "b", 10, ckpt=ckpt)
    straight, straight_msgs = run_no_grad(tmp_path / "c", 10)
    assert (
        len(msgs) == 1 and "up to step 4 since the check before, 3 checks in a row" in msgs[0]
    )  # the third check, after the resume
    assert msgs == straight_msgs
    for key in ("steps", "tracker", "recent_checks"):
        assert resumed.state_dict()[key] == straight.state_dict()[key]
    assert [h["step"] for h in resumed.history] == [h["step"] for h in straight.history] == [0, 2, 4, 6, 8]
    # the per-step series the blow-up detection reads span the resume: steps before it came from the checkpoint
    series = resumed.state_dict()["series"]
    assert [s for s, _ in series["losses"]] == [s for s, _ in straight.state_dict()["series"]["losses"]]
    assert [s for s, _ in series["losses"]] == list(range(9))  # brought to the host at the checks (last: 8)
    assert [s for s, _ in series["pending_losses"]] == [9]  # still a tensor: a checkpoint adds no transfer


def test_figure_saved_and_sent_to_tensorboard(tmp_path: Any) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    monitor = VanishingGradientMonitor(check_every_n_steps=2, patience=5)  # the RNN's decay is flagged
    make_trainer(tmp_path, max_steps=6, callbacks=[monitor], logger=logger).fit(TinyRNN(), seq_loader())
    png = os.path.join(logger.log_dir, "gradient_flow.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "grad_health/gradient_flow" in events.Tags()["images"]


def test_figure_without_logger_goes_to_a_folder_of_its_run(tmp_path: Any) -> None:
    for _ in range(2):
        make_trainer(tmp_path, max_steps=3, callbacks=[VanishingGradientMonitor()]).fit(
            RegressionModel(), regression_loader()
        )
    runs = tmp_path / "lightning_clip_logs"
    assert sorted(os.listdir(runs)) == ["version_0", "version_1"]
    assert all((runs / v / "gradient_flow.png").exists() for v in ("version_0", "version_1"))
    assert not (tmp_path / "gradient_flow.png").exists()
    make_trainer(tmp_path / "off", max_steps=3, callbacks=[VanishingGradientMonitor(save_figure=False)]).fit(
        RegressionModel(), regression_loader()
    )
    assert not (tmp_path / "off" / "gradient_flow.png").exists()


class TwoOptimizers(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_a, opt_b = self.optimizers()  # type: ignore[misc]
        for opt in (opt_a, opt_b):
            opt.zero_grad()
            self.manual_backward(nn.functional.mse_loss(self.b(torch.tanh(self.a(x))), y))
            opt.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.a.parameters(), lr=0.01), torch.optim.SGD(self.b.parameters(), lr=0.01)


def test_several_optimizers_are_checked_separately(tmp_path: Any) -> None:
    checked: list[tuple[int, list[str]]] = []

    class Recording(VanishingGradientMonitor):
        def check(self, params: Any, per_param: Any, trainable: Any, step: int, **kw: Any) -> dict[str, Any]:
            fig = super().check(params, per_param, trainable, step, **kw)
            checked.append((step, fig["layers"]))
            return fig

    monitor = Recording(check_every_n_steps=2, save_figure=False)
    make_trainer(tmp_path, max_steps=8, callbacks=[monitor]).fit(TwoOptimizers(), regression_loader())
    assert monitor.steps == {0: 4, 1: 4}  # 4 batches, each optimizer stepped once per batch
    assert checked == [(0, ["a"]), (1, ["b"]), (4, ["a"]), (5, ["b"])]


class PackedRNN(TinyRNN):
    """The same RNN fed a PackedSequence of variable lengths."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = torch.tensor([20 - (i % 3) for i in range(x.shape[0])])
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)
        return self.head(h[-1])


def test_gradient_accumulation_and_packed_sequences(tmp_path: Any) -> None:
    model = PackedRNN()
    tapped: list[tuple[int, bool]] = []
    model.rnn.register_forward_hook(
        lambda m, args, out: tapped.append((model.global_step, args[0].data.requires_grad))
    )
    monitor = VanishingGradientMonitor(
        check_every_n_steps=2, patience=5, log_layer_metrics=True, save_figure=False
    )
    make_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[monitor]).fit(
        model, seq_loader()
    )
    # 3 optimizer steps of 2 micro-batches each; checks at optimizer steps 0 and 2, both micro-batches tapped
    assert tapped == [(0, True), (0, True), (1, False), (1, False), (2, True), (2, True)]
    assert [h["step"] for h in monitor.history] == [0, 2]
    # reference: ‖∂L/∂x_t‖² summed over both micro-batches (padding gets no gradient), then 10% at each end
    sq = sum(model.input_grad(2, i).pow(2).sum(dim=(0, 2)) for i in range(2))
    per_t = sq.sqrt().tolist()
    decay, k, steps = monitor.last["time_decay"]["rnn"]
    assert (k, steps) == (2, 20)
    assert decay == pytest.approx((per_t[0] + per_t[1]) / (per_t[-2] + per_t[-1]), rel=1e-4)

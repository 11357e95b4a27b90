"""lightning_clip.functional.health and report.plot_gradient_flow, without Lightning, against naive references."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_clip.functional import health
from lightning_clip.report import plot_gradient_flow


class Composite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # owned by the root
        self.emb = nn.Embedding(5, 3)
        self.block = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.LayerNorm(3))
        self.head = nn.Linear(3, 5)
        self.head.weight = self.emb.weight  # tied: belongs to `emb`, registered first


def test_model_layers_registration_order_and_owners() -> None:
    model = Composite()
    layers = health.model_layers(model)
    assert [n for n, _ in layers] == ["<root>", "emb", "block.0", "block.2", "head"]
    index = health.param_layer_index(layers)
    assert index[id(model.emb.weight)] == 1  # the tied weight: first owner
    assert index[id(model.head.bias)] == 4
    assert index[id(model.scale)] == 0
    assert len(index) == len(list(model.parameters()))  # every parameter mapped (parameters() dedups ties)


def test_depth_ratios_by_hand() -> None:
    assert health.depth_ratios([1.0, 4.0, 2.0]) == [0.25, 1.0, 0.5]
    assert health.depth_ratios([]) == []
    assert all(math.isnan(r) for r in health.depth_ratios([0.0, 0.0]))
    assert all(math.isnan(r) for r in health.depth_ratios([1.0, float("inf")]))
    assert all(math.isnan(r) for r in health.depth_ratios([1.0, float("nan")]))


def naive_profile(grad: torch.Tensor, time_dim: int) -> list[float]:
    g = grad.double()
    return [float(g.select(time_dim, t).pow(2).sum()) for t in range(g.shape[time_dim])]


@pytest.mark.parametrize("batch_first", [False, True])
def test_time_profile_matches_naive_loop(batch_first: bool) -> None:
    g = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(1))
    got = health.time_profile(g, batch_first=batch_first).tolist()
    assert got == pytest.approx(naive_profile(g, 1 if batch_first else 0), rel=1e-6)
    unbatched = g[:, 0]
    assert health.time_profile(unbatched).tolist() == pytest.approx(naive_profile(unbatched, 0), rel=1e-6)


def test_time_profile_of_packed_sequence_matches_padded() -> None:
    gen = torch.Generator().manual_seed(2)
    padded = torch.randn(5, 3, 2, generator=gen)  # T=5, B=3
    lengths = torch.tensor([5, 3, 2])
    for b, n in enumerate(lengths.tolist()):
        padded[n:, b] = 0.0  # what lies beyond a sequence's end is not part of it
    packed = pack_padded_sequence(padded, lengths)
    got = health.time_profile(packed.data, batch_sizes=packed.batch_sizes).tolist()
    unpacked, _ = pad_packed_sequence(packed)
    assert got == pytest.approx(naive_profile(unpacked, 0), rel=1e-6)


def test_time_profile_of_a_real_rnn_input_gradient() -> None:
    """‖∂L/∂x_t‖² against autograd.grad of the loss w.r.t. each time step's input, one step at a time."""
    torch.manual_seed(0)
    rnn = nn.RNN(2, 4, batch_first=True)
    x = torch.randn(3, 7, 2, requires_grad=True)
    loss = rnn(x)[0][:, -1].sum()
    (gx,) = torch.autograd.grad(loss, x)
    expected = []
    for t in range(7):
        xt = x.detach().clone().requires_grad_(True)
        (gt,) = torch.autograd.grad(rnn(xt)[0][:, -1].sum(), xt)
        expected.append(float(gt[:, t].double().pow(2).sum()))
    assert health.time_profile(gx, batch_first=True).tolist() == pytest.approx(expected, rel=1e-5)


def test_time_decay_by_hand() -> None:
    norms = [0.5 ** (19 - t) for t in range(20)]  # ‖∂L/∂x_t‖
    decay, k = health.time_decay([n * n for n in norms])
    assert k == 2
    assert decay == pytest.approx(((norms[0] + norms[1]) / 2) / ((norms[18] + norms[19]) / 2), rel=1e-12)
    assert health.time_decay([1.0])[0] != health.time_decay([1.0])[0]  # NaN: one step has no history
    assert math.isnan(health.time_decay([1.0, 0.0])[0])  # nothing reaches the latest step
    assert health.time_decay([4.0, 1.0], fraction=0.5) == (2.0, 1)


def test_recurrent_blocks_names_and_shapes() -> None:
    assert [n for n, _ in health.recurrent_blocks(nn.RNN(2, 3, num_layers=2))] == ["l0", "l1"]
    lstm = nn.LSTM(2, 3, bidirectional=True)
    names = [n for n, _ in health.recurrent_blocks(lstm)]
    assert names == [f"l0{d}.{g}" for d in ("", "_reverse") for g in "ifgo"]
    proj = nn.LSTM(2, 6, proj_size=2)
    blocks = health.recurrent_blocks(proj)
    assert all(w.shape == (6, 6) for _, w in blocks)
    expected = proj.weight_hh_l0[6:12] @ proj.weight_hr_l0  # forget-gate block through the projection
    torch.testing.assert_close(blocks[1][1], expected.detach())


@pytest.mark.parametrize("cls,gates", [(nn.RNN, ["l0"]), (nn.GRU, ["l0.r", "l0.z", "l0.n"]), (nn.LSTM, None)])
def test_spectral_radii_per_gate_match_numpy(cls: Any, gates: list[str] | None) -> None:
    torch.manual_seed(0)
    mod = cls(3, 5)
    names, radii = health.spectral_radii(mod)
    gates = gates or [f"l0.{g}" for g in "ifgo"]
    assert names == gates
    w = mod.weight_hh_l0.detach().double().numpy()
    expected = [np.abs(np.linalg.eigvals(b)).max() for b in np.split(w, len(gates), axis=0)]
    assert radii.tolist() == pytest.approx(expected, rel=1e-5)


def test_thin_history_keeps_the_span() -> None:
    assert health.thin_history([1, 2, 3], 3) == [1, 2, 3]
    assert health.thin_history(list(range(6)), 4) == [0, 2, 4, 5]
    assert health.thin_history(list(range(7)), 4) == [0, 2, 4, 6]


def test_patience_tracker_episodes() -> None:
    t = health.PatienceTracker(patience=3)
    both = {"a", "b"}
    assert t.update({"a"}, both) == []
    assert t.update({"a"}, both) == []
    assert t.may_alert("a") and not t.may_alert("b")
    assert t.update({"a", "b"}, both) == ["a"]  # third flagged check in a row
    assert t.update({"a", "b"}, both) == []  # once per episode
    assert t.update(set(), {"b"}) == []  # "a" not observed: its episode goes on
    assert t.flagged_count("a") == 4 and t.flagged_count("b") == 0
    assert t.update(set(), both) == [] and t.update(set(), both) == []
    assert t.alerted("a")  # two healthy checks are not a recovery yet
    assert t.update({"a"}, both) == []  # a relapse inside the episode: no new warning
    for _ in range(3):
        t.update(set(), both)
    assert not t.alerted("a")  # recovered: the episode is over
    assert [t.update({"a"}, both) for _ in range(3)] == [[], [], ["a"]]  # a new episode warns again


def test_patience_tracker_state_round_trip() -> None:
    t = health.PatienceTracker(patience=2)
    t.update({"x"}, {"x", "y"})
    state = t.state_dict()
    u = health.PatienceTracker(patience=2)
    u.load_state_dict(state)
    assert u.counts == t.counts
    assert u.update({"x"}, {"x"}) == ["x"] == t.update({"x"}, {"x"})
    torch.save(state, "/dev/null")  # plain values only


def test_plot_gradient_flow_writes_png(tmp_path: Any) -> None:

    history = [
        {"step": 0, "layers": [0, 1, 2], "norms": [0.0, 1e-9, 1.0]},
        {"step": 25, "layers": [0, 1, 2], "norms": [1e-12, 1e-6, 0.5]},
    ]
    path = tmp_path / "flow.png"
    fig = plot_gradient_flow(history, ["inp", "mid", "out"], path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["inp", "mid", "out"]
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 3]
    assert len(lines) == 2
    floor = 1e-13  # a tenth of the smallest positive norm: where the exact zero is drawn
    assert lines[0].get_ydata()[0] == pytest.approx(floor)

"""lightning_clip.functional.causes without Lightning, against naive references: autograd's own derivatives,
numpy counts, float64 loops written from the nn.LSTM / nn.GRU / nn.RNN equations, hand-built graphs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lightning_clip.functional import causes, gates, health


def sites_of(model: nn.Module, loss: torch.Tensor) -> list[tuple[str, str | None]]:
    layers = health.model_layers(model)
    found = causes.activation_sites(causes.graph_nodes(loss.grad_fn), health.param_layer_index(layers))
    return [(s.kind, layers[s.layer][0] if s.layer is not None else None) for s in found]


class Functional(nn.Module):
    """Activations called as functions in forward, and as modules, with norm layers in between."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.c = nn.Linear(8, 8)
        self.act = nn.LeakyReLU(0.2)
        self.d = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.a(x))
        h = torch.tanh(self.norm(self.b(h)))
        h = nn.functional.gelu(self.c(h))
        return self.d(self.act(h))


def test_activation_sites_functional_and_modules_with_their_feeding_layer() -> None:
    model = Functional()
    loss = model(torch.randn(5, 4)).sum()
    # an activation applied to another's output has no layer of its own (the search stops at activations)
    assert sites_of(model, loss) == [("sigmoid", "a"), ("tanh", "norm"), ("gelu", "c"), ("leaky_relu", None)]
    layers = health.model_layers(model)
    sites = causes.activation_sites(causes.graph_nodes(loss.grad_fn), health.param_layer_index(layers))
    assert sites[3].args == {"slope": pytest.approx(0.2)}


def test_transformer_relu_inside_the_module_and_relu6_recognised() -> None:
    enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    assert sites_of(enc, enc(torch.randn(2, 3, 8)).sum()) == [("relu", "linear1")]
    seq = nn.Sequential(nn.Linear(3, 3), nn.ReLU6(), nn.Linear(3, 1))
    assert sites_of(seq, seq(torch.randn(2, 3)).sum()) == [("relu6", "0")]


ACTIVATIONS = {
    "sigmoid": (torch.sigmoid, {}),
    "tanh": (torch.tanh, {}),
    "relu": (torch.relu, {}),
    "leaky_relu": (lambda x: nn.functional.leaky_relu(x, 0.1), {"slope": 0.1}),
    "hardtanh": (lambda x: nn.functional.hardtanh(x, -0.52, 0.73), {"min": -0.52, "max": 0.73}),
    "gelu": (nn.functional.gelu, {}),
    "silu": (nn.functional.silu, {}),
    "elu": (lambda x: nn.functional.elu(x, 0.7), {"alpha": 0.7, "scale": 1.0, "input_scale": 1.0}),
}


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
def test_derivative_matches_autograd(kind: str) -> None:
    fn, args = ACTIVATIONS[kind]
    x = torch.linspace(-6, 6, 241, dtype=torch.float64).requires_grad_(True)
    y = fn(x)
    (reference,) = torch.autograd.grad(y.sum(), x)
    saved = y if kind in ("sigmoid", "tanh", "relu") else x  # what autograd keeps for each kind
    d, top = causes.derivative(kind, saved.detach(), args)
    assert torch.allclose(d.double(), reference, atol=1e-5)
    assert top == pytest.approx(float(reference.abs().max()), rel=2e-3)  # the grid contains the maximum


def test_saved_tensor_is_the_one_autograd_kept() -> None:
    lin = nn.Linear(3, 4)
    x = torch.randn(6, 3)
    out = torch.sigmoid(lin(x))
    [site] = causes.activation_sites(
        causes.graph_nodes(out.sum().grad_fn), {id(lin.weight): 0, id(lin.bias): 0}
    )
    assert torch.equal(site.tensor, out.detach())


def test_site_figures_against_numpy_counts() -> None:
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 10, generator=g) * 3 - 1.0
    pre[:, 3] = -5.0  # unit 3 never active
    out = torch.relu(pre)
    d, top = causes.derivative("relu", out)
    elements, flat, units, dead, mean_d = causes.site_figures(d, top, dim=1).tolist()
    a = pre.numpy()
    assert (elements, units) == (640, 10)
    assert flat == pytest.approx(float((a <= 0).mean()))
    assert dead == pytest.approx(float((a <= 0).all(axis=0).mean()))
    assert dead >= 0.1
    assert mean_d == pytest.approx(float((a > 0).mean()))


def test_site_figures_sigmoid_flat_region_and_channels() -> None:
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(8, 3, 5, 5, generator=g) * 4
    s = torch.sigmoid(pre)
    d, top = causes.derivative("sigmoid", s)
    dim = causes.unit_dim(nn.Conv2d(1, 3, 3), s.ndim)
    _, flat, units, stuck, mean_d = causes.site_figures(d, top, dim).tolist()
    sd = (s * (1 - s)).double().numpy()
    assert dim == 1 and units == 3
    assert flat == pytest.approx(float((sd < 0.025).mean()), abs=1e-6)
    assert stuck == pytest.approx(float((sd < 0.025).transpose(1, 0, 2, 3).reshape(3, -1).all(axis=1).mean()))
    assert mean_d == pytest.approx(float(sd.mean()), rel=1e-5)


def test_weight_scale_and_needed_gain() -> None:
    lin = nn.Linear(300, 200)
    w = lin.weight.detach().double().numpy()
    assert float(causes.weight_scale(lin.weight)) == pytest.approx(np.sqrt((w**2).mean() * 300), rel=1e-5)
    assert abs(w.std() / np.sqrt((w**2).mean()) - 1) < 0.01  # zero-mean init: rms and std agree
    given = torch.tensor(3.0)  # a norm measured elsewhere is used as is
    assert float(causes.weight_scale(lin.weight, given)) == pytest.approx(3.0 * math.sqrt(300 / 60000))
    conv = nn.Conv2d(4, 6, 3)
    c = conv.weight.detach().double().numpy()
    assert float(causes.weight_scale(conv.weight)) == pytest.approx(np.sqrt((c**2).mean() * 36), rel=1e-5)
    assert causes.needed_gain("leaky_relu", {"slope": 0.2}) == pytest.approx(math.sqrt(2 / 1.04))
    assert causes.needed_gain("gelu") == pytest.approx(math.sqrt(2))


class ResidualMLP(nn.Module):
    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(torch.relu(h)) if self.residual else b(torch.relu(h)) + 1.0
        return h


@pytest.mark.parametrize(
    "name,expected",
    [
        ("mlp", 0),
        ("residual", 3),
        ("transformer", 4),
        ("rnn", 0),
        ("lstm", 0),
        ("cnn_bn", 0),
        ("embedding_lm", 2),
    ],
)
def test_graph_structure_counts_residual_connections(name: str, expected: int) -> None:
    torch.manual_seed(0)
    if name in ("mlp", "residual"):
        out = ResidualMLP(name == "residual")(torch.randn(2, 4))
    elif name == "transformer":  # 2 layers x (attention + feed-forward) residuals
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        out = enc(nn.Linear(4, 8)(torch.randn(2, 3, 4)))  # the first skip needs an input with a history
    elif name in ("rnn", "lstm"):  # the unrolled recurrence shares the input projection: no skip
        mod = nn.RNN(3, 4) if name == "rnn" else nn.LSTM(3, 4)
        out = mod(torch.randn(6, 2, 3))[0]
    elif name == "cnn_bn":
        out = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())(torch.randn(2, 1, 5, 5))
    else:  # an embedding straight into residual blocks: the lookup is data, not a weight expression
        emb, lin1, lin2 = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        h = emb(torch.tensor([[1, 2, 3]]))
        h = h + lin1(torch.relu(h))
        out = h + lin2(torch.relu(h))
    structure = causes.graph_structure(causes.graph_nodes(out.sum().grad_fn))
    assert structure.residual_adds == expected
    assert (structure.norm_nodes > 0) == (name in ("transformer", "cnn_bn"))


# ------------------------------------------------------------------------------------- recurrent
def lstm_reference(
    m: nn.LSTM, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
) -> dict[str, list[torch.Tensor]]:
    """Layer 0 of an LSTM (time-major x) in float64, step by step from the documented equations."""
    w_ih, w_hh = m.weight_ih_l0.double(), m.weight_hh_l0.double()
    b = m.bias_ih_l0.double() + m.bias_hh_l0.double()
    hs = m.hidden_size
    out: dict[str, list[torch.Tensor]] = {g: [] for g in "ifgo"}
    for t in range(x.shape[0]):
        z = x[t].double() @ w_ih.T + h @ w_hh.T + b
        i, f, g, o = (z[:, k * hs : (k + 1) * hs] for k in range(4))
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c = f * c + i * g
        h = o * c.tanh()
        for k, v in zip("ifgo", (i, f, g, o), strict=True):
            out[k].append(v)
    return out


@pytest.mark.parametrize("layers", [1, 2])
def test_lstm_gates_against_a_float64_loop(layers: int) -> None:
    torch.manual_seed(0)
    m = nn.LSTM(3, 5, num_layers=layers, batch_first=True)
    x = torch.randn(4, 7, 3)
    h0, c0 = torch.randn(layers, 4, 5), torch.randn(layers, 4, 5)
    out, _ = m(x, (h0, c0))
    found = gates.recurrent_gates(m, x, (h0, c0), out)
    assert found is not None
    ref = lstm_reference(m, x.transpose(0, 1), h0[0].double(), c0[0].double())
    for g in "ifgo":
        expected = torch.stack(ref[g]).reshape(-1, 5)  # (T·B, H), time-major like the monitor's rows
        assert torch.allclose(found[g].double(), expected, atol=1e-5), g


def test_gru_and_rnn_gates_against_float64_loops() -> None:
    torch.manual_seed(1)
    gru, rnn = nn.GRU(3, 4), nn.RNN(3, 4, nonlinearity="tanh")
    x = torch.randn(6, 2, 3)
    found = gates.recurrent_gates(gru, x, None, gru(x)[0])
    assert found is not None
    w_ih, w_hh, b_ih, b_hh = (
        getattr(gru, n).double() for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    )
    h = torch.zeros(2, 4, dtype=torch.float64)
    zs = []
    for t in range(6):
        gi, gh = x[t].double() @ w_ih.T + b_ih, h @ w_hh.T + b_hh
        r = (gi[:, :4] + gh[:, :4]).sigmoid()
        z = (gi[:, 4:8] + gh[:, 4:8]).sigmoid()
        n = (gi[:, 8:] + r * gh[:, 8:]).tanh()
        h = (1 - z) * n + z * h
        zs.append(z)
    assert torch.allclose(found["z"].double(), torch.stack(zs).reshape(-1, 4), atol=1e-5)
    out = rnn(x)[0]
    [(key, h_gate)] = gates.recurrent_gates(rnn, x, None, out).items()  # type: ignore[union-attr]
    assert key == "h" and torch.allclose(
        h_gate, out.reshape(-1, 4), atol=1e-6
    )  # the hidden states themselves


def test_packed_sequences_use_only_the_valid_rows() -> None:
    torch.manual_seed(2)
    m = nn.LSTM(2, 3, batch_first=True)
    x = torch.randn(3, 5, 2)
    lengths = torch.tensor([5, 2, 4])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    found = gates.recurrent_gates(m, packed, None, m(packed)[0])
    assert found is not None and found["f"].shape == (11, 3)  # 5 + 2 + 4 valid (time, sequence) rows
    expected = []
    for b, n in enumerate(lengths.tolist()):  # each sequence alone, unpadded
        ref = lstm_reference(
            m,
            x[b : b + 1, :n].transpose(0, 1),
            torch.zeros(1, 3, dtype=torch.float64),
            torch.zeros(1, 3, dtype=torch.float64),
        )
        expected += [f[0] for f in ref["f"]]
    got = sorted(found["f"].double().sum(1).tolist())
    expected = [e.detach() for e in expected]
    assert got == pytest.approx(sorted(float(e.sum()) for e in expected), abs=1e-5)


def test_gate_figures_against_numpy() -> None:
    g = torch.Generator().manual_seed(3)
    f = torch.sigmoid(torch.randn(40, 6, generator=g) * 2 - 1)
    fig = gates.gate_figures("LSTM", {"f": f})["f"].tolist()
    a = f.double().numpy()
    assert fig[5] == pytest.approx(a.mean(), rel=1e-5)
    assert fig[6] == pytest.approx(np.log10(a).mean(), rel=1e-5)
    assert fig[7] == pytest.approx(np.log10(a).mean(axis=0).max(), rel=1e-5)
    assert fig[4] == pytest.approx((a * (1 - a)).mean(), rel=1e-5)


# ----------------------------------------------------------------------------------- recent jump
def test_recent_jump_rules_by_hand() -> None:
    s = [(0, 2.0), (1, 2.2), (2, 1.8), (3, 2.1), (4, 5.0), (5, 6.0)]
    assert causes.recent_jump("loss", s, -1, 5, 1.5) == causes.Jump("loss", 4, 2.05, 5.0, 4)
    # from step 5 on only: 6 is a new high, 2.86 x the median of the 5 values before it
    assert causes.recent_jump("loss", s, 4, 5, 1.5) == causes.Jump("loss", 5, 2.1, 6.0, 5)
    assert causes.recent_jump("loss", s, -1, 3, 1.5) is None  # outside the window
    nan = causes.recent_jump("loss", [(0, 1.0), (1, math.nan)], -1, 1, 1.5)
    assert nan is not None and nan.step == 1 and math.isnan(nan.value)
    assert causes.recent_jump("loss", [(0, math.inf)], -1, 0, 1.5) is None  # no history before it
    assert (
        causes.recent_jump("loss", [(0, 1.0), (1, 9.0), (2, 1.0), (3, 8.0)], 1, 3, 1.5) is None
    )  # no new high


@pytest.mark.parametrize("kind", ["lstm_proj", "gru"])
def test_step_by_step_layer0_agrees_with_the_batched_path(kind: str) -> None:
    """Two ways to the same gates: a 2-layer module (layer 0 rerun step by step) and a 1-layer module with
    the same layer-0 weights (gates from its output in one batched pass), including LSTM projections."""
    torch.manual_seed(4)
    if kind == "lstm_proj":
        deep: nn.RNNBase = nn.LSTM(3, 5, num_layers=2, proj_size=2)
        single: nn.RNNBase = nn.LSTM(3, 5, proj_size=2)
    else:
        deep, single = nn.GRU(3, 5, num_layers=2), nn.GRU(3, 5)
    with torch.no_grad():
        for name, p in single.named_parameters():
            p.copy_(getattr(deep, name))  # the *_l0 parameters
    x = torch.randn(6, 2, 3)
    a = gates.recurrent_gates(deep, x, None, deep(x)[0])
    b = gates.recurrent_gates(single, x, None, single(x)[0])
    assert a is not None and b is not None and a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k

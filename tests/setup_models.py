"""Models of the setups issue 19 covers (sparse embeddings, complex weights, partly used heads), shared by
their tests. Real modules and optimizers; each model has a twin or a plain-loop reference in its test."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def token_loader(
    n: int = 48, vocab: int = 30, context: int = 6, batch_size: int = 8, seed: int = 0
) -> DataLoader:
    """Bags of token ids (repeats inside a batch: uncoalesced sparse gradients) and a regression target."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, context), generator=g)
    weights = torch.randn(vocab, generator=g)
    y = weights[tokens].mean(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(tokens, y), batch_size=batch_size, shuffle=False)


class BagOfEmbeddings(pl.LightningModule):
    """Word2vec-style regressor: the mean of the tokens' embeddings, then a linear head. ``sparse`` picks
    ``nn.Embedding(sparse=True)`` (sparse COO gradients) or its dense twin; the initial weights depend on
    the seed only, so both twins start equal. Plain SGD (no momentum): a sparse and a dense gradient make
    the same update."""

    def __init__(
        self, sparse: bool = True, vocab: int = 30, dim: int = 6, lr: float = 0.5, seed: int = 0
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim, sparse=sparse)
        self.head = nn.Linear(dim, 1)
        self.lr = lr

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(tokens).mean(dim=1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, y = batch
        return nn.functional.mse_loss(self(tokens), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class SparseAdamModel(BagOfEmbeddings):
    """Manual optimization with two optimizers: ``SparseAdam`` for the sparse embedding, ``Adam`` for the
    head; each step ``opt_sparse.step()`` then ``opt_dense.step()``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(sparse=True, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, y = batch
        opt_sparse, opt_dense = self.optimizers()  # type: ignore[misc]
        loss = nn.functional.mse_loss(self(tokens), y)
        self.manual_backward(loss)
        opt_sparse.step()
        opt_dense.step()
        opt_sparse.zero_grad()
        opt_dense.zero_grad()
        return loss.detach()

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SparseAdam(list(self.emb.parameters()), lr=0.05),
            torch.optim.Adam(self.head.parameters(), lr=0.05),
        ]


class ComplexFeatures(pl.LightningModule):
    """A regressor with one complex weight: ``|x W|`` (``W`` complex64) feeds a real linear head; Adam."""

    def __init__(self, features: int = 8, hidden: int = 6, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.cweight = nn.Parameter(torch.randn(features, hidden, dtype=torch.complex64) / features**0.5)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x.to(torch.complex64) @ self.cweight).abs())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class PartlyUsedHeads(pl.LightningModule):
    """A shared trunk with heads used on some steps only: ``head_a`` on even steps, ``head_b`` on odd steps
    (round-robin multi-task), ``aux`` on the steps ``s % 10 == 5`` (an auxiliary loss), and ``unused``,
    never used. Plain SGD."""

    def __init__(self, features: int = 8, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(features, hidden), nn.Tanh())
        self.head_a = nn.Linear(hidden, 1)
        self.head_b = nn.Linear(hidden, 1)
        self.aux = nn.Linear(hidden, 1)
        self.unused = nn.Linear(hidden, 1)
        self.used: list[tuple[int, list[str]]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.trunk(x)
        step = self.global_step
        heads = ["head_a" if step % 2 == 0 else "head_b", *(["aux"] if step % 10 == 5 else [])]
        self.used.append((step, heads))
        return sum(nn.functional.mse_loss(getattr(self, name)(h), y) for name in heads)  # type: ignore[return-value]

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)

"""Networks and data that need torch only (no Lightning): what Ray workers import to rebuild a net.

>>> MLP(64, [32], 10)(load_digits_tensors()[1].tensors[0][:2]).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.utils.data import TensorDataset


class MLP(nn.Module):
    """``Linear -> act`` blocks and a linear head; He-normal init, small biases."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        activation: Literal["relu", "leaky_relu", "gelu"] = "relu",
        bias_std: float = 1e-6,
    ) -> None:
        super().__init__()
        acts = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            linear = nn.Linear(width, h)
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.normal_(linear.bias, std=bias_std)
            layers += [linear, acts[activation]()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


def load_digits_tensors(seed: int = 0, test_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """Digits as float inputs in [0, 1] (64 features) and int64 labels, split train/test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])

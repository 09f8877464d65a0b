"""The tasks and networks a sweep names in its config, built by dynatrack's own code.

A sweep directory holds names and numbers only (``task: digits``, ``hidden: [64, 64]``); the
comparison rebuilds the data and the network from them with these functions, so nothing named in
a sweep directory is ever imported.

>>> train, test, meta = make_task("synthetic", seed=0, n_train=200, n_test=100)
>>> train.tensors[0].shape, meta
(torch.Size([200, 20]), {'in_features': 20, 'num_classes': 4})
>>> build_net({"hidden": [8]}, meta)(train.tensors[0][:3]).shape
torch.Size([3, 4])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

TASKS = ("digits", "synthetic")


def make_task(name: str, seed: int = 0, **options: Any) -> tuple[TensorDataset, TensorDataset, dict[str, int]]:
    """``(train, test, {"in_features", "num_classes"})`` for a task named in a sweep config.

    - ``digits``: scikit-learn's bundled 8x8 digits (1,797 samples, 64 features in [0, 1],
      10 classes), split 80/20 by ``seed`` (options: ``test_fraction``).
    - ``synthetic``: a teacher-network classification task. Inputs are standard normal in
      ``in_features`` dimensions; labels are the argmax of a random one-hidden-layer ReLU teacher
      (``teacher_width`` units) with a fraction ``label_noise`` of the training labels replaced by
      random ones (easy to fit, hard to generalize: the regime of Li, Wei & Ma 2019). Options:
      ``n_train`` (2000), ``n_test`` (2000), ``in_features`` (20), ``num_classes`` (4),
      ``teacher_width`` (32), ``label_noise`` (0.1). Fully determined by ``seed``.
    """
    if name == "digits":
        from dynatrack.nets import load_digits_tensors

        unknown = set(options) - {"test_fraction"}
        if unknown:
            raise ValueError(f"task 'digits' has no options {sorted(unknown)}; it takes test_fraction")
        train, test = load_digits_tensors(seed, **options)
        return train, test, {"in_features": 64, "num_classes": 10}
    if name == "synthetic":
        return _synthetic(seed, **options)
    raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")


def _synthetic(
    seed: int,
    n_train: int = 2000,
    n_test: int = 2000,
    in_features: int = 20,
    num_classes: int = 4,
    teacher_width: int = 32,
    label_noise: float = 0.1,
) -> tuple[TensorDataset, TensorDataset, dict[str, int]]:
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(in_features, teacher_width, generator=g) / in_features**0.5
    b1 = 0.1 * torch.randn(teacher_width, generator=g)
    w2 = torch.randn(teacher_width, num_classes, generator=g) / teacher_width**0.5
    x = torch.randn(n_train + n_test, in_features, generator=g)
    y = (torch.relu(x @ w1 + b1) @ w2).argmax(1)
    noisy = torch.rand(n_train, generator=g) < label_noise
    y_train = y[:n_train].clone()
    y_train[noisy] = torch.randint(0, num_classes, (int(noisy.sum()),), generator=g)
    train = TensorDataset(x[:n_train], y_train)
    test = TensorDataset(x[n_train:], y[n_train:])
    return train, test, {"in_features": in_features, "num_classes": num_classes}


def build_net(model: Mapping[str, Any], meta: Mapping[str, int]) -> nn.Module:
    """The MLP a sweep config's ``model`` section names (``hidden``, ``activation``), sized for the task."""
    from dynatrack.nets import MLP

    unknown = set(model) - {"hidden", "activation"}
    if unknown:
        raise ValueError(f"model section has no keys {sorted(unknown)}; it takes hidden, activation")
    return MLP(meta["in_features"], list(model.get("hidden", [64, 64])), meta["num_classes"],
               model.get("activation", "relu"))

"""The probe set: fixed inputs (with optional labels) in named splits, split across ranks.

``PatternRecorder(probe=...)`` accepts, per split, a tensor of inputs, a pair
``(inputs, labels)``, a :class:`ProbeSplit`, or a map-style dataset with
``indices``; a ``dict`` names several splits. A bare value is the ``train`` split.

>>> import torch
>>> p = Probe.build({"train": (torch.randn(10, 4), torch.arange(10) % 2), "test": (torch.randn(3, 4), torch.tensor([0, 1, 1]))})
>>> p.sizes, p.num_classes
({'train': 10, 'test': 3}, 2)
>>> p.shard(rank=1, world_size=2)["train"].sample_ids.tolist()
[1, 3, 5, 7, 9]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset


#: The largest number of classes (``max label + 1``) a probe may have: the neuron rows keep
#: one count per class, per neuron and recorded step.
MAX_CLASSES = 2**16


class ProbeError(ValueError):
    """A probe set that cannot be used."""


@dataclass
class ProbeSplit:
    """One named probe split: inputs, optional integer labels, and sample ids.

    ``sample_ids`` are the samples' indices in their dataset split (default
    ``0..n-1``); they become the ``sample_id`` column.
    """

    inputs: torch.Tensor
    labels: torch.Tensor | None = None
    sample_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, torch.Tensor):
            raise ProbeError(f"probe inputs must be a torch.Tensor, got {type(self.inputs).__name__}")
        n = self.inputs.shape[0] if self.inputs.dim() else 0
        if self.inputs.dim() < 1 or n == 0:
            raise ProbeError(f"probe inputs must have a non-empty leading sample dimension, got shape {tuple(self.inputs.shape)}")
        if self.sample_ids is None:
            self.sample_ids = torch.arange(n, dtype=torch.int64)
        self.sample_ids = torch.as_tensor(self.sample_ids, dtype=torch.int64).reshape(-1)
        if self.sample_ids.numel() != n:
            raise ProbeError(f"probe has {n} inputs but {self.sample_ids.numel()} sample ids")
        if torch.unique(self.sample_ids).numel() != n:
            raise ProbeError("probe sample ids must be unique within a split")
        if self.labels is not None:
            labels = torch.as_tensor(self.labels)
            if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
                raise ProbeError(
                    f"probe labels must be a 1-D integer tensor of class indices, got dtype {labels.dtype}, shape {tuple(labels.shape)}"
                )
            if labels.numel() != n:
                raise ProbeError(f"probe has {n} inputs but {labels.numel()} labels")
            if n and int(labels.min()) < 0:
                raise ProbeError("probe labels must be >= 0 (class indices)")
            if n and int(labels.max()) >= MAX_CLASSES:
                raise ProbeError(
                    f"probe label {int(labels.max())} is too large: labels are class indices and each neuron keeps "
                    f"one count per class 0..max label (at most {MAX_CLASSES:,} classes). Remap the labels to "
                    "0..K-1 (labels = torch.unique(labels, return_inverse=True)[1]) or pass the probe without labels"
                )
            self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @classmethod
    def from_dataset(cls, dataset: Dataset, indices: Sequence[int] | None = None) -> "ProbeSplit":
        """Gather ``dataset[i]`` for ``i`` in ``indices`` (default: all).

        Items may be a tensor, ``(input, label, ...)`` or a dict with ``input``/``x``
        and ``label``/``y`` keys.
        """
        if indices is None:
            indices = range(len(dataset))  # type: ignore[arg-type]
        indices = [int(i) for i in indices]
        xs, ys = [], []
        for i in indices:
            item = dataset[i]
            if isinstance(item, Mapping):
                x = item.get("input", item.get("x"))
                y = item.get("label", item.get("y"))
            elif isinstance(item, (tuple, list)):
                x, y = item[0], (item[1] if len(item) > 1 else None)
            else:
                x, y = item, None
            if x is None:
                raise ProbeError(f"dataset item {i} has no input (use a tensor, a tuple or a dict with 'input')")
            xs.append(torch.as_tensor(x))
            ys.append(y)
        labels = None
        if all(y is not None for y in ys):
            labels = torch.as_tensor([int(y) for y in ys], dtype=torch.int64)
        return cls(torch.stack(xs), labels, torch.as_tensor(indices, dtype=torch.int64))


@dataclass
class Probe:
    """All probe splits, as given (every rank holds the whole probe, then shards it)."""

    splits: dict[str, ProbeSplit]

    @classmethod
    def build(cls, probe: Any, indices: Sequence[int] | None = None) -> "Probe":
        if probe is None:
            return cls({})
        if isinstance(probe, Probe):
            return probe
        if isinstance(probe, Mapping):
            return cls({str(name): _split(value, None) for name, value in probe.items()})
        return cls({"train": _split(probe, indices)})

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(s) for name, s in self.splits.items()}

    @property
    def num_classes(self) -> int:
        """``max label + 1`` over the splits with labels; 0 when no split has labels.

        A split without labels (a plain tensor) gets no per-class counts, whatever the others have.
        """
        labelled = [s.labels for s in self.splits.values() if s.labels is not None]
        if not labelled:
            return 0
        return int(max(int(labels.max()) for labels in labelled)) + 1

    def shard(self, rank: int, world_size: int) -> dict[str, ProbeSplit]:
        """This rank's samples: every ``world_size``-th sample starting at ``rank``, ordered by label.

        The order by label (stable) lets the per-class neuron counts be summed over one
        contiguous block of rows per class; every row keeps its ``sample_id``.
        """
        out = {}
        for name, s in self.splits.items():
            sel = slice(rank, None, world_size)
            inputs, labels, ids = s.inputs[sel], None if s.labels is None else s.labels[sel], s.sample_ids[sel]  # type: ignore[index]
            if labels is not None and len(labels) > 1 and bool((labels[1:] < labels[:-1]).any()):
                order = torch.argsort(labels, stable=True)
                inputs, labels, ids = inputs[order], labels[order], ids[order]
            out[name] = ProbeSplit(inputs, labels, ids)
        return out

    def describe(self) -> dict[str, Any]:
        first = next(iter(self.splits.values()), None)
        shape = list(first.inputs.shape[1:]) if first is not None else []
        return {"size": sum(self.sizes.values()), "splits": self.sizes, "num_classes": self.num_classes,
                "input_shape": shape}


def _split(value: Any, indices: Sequence[int] | None) -> ProbeSplit:
    if isinstance(value, ProbeSplit):
        return value
    if isinstance(value, torch.Tensor):
        return ProbeSplit(value if indices is None else value[torch.as_tensor(indices)],
                          None, None if indices is None else torch.as_tensor(indices))
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], torch.Tensor):
        x, y = value
        if indices is not None:
            idx = torch.as_tensor(indices)
            return ProbeSplit(x[idx], torch.as_tensor(y)[idx], idx)
        return ProbeSplit(x, torch.as_tensor(y))
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], Dataset):
        return ProbeSplit.from_dataset(value[0], value[1])
    if isinstance(value, Dataset):
        return ProbeSplit.from_dataset(value, indices)
    raise ProbeError(
        f"cannot use a {type(value).__name__} as a probe split; pass a tensor, (inputs, labels), "
        "(dataset, indices), a ProbeSplit, or a dict of those keyed by split name"
    )

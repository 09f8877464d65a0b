"""Sample ids for the ``batch`` source.

Rows recorded from the training batch carry each sample's index in its
dataset. A batch supplies them in one of two ways:

* a ``dict`` batch with an integer tensor under ``"sample_id"``;
* a tuple/list batch whose **last** element is that tensor — what
  :class:`IndexedDataset` produces from any map-style dataset.

Anything else: pass ``sample_ids=callable(batch) -> Tensor`` to the recorder.

>>> import torch
>>> from torch.utils.data import TensorDataset
>>> ds = IndexedDataset(TensorDataset(torch.zeros(5, 2), torch.ones(5)))
>>> x, y, i = ds[3]; i
3
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

SAMPLE_ID_KEY = "sample_id"


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so each item also carries its index.

    Tuple items gain a trailing index (``(x, y) -> (x, y, index)``), dict items a
    ``"sample_id"`` key, other items become ``(item, index)``.
    """

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError("IndexedDataset needs a map-style dataset (with __getitem__ and __len__)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        idx = int(index)  # a plain int: the default collate makes one int64 tensor per batch
        if isinstance(item, Mapping):
            return {**item, SAMPLE_ID_KEY: idx}
        if isinstance(item, (tuple, list)):
            return (*item, idx)
        return (item, idx)


def default_sample_ids(batch: Any) -> torch.Tensor | None:
    """Find sample ids in a batch (see module docstring); ``None`` if absent."""
    if isinstance(batch, Mapping):
        ids = batch.get(SAMPLE_ID_KEY)
    elif isinstance(batch, (tuple, list)) and batch:
        ids = batch[-1]
    else:
        return None
    if isinstance(ids, torch.Tensor) and ids.dim() == 1 and not ids.dtype.is_floating_point and ids.dtype != torch.bool:
        return ids
    return None

"""The embedded default task: an MLP on scikit-learn's bundled digits (no download).

>>> dm = DigitsDataModule(batch_size=64)
>>> dm.setup("fit"); len(dm.train_set), len(dm.test_set)
(1438, 359)
>>> DigitsMLP(hidden=[32, 32])(dm.test_set.tensors[0][:2]).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dynatrack.nets import MLP, load_digits_tensors
from dynatrack.recorder.data import IndexedDataset

__all__ = ["MLP", "DigitsMLP", "DigitsDataModule", "load_digits_tensors"]


class DigitsMLP(pl.LightningModule):
    """Classifier for the 8x8 digits: 64 -> hidden... -> 10, cross-entropy, Adam or SGD."""

    def __init__(
        self,
        hidden: Sequence[int] = (64, 64, 64),
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        activation: Literal["relu", "leaky_relu", "gelu"] = "relu",
        in_features: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = MLP(in_features, list(hidden), num_classes, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's bundled digits (1,797 samples), train/test split, batches end with sample ids."""

    def __init__(self, batch_size: int = 64, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.test_set = load_digits_tensors(self.seed)

    def probe(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The whole train and test splits as the probe set."""
        self.setup()
        assert self.train_set is not None and self.test_set is not None
        return {"train": tuple(self.train_set.tensors), "test": tuple(self.test_set.tensors)}  # type: ignore[dict-item]

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(IndexedDataset(self.train_set), batch_size=self.batch_size, shuffle=True,
                          num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        assert self.test_set is not None
        return DataLoader(self.test_set, batch_size=512, num_workers=self.num_workers)

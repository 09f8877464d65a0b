"""Shared fixtures: tiny real Lightning modules and a Trainer factory (no mocks)."""

from __future__ import annotations

import logging
import os
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dynatrack import IndexedDataset, PatternRecorder, schedules
from dynatrack.models import DigitsDataModule, DigitsMLP

os.environ.setdefault("WANDB_SILENT", "true")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
torch.set_num_threads(1)


class TinyNet(pl.LightningModule):
    """in -> h1 -> h2 -> out MLP with ReLUs; widths not multiples of 8 on purpose."""

    def __init__(self, d_in: int = 5, hidden: tuple[int, ...] = (13, 20), d_out: int = 3, lr: float = 0.05,
                 act: str = "relu") -> None:
        super().__init__()
        self.save_hyperparameters()
        acts = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.1), "gelu": nn.GELU}
        layers: list[nn.Module] = []
        w = d_in
        for h in hidden:
            layers += [nn.Linear(w, h), acts[act]()]
            w = h
        layers.append(nn.Linear(w, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch[0], batch[1]
        out = self(x)
        if self.hparams.d_out == 1:
            return nn.functional.mse_loss(out.squeeze(-1), y.float())
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def make_data(n: int = 96, d_in: int = 5, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 16, indexed: bool = True, shuffle: bool = True) -> DataLoader:
    ds = TensorDataset(x, y)
    return DataLoader(IndexedDataset(ds) if indexed else ds, batch_size=batch_size, shuffle=shuffle)


def trainer(max_steps: int, callbacks: list, **kw) -> pl.Trainer:  # noqa: ANN001
    opts = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False)
    opts.update(kw)
    return pl.Trainer(callbacks=callbacks, **opts)


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return make_data()


def assert_signs(got_bits: "np.ndarray", z: "torch.Tensor | np.ndarray", tol: float = 1e-5) -> None:
    """Compare recorded bits with independently computed pre-activations ``z``.

    Entries with ``|z| <= tol`` are skipped: float32 forward and a float64
    recomputation may legitimately disagree on a sign that close to zero
    (there must be only a handful of those).
    """
    import numpy as np

    z = z.detach().numpy() if isinstance(z, torch.Tensor) else np.asarray(z)
    got = np.unpackbits(got_bits, axis=1, count=z.shape[1]).astype(bool)
    assert got.shape == z.shape
    clear = np.abs(z) > tol
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], (z > 0)[clear])


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> str:  # noqa: ANN001
    """A small real run: MLP 64-24-16-10 on digits, probe train+test, 30 steps."""
    warnings.filterwarnings("ignore")
    root = tmp_path_factory.mktemp("runs")
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    model = DigitsMLP(hidden=[24, 16], lr=1e-2)
    rec = PatternRecorder(str(root), run_name="digits", probe=dm.probe(), schedule=schedules.at([0, 5, 10, 20]),
                          rows_per_file=5000)
    pl.Trainer(accelerator="cpu", devices=1, max_steps=30, callbacks=[rec], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(model, dm)
    return rec.run_dir


@pytest.fixture(scope="module")
def local_ray():  # noqa: ANN201
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _dynatrack_logger_restored():  # noqa: ANN202
    """The CLI, called in-process by some tests, gives the ``dynatrack`` logger its own handler and
    stops propagation (right for a process, wrong for the next test's caplog): undo it after each test."""
    logger = logging.getLogger("dynatrack")
    level, propagate, handlers = logger.level, logger.propagate, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.propagate = propagate
    logger.handlers[:] = handlers

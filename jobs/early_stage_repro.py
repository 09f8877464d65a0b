"""Reproduce the early-stage regime of Wang & Ma (NeurIPS 2022) with dynatrack's early_stage analyzer.

    nice -n 10 python jobs/early_stage_repro.py --out docs/img   # ~2-4 min on 2 cores

1. The paper's regime: a two-layer, mildly parameterized ReLU net (m = 4n neurons) on
   near-orthogonal data (n = 32 samples of dimension d = 128 > n, x_i ~ N(0, I/d), labels
   y_i in {0, 1}, square loss), full-batch GD and mini-batch SGD (batch n/4), 3 seeds each,
   step size η = 1/β(0) (β estimated at initialization by power iteration on HVPs).
2. Digits (scikit-learn's bundled 8x8 digits, 512 training samples, d = 64 < n),
   two-layer net of width 256, cross-entropy, full-batch GD: the regime where the
   partition bound turns vacuous (activated sets larger than the input dimension).

Each run is a real Lightning fit with the PatternRecorder (probe = the whole training set,
patterns and weights every step); the analysis is the early_stage analyzer's own code
(:func:`dynatrack.parallel.early.early_task` and ``finish_early``, what its Ray tasks run),
called in this process. Prints one JSON object and writes ``early_repro.png`` and
``early_repro.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

log = logging.getLogger("early_stage_repro")


class TwoLayerNet(pl.LightningModule):
    """f(x) = A relu(B x + c) + a0; square loss (scalar output) or cross-entropy; plain SGD."""

    def __init__(self, d: int = 128, m: int = 128, out: int = 1, lr: float = 0.1,
                 loss: str = "mse") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(d, m), nn.ReLU(), nn.Linear(m, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        out = self(x)
        if self.hparams.loss == "mse":
            return nn.functional.mse_loss(out, y.float().reshape(-1, 1))
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def near_orthogonal(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, d, generator=g) / d ** 0.5
    y = torch.arange(n) % 2  # balanced 0/1 labels; the square loss takes them as targets
    return x, y


def digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from dynatrack.models import load_digits_tensors

    train, _ = load_digits_tensors(seed)
    return train.tensors[0][:n], train.tensors[1][:n]


def beta_at_init(model: TwoLayerNet, x: torch.Tensor, y: torch.Tensor, loss: str) -> float:
    from dynatrack.analysis import early_stage as es
    from dynatrack.analysis.regions import piecewise_linear_layers

    layers = piecewise_linear_layers(model, [x.shape[1]])
    return es.hessian_top_eigenvalue(layers, x.double().numpy(), y.numpy(), loss, iters=100, tol=1e-6)


def one_run(root: Path, name: str, x: torch.Tensor, y: torch.Tensor, *, m: int, out: int, loss: str, batch: int,
            steps: int, seed: int, lr: float | None = None) -> dict[str, Any]:
    from dynatrack import PatternRecorder, open_run, schedules
    from dynatrack.parallel import early
    from dynatrack.recorder.data import IndexedDataset

    pl.seed_everything(seed, verbose=False)
    model = TwoLayerNet(d=x.shape[1], m=m, out=out, lr=1.0, loss=loss)
    beta0 = beta_at_init(model, x, y, loss)
    lr = lr if lr is not None else 1.0 / beta0
    model.hparams.lr = lr
    rec = PatternRecorder(str(root), run_name=name, probe={"train": (x, y)}, schedule=schedules.every(1), seed=seed)
    dl = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=batch, shuffle=batch < len(x),
                    generator=torch.Generator().manual_seed(seed))
    pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=[rec], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(model, dl)
    run = open_run(rec.run_dir)
    conf = {"loss": loss, "split": "train", "beta_iters": 50, "seed": 0, "early_lr": None}
    table = early.early_task(run.path, run.checkpoint_steps(), conf)["early_stage"]
    res = early.finish_early(run, table)
    t = res["early_stage"].to_pandas()
    # activated-set sizes at step 0 vs. the feature dimension D + 1 (only |I_k| <= D + 1 can give λ_min > 0)
    ids, bits = run.pattern_bits(0, "net.1")
    active = np.unpackbits(bits, axis=1, count=run.widths["net.1"]).astype(bool)
    sizes = active.sum(0)
    gd = batch >= len(x)
    last = t.iloc[-1]
    return {
        "name": name, "n": len(x), "d": x.shape[1], "m": m, "loss": loss, "optimizer": "GD" if gd else f"SGD(batch {batch})",
        "seed": seed, "lr": lr, "beta0": beta0, "eta_beta0": lr * beta0,
        "mu0": float(t.mu.iloc[0]), "mu_min": float(t.mu.min()), "vacuous_samples0": int(t.n_vacuous.iloc[0]),
        "median_active_set": float(np.median(sizes)), "neurons_small_sets": int((sizes <= x.shape[1] + 1).sum()),
        "loss0": float(t.loss.iloc[0]), "lossT": float(last.loss), "steps": int(last.step),
        "pred_gd_T": float(last.pred_gd), "pred_mu_T": float(last.pred_mu), "pred_step_T": float(last.pred_step),
        "mean_ratio_observed": float(t.ratio_observed.mean()), "mean_ratio_pred_mu": float(t.ratio_pred_mu.iloc[:-1].mean()),
        "lb_mu_over_grad0": float(t.lb_mu.iloc[0] / t.grad_norm_sq.iloc[0]),
        "lb_total_over_grad0": float(t.lb_total.iloc[0] / t.grad_norm_sq.iloc[0]),
        "violations": {b: int(n) for b, n in res["early_stage_violations"].to_pandas().groupby("bound").size().items()},
        "violation_causes": {r.bound: r.cause for r in res["early_stage_violations"].to_pandas().itertuples()},
        "early_end_step": res["early_stage_summary"].column("early_end_step")[0].as_py(),
        "series": {c: [None if v != v else float(v) for v in t[c]] for c in ("step", "loss", "pred_gd", "pred_mu", "pred_step", "mu")},
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("orthogonal", "GD"), ("orthogonal", "SGD"), ("digits", "GD")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (task, opt) in zip(axes, groups):
        for i, r in enumerate(x for x in results if x["name"].startswith(task) and x["optimizer"].startswith(opt)):
            s = r["series"]
            col = f"C{i}"
            ax.plot(s["step"], s["loss"], "-", color=col, label=f"seed {r['seed']} observed")
            if opt == "GD":
                ax.plot(s["step"], s["pred_mu"], ":", color=col, label="μ-bound (pred_mu)" if i == 0 else None)
                ax.plot(s["step"], s["pred_gd"], "--", color=col, alpha=0.6, label="descent lemma (pred_gd)" if i == 0 else None)
            else:
                ax.plot(s["step"], s["pred_step"], "--", color=col, alpha=0.6, label="descent lemma on Δ (pred_step)" if i == 0 else None)
        ax.set_title(f"{task}, {opt}")
        ax.set_xlabel("step")
        ax.set_ylabel("probe (= training) loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for early_repro.png and early_repro.json")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        n, d = 32, 128
        for seed in range(args.seeds):
            x, y = near_orthogonal(n, d, seed)
            for batch in (n, n // 4):
                results.append(one_run(Path(tmp), f"orthogonal-b{batch}-s{seed}", x, y, m=4 * n, out=1, loss="mse",
                                       batch=batch, steps=args.steps, seed=seed))
        for seed in range(min(args.seeds, 2)):
            x, y = digits(512, seed)
            results.append(one_run(Path(tmp), f"digits-s{seed}", x, y, m=256, out=10, loss="cross_entropy",
                                   batch=len(x), steps=args.steps, seed=seed))
    plot(results, out / "early_repro.png")
    (out / "early_repro.json").write_text(json.dumps(results, indent=1))
    summary = [{k: v for k, v in r.items() if k != "series"} for r in results]
    json.dump({"seconds": round(time.perf_counter() - start, 1), "runs": summary}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

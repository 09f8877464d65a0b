"""Reproduce Hanin & Rolnick's depth-independence of 2-D region counts on digits (small scale).

Hanin & Rolnick, "Deep ReLU Networks Have Surprisingly Few Activation Patterns" (NeurIPS 2019,
arXiv 1906.00904): at a fixed total number N of hidden neurons, the number of linear regions in
a 2-D slice through three training inputs is of order N^2 / 2!, whatever the depth, at
initialization and through training.

Setup here: scikit-learn's bundled digits (64-dim, scaled to [0, 1]; 1,500 train / 297 test),
N hidden neurons split evenly over depths 1-4, He-normal weights, biases N(0, 1e-6) (variance),
Adam lr 1e-3, cross-entropy, batch 32. Regions are counted exactly
(:func:`dynatrack.analysis.regions.count_regions_2d`) in ``--slices`` slices through a digit of
each of classes 0, 1, 2 (the same training digits for every depth), at initialization and after
``--epochs`` epochs. Prints one JSON object, then a Markdown table.

    python jobs/hanin_rolnick_table.py --hidden 96 --epochs 20 --slices 4
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import numpy as np
import torch
from torch import nn

from dynatrack.analysis.regions import count_regions_2d, normalized_count, piecewise_linear_layers, slice_through

logger = logging.getLogger("hanin_rolnick_table")


def he_normal_mlp(widths: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    prev = 64
    for w in [*widths, 10]:
        lin = nn.Linear(prev, w)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.normal_(lin.bias, std=1e-3)  # variance 1e-6
        mods += [lin, nn.ReLU()]
        prev = w
    return nn.Sequential(*mods[:-1])


def count_in_slices(model: nn.Module, slices: list) -> list[int]:
    layers = piecewise_linear_layers(model, 64)
    return [count_regions_2d(layers, s.origin, s.u1, s.u2).count for s in slices]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=gen).split(32):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=96, help="total hidden width N")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from sklearn.datasets import load_digits

    data, labels = load_digits(return_X_y=True)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(labels))
    train_idx, test_idx = order[:1500], order[1500:]
    x = torch.tensor(data / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)
    picks = [rng.choice(train_idx[labels[train_idx] == c], size=args.slices, replace=False) for c in (0, 1, 2)]
    slices = [slice_through(*(data[p[i]] / 16.0 for p in picks)) for i in range(args.slices)]
    scale = args.hidden**2 / 2

    rows = []
    start = time.perf_counter()
    for depth in args.depths:
        if args.hidden % depth:
            raise ValueError(f"--hidden {args.hidden} does not split evenly over depth {depth}")
        widths = [args.hidden // depth] * depth
        model = he_normal_mlp(widths, args.seed + depth)
        at_init = count_in_slices(model, slices)
        train(model, x[train_idx], y[train_idx], args.epochs, args.seed + depth)
        trained = count_in_slices(model, slices)
        row = {
            "depth": depth,
            "widths": widths,
            "counts_init": at_init,
            "counts_trained": trained,
            "mean_init": statistics.mean(at_init),
            "mean_trained": statistics.mean(trained),
            "normalized_init": normalized_count(statistics.mean(at_init), args.hidden, 2),
            "normalized_trained": normalized_count(statistics.mean(trained), args.hidden, 2),
            "train_accuracy": accuracy(model, x[train_idx], y[train_idx]),
            "test_accuracy": accuracy(model, x[test_idx], y[test_idx]),
        }
        logger.info("depth %d: init %s, trained %s", depth, at_init, trained)
        rows.append(row)
    report = {
        "reference": "Hanin & Rolnick, NeurIPS 2019, arXiv 1906.00904",
        "data": "sklearn digits 64-dim in [0,1], 1500 train / 297 test",
        "n_hidden": args.hidden,
        "scale_N2_over_2": scale,
        "slices": args.slices,
        "slice_samples": [[int(p[i]) for p in picks] for i in range(args.slices)],
        "training": f"Adam lr 1e-3, batch 32, {args.epochs} epochs, cross-entropy",
        "init": "He-normal weights, biases N(0, 1e-6) (variance)",
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(report))
    print()
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    n = report["n_hidden"]
    lines = [
        f"N = {n} hidden neurons, N^2/2 = {report['scale_N2_over_2']:.0f}; mean (min-max) over "
        f"{report['slices']} slices; {report['training']}",
        "",
        "| depth | widths | regions at init | / (N^2/2) | regions trained | / (N^2/2) | test acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['depth']} | {'x'.join(map(str, r['widths']))} "
            f"| {r['mean_init']:.0f} ({min(r['counts_init'])}-{max(r['counts_init'])}) | {r['normalized_init']:.3f} "
            f"| {r['mean_trained']:.0f} ({min(r['counts_trained'])}-{max(r['counts_trained'])}) "
            f"| {r['normalized_trained']:.3f} | {r['test_accuracy']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

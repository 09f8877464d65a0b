"""Pruning a digits MLP by expressiveness vs weight norm vs at random (Maroudis & Xydis' claim; derived score).

A one-hidden-layer MLP 64 -> ``width`` -> 10 on scikit-learn's digits (full-batch Adam). For
each seed and k, the k hidden neurons with the lowest expressiveness score
(:mod:`dynatrack.analysis.expressiveness`, derived, on ``probe`` training samples), the k with
the smallest ||w_in||·||w_out||, or k random ones are masked to zero; test accuracy is
measured without fine-tuning and after ``finetune`` more full-batch steps with the mask held.
"At initialization": the ranking is taken from the initial network's patterns, the pruned
network is then trained ``steps`` steps (the claim that the criterion works before training).
Prints one JSON object; ``--out`` writes it and ``--plot`` a PNG.

    python jobs/expressiveness_prune.py --seeds 0 1 2 --ks 8 16 32 --out docs/results/expressiveness_prune.json
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import torch

from dynatrack.analysis.expressiveness import expressiveness, prune_ranking
from dynatrack.models import load_digits_tensors

CRITERIA = ("expressiveness", "weight_norm", "random")


def _train(net: torch.nn.Sequential, x: torch.Tensor, y: torch.Tensor, steps: int, mask: torch.Tensor) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net[2](torch.relu(net[0](x)) * mask), y).backward()
        opt.step()


def _acc(net: torch.nn.Sequential, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net[2](torch.relu(net[0](x)) * mask).argmax(1) == y).float().mean())


def _choose(criterion: str, net: torch.nn.Sequential, xp: torch.Tensor, k: int, rng: np.random.Generator) -> np.ndarray:
    width = net[0].out_features
    if criterion == "expressiveness":
        with torch.no_grad():
            pats = (net[0](xp) > 0).numpy()
        return prune_ranking(expressiveness(pats).neuron, k)
    if criterion == "weight_norm":
        with torch.no_grad():
            norm = net[0].weight.norm(dim=1) * net[2].weight.norm(dim=0)
        return prune_ranking(norm.numpy(), k)
    if k > width:
        raise ValueError(f"cannot prune {k} neurons from a layer of {width}")
    return rng.choice(width, k, replace=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--finetune", type=int, default=20)
    p.add_argument("--probe", type=int, default=512)
    p.add_argument("--out")
    p.add_argument("--plot")
    args = p.parse_args()
    if max(args.ks) > args.width:
        p.error(f"cannot prune {max(args.ks)} neurons from a layer of {args.width}: every k must be <= --width")
    torch.set_num_threads(1)
    train, test = load_digits_tensors(0)
    (x, y), (xt, yt) = train.tensors, test.tensors
    xp = x[: args.probe]
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        init = torch.nn.Sequential(torch.nn.Linear(64, args.width), torch.nn.ReLU(), torch.nn.Linear(args.width, 10))
        full = torch.ones(args.width)
        trained = copy.deepcopy(init)
        _train(trained, x, y, args.steps, full)
        base = _acc(trained, xt, yt, full)
        for k in args.ks:
            for criterion in CRITERIA:
                rng = np.random.default_rng(seed * 1000 + k)
                for when, net0 in (("trained", trained), ("init", init)):
                    net = copy.deepcopy(net0)
                    mask = torch.ones(args.width)
                    mask[torch.as_tensor(_choose(criterion, net, xp, k, rng), dtype=torch.long)] = 0.0
                    if when == "trained":
                        pruned = _acc(net, xt, yt, mask)
                        _train(net, x, y, args.finetune, mask)
                    else:  # ranked at initialization, then trained with the mask
                        _train(net, x, y, args.steps, mask)
                        pruned = None
                    rows.append({"seed": seed, "k": k, "criterion": criterion, "when": when, "base_acc": base,
                                 "acc_pruned": pruned, "acc_finetuned": _acc(net, xt, yt, mask)})
    out = {"setup": vars(args), "rows": rows}
    if args.plot:
        _plot(rows, args.ks, args.plot)
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


def _plot(rows: list[dict], ks: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharex=True)
    panels = (("trained", "acc_pruned", "trained, no fine-tune"), ("trained", "acc_finetuned", "trained, short fine-tune"),
              ("init", "acc_finetuned", "pruned at init, then trained"))
    for ax, (when, col, title) in zip(axes, panels):
        for c in CRITERIA:
            vals = [[r[col] for r in rows if r["when"] == when and r["criterion"] == c and r["k"] == k] for k in ks]
            ax.errorbar(ks, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], marker="o", capsize=3, label=c)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("neurons pruned (k)")
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()

"""Greedy vertex search vs gradient descent from the same initialization (Matena & Raffel's claim).

A small underparameterized teacher-student task: a random one-hidden-layer ReLU teacher
(d inputs, ``teacher`` neurons, scalar output) labels n Gaussian inputs; a student with
fewer neurons starts from one random initialization and is trained two ways:
- gradient descent: full-batch Adam on the square loss (``gd_steps``), float64;
- greedy vertex search (:func:`dynatrack.analysis.zonotope.greedy_vertex_search`) from the
  initialization's patterns and output signs; its loss is the fixed-pattern optimum at the
  vertex it stops at.
Also reported: GD's final patterns polished by the convex problem (the fixed-pattern optimum
at GD's final vertex). Prints one JSON object; ``--out`` also writes it.

    python jobs/zonotope_repro.py --seeds 0 1 2 3 --out docs/results/zonotope_repro.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from dynatrack.analysis import zonotope as zt


def one_seed(seed: int, n: int, d: int, teacher: int, student: int, gd_steps: int, lr: float, max_moves: int) -> dict:
    rng = np.random.default_rng(1000 + seed)
    x = rng.normal(size=(n, d))
    tw = rng.normal(size=(teacher, d + 1))
    ta = rng.normal(size=(1, teacher))
    y = zt.homogenize(x) @ tw.T
    y = (np.maximum(y, 0) @ ta.T)[:, 0]
    y = (y - y.mean()) / y.std()
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(student, d + 1, generator=g, dtype=torch.float64) * (2.0 / (d + 1)) ** 0.5
    a0 = torch.randn(1, student, generator=g, dtype=torch.float64) * (1.0 / student) ** 0.5
    c0 = torch.zeros(1, dtype=torch.float64)
    xt = torch.as_tensor(zt.homogenize(x))
    yt = torch.as_tensor(y)
    params = [p.clone().requires_grad_(True) for p in (w0, a0, c0)]
    opt = torch.optim.Adam(params, lr=lr)
    t0 = time.perf_counter()
    for _ in range(gd_steps):
        opt.zero_grad()
        w, a, c = params
        loss = ((torch.relu(xt @ w.T) @ a.T + c)[:, 0] - yt).pow(2).mean()
        loss.backward()
        opt.step()
    gd_time = time.perf_counter() - t0
    w, a, c = (p.detach().numpy() for p in params)
    gd_loss = zt.network_square_loss(x, y, w, a, c)
    gd_pat = (zt.homogenize(x) @ w.T > 0).T
    polish = zt.fixed_pattern_optimum(x, y, gd_pat, np.sign(a)).loss
    init_pat = (zt.homogenize(x) @ w0.numpy().T > 0).T
    init_loss = zt.network_square_loss(x, y, w0.numpy(), a0.numpy(), c0.numpy())
    t0 = time.perf_counter()
    gr = zt.greedy_vertex_search(x, y, init_pat, np.sign(a0.numpy()), max_moves=max_moves, seed=seed)
    return {"seed": seed, "init_loss": init_loss, "init_vertex_optimum": gr.history[0], "gd_loss": gd_loss,
            "gd_polished": polish, "greedy_loss": gr.loss, "greedy_moves": gr.moves, "greedy_qp_solves": gr.evaluated,
            "greedy_s": time.perf_counter() - t0, "gd_s": gd_time, "var_y": float(np.var(y))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--d", type=int, default=2)
    p.add_argument("--teacher", type=int, default=6)
    p.add_argument("--student", type=int, default=2)
    p.add_argument("--gd-steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--max-moves", type=int, default=40)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [one_seed(s, args.n, args.d, args.teacher, args.student, args.gd_steps, args.lr, args.max_moves)
            for s in args.seeds]
    out = {"task": vars(args), "rows": rows,
           "greedy_better": sum(r["greedy_loss"] < r["gd_loss"] - 1e-9 for r in rows), "seeds": len(rows)}
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""Benchmark: vertex LP checks per second and the fixed-pattern solve time on a digits demo-sized first layer.

The layer: 64 inputs -> 64 ReLU neurons (the demo MLP's first layer; one hidden layer, head
64 -> 10) after ``--steps`` full-batch Adam steps on digits; its 64 patterns over the 1,438
training samples. Measures (medians of ``--repeat``):
- LP checks per second: :func:`dynatrack.analysis.zonotope.is_vertex` on the 64 patterns, all samples;
- the same checks as Ray tasks on a local Ray (2 CPUs, warm): one task vs two (neurons split);
- the fixed-pattern problem's solve time (K = 10 fixed output weights) on probe subsets of
  ``--qp-samples`` samples (its dense QP grows like (n·m)·(m·(d+1))).
Prints one JSON object.

    python jobs/bench_zonotope.py --out docs/results/zonotope_bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch

from dynatrack.analysis import zonotope as zt
from dynatrack.models import load_digits_tensors


def _median_time(fn, repeat: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--qp-samples", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, _ = load_digits_tensors(0)
    x, y = train.tensors
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(args.steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    xn = x.numpy().astype(np.float64)
    w = torch.cat([net[0].weight, net[0].bias[:, None]], 1).detach().double().numpy()
    a = net[2].weight.detach().double().numpy()
    pats = (zt.homogenize(xn) @ w.T > 0).T
    n_unique = len(np.unique(pats, axis=0))
    assert zt.is_vertex(xn, pats).all()
    lp_s = _median_time(lambda: zt.is_vertex(xn, pats), args.repeat)
    out = {"layer": "64 -> 64 (head 64 -> 10)", "samples": len(xn), "neurons": len(pats), "distinct_patterns": n_unique,
           "lp_seconds": lp_s, "lp_checks_per_s": n_unique / lp_s}
    _write(out, args.out)  # each section is kept as soon as it is measured
    targets = np.eye(10)[y.numpy()]
    qp = {}
    for n in args.qp_samples:
        pos = np.arange(n)
        t0 = time.perf_counter()
        res = zt.fixed_pattern_optimum(xn[pos], targets[pos], pats[:, pos], a)
        qp[str(n)] = {"seconds": time.perf_counter() - t0, "constraints": n * len(pats),
                      "params": len(pats) * 65 + 10, "loss": res.loss,
                      "network_loss": zt.network_square_loss(xn[pos], targets[pos], w, a,
                                                             net[2].bias.detach().double().numpy())}
        out["fixed_pattern"] = qp
        _write(out, args.out)
    if not args.no_ray:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=False)
        try:
            check = ray.remote(num_cpus=1)(zt.is_vertex)
            xref = ray.put(xn)

            def run(parts: int) -> None:
                ray.get([check.remote(xref, chunk) for chunk in np.array_split(pats, parts)])

            run(2)  # warm the workers
            out["ray_one_task_s"] = _median_time(lambda: run(1), args.repeat)
            out["ray_two_tasks_s"] = _median_time(lambda: run(2), args.repeat)
            out["ray_speedup"] = out["ray_one_task_s"] / out["ray_two_tasks_s"]
        finally:
            ray.shutdown()
    _write(out, args.out)
    print(json.dumps(out, indent=1))


def _write(out: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

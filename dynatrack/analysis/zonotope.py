"""The zonotope view of one-hidden-layer ReLU networks (Matena & Raffel, NeurIPS 2022).

Matena & Raffel, "A Combinatorial Perspective on the Optimization of Shallow ReLU
Networks" (arXiv 2210.00176). With homogenized inputs x~_i = (x_i, 1), a hidden neuron
with weights w (bias last) has the activation pattern s_i = [w·x~_i > 0] over the n
training points. The patterns a neuron can have are exactly the vertices of the zonotope
Z = Σ_i [0, x~_i]: s is a vertex iff some w has (2 s_i - 1)·w·x~_i > 0 for every i, and by
scaling w that is the same as the linear feasibility problem (2 s_i - 1)·w·x~_i >= 1
(:func:`is_vertex`). Neighbouring vertices differ in one sample's bit, and
#vertices <= 2·Σ_{k=0}^{d} C(n-1, k) (:func:`vertex_count_bound`). Training the network
is a choice of a vertex per neuron (combinatorial) plus a convex problem once the
patterns are fixed (:func:`fixed_pattern_optimum`); :func:`greedy_vertex_search` is the
paper's greedy local search over neighbouring vertices.

>>> import numpy as np
>>> x = np.array([[0.0], [1.0], [2.0]])
>>> is_vertex(x, np.array([[1, 1, 0], [1, 0, 1]], dtype=bool)).tolist()  # a threshold, not a gap
[True, False]

Pure functions: numpy and scipy only, no I/O.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg import solve_triangular
from scipy.optimize import linprog, nnls

log = logging.getLogger(__name__)

__all__ = [
    "FixedPatternResult",
    "GreedyResult",
    "distinct_vertices",
    "fixed_pattern_optimum",
    "greedy_vertex_search",
    "homogenize",
    "is_vertex",
    "network_square_loss",
    "vertex_count_bound",
    "vertex_moves",
]


def homogenize(x: np.ndarray) -> np.ndarray:
    """x~ = (x, 1): float64 ``[n, d + 1]`` (the bias becomes the last weight)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return np.hstack([x, np.ones((len(x), 1))])


def is_vertex(x: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """Whether each pattern (row of ``patterns``, bool ``[m, n]``) is a vertex of Σ_i [0, x~_i].

    One LP feasibility problem per distinct pattern (SciPy ``linprog``, HiGHS): find w with
    (2 s_i - 1)·w·x~_i >= 1 for all i, which is feasible iff the strict system
    (2 s_i - 1)·w·x~_i > 0 is (scale w) — i.e. iff some neuron has exactly pattern s on the
    points x (Matena & Raffel). A recorded pattern that fails it was not produced by any
    weights: a recording bug. Equal patterns are checked once.

    Returns bool ``[m]``.
    """
    xt = homogenize(x)
    pats = np.asarray(patterns, dtype=bool).reshape(-1, len(xt))
    if not len(pats):
        return np.zeros(0, dtype=bool)
    uniq, inverse = np.unique(pats, axis=0, return_inverse=True)
    ok = np.empty(len(uniq), dtype=bool)
    zero = np.zeros(xt.shape[1])
    for k, s in enumerate(uniq):
        signs = np.where(s, 1.0, -1.0)
        res = linprog(zero, A_ub=-signs[:, None] * xt, b_ub=-np.ones(len(xt)), bounds=(None, None), method="highs")
        if res.status not in (0, 2):
            raise RuntimeError(f"the vertex LP did not finish: {res.message}")
        ok[k] = res.status == 0
    return ok[np.ravel(inverse)]


def vertex_count_bound(n: int, d: int) -> int:
    """Matena & Raffel's bound on the vertices of Σ_{i<=n} [0, x~_i], x_i in R^d: 2·Σ_{k=0}^{d} C(n-1, k)."""
    return 2 * sum(math.comb(n - 1, k) for k in range(d + 1))


def vertex_moves(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Each neuron's vertex move: the Hamming distance between its patterns (bool ``[m, n]`` each)."""
    before, after = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    if before.shape != after.shape:
        raise ValueError(f"pattern shapes differ: {before.shape} vs {after.shape}")
    return (before != after).sum(axis=1)


def distinct_vertices(history: np.ndarray) -> np.ndarray:
    """Distinct vertices each neuron has visited: ``history`` bool ``[steps, m, n]`` -> int ``[steps, m]``.

    Entry ``[t, j]`` counts the distinct patterns of neuron j among steps 0..t (cumulative).
    """
    history = np.asarray(history, dtype=bool)
    steps, m, _ = history.shape
    out = np.zeros((steps, m), dtype=np.int64)
    packed = np.packbits(history, axis=2)
    for j in range(m):
        seen: set[bytes] = set()
        for t in range(steps):
            seen.add(packed[t, j].tobytes())
            out[t, j] = len(seen)
    return out


def network_square_loss(x: np.ndarray, targets: np.ndarray, w: np.ndarray, a: np.ndarray, c: np.ndarray) -> float:
    """(1/n) Σ_i ||f(x_i) - t_i||² of f(x) = A·relu(W x~) + c (``w`` [m, d+1], ``a`` [K, m], ``c`` [K])."""
    xt = homogenize(x)
    t = np.asarray(targets, dtype=np.float64).reshape(len(xt), -1)
    f = np.maximum(xt @ np.asarray(w, dtype=np.float64).T, 0.0) @ np.asarray(a, dtype=np.float64).T + c
    return float(((f - t) ** 2).sum() / len(xt))


@dataclass(frozen=True)
class FixedPatternResult:
    """Solution of the fixed-pattern problem: its loss, weights, and how feasible they are."""

    loss: float  # (1/n) Σ_i ||f(x_i) - t_i||² at the solution
    w: np.ndarray  # [m, d + 1] hidden weights (bias last) with the fixed patterns
    c: np.ndarray  # [K] output bias
    max_violation: float  # max_ij max(0, -(2 s_ij - 1) w_j·x~_i): solver round-off, in pre-activation units


def _design(xt: np.ndarray, s: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The QP's data: rows (k, i) of E z = f_k(x_i) for z = (w_1..w_m, c), and G z = (2s_ij - 1) w_j·x~_i."""
    n, p = xt.shape
    m = s.shape[1]
    k_out = a.shape[0]
    feats = (s[:, :, None] * xt[:, None, :]).reshape(n, m * p)
    e = np.vstack([np.hstack([feats * np.repeat(a[k], p)[None, :], np.tile(np.eye(k_out)[k], (n, 1))])
                   for k in range(k_out)])
    g = np.zeros((n * m, m * p + k_out))
    for j in range(m):
        g[j * n:(j + 1) * n, j * p:(j + 1) * p] = (2.0 * s[:, j:j + 1] - 1.0) * xt
    return e, g


def _lsi(e: np.ndarray, f: np.ndarray, g: np.ndarray, ridge: float) -> np.ndarray:
    """min ||E z - f||² + eps||z||² s.t. G z >= 0, by Lawson & Hanson's LSI -> LDP -> NNLS (ch. 23).

    E_a = [E; sqrt(eps) I] = Q R; u = R z - Qᵀ f_a turns it into the least-distance problem
    min ||u|| s.t. (G R⁻¹) u >= -G R⁻¹ Qᵀ f_a, solved by one ``scipy.optimize.nnls``.
    """
    p = e.shape[1]
    eps = ridge * max(1.0, float((e**2).sum()) / p)
    q, r = np.linalg.qr(np.vstack([e, math.sqrt(eps) * np.eye(p)]))
    qf = q.T @ np.concatenate([f, np.zeros(p)])
    gh = solve_triangular(r, g.T, trans="T").T  # G R^-1
    lhs = np.vstack([gh.T, -(gh @ qf)[None, :]])
    rhs = np.zeros(p + 1)
    rhs[-1] = 1.0
    y, _ = nnls(lhs, rhs, maxiter=50 * lhs.shape[1])
    res = lhs @ y - rhs
    if abs(res[-1]) < 1e-12:  # cannot happen: z = 0 satisfies G z >= 0
        raise RuntimeError("the fixed-pattern problem reported infeasible")
    return solve_triangular(r, -res[:p] / res[-1] + qf)


def fixed_pattern_optimum(
    x: np.ndarray,
    targets: np.ndarray,
    patterns: np.ndarray,
    out_weights: np.ndarray,
    *,
    ridge: float = 1e-11,
) -> FixedPatternResult:
    """The best square loss reachable without changing any neuron's pattern (Matena & Raffel).

    Network f(x) = Σ_j a_j·relu(w_j·x~) + c with K outputs (a_j in R^K the column j of
    ``out_weights``). On the n points, relu(w_j·x~_i) = s_ij·(w_j·x~_i) once the pattern s_j
    is fixed, so f is linear in (W, c) and the problem solved here is the convex QP

        minimize_{W, c}  (1/n) Σ_i || Σ_j s_ij (w_j·x~_i) a_j + c - t_i ||²
        subject to       (2 s_ij - 1)·(w_j·x~_i) >= 0   for every sample i and neuron j,

    the closure of "every neuron keeps pattern s_j" (its infimum equals the infimum over the
    networks with exactly these patterns when each s_j is a vertex).

    - K = 1 (the paper's case): pass ``out_weights = sign(a)`` (shape [1, m]). By positive
      homogeneity a_j·relu(w_j·x~) = sign(a_j)·relu(|a_j| w_j·x~), so this is the best loss
      over *all* output and hidden weights with these patterns and output signs (jointly).
    - K > 1: the output weights A are held fixed (the hidden weights and the output bias are
      optimized): f_i = A·(s_i ⊙ W x~_i) + c is linear in W, but A·W together is not.

    Solved exactly as a least-squares problem with linear inequality constraints (Lawson &
    Hanson's LSI -> LDP -> NNLS reduction, SciPy ``nnls``), with a ridge eps·||z||²,
    eps = ``ridge``·||E||²_F / #params, only to make the design full rank (a dead neuron's
    weights do not enter the loss). Dense: memory and time grow like (n·m)·(m·(d+1)), so keep
    n·m to a few thousand (the analyzer takes a probe subset).
    """
    xt = homogenize(x)
    n, p = xt.shape
    t = np.asarray(targets, dtype=np.float64).reshape(n, -1)
    s = np.asarray(patterns, dtype=bool).reshape(-1, n).T.astype(np.float64)  # [n, m]
    m = s.shape[1]
    a = np.asarray(out_weights, dtype=np.float64).reshape(-1, m)  # [K, m]
    if t.shape[1] != a.shape[0]:
        raise ValueError(f"targets have {t.shape[1]} columns but out_weights has {a.shape[0]} rows")
    e, g = _design(xt, s, a)
    z = _lsi(e, t.T.ravel(), g, ridge)
    w, c = z[: m * p].reshape(m, p), z[m * p:]
    gz = g @ z
    viol = float(np.maximum(0.0, -gz).max()) if len(gz) else 0.0
    r = (s * (xt @ w.T)) @ a.T + c - t
    return FixedPatternResult(loss=float((r**2).sum() / n), w=w, c=c, max_violation=viol)


def relaxed_optimum(x: np.ndarray, targets: np.ndarray, patterns: np.ndarray, out_weights: np.ndarray) -> float:
    """The fixed-pattern objective without the pattern constraints: a least-squares lower bound.

    min_{W, c} (1/n) Σ_i ||Σ_j s_ij (w_j·x~_i) a_j + c - t_i||² by ``numpy.linalg.lstsq``;
    never above :func:`fixed_pattern_optimum` (a relaxation); used to skip hopeless neighbours.
    """
    xt = homogenize(x)
    t = np.asarray(targets, dtype=np.float64).reshape(len(xt), -1)
    s = np.asarray(patterns, dtype=bool).reshape(-1, len(xt)).T.astype(np.float64)
    e, _ = _design(xt, s, np.asarray(out_weights, dtype=np.float64).reshape(t.shape[1], -1))
    f = t.T.ravel()
    sol, *_ = np.linalg.lstsq(e, f, rcond=None)
    return float(((e @ sol - f) ** 2).sum() / len(xt))


@dataclass(frozen=True)
class GreedyResult:
    """Outcome of :func:`greedy_vertex_search`."""

    loss: float  # fixed-pattern optimum at the final vertex
    patterns: np.ndarray  # bool [m, n], the final vertex of every neuron
    w: np.ndarray  # [m, d + 1] the convex problem's weights there
    c: np.ndarray
    moves: int  # vertex moves made
    evaluated: int  # neighbours whose convex problem was solved
    history: list[float]  # loss after each move (history[0] = start)


def greedy_vertex_search(
    x: np.ndarray,
    targets: np.ndarray,
    patterns: np.ndarray,
    out_weights: np.ndarray,
    *,
    max_moves: int = 50,
    max_neighbors: int | None = None,
    seed: int = 0,
) -> GreedyResult:
    """Greedy local search over zonotope vertices (Matena & Raffel's heuristic).

    Start at the given vertices (one per neuron, e.g. the patterns at initialization) and
    their fixed-pattern optimum L(S) (:func:`fixed_pattern_optimum`). A neighbour flips one
    sample's bit in one neuron's pattern and must again be a vertex (:func:`is_vertex`).
    Each move goes to the neighbour with the lowest L (steepest descent); the search stops
    at a vertex tuple no neighbour improves, or after ``max_moves``.

    Derived details (the paper's exact procedure was not available): neighbours whose
    unconstrained least-squares relaxation (:func:`relaxed_optimum`, a lower bound on their L)
    is not below the current L are skipped without solving their QP, and with
    ``max_neighbors`` a random sample of that many flips is examined per move.
    """
    xt_x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    cur = np.asarray(patterns, dtype=bool).copy()
    m, n = cur.shape
    res = fixed_pattern_optimum(xt_x, targets, cur, out_weights)
    history = [res.loss]
    rng = np.random.default_rng(seed)
    evaluated = 0
    for _ in range(max_moves):
        flips = [(j, i) for j in range(m) for i in range(n)]
        if max_neighbors is not None and max_neighbors < len(flips):
            flips = [flips[k] for k in rng.choice(len(flips), max_neighbors, replace=False)]
        cands = np.repeat(cur[None], len(flips), axis=0)
        for k, (j, i) in enumerate(flips):
            cands[k, j, i] = ~cands[k, j, i]
        rows = np.array([cands[k, j] for k, (j, _) in enumerate(flips)])
        feasible = is_vertex(xt_x, rows) if len(rows) else np.zeros(0, dtype=bool)
        best, best_k = res, -1
        for k in np.flatnonzero(feasible):
            if relaxed_optimum(xt_x, targets, cands[k], out_weights) >= best.loss - 1e-12:
                continue
            cand = fixed_pattern_optimum(xt_x, targets, cands[k], out_weights)
            evaluated += 1
            if cand.loss < best.loss - 1e-10:
                best, best_k = cand, int(k)
        if best_k < 0:
            break
        cur, res = cands[best_k], best
        history.append(res.loss)
    return GreedyResult(loss=res.loss, patterns=cur, w=res.w, c=res.c, moves=len(history) - 1,
                        evaluated=evaluated, history=history)

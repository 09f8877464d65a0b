"""Expressiveness of a layer and of each neuron, from binary activation patterns (derived).

After Maroudis & Xydis (arXiv 2512.06440): a neuron (or group) is expressive when it tells
samples apart — judged by the overlap of activations across samples — which works at
initialization and from few samples, and ranks neurons for pruning. The paper's exact
formula was not available; the definition here is **derived** (dynatrack's, not the paper's):

- a layer's pattern of sample x is a(x) in {0,1}^width; for a pair of samples the Jaccard
  overlap is J(a, a') = |a ∧ a'| / |a ∨ a'|, with J = 1 when both are empty;
- the layer's expressiveness is E = 1 - mean over ordered pairs x ≠ x' of J(a(x), a(x'));
- neuron j's expressiveness is what the layer loses without it: e_j = E - E_{-j}, E_{-j}
  the same over the patterns with column j removed.

A dead neuron (never active) changes no intersection and no union: e_j = 0 exactly. An
always-on neuron adds 1 to every intersection and union, (I+1)/(U+1) >= I/U, so it makes
samples look alike: e_j <= 0 (0 only when every pair is already identical).
The pruning ranking is by e_j, least expressive first.

All e_j in one pass from pair counts: with I = A Aᵀ (intersections), U_pq = c_p + c_q - I_pq
(c_p active neurons of sample p), removing neuron j changes a pair's J only where j is
active in the pair: (I - 1)/(U - 1) where both are active, I/(U - 1) where one is. So
Σ_pairs J_{-j} = Σ_pairs J + a_jᵀ (M11 - J) a_j + 2·a_jᵀ (M10 - J)(1 - a_j), for all j by
two matrix products (a_j = column j of A, diagonals excluded).

>>> import numpy as np
>>> a = np.array([[1, 0, 1], [1, 1, 0], [1, 0, 0]], dtype=bool)  # neuron 0 always on
>>> r = expressiveness(a)  # J = 1/3, 1/2, 1/2: E = 1 - 4/9
>>> round(r.layer, 4), bool(r.neuron[0] < 0)
(0.5556, True)

Pure functions: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Expressiveness", "expressiveness", "jaccard_sum", "prune_ranking"]


@dataclass(frozen=True)
class Expressiveness:
    """A layer's expressiveness and each neuron's leave-one-out score, with the sums behind them."""

    layer: float  # E = 1 - jaccard_sum / n_pairs
    neuron: np.ndarray  # float64 [width]: e_j = E - E_{-j} = (loo_jaccard_sum_j - jaccard_sum) / n_pairs
    jaccard_sum: float  # Σ over ordered pairs p != q of J(a_p, a_q)
    loo_jaccard_sum: np.ndarray  # float64 [width]: the same sum with neuron j removed
    n_pairs: int  # n (n - 1)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0/0 = 1 (two empty patterns overlap fully)."""
    out = np.ones_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def jaccard_sum(patterns: np.ndarray) -> float:
    """Σ over ordered pairs p != q of J(a_p, a_q) for bool ``patterns`` [n, width]."""
    a = np.asarray(patterns, dtype=np.float64)
    inter = a @ a.T
    c = a.sum(axis=1)
    jac = _ratio(inter, c[:, None] + c[None, :] - inter)
    np.fill_diagonal(jac, 0.0)
    return float(jac.sum())


def expressiveness(patterns: np.ndarray) -> Expressiveness:
    """Layer expressiveness E and every neuron's e_j = E - E_{-j} (derived; see the module doc).

    ``patterns``: bool ``[n, width]``, one row per sample (n >= 2). Memory O(n²): pass a
    subset of a large probe.
    """
    a = np.asarray(patterns, dtype=bool)
    if a.ndim != 2:
        raise ValueError(f"patterns must be [samples, width], got shape {a.shape}")
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"expressiveness compares pairs of samples: needs >= 2 probe samples, got {n}")
    af = a.astype(np.float64)
    inter = af @ af.T
    cnt = af.sum(axis=1)
    union = cnt[:, None] + cnt[None, :] - inter
    jac = _ratio(inter, union)
    m11 = _ratio(inter - 1.0, union - 1.0)  # both active on j: j leaves the intersection and the union
    m10 = _ratio(inter, union - 1.0)  # one active on j: j leaves the union only
    for mat in (jac, m11, m10):
        np.fill_diagonal(mat, 0.0)
    total = float(jac.sum())
    d11 = ((m11 - jac) @ af * af).sum(axis=0)  # a_jᵀ (M11 - J) a_j for every j
    d10 = ((m10 - jac) @ (1.0 - af) * af).sum(axis=0)  # a_jᵀ (M10 - J) (1 - a_j)
    loo = total + d11 + 2.0 * d10
    n_pairs = n * (n - 1)
    layer = 1.0 - total / n_pairs
    return Expressiveness(layer=layer, neuron=(loo - total) / n_pairs, jaccard_sum=total, loo_jaccard_sum=loo,
                          n_pairs=n_pairs)


def prune_ranking(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` neurons to prune: lowest score first (ties by index). ``k`` <= the layer's width."""
    scores = np.asarray(scores, dtype=np.float64)
    if not 0 <= k <= len(scores):
        raise ValueError(f"cannot prune {k} neurons from a layer of {len(scores)}; choose k between 0 and {len(scores)}")
    return np.argsort(scores, kind="stable")[:k]

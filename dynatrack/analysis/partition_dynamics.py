"""Neuron-partition dynamics: how the partition of neurons moves during training.

Wang & Ma, "Early Stage Convergence and Global Convergence of Training Mildly
Parameterized Neural Networks" (NeurIPS 2022, arXiv 2206.02139) analyse training
through each neuron's activated set I_k(t) = {i : b_k(t)·x_i > 0} and a partition of
the neurons by sign(a_k) and by which samples/labels activate them. The partition
classes used here are the **derived** labels of :mod:`dynatrack.analysis.partitions`
(``dead``, ``always_on``, ``class_selective``, ``mixed``, ``partial``), suffixed with
the outgoing-weight sign (``+``/``-``/``0``) where the recorder stored it. Derived
statistics, all counts (they merge across ranks, shards and tasks by addition):

* class sizes |{k : class_k(t) = c}|, summing to the layer width;
* transition counts T[a, b] = |{k : class_k(s) = a, class_k(t) = b}| between an earlier
  step s (the previous recorded step, or step 0) and t; row sums are the sizes at s;
* set changes Σ_i 1[i ∈ I_k(t) Δ I_k(0)] per neuron over the samples seen (a sum over
  ranks' samples); a neuron's activated set is unchanged since initialization iff its
  total is 0 (:func:`set_change_compute` counts them);
* per-sample churn |S_i(t) Δ S_i(s)|, S_i the set of neurons that sample i activates.

>>> import numpy as np
>>> before = np.array(["dead", "mixed", "mixed"], dtype=object)
>>> after = np.array(["mixed", "mixed", "dead"], dtype=object)
>>> sorted(transition_counts(before, after).items())
[(('dead', 'mixed'), 1), (('mixed', 'dead'), 1), (('mixed', 'mixed'), 1)]
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


def partition_classes(labels: np.ndarray, out_sign: np.ndarray | None = None) -> np.ndarray:
    """Class of each neuron: its partition label, plus ``+``/``-``/``0`` when ``out_sign`` is known.

    >>> partition_classes(np.array(["dead", "mixed"], dtype=object), np.array([1, -1])).tolist()
    ['dead+', 'mixed-']
    """
    labels = np.asarray(labels, dtype=object)
    if out_sign is None:
        return labels.copy()
    out = labels.copy()
    for k, s in enumerate(out_sign):
        if s is not None and not (isinstance(s, float) and np.isnan(s)):
            out[k] = f"{labels[k]}{'+' if s > 0 else '-' if s < 0 else '0'}"
    return out


def class_sizes(classes: np.ndarray) -> dict[str, int]:
    """``{class: number of neurons}``; the values sum to the layer width."""
    return dict(Counter(np.asarray(classes, dtype=object).tolist()))


def transition_counts(before: np.ndarray, after: np.ndarray) -> dict[tuple[str, str], int]:
    """``{(class at s, class at t): neurons}`` for the same neurons at two steps (nonzero entries)."""
    before, after = np.asarray(before, dtype=object), np.asarray(after, dtype=object)
    if before.shape != after.shape:
        raise ValueError(f"class arrays differ in length: {before.shape} vs {after.shape}")
    return dict(Counter(zip(before.tolist(), after.tolist())))


@dataclass
class SetChangeState:
    """Sufficient statistics of activated-set changes against a reference step (counts).

    ``changed[k]`` = Σ over the samples seen of 1[i ∈ I_k(t) Δ I_k(ref)]; ``n_samples`` samples seen.
    """

    width: int
    n_samples: int = 0
    changed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        if not len(self.changed):
            self.changed = np.zeros(self.width, dtype=np.int64)


def set_change_update(state: SetChangeState, ref: np.ndarray, now: np.ndarray) -> SetChangeState:
    """Add the samples of one shard: ``ref`` and ``now`` are bool ``[n, width]`` of the same samples."""
    ref, now = np.asarray(ref, dtype=bool), np.asarray(now, dtype=bool)
    if ref.shape != now.shape or ref.shape[1] != state.width:
        raise ValueError(f"pattern shapes {ref.shape}, {now.shape} do not match width {state.width}")
    return SetChangeState(state.width, state.n_samples + len(ref), state.changed + (ref != now).sum(axis=0))


def set_change_merge(a: SetChangeState, b: SetChangeState) -> SetChangeState:
    """Two shards' states combined (addition)."""
    if a.width != b.width:
        raise ValueError(f"widths differ: {a.width} vs {b.width}")
    return SetChangeState(a.width, a.n_samples + b.n_samples, a.changed + b.changed)


def set_change_compute(state: SetChangeState) -> tuple[int, int]:
    """``(n_unchanged, changed_sum)``: neurons whose activated set is identical to the
    reference on every sample seen, and Σ_k |I_k(t) Δ I_k(ref)|."""
    return int((state.changed == 0).sum()), int(state.changed.sum())


def sample_churn(ref: np.ndarray, now: np.ndarray) -> np.ndarray:
    """|S_i(t) Δ S_i(ref)| per sample (Hamming distance of its patterns), int64 ``[n]``.

    >>> sample_churn(np.array([[1, 0, 1]], bool), np.array([[0, 0, 0]], bool)).tolist()
    [2]
    """
    return (np.asarray(ref, dtype=bool) != np.asarray(now, dtype=bool)).sum(axis=1).astype(np.int64)

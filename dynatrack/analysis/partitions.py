"""Neuron partitions: how neurons split by the samples that activate them.

Wang & Ma, "Early Stage Convergence and Global Convergence of Training Mildly
Parameterized Neural Networks" (NeurIPS 2022, arXiv 2206.02139) analyse a
two-layer net f(x) = Σ_k a_k σ(b_k·x) through each neuron's *activated set*
I_k = {i : b_k·x_i > 0} and partition the neurons by sign(a_k) and by which
samples / labels activate them. The labels below are a **derived**,
computable version of that partition for any ReLU-family layer:

* ``dead``            |I_k| = 0: no probe sample activates the neuron.
* ``always_on``       |I_k| = n: every probe sample activates it (it is linear on the probe set).
* ``class_selective`` 0 < |I_k| < n and every activating sample has the same label.
* ``mixed``           0 < |I_k| < n and samples of two or more labels activate it.
* ``partial``         0 < |I_k| < n when no labels are known.
* ``empty``           no probe samples were counted (n = 0).

For the last hidden layer of a scalar-output model the sign of the outgoing
weight sign(a_k) is stored beside the label (column ``out_sign``).

>>> import numpy as np
>>> partition_labels(np.array([0, 4, 2, 3]), np.array([4, 4, 4, 4]),
...                  np.array([[0, 0], [2, 2], [2, 0], [2, 1]])).tolist()
['dead', 'always_on', 'class_selective', 'mixed']
"""

from __future__ import annotations

import numpy as np

LABELS = ("dead", "always_on", "class_selective", "mixed", "partial", "empty")


def partition_labels(
    active: np.ndarray, n_samples: np.ndarray, active_by_class: np.ndarray | None = None
) -> np.ndarray:
    """Label each neuron from its counts (see module docstring for the definitions).

    Args:
        active: int ``[m]`` probe samples activating each neuron.
        n_samples: int ``[m]`` probe samples counted for each neuron.
        active_by_class: int ``[m, C]`` the same count split by label, or ``None``
            / ``C == 0`` when the probe has no labels.

    Returns an object array of ``m`` strings.
    """
    active = np.asarray(active)
    n_samples = np.asarray(n_samples)
    out = np.full(active.shape, "mixed", dtype=object)
    has_classes = active_by_class is not None and np.asarray(active_by_class).ndim == 2 and np.asarray(
        active_by_class
    ).shape[1] > 0
    if has_classes:
        classes_hit = (np.asarray(active_by_class) > 0).sum(axis=1)
        out[classes_hit == 1] = "class_selective"
    else:
        out[:] = "partial"
    out[active >= n_samples] = "always_on"
    out[active == 0] = "dead"
    out[n_samples == 0] = "empty"
    return out

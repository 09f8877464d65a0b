"""Bit packing and layer selection."""

import numpy as np
import pytest
import torch
from torch import nn

from dynatrack.recorder.capture import (
    LayerSelectionError,
    materialize,
    pack_bits,
    select_layers,
)


@pytest.mark.parametrize("width", [1, 7, 8, 9, 64, 100])
def test_pack_bits_equals_numpy_packbits(width):
    g = torch.Generator().manual_seed(width)
    active = torch.rand(33, width, generator=g) > 0.5
    np.testing.assert_array_equal(pack_bits(active).numpy(), np.packbits(active.numpy(), axis=1, bitorder="big"))


@pytest.mark.parametrize(
    "shapes",
    [[(5, 16)], [(3, 256), (4, 256), (1, 256)], [(2, 9)], [(3, 2, 4, 4), (1, 2, 4, 4)], [(0, 8), (3, 8)], [(6, 3)]],
)
def test_materialize_equals_numpy_packbits_and_leaves_the_masks_alone(shapes):
    # the writer's GIL-free packing (multiply-gather on uint64 words) against numpy.packbits
    rng = np.random.default_rng(len(shapes))
    masks = [torch.from_numpy(rng.random(s) > 0.5) for s in shapes]
    before = [m.clone() for m in masks]
    rows = np.concatenate([m.numpy().reshape(m.shape[0], int(np.prod(m.shape[1:]))) for m in masks])
    got = materialize(masks)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.packbits(rows, axis=1, bitorder="big"))
    assert all(torch.equal(a, b) for a, b in zip(masks, before))


def test_select_by_type_and_glob_in_forward_order():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), nn.GELU()), nn.Sequential(nn.Linear(2, 2), nn.SiLU())])
            self.tanh = nn.Tanh()

    m = M()
    assert [n for n, _ in select_layers(m, None)] == ["enc.0.1", "enc.1.1"]
    assert [n for n, _ in select_layers(m, ["enc.*.1"])] == ["enc.0.1", "enc.1.1"]
    assert [n for n, _ in select_layers(m, ["tanh"])] == ["tanh"]  # any named module: sign of its input
    with pytest.raises(LayerSelectionError, match=r"ReLU-family modules: \['enc.0.1', 'enc.1.1'\]"):
        select_layers(m, ["dec.*"])


@pytest.mark.parametrize("width", [40, 13])  # SWAR words (w % 8 == 0) and the byte-wise path
@pytest.mark.parametrize("order", ["sorted", "shuffled", "no labels", "missing class"])
def test_writer_class_counts_equal_a_naive_loop(order, width):
    from dynatrack.recorder.callback import _class_counts

    rng = np.random.default_rng(3)
    rows = rng.random((700, width)) > 0.6
    labels = rng.integers(0, 3, 700)
    labels[:300] = 0  # class 0 has more than 255 rows, nearly all active: several SWAR blocks, each lane <= 255
    rows[:300] = rng.random((300, width)) > 0.02
    if order == "sorted":
        idx = np.argsort(labels, kind="stable")
        rows, labels = rows[idx], labels[idx]
    if order == "missing class":
        labels[labels == 2] = 1
    n_classes = 0 if order == "no labels" else 5  # classes 3 and 4 (and 2) never occur
    got = _class_counts(rows, None if order == "no labels" else labels, n_classes)
    if n_classes == 0:
        naive = [[sum(int(r[j]) for r in rows) for j in range(width)]]
    else:
        naive = [[sum(int(r[j]) for r, y in zip(rows, labels) if y == c) for j in range(width)] for c in range(n_classes)]
    np.testing.assert_array_equal(got, np.array(naive))

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
    from dynatrack.recorder.decode import _class_counts

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


class _Net(nn.Module):
    """Widths 3 (a shared ReLU, called twice: 3 and 13 wide), a conv ReLU (2x3x3 = 18) and a GELU gate (9)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)
        self.act = nn.ReLU()
        self.fc1, self.fc2, self.fc3 = nn.Linear(18, 3), nn.Linear(3, 13), nn.Linear(13, 9)
        self.gate = nn.GELU()

    def forward(self, x):
        h = self.act(self.conv(x)).flatten(1)
        h = self.act(self.fc1(h))
        h = self.act(self.fc2(h))
        return self.gate(self.fc3(h))


def _reference_masks(net, x):
    """Every recorded layer's pre-activation sign, by a plain forward (no hooks)."""
    with torch.no_grad():
        c = net.conv(x)
        h1 = net.fc1(torch.relu(c).flatten(1))
        h2 = net.fc2(torch.relu(h1))
        g = net.fc3(torch.relu(h2))
    return {"act@0": (c > 0).flatten(1), "act@1": h1 > 0, "act@2": h2 > 0, "gate": g > 0}


@pytest.mark.parametrize("path", ["kernel", "numpy"])  # the compiled pack-and-count kernel, or numpy only
@pytest.mark.parametrize("chunk", [10, 23])  # three chunks (the last short), or one (counts are the SWAR lanes)
def test_probe_masks_decode_equals_packbits_and_a_naive_count(chunk, path, monkeypatch):
    # CPU probe steps: the hooks write every layer of a chunk into one buffer; after each chunk's
    # forward one pack and one count decode it
    from dynatrack.recorder import decode
    from dynatrack.recorder.decode import _ProbeDecoder
    from dynatrack.recorder.capture import Capture, trace_layers

    if path == "numpy":
        monkeypatch.setattr(decode, "_pack_kernel", None)
    elif decode._pack_kernel is None:
        pytest.skip("dynatrack.recorder._pack is not compiled in this install (no C compiler at install time)")

    torch.manual_seed(0)
    net = _Net()
    modules = select_layers(net, None)
    x0 = torch.randn(2, 1, 4, 4)
    calls, widths = trace_layers(net, modules, net, x0)
    assert calls == {"act": 3, "gate": 1} and widths == {"act@0": 18, "act@1": 3, "act@2": 13, "gate": 9}
    cap = Capture(modules, calls)
    cap.pack_on_device = False
    n = 23
    buf = cap.probe_masks(widths, min(chunk, n))  # one chunk's rows
    assert [off % 8 for _, off, _ in buf.layers] == [0, 0, 0, 0]
    labels = np.sort(np.random.default_rng(0).integers(0, 4, n))
    dec = _ProbeDecoder("train", buf, n, labels, 4)
    totals = _ProbeDecoder("train", buf, n, None, 0)  # no labels: one row of totals
    assert (dec.kernel is not None) == (totals.kernel is not None) == (path == "kernel")
    assert set(labels) == {0, 1, 2, 3} and dec.one_chunk == totals.one_chunk == (chunk == n)
    assert dec.plans[0].lanes_are_counts == (chunk == n) and totals.plans[0].lanes_are_counts
    for trial in range(2):  # the second probe step reuses the buffer (its padding must still be zero)
        x = torch.randn(n, 1, 4, 4) * (1 + trial)
        cap.reuse = buf
        dec.begin(bits=True, counts=True)
        totals.begin(bits=False, counts=True)
        cap.start_batch()
        with torch.no_grad():
            for k, i in enumerate(range(0, n, chunk)):  # 10, 10 and 3 rows (the last leaves stale rows behind), or 23
                net(x[i : i + chunk])
                taken = cap.take()
                cap.enabled = True
                assert {k: len(v) for k, v in taken.items()} == {layer: 1 for layer in widths}
                dec.add(k, i, min(chunk, n - i))
                totals.add(k, i, min(chunk, n - i))
        cap.enabled = False
        cap.reuse = None
        ref = _reference_masks(net, x)
        dec.wait()  # a one-chunk split is decoded on the kernel's own thread: whoever reads waits first
        totals.wait()
        items = dec.items()
        bits = {layer: a for what, _, layer, a in items if what == "bits"}
        counts = {layer: a for what, _, layer, a in items if what == "counts"}
        total_items = totals.items()
        assert {what for what, _, _, _ in total_items} == {"counts"}
        total = {layer: a for _, _, layer, a in total_items}
        for layer, mask in ref.items():
            m = mask.numpy()
            np.testing.assert_array_equal(bits[layer], np.packbits(m, axis=1, bitorder="big"))
            naive = [[sum(int(m[r, j]) for r in range(n) if labels[r] == c) for j in range(m.shape[1])] for c in range(4)]
            np.testing.assert_array_equal(counts[layer], np.array(naive))
            np.testing.assert_array_equal(total[layer], m.sum(axis=0, keepdims=True))
            assert bits[layer].flags.c_contiguous
            # numpy, one chunk: the counts are _class_counts' SWAR lanes themselves (uint8), else int32 sums
            assert counts[layer].dtype == (np.uint8 if chunk == n and path == "numpy" else np.int32)
    cap.detach()


def test_pack_kernel_equals_packbits_and_a_naive_count():
    # the compiled kernel alone: widths past its 4,096-neuron counter window, classes split into
    # several blocks (at most 255 rows each), a class with no rows
    from dynatrack.recorder import decode

    kernel = decode._pack_kernel
    if kernel is None:
        pytest.skip("dynatrack.recorder._pack is not compiled in this install (no C compiler at install time)")
    rng = np.random.default_rng(1)
    for rows, wpad, n_classes in [(1, 8, 1), (600, 16, 3), (37, 4104, 5), (300, 24, 4)]:
        labels = np.sort(rng.choice([c for c in range(n_classes) if c != 1 or n_classes == 1], rows))
        plan = decode._count_plan(labels, n_classes, rows)
        masks = rng.random((rows, wpad)) < 0.3
        bits = np.empty((rows, wpad // 8), np.uint8)
        naive = np.zeros((n_classes, wpad), np.int64)
        for r in range(rows):
            for j in range(wpad):
                naive[labels[r], j] += int(masks[r, j])
        for zero in (False, True):  # added to what is there, or to zeros
            counts = np.full((n_classes, wpad), 7, np.int32)
            kernel.pack_count(masks, rows, wpad, plan.block_start, plan.block_class, bits, counts, zero)
            np.testing.assert_array_equal(bits, np.packbits(masks, axis=1, bitorder="big"))
            np.testing.assert_array_equal(counts, naive + (0 if zero else 7))
    starts, classes = np.array([0], np.int64), np.array([0], np.int64)
    masks = np.zeros((4, 8), bool)
    with pytest.raises(ValueError, match="buffer sizes do not fit"):
        kernel.pack_count(masks, 4, 16, starts, classes, None, None)
    with pytest.raises(ValueError, match="at most 255 rows each"):
        kernel.pack_count(np.zeros((256, 8), bool), 256, 8, starts, classes, None, None)
    with pytest.raises(TypeError, match="starts must be int64"):  # lengths would count the wrong blocks
        kernel.pack_count(masks, 4, 8, starts.astype(np.int32), classes, None, None)
    with pytest.raises(ValueError, match="counts must be int32"):
        kernel.pack_count(masks, 4, 8, starts, np.array([2], np.int64), None, np.zeros((2, 8), np.int32))


def test_pack_kernel_background_calls_equal_the_direct_ones():
    # submit(): the same calls on the kernel's native thread (no GIL); the buffers stay held until
    # wait(), a Pending freed unwaited waits first, and a forked child (a DataLoader worker) can
    # still submit
    import os

    from dynatrack.recorder import decode

    kernel = decode._pack_kernel
    if kernel is None:
        pytest.skip("dynatrack.recorder._pack is not compiled in this install (no C compiler at install time)")
    rng = np.random.default_rng(2)
    rows, wpad = 600, 40
    labels = np.sort(rng.integers(0, 3, rows))
    plan = decode._count_plan(labels, 3, rows)
    starts, classes = plan.block_start, plan.block_class

    def calls():
        masks = [rng.random((rows, wpad)) < 0.5 for _ in range(3)]
        outs = [(np.empty((rows, wpad // 8), np.uint8), np.full((3, wpad), 9, np.int32)) for _ in masks]
        return masks, outs, [(m, rows, wpad, starts, classes, b, c, True) for m, (b, c) in zip(masks, outs)]

    def check(masks, outs):
        for m, (b, c) in zip(masks, outs):
            np.testing.assert_array_equal(b, np.packbits(m, axis=1, bitorder="big"))
            np.testing.assert_array_equal(c, [[int(m[labels == k, j].sum()) for j in range(wpad)] for k in range(3)])

    masks, outs, args = calls()
    pending = kernel.submit(args)
    pending.wait()
    assert pending.done
    pending.wait()  # idempotent
    check(masks, outs)
    many = [calls() for _ in range(20)]
    handles = [kernel.submit(a) for _, _, a in many]
    del handles  # freed unwaited: each waits for its calls first
    for masks, outs, _ in many:
        check(masks, outs)
    with pytest.raises(ValueError, match="zero=True"):
        kernel.submit([args[0][:7] + (False,)])  # added-to counts could not be redone after a fork
    with pytest.raises(ValueError, match="buffer sizes do not fit"):
        kernel.submit([(args[0][0], rows, wpad + 8) + args[0][3:]])
    if not hasattr(os, "fork"):
        return
    masks, outs, args = calls()
    before = kernel.submit(args)  # in flight at the fork
    pid = os.fork()
    if pid == 0:  # the child: its copy of the queued calls finishes, and new ones run
        ok = 0
        try:
            before.wait()
            check(masks, outs)
            m2, o2, a2 = calls()
            kernel.submit(a2).wait()
            check(m2, o2)
        except BaseException:  # noqa: BLE001 - reported by the exit status
            ok = 1
        os._exit(ok)
    _, status = os.waitpid(pid, 0)
    before.wait()
    check(masks, outs)
    assert os.waitstatus_to_exitcode(status) == 0


def test_probe_masks_reject_a_layer_whose_width_changed():
    from dynatrack.recorder.capture import ProbeMasks

    buf = ProbeMasks({0: [("a", 8)]}, rows=4)
    assert buf.view(0, 0, torch.zeros(4, 8)).shape == (4, 8)
    with pytest.raises(ValueError, match="expected 8 values per sample"):
        buf.view(0, 0, torch.zeros(4, 9))
    with pytest.raises(ValueError, match="at most 4 samples"):
        buf.view(0, 0, torch.zeros(5, 8))  # a chunk larger than the buffer
    with pytest.raises(ValueError, match="called more than 1 times in one probe forward"):
        buf.view(0, 1, torch.zeros(4, 8))  # a second call within one chunk's forward


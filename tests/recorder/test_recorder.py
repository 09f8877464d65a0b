"""PatternRecorder in real single-process Trainer runs, checked against independent recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TinyNet, assert_signs, loader, make_data, trainer
from lightning.pytorch import Callback

from dynatrack import PatternRecorder, open_run, schedules
from dynatrack.analysis.partitions import partition_labels


def manual_preacts(state: dict, x: torch.Tensor, n_hidden: int = 2) -> list[torch.Tensor]:
    """Pre-activations of TinyNet's hidden layers from a plain float64 matrix forward of the weights."""
    h, out = x.double(), []
    for i in range(n_hidden):
        w, b = state[f"net.{2 * i}.weight"].double(), state[f"net.{2 * i}.bias"].double()
        z = h @ w.T + b
        out.append(z)
        h = torch.relu(z)
    return out


def fit_recorded(tmp_path, data, steps: int = 12, **rec_kw):
    x, y = data
    torch.manual_seed(0)
    model = TinyNet()
    rec_kw.setdefault("probe", {"train": (x, y), "test": make_data(20, seed=1)})
    rec = PatternRecorder(str(tmp_path / "runs"), run_name="r", **rec_kw)
    trainer(steps, [rec]).fit(model, loader(x, y))
    return rec, model, open_run(rec.run_dir)


def test_probe_bits_equal_plain_forward_of_checkpointed_weights(tmp_path, data):
    rec, _, run = fit_recorded(tmp_path, data, steps=12, schedule=schedules.at([0, 5, 11]))
    x, _ = data
    test_x, _ = make_data(20, seed=1)
    assert run.recorded_steps() == [0, 5, 11, 12]  # 12: the final weights (record_final)
    assert run.checkpoint_steps() == [0, 5, 11, 12]
    for step in (0, 5, 12):
        state = run.checkpoint(step)
        for split, inputs in (("train", x), ("test", test_x)):
            expected = manual_preacts(state, inputs)
            for layer, z in zip(["net.1", "net.3"], expected):
                ids, bits = run.pattern_bits(step, layer, split=split)
                assert ids.tolist() == list(range(len(inputs)))
                assert_signs(bits, z)
    # weights do change between recorded steps, so the comparison is not trivially the same pattern
    assert not torch.equal(run.checkpoint(0)["net.0.weight"], run.checkpoint(12)["net.0.weight"])


def test_n_active_is_popcount_and_row_bytes_match_width(tmp_path, data):
    _, _, run = fit_recorded(tmp_path, data, steps=3)
    t = run.patterns()
    widths = run.widths
    assert widths == {"net.1": 13, "net.3": 20}
    for layer, n_active, bits in zip(t.column("layer").to_pylist(), t.column("n_active").to_pylist(),
                                     t.column("bits").to_pylist()):
        assert len(bits) == (widths[layer] + 7) // 8
        assert n_active == sum(bin(b).count("1") for b in bits)


@pytest.mark.parametrize("where", ["device", "writer"])
def test_neuron_partitions_equal_counts_from_pattern_rows(tmp_path, data, where):
    x, y = data
    _, _, run = fit_recorded(tmp_path, data, steps=6, schedule=schedules.at([0, 4]), neuron_counts=where)
    neurons = run.neurons().to_pandas()
    for step in (0, 4, 6):
        for layer, width in run.widths.items():
            ids, bits = run.pattern_bits(step, layer, split="train")
            active = np.unpackbits(bits, axis=1, count=width).astype(bool)
            labels = y.numpy()[ids]
            rows = neurons[(neurons.step == step) & (neurons.layer == layer) & (neurons.split == "train")]
            rows = rows.sort_values("neuron")
            assert rows.neuron.tolist() == list(range(width))
            np.testing.assert_array_equal(rows.active.to_numpy(), active.sum(0))
            assert (rows.n_samples == len(x)).all()
            by_class = np.stack(rows.active_by_class.to_numpy())
            naive = np.array([[active[labels == c, j].sum() for c in range(3)] for j in range(width)])
            np.testing.assert_array_equal(by_class, naive)
            # labels by hand from the definitions
            for j, label in enumerate(rows.partition):
                a = active[:, j]
                if not a.any():
                    assert label == "dead"
                elif a.all():
                    assert label == "always_on"
                elif len(set(labels[a])) == 1:
                    assert label == "class_selective"
                else:
                    assert label == "mixed"


def test_partition_labels_cover_all_cases():
    active = np.array([0, 5, 2, 3, 1, 0])
    n = np.array([5, 5, 5, 5, 5, 0])
    by_class = np.array([[0, 0], [3, 2], [2, 0], [1, 2], [0, 1], [0, 0]])
    assert partition_labels(active, n, by_class).tolist() == [
        "dead", "always_on", "class_selective", "mixed", "class_selective", "empty"]
    assert partition_labels(active[:5], n[:5], None).tolist() == ["dead", "always_on", "partial", "partial", "partial"]


def test_batch_source_rows_match_the_batch_forward(tmp_path, data):
    x, y = data
    seen: dict[int, torch.Tensor] = {}

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[trainer.global_step] = batch[-1].clone()

    torch.manual_seed(0)
    model = TinyNet()
    rec = PatternRecorder(str(tmp_path / "runs"), run_name="b", probe=None, batch_schedule=schedules.every(3),
                          checkpoint_schedule=schedules.every(3))
    trainer(10, [rec, Spy()]).fit(model, loader(x, y))
    run = open_run(rec.run_dir)
    assert run.recorded_steps("patterns", source="batch") == [0, 3, 6, 9]
    for step in (0, 3, 6, 9):
        t = run.patterns(step=step, layer="net.3", source="batch")
        ids = np.array(t.column("sample_id").to_pylist())
        assert sorted(ids.tolist()) == sorted(seen[step].tolist())
        z = manual_preacts(run.checkpoint(step), x[torch.as_tensor(ids)])[1]
        got = np.stack([np.frombuffer(b, np.uint8) for b in t.column("bits").to_pylist()])
        assert_signs(got, z)
    steps = run.steps().to_pandas()
    assert set(steps.step) >= {0, 3, 6, 9}
    assert (steps.batch_size == 16).all() and np.isfinite(steps.loss).all() and (steps.grad_norm > 0).all()


def test_batch_source_without_ids_is_a_clear_error(tmp_path, data):
    x, y = data
    rec = PatternRecorder(str(tmp_path / "runs"), run_name="noid", batch_schedule=schedules.every(1))
    with pytest.raises(ValueError, match="IndexedDataset"):
        trainer(3, [rec]).fit(TinyNet(), loader(x, y, indexed=False))


def test_train_mode_restored_and_probe_in_eval(tmp_path, data):
    x, y = data
    modes: list[tuple[bool, bool]] = []

    class Dropped(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)
            self.drop.eval()  # a submodule deliberately frozen in eval: must stay so

        def forward(self, x):
            modes.append((self.training, self.drop.training))
            return self.net(self.drop(x))

    rec = PatternRecorder(str(tmp_path / "runs"), run_name="m", probe=(x, y), schedule=schedules.every(2))
    model = Dropped()
    trainer(4, [rec]).fit(model, loader(x, y))
    # probe forwards run in eval mode, training forwards in train mode with drop still eval
    assert (False, False) in modes and (True, False) in modes
    assert all(not d for _, d in modes)
    # probe forwards are deterministic: eval mode disables dropout
    run = open_run(rec.run_dir)
    ids, bits = run.pattern_bits(0, "net.1")
    assert_signs(bits, manual_preacts(run.checkpoint(0), x)[0])


def test_duckdb_reads_the_run_directory_without_dynatrack(tmp_path, data):
    duckdb = pytest.importorskip("duckdb")
    _, _, run = fit_recorded(tmp_path, data, steps=5, batch_schedule=schedules.every(2))
    root = run.path
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT step, layer, split, source, COUNT(*), COUNT(DISTINCT bits), SUM(n_active) "
        f"FROM read_parquet('{root}/patterns/*/*.parquet', hive_partitioning = true) GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    t = run.patterns().to_pandas()
    expected = sorted(
        (int(k[0]), k[1], k[2], k[3], len(g), g.bits.nunique(), int(g.n_active.sum()))
        for k, g in t.groupby(["step", "layer", "split", "source"])
    )
    assert [tuple(r) for r in rows] == expected
    ranks = con.execute(f"SELECT DISTINCT rank FROM read_parquet('{root}/steps/*/*.parquet', hive_partitioning=true)").fetchall()
    assert ranks == [(0,)]


@pytest.mark.parametrize("probe_batch_size", [1024, 40])  # one probe chunk, or three (calls interleave)
def test_shared_activation_module_and_non_sequential_model(tmp_path, data, probe_batch_size):
    x, y = data

    class Block(torch.nn.Module):
        def __init__(self, d: int, h: int) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(d, h)

    class Custom(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleDict({"a": Block(5, 9), "b": Block(9, 7)})
            self.act = torch.nn.LeakyReLU(0.2)  # one module, called twice per forward
            self.head = torch.nn.Linear(7, 3)

        def forward(self, x):
            return self.head(self.act(self.blocks["b"].fc(self.act(self.blocks["a"].fc(x)))))

    torch.manual_seed(1)
    model = Custom()
    rec = PatternRecorder(str(tmp_path / "runs"), run_name="c", probe=(x, y), layers=["act"],
                          schedule=schedules.at([0]), probe_batch_size=probe_batch_size)
    trainer(2, [rec]).fit(model, loader(x, y))
    run = open_run(rec.run_dir)
    assert run.widths == {"act@0": 9, "act@1": 7}
    st = run.checkpoint(0)
    z1 = x @ st["blocks.a.fc.weight"].T + st["blocks.a.fc.bias"]
    z2 = torch.nn.functional.leaky_relu(z1, 0.2) @ st["blocks.b.fc.weight"].T + st["blocks.b.fc.bias"]
    for layer, z in (("act@0", z1), ("act@1", z2)):
        ids, bits = run.pattern_bits(0, layer)
        assert ids.tolist() == list(range(len(x)))
        assert_signs(bits, z)


def test_gelu_records_gate_sign_and_scalar_output_sign(tmp_path):
    x, y = make_data(40, classes=2)
    torch.manual_seed(2)
    model = TinyNet(hidden=(6,), d_out=1, act="gelu")
    rec = PatternRecorder(str(tmp_path / "runs"), run_name="g", probe=(x, y), schedule=schedules.at([0]))
    trainer(1, [rec]).fit(model, loader(x, y))
    run = open_run(rec.run_dir)
    st = run.checkpoint(0)
    z = x @ st["net.0.weight"].T + st["net.0.bias"]
    _, bits = run.pattern_bits(0, "net.1")
    assert_signs(bits, z)
    n = run.neurons(step=0).to_pandas().query("split == 'train'").sort_values("neuron")
    np.testing.assert_array_equal(n.out_sign.to_numpy(), torch.sign(st["net.2.weight"][0]).numpy())


def test_pyarrow_filesystem_uri_root(tmp_path, data):
    x, y = data
    rec = PatternRecorder(f"file://{tmp_path}/uri-root", run_name="u", probe=(x, y), schedule=schedules.at([0]))
    trainer(2, [rec]).fit(TinyNet(), loader(x, y))
    assert (tmp_path / "uri-root" / "u" / "manifest.json").exists()
    assert open_run(f"file://{tmp_path}/uri-root/u").recorded_steps() == [0, 2]


def test_probe_set_is_stored_in_the_run(tmp_path, data):
    x, y = data
    _, _, run = fit_recorded(tmp_path, data, steps=1)
    ids, labels, inputs = run.probe_inputs("train")
    np.testing.assert_array_equal(ids, np.arange(len(x)))
    np.testing.assert_array_equal(labels, y.numpy())
    np.testing.assert_array_equal(inputs, x.numpy())
    tx, ty = make_data(20, seed=1)
    np.testing.assert_array_equal(run.probe_inputs("test")[2], tx.numpy())
    assert run.manifest["probe"] == {"size": len(x) + 20, "splits": {"train": len(x), "test": 20},
                                     "num_classes": 3, "input_shape": [5]}


class ModifiesPreactivation(TinyNet):
    """Changes the first layer's pre-activation in place *after* its ReLU ran (legal for autograd)."""

    def forward(self, x):
        z = self.net[0](x)
        a = self.net[1](z)
        z.sub_(100.0)  # kept, unpacked signs of z would now all read "off"
        return self.net[4](self.net[3](self.net[2](a)))


def test_in_place_change_after_the_hook_does_not_change_the_bits(tmp_path, data):
    """The bits are taken when the hook runs: a later in-place change of the pre-activation
    (which would turn every kept, unpacked sign of ``net.1`` "off") must not reach the rows."""
    x, y = data
    torch.manual_seed(0)
    # each source on its own, so that neither benefits from the other one
    rec = PatternRecorder(str(tmp_path / "runs"), run_name="p", probe=(x, y), schedule=schedules.at([0, 2]))
    trainer(3, [rec]).fit(ModifiesPreactivation(), loader(x, y))
    run = open_run(rec.run_dir)
    for step in (0, 2):
        _, bits = run.pattern_bits(step, "net.1")
        assert bits.any()
        assert_signs(bits, manual_preacts(run.checkpoint(step), x)[0])
    rec = PatternRecorder(str(tmp_path / "runs"), run_name="b", batch_schedule=schedules.every(1),
                          checkpoint_schedule=schedules.every(1))
    trainer(3, [rec]).fit(ModifiesPreactivation(), loader(x, y))
    run = open_run(rec.run_dir)
    t = run.patterns(source="batch").to_pandas()
    for step in (0, 1, 2):
        for k, layer in enumerate(("net.1", "net.3")):
            rows = t[(t.step == step) & (t.layer == layer)]
            assert len(rows) == 16
            z = manual_preacts(run.checkpoint(step), x[torch.as_tensor(rows.sample_id.to_numpy())])[k]
            assert_signs(np.stack([np.frombuffer(b, np.uint8) for b in rows.bits]), z)


def test_steps_rows_under_gradient_accumulation(tmp_path, data):
    """One row per optimizer step, with the gradient norm of the accumulated gradients
    (checked against a naive float64 norm taken by another callback)."""
    x, y = data
    norms: dict[int, float] = {}

    class NormSpy(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            sq = sum(float((p.grad.double() ** 2).sum()) for p in pl_module.parameters() if p.grad is not None)
            norms[trainer.global_step] = sq ** 0.5

    torch.manual_seed(0)
    rec = PatternRecorder(str(tmp_path / "runs"), run_name="acc", probe=(x, y), schedule=schedules.every(1))
    trainer(4, [rec, NormSpy()], accumulate_grad_batches=2).fit(TinyNet(), loader(x, y))
    steps = open_run(rec.run_dir).steps().to_pandas().sort_values("step")
    assert steps.step.tolist() == [0, 1, 2, 3]  # the final step (4) has no optimizer step, so no row
    np.testing.assert_allclose(steps.grad_norm.to_numpy(), [norms[s] for s in steps.step], rtol=1e-5)
    assert (steps.batch_size == 32).all()  # 2 micro-batches of 16 per optimizer step


def test_batch_rows_with_uneven_batches_many_steps_per_hand_off(tmp_path, data):
    """Batches of 20 and 16 rows (96 samples), no checkpoints, so all 12 steps reach the writer in
    one hand-off: every row's bits equal a float64 forward of that step's weights (snapshotted by
    another callback) on that sample."""
    x, y = data
    weights: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            weights[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    torch.manual_seed(0)
    rec = PatternRecorder(str(tmp_path / "runs"), run_name="u", batch_schedule=schedules.every(1),
                          checkpoint_schedule=schedules.never(), record_final=False, submit_every=16)
    trainer(12, [Snapshot(), rec]).fit(TinyNet(), loader(x, y, batch_size=20))
    run = open_run(rec.run_dir)
    t = run.patterns(source="batch").to_pandas()
    assert sorted(set(t.step)) == list(range(12))
    for step in range(12):
        for k, layer in enumerate(("net.1", "net.3")):
            rows = t[(t.step == step) & (t.layer == layer)]
            assert len(rows) == (16 if step % 5 == 4 else 20)
            z = manual_preacts(weights[step], x[torch.as_tensor(rows.sample_id.to_numpy())])[k]
            assert_signs(np.stack([np.frombuffer(b, np.uint8) for b in rows.bits]), z)


@pytest.mark.parametrize("path", ["kernel", "numpy"])  # the compiled pack-and-count kernel, or numpy only
@pytest.mark.parametrize("probe_batch_size", [40, 1024])  # three chunks per split (the last short), or one
def test_probe_bits_and_counts_with_byte_aligned_widths_equal_splits_and_chunks(tmp_path, monkeypatch, path,
                                                                                probe_batch_size):
    # widths that are multiples of 8 take the joint decode (all layers side by side); two splits of
    # the same shape and several probe chunks per split share the reused mask buffers' shapes
    from dynatrack.recorder import decode

    if path == "numpy":
        monkeypatch.setattr(decode, "_pack_kernel", None)
    elif decode._pack_kernel is None:
        pytest.skip("dynatrack.recorder._pack is not compiled in this install (no C compiler at install time)")
    x, y = make_data(96)
    test_x, test_y = make_data(96, seed=1)
    torch.manual_seed(0)
    model = TinyNet(hidden=(16, 24))
    rec = PatternRecorder(str(tmp_path / "runs"), run_name="r", probe={"train": (x, y), "test": (test_x, test_y)},
                          schedule=schedules.at([0, 4, 7]), probe_batch_size=probe_batch_size)
    trainer(8, [rec]).fit(model, loader(x, y))
    run = open_run(rec.run_dir)
    neurons = run.neurons().to_pandas()
    for step in (0, 4, 7, 8):
        state = run.checkpoint(step)
        for split, inputs, labels in (("train", x, y), ("test", test_x, test_y)):
            for layer, z in zip(["net.1", "net.3"], manual_preacts(state, inputs)):
                ids, bits = run.pattern_bits(step, layer, split=split)
                assert ids.tolist() == list(range(len(inputs)))
                assert_signs(bits, z)
                active = (z > 0).numpy()
                rows = neurons[(neurons.step == step) & (neurons.layer == layer) & (neurons.split == split)]
                rows = rows.sort_values("neuron")
                np.testing.assert_array_equal(rows.active.to_numpy(), active.sum(axis=0))
                by_class = np.stack(rows.active_by_class.to_numpy())
                np.testing.assert_array_equal(by_class, [[int(active[labels.numpy() == c, j].sum()) for c in range(3)]
                                                         for j in range(z.shape[1])])


class AcceleratorPathRecorder(PatternRecorder):
    """The accelerator code path run on CPU tensors: bits packed by torch in the hooks, per-class
    counts by the one-hot matmul, each step's tensors in one host record with its layout, the
    loss and gradient norm stacked. Exercises that path where no GPU is available."""

    def _open_run(self, trainer, pl_module):
        super()._open_run(trainer, pl_module)
        self._on_accelerator = True
        self._counts_on_device = True
        self._capture.pack_on_device = True


def test_accelerator_code_path_writes_the_same_rows_as_the_cpu_path(tmp_path, data):
    x, y = data

    def record(cls, name):
        torch.manual_seed(0)
        model = TinyNet()
        rec = cls(str(tmp_path / name), run_name=name, probe={"train": (x, y), "test": make_data(20, seed=1)},
                  schedule=schedules.at([0, 4]), batch_schedule=schedules.every(2), submit_every=3)
        trainer(7, [rec]).fit(model, loader(x, y, shuffle=False))
        return open_run(rec.run_dir)

    cpu, acc = record(PatternRecorder, "cpu"), record(AcceleratorPathRecorder, "acc")
    key = ["step", "layer", "split", "source", "sample_id"]
    for table in ("patterns", "neurons"):
        a = getattr(cpu, table)().to_pandas()
        b = getattr(acc, table)().to_pandas()
        k = key if table == "patterns" else ["step", "layer", "split", "neuron"]
        a, b = a.sort_values(k).reset_index(drop=True), b.sort_values(k).reset_index(drop=True)
        assert len(a) > 0 and a.drop(columns=["active_by_class"], errors="ignore").equals(
            b.drop(columns=["active_by_class"], errors="ignore"))
        if table == "neurons":
            assert [list(v) for v in a.active_by_class] == [list(v) for v in b.active_by_class]
    assert sorted(set(cpu.patterns(source="batch").column("step").to_pylist())) == [0, 2, 4, 6]
    sa, sb = cpu.steps().to_pandas(), acc.steps().to_pandas()
    assert sa.step.tolist() == sb.step.tolist()
    np.testing.assert_allclose(sa.loss, sb.loss, rtol=1e-6)
    np.testing.assert_allclose(sa.grad_norm, sb.grad_norm, rtol=1e-5)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_every_source_records_exactly_its_schedule_steps(tmp_path, data, accumulate):
    """Unrecorded steps skip the schedule checks until the next step any schedule can fire:
    the steps of every table must still be exactly those of its schedule (a naive scan),
    also under gradient accumulation and with an opaque callable among the schedules."""
    x, y = data
    cases = {
        "known": dict(schedule=schedules.log_spaced(dense=3, base=4), batch_schedule=schedules.at([1, 6, 13]),
                      neuron_schedule=schedules.every(5, start=2), checkpoint_schedule=schedules.at([7]),
                      steps_schedule=schedules.every(4, start=1)),
        "opaque": dict(schedule=schedules.every(6), batch_schedule=lambda s: s in (2, 9),
                       checkpoint_schedule=schedules.never(), steps_schedule=lambda s: s % 5 == 3),
    }
    n_steps = 18
    for name, kw in cases.items():
        torch.manual_seed(0)
        rec = PatternRecorder(str(tmp_path / f"runs-{accumulate}"), run_name=name, probe=(x, y), record_final=False, **kw)
        hooked: set[int] = set()

        class HookSpy(Callback):  # runs after the recorder: are the batch hooks attached for this batch?
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if rec._capture.batch_attached:
                    hooked.add(trainer.global_step)

        trainer(n_steps, [rec, HookSpy()], accumulate_grad_batches=accumulate).fit(TinyNet(), loader(x, y, batch_size=8))
        run = open_run(rec.run_dir)
        def scan(s):
            return [k for k in range(n_steps) if s(k)]

        assert run.recorded_steps("patterns", source="probe") == scan(kw["schedule"]), name
        assert run.recorded_steps("patterns", source="batch") == scan(kw["batch_schedule"]), name
        assert sorted(set(run.neurons().column("step").to_pylist())) == scan(kw.get("neuron_schedule", kw["schedule"])), name
        assert sorted(run.steps().column("step").to_pylist()) == scan(kw["steps_schedule"]), name
        assert run.checkpoint_steps() == scan(kw["checkpoint_schedule"]), name
        assert sorted(hooked) == scan(kw["batch_schedule"]), name  # unrecorded steps run without hooks

"""The Ray analysis engine on a real recorded run, checked against independent references."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import TinyNet, loader, make_data
from dynatrack import open_run
from dynatrack.analysis import regions as reg
from dynatrack.parallel import AnalyzeConfig, analyze_run
from dynatrack.parallel.analyze import analyze_and_report, plan_step_ranges
from dynatrack.parallel.tasks import NETWORK, _import_model
from dynatrack.store.fs import StoreError

CFG = AnalyzeConfig(n_slices=1, n_segments=3, boundary_samples=16, lc_samples=16, lc_radii=(0.05, 0.3),
                    lc_directions=4)


@pytest.fixture(scope="module")
def results(digits_run, local_ray):  # noqa: ANN001, ANN201
    return analyze_run(digits_run, config=CFG)


def unpacked(run, step, layer, split):  # noqa: ANN001, ANN201
    ids, bits = run.pattern_bits(step, layer, split=split)
    return ids, np.unpackbits(bits, axis=1, count=run.widths[layer]).astype(bool)


def test_distinct_counts_equal_duckdb_count_distinct(digits_run, results):
    duckdb = pytest.importorskip("duckdb")
    got = {(r["step"], r["layer"], r["split"]): r["n_distinct"] for r in results["patterns"].to_pylist()
           if r["layer"] != NETWORK}
    rows = duckdb.connect().execute(
        f"SELECT step, layer, split, COUNT(DISTINCT bits) FROM read_parquet('{digits_run}/patterns/*/*.parquet', "
        "hive_partitioning = true) WHERE source = 'probe' GROUP BY ALL").fetchall()
    assert {(s, l, p): n for s, l, p, n in rows} == got
    # the Parquet file the analyzer wrote holds the same
    assert pq.read_table(f"{digits_run}/analysis/patterns.parquet").equals(results["patterns"])


def test_whole_network_shared_and_churn_equal_naive_loops(digits_run, results):
    run = open_run(digits_run)
    layers = list(run.widths)
    table = {(r["step"], r["layer"], r["split"]): r for r in results["patterns"].to_pylist()}
    steps = [0, 5, 10, 20, 30]
    for split in ("train", "test"):
        prev = None
        for step in steps:
            per = [unpacked(run, step, layer, split) for layer in layers]
            full = np.concatenate([a for _, a in per], axis=1)
            keys = [row.tobytes() for row in full]
            counts = {k: keys.count(k) for k in set(keys)}
            r = table[(step, NETWORK, split)]
            assert r["n_distinct"] == len(counts)
            assert r["n_shared"] == sum(c for c in counts.values() if c > 1)
            for (layer, (_, a)) in zip(layers, per):
                lr = table[(step, layer, split)]
                assert lr["n_distinct"] == len({row.tobytes() for row in a})
            if prev is not None:
                d = (full != prev).sum(1)
                assert r["churn_hamming_sum"] == int(d.sum()) and r["churn_changed"] == int((d > 0).sum())
                flips = results["pattern_flips"].filter(
                    (results["pattern_flips"].column("step").to_numpy() == step)
                    & (np.array(results["pattern_flips"].column("layer").to_pylist()) == layers[0])
                    & (np.array(results["pattern_flips"].column("split").to_pylist()) == split))
                w0 = run.widths[layers[0]]
                np.testing.assert_array_equal(flips.column("flips").to_numpy(), (full[:, :w0] != prev[:, :w0]).sum(0))
            else:
                assert r["churn_samples"] is None
            prev = full


def test_task_split_does_not_change_results(digits_run, local_ray, results):
    one = analyze_run(digits_run, config=CFG, tasks_per_cpu=1, progress=False)
    many = analyze_run(digits_run, config=CFG, tasks_per_cpu=8, progress=False)
    for name in results:
        assert one[name].equals(many[name]), name
        assert one[name].equals(results[name]), name


def test_regions_match_direct_computation_and_dense_grid(digits_run, results):
    run = open_run(digits_run)
    model = _import_model(run)  # the real LightningModule class, not the stored description
    r2 = [r for r in results["regions"].to_pylist() if r["kind"] == "2d"]
    assert sorted({r["step"] for r in r2}) == run.checkpoint_steps() == [0, 5, 10, 20, 30]
    ids, labels, x = run.probe_inputs("train")
    x = x.reshape(len(x), -1).astype(np.float64)
    for r in r2:
        model.load_state_dict(run.checkpoint(r["step"]))
        model.eval()
        a, b, c = (int(np.flatnonzero(ids == s)[0]) for s in r["samples"])
        assert labels[[a, b, c]].tolist() == [0, 1, 2]  # Hanin & Rolnick's slice through digits 0, 1, 2
        sl = reg.slice_through(x[a], x[b], x[c])
        # independent lower bound: distinct patterns of the real torch forward on a 300x300 grid of the slice
        s, t = np.meshgrid(np.linspace(-1, 1, 300), np.linspace(-1, 1, 300))
        pts = sl.origin + s.reshape(-1, 1) * sl.u1 + t.reshape(-1, 1) * sl.u2
        acts = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: acts.__setitem__(n, i[0] > 0))
                 for n, m in model.named_modules() if isinstance(m, torch.nn.ReLU)]
        with torch.no_grad():
            model(torch.as_tensor(pts, dtype=torch.float32))
        for h in hooks:
            h.remove()
        grid = len({row.tobytes() for row in torch.cat(list(acts.values()), 1).numpy()})
        assert r["count"] >= grid > 10
        assert r["n_hidden"] == 40 and r["normalized"] == pytest.approx(r["count"] / (40 ** 2 / 2))


def test_local_complexity_and_boundary_distance_are_consistent(digits_run, results):
    run = open_run(digits_run)
    lc = results["local_complexity"].to_pandas()
    assert set(lc.layer) == set(run.widths) and set(lc.radius) == {0.05, 0.3}
    # larger cross-polytopes meet at least as many hyperplanes
    for (step, layer), g in lc.groupby(["step", "layer"]):
        small, large = g.sort_values("radius").lc_sum.tolist()
        assert small <= large
    # a cross-polytope of radius r cannot cross a neuron when r is below the distance to every boundary:
    bd = results["boundary_distance"].to_pandas()
    assert (bd.distance > 0).all() and bd.groupby("step").size().eq(16).all()


def test_plan_step_ranges_partitions_the_steps():
    steps = [0, 1, 2, 5, 9, 30, 31]
    for n in range(1, 10):
        parts = plan_step_ranges(steps, n)
        assert list(itertools.chain(*parts)) == steps and len(parts) == min(n, len(steps))


def test_bad_inputs_fail_fast_with_clear_errors(digits_run, tmp_path, local_ray):
    with pytest.raises(StoreError, match="does not exist"):
        analyze_run(str(tmp_path / "missing"))
    with pytest.raises(StoreError, match="no checkpoint for steps \\[7\\]"):
        analyze_run(digits_run, config=AnalyzeConfig(analyzers=("regions",), steps=(7,)))
    with pytest.raises(ValueError, match="unknown analyzers"):
        AnalyzeConfig(analyzers=("regionz",))


def test_unreachable_address_is_an_error_within_seconds(digits_run):
    import subprocess
    import sys

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dynatrack.cli", "analyze", digits_run, "--address", "127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot reach a Ray cluster at '127.0.0.1:9'" in proc.stderr
    assert time.perf_counter() - start < 20  # includes the interpreter start-up
    assert "Traceback" not in proc.stderr


class Residual(TinyNet):
    """A skip connection: not a plain chain of Linear and ReLU, so no exact region count."""

    def forward(self, x):  # noqa: ANN001, ANN201
        h = self.net[1](self.net[0](x))
        return self.net[4](self.net[3](self.net[2](h)) + h[:, :1])


def test_unsupported_model_for_regions_is_named(tmp_path, local_ray):
    import lightning.pytorch as pl

    from dynatrack import PatternRecorder, schedules

    x, y = make_data()
    rec = PatternRecorder(str(tmp_path), run_name="res", probe=(x, y), schedule=schedules.at([0]))
    pl.Trainer(accelerator="cpu", max_steps=1, callbacks=[rec], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(Residual(), loader(x, y))
    from dynatrack.parallel.analyze import skipped_analyzers

    # issue 12: the analyzer that does not apply is skipped with its reason, the others run
    results = analyze_run(rec.run_dir, config=AnalyzeConfig(analyzers=("patterns", "regions")), progress=False)
    skipped = skipped_analyzers(results)
    assert list(skipped) == ["regions"] and "is not the output of" in skipped["regions"]
    assert "regions" not in results and results["patterns"].num_rows > 0


def test_previous_results_are_kept_not_overwritten(digits_run, local_ray):
    cfg = AnalyzeConfig(analyzers=("patterns",), steps=(0, 5))
    analyze_run(digits_run, config=cfg, progress=False)
    analyze_run(digits_run, config=cfg, progress=False)
    run = open_run(digits_run)
    previous = [i.base_name for i in run.loc.list_files("analysis/previous")]
    assert any(name.startswith("patterns-") for name in previous)


def test_newer_schema_and_online_wandb_without_login_fail_before_any_work(digits_run, tmp_path, monkeypatch):
    import json
    import shutil

    from dynatrack.tracking import TrackingError

    copy = tmp_path / "newer"
    shutil.copytree(digits_run, copy, ignore=shutil.ignore_patterns("analysis"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="schema version 2, newer than this dynatrack"):
        analyze_run(str(copy))

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    start = time.perf_counter()
    with pytest.raises(TrackingError, match="wandb login"):
        analyze_and_report(digits_run, config=AnalyzeConfig(analyzers=("patterns",)), wandb_mode="online")
    assert time.perf_counter() - start < 20

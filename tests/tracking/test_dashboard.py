"""The analysis dashboard on a real recorded run: W&B keys read back from the offline run and
checked against the run's own tables, PNG plots decoded, the 2-D slice figure against the exact
region count, the workspace spec against the logged keys, and re-analysis runs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dynatrack import open_run
from dynatrack.parallel.analyze import _concat, log_results
from dynatrack.parallel.tasks import AnalyzeConfig, pattern_task, weights_task
from dynatrack.tracking import STEP_KEY, read_offline_run
from dynatrack.tracking.dashboard import slice_steps, write_plots
from dynatrack.tracking.workspace import build_workspace

PLOT_NAMES = {"training", "patterns", "partitions", "regions", "slices", "local_complexity"}
CFG = AnalyzeConfig(n_slices=1, n_segments=2, boundary_samples=8, lc_samples=16, lc_radii=(0.05, 0.2), lc_directions=4)


@pytest.fixture(scope="module")
def run_copy(digits_run, tmp_path_factory):
    """A private copy of the session's digits run (plots and analysis files are written into it)."""
    import shutil

    dst = tmp_path_factory.mktemp("dash") / "digits"
    shutil.copytree(digits_run, dst, ignore=shutil.ignore_patterns("analysis", "plots"))
    return str(dst)


@pytest.fixture(scope="module")
def results(run_copy):
    """The analyzers' tables, computed by the same task functions Ray runs, called directly."""
    run = open_run(run_copy)
    steps = run.recorded_steps("patterns", source="probe")
    parts = [pattern_task(run.path, steps, None), weights_task(run.path, run.checkpoint_steps(), CFG.to_dict(),
                                                                ["regions", "local_complexity"])]
    return _concat(parts)


@pytest.fixture(scope="module")
def logged(run_copy, results, tmp_path_factory):
    wb = tmp_path_factory.mktemp("wb")
    res = log_results(open_run(run_copy), results, mode="offline", group="dash", wandb_dir=str(wb),
                      config=CFG.to_dict())
    assert res is not None
    return res, read_offline_run(res.run_dir)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _by_step(history):
    return {row[STEP_KEY]: row for row in history}


@pytest.mark.slow
def test_training_curves_are_the_steps_table(run_copy, logged):
    """train/loss|lr|grad_norm at every step == the rank mean of the `steps` Parquet rows (DuckDB)."""
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.connect().execute(
        f"SELECT step, avg(loss), avg(lr), avg(grad_norm) FROM read_parquet('{run_copy}/steps/*/*.parquet') "
        "GROUP BY step ORDER BY step").fetchall()
    assert len(rows) >= 4
    history = _by_step(logged[1]["history"])
    for step, loss, lr, gn in rows:
        row = history[step]
        assert row["train/loss"] == pytest.approx(loss)
        assert row["train/lr"] == pytest.approx(lr)
        assert row["train/grad_norm"] == pytest.approx(gn)
    assert logged[1]["summary"]["train/loss"] == pytest.approx(rows[-1][1])


@pytest.mark.slow
def test_partition_sizes_are_counts_of_merged_neuron_labels(run_copy, logged):
    neurons = open_run(run_copy).neurons(merged=True).to_pylist()
    expected = Counter((r["step"], r["layer"], r["split"], r["partition"]) for r in neurons)
    labels = {(layer, split): {p for (_, ly, sp, p) in expected if (ly, sp) == (layer, split)}
              for (_, layer, split, _) in expected}
    history = _by_step(logged[1]["history"])
    checked = 0
    for step in sorted({k[0] for k in expected}):
        for (layer, split), seen in labels.items():
            for label in seen:
                assert history[step][f"partitions/{layer}/{split}/{label}"] == expected.get((step, layer, split, label), 0)
                checked += 1
            total = sum(history[step][f"partitions/{layer}/{split}/{label}"] for label in seen)
            assert total == open_run(run_copy).widths[layer]  # every neuron has exactly one label
    assert checked > 10
    logged_keys = {k for row in logged[1]["history"] for k in row if k.startswith("partitions/")}
    assert logged_keys == {f"partitions/{ly}/{sp}/{p}" for (ly, sp), seen in labels.items() for p in seen}


@pytest.mark.slow
def test_plots_are_written_decoded_and_logged(run_copy, logged):
    import matplotlib.image as mpimg

    res, run = logged
    plots_dir = Path(run_copy) / "plots"
    assert {p.stem for p in plots_dir.glob("*.png")} == PLOT_NAMES
    for p in plots_dir.glob("*.png"):
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
        assert img[..., :3].std() > 0.05, f"{p.name} is blank"
    last = run["history"][-1]
    for name in PLOT_NAMES:
        ref = run["summary"][f"plots/{name}"]
        assert ref["_type"] == "image-file"
        logged_png = res.run_dir / "files" / ref["path"]
        assert logged_png.read_bytes() == (plots_dir / f"{name}.png").read_bytes()
        assert f"plots/{name}.width" in last or f"plots/{name}" in last
    step_metrics = {m.get("glob_name"): m.get("step_metric") for m in run["metrics"]}
    assert {step_metrics[f"{a}/*"] for a in ("train", "partitions", "plots", "patterns")} == {STEP_KEY}


def test_slice_figure_has_one_polygon_per_exact_region(run_copy, results):
    """The slice panels are the analysis' 2-D item 0: same count as regions.parquet at each step."""
    from dynatrack.tracking.dashboard import slice_panels

    run = open_run(run_copy)
    regions = results["regions"].to_pylist()
    steps = slice_steps([r["step"] for r in regions if r["kind"] == "2d"])
    panels = slice_panels(run, steps, split=CFG.split, seed=CFG.seed)
    exact = {r["step"]: r["count"] for r in regions if r["kind"] == "2d" and r["item"] == 0}
    assert [p["step"] for p in panels] == steps and len(steps) == 4
    for p in panels:
        assert len(p["polygons"]) == exact[p["step"]] == len({row.tobytes() for row in np.packbits(p["patterns"], 1)})
        # the polygons tile the square [-1, 1]^2 (area 4), shoelace by hand
        area = sum(0.5 * abs(np.dot(v[:, 0], np.roll(v[:, 1], -1)) - np.dot(v[:, 1], np.roll(v[:, 0], -1)))
                   for v in p["polygons"])
        assert area == pytest.approx(4.0, rel=1e-9)


@pytest.mark.slow
def test_workspace_spec_matches_the_logged_keys(run_copy, logged):
    res, run = logged
    spec = json.loads((Path(run_copy) / "analysis" / "wandb_workspace.json").read_text())
    logged_keys = {k for row in run["history"] for k in row} | set(run["summary"])
    assert spec["x_axis"] == STEP_KEY
    sections = {s["name"]: s for s in spec["sections"]}
    assert set(sections) == {"train", "patterns", "partitions", "regions", "boundary", "local_complexity", "plots"}
    ys = [y for s in spec["sections"] for p in s["panels"] for y in p.get("y", [])]
    media = [m for p in sections["plots"]["panels"] for m in p["media_keys"]]
    assert set(ys) <= logged_keys and set(media) <= logged_keys
    assert set(media) == {f"plots/{n}" for n in PLOT_NAMES}
    plotted = {k for k in logged_keys if k.split("/")[0] in sections and k.split("/")[0] != "plots"
               and not k.endswith(("_step", "_runtime", "_timestamp"))}
    assert set(ys) == plotted, "every logged series has a panel"
    pytest.importorskip("wandb_workspaces")
    ws = build_workspace(spec, entity="someone")
    assert [s.name for s in ws.sections] == [s["name"] for s in spec["sections"]]
    assert ws.settings.x_axis == STEP_KEY
    assert sorted(y for s in ws.sections for p in s.panels for y in (getattr(p, "y", None) or [])) == sorted(ys)


def test_reanalysis_is_a_new_run_that_names_the_previous_one(run_copy, results, tmp_path):
    """Two analyses of one run: two W&B runs (ids differ), the second names the first; neither
    history restarts its step counter (with one shared id, offline, the second did)."""
    from dynatrack.tracking import log_analysis
    from dynatrack.parallel.analyze import wandb_views

    views, dims, _ = wandb_views({"patterns": results["patterns"]})
    wb = tmp_path / "wb"
    first = log_analysis(views, dims=dims, run_id="digits", group="g", wandb_dir=wb)
    second = log_analysis(views, dims=dims, run_id="digits", group="g", wandb_dir=wb)
    assert first is not None and second is not None
    assert first.run_id != second.run_id and second.previous == first.run_id and first.previous is None
    folders = sorted((wb / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    assert {f.name.endswith(first.run_id) for f in folders} == {True, False}
    r = read_offline_run(second.run_dir)
    assert r["run_id"] == second.run_id
    steps = [row[STEP_KEY] for row in r["history"]]
    assert steps == sorted(set(views["patterns"].column("step").to_pylist())), "every step once, increasing"
    assert r["run"]["display_name"] == "digits" and r["run"]["run_group"] == "g"
    assert r["config"]["previous_analysis"] == first.run_id


def test_a_failing_plot_is_skipped_with_its_reason(run_copy, caplog):
    run = open_run(run_copy)

    def broken(f):
        raise ValueError("no data for this plot")

    def fine(f):
        from dynatrack.plots import plot_training

        plot_training(open_run(run_copy).steps().select(["step", "loss"]), f)

    with caplog.at_level("WARNING", logger="dynatrack.tracking.dashboard"):
        out = write_plots(run, {"broken": broken, "fine": fine})
        first = out["fine"].read_bytes()
        again = write_plots(run, {"fine": fine})
    assert set(out) == {"fine"} and out["fine"].is_file() and again["fine"] == out["fine"]
    kept = list((Path(run_copy) / "plots" / "previous").glob("fine-*.png"))
    assert len(kept) == 1 and kept[0].read_bytes() == first, "the earlier plot is kept, not overwritten"
    assert not (Path(run_copy) / "plots" / "broken.png").exists()
    assert any("'broken'" in r.getMessage() and "no data for this plot" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_regions_parquet_and_logged_series_agree(run_copy, results, logged):
    """regions/2d_mean in W&B is the mean of the 2-D counts written to regions.parquet."""
    history = _by_step(logged[1]["history"])
    by_step: dict[int, list[int]] = {}
    for r in results["regions"].to_pylist():
        if r["kind"] == "2d":
            by_step.setdefault(r["step"], []).append(r["count"])
    for step, counts in by_step.items():
        assert history[step]["regions/2d_mean"] == pytest.approx(sum(counts) / len(counts))


def _readme_key_patterns() -> list[str]:
    """The keys of the README's "W&B keys" table, ``<placeholder>`` parts as regexes."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme[readme.index("#### W&B keys"):]
    rows = []
    for line in block.splitlines()[1:]:
        if line.startswith("| `"):
            rows.append(line.split("|")[1])
        elif rows and not line.startswith("|"):
            break
    keys = [k for cell in rows for k in re.findall(r"`([^`]+)`", cell)]
    return [re.escape(k).replace(r"<", "<").replace(r">", ">") for k in keys]


def test_readme_lists_exactly_the_logged_wandb_keys(logged):
    """Every key the README documents is logged, and every logged history key is documented."""
    import re

    _, run = logged
    # media (images, tables) are flattened into "<key>.<field>" in the offline history
    logged_keys = {re.sub(r"^((?:plots|tables)/[^.]+)\..*$", r"\1", k)
                   for row in run["history"] for k in row if not k.startswith("_")}
    patterns = [re.compile("^" + re.sub(r"<[a-z_]+>", r"[^/]+", p) + "$") for p in _readme_key_patterns()]
    assert len(patterns) >= 15
    undocumented = sorted(k for k in logged_keys if not any(p.match(k) for p in patterns))
    assert not undocumented, f"logged but not in the README's W&B keys table: {undocumented}"
    unlogged = [p.pattern for p in patterns if not any(p.match(k) for k in logged_keys)]
    assert not unlogged, f"in the README's W&B keys table but not logged: {unlogged}"

"""dynatrack.tracking against a real, offline wandb: what is logged is read back with
`wandb leet inspect --json` and compared with the source Arrow tables row by row."""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time

import pyarrow as pa
import pytest

from dynatrack.tracking import (
    STEP_KEY,
    TrackingError,
    analysis_run_id,
    log_analysis,
    read_offline_run,
    resolve_mode,
    wandb_run_id,
)

LAYERS = ("fc1", "fc2")
SPLITS = ("train", "test")
PATTERN_STEPS = (0, 1, 3, 10, 30, 100)
REGION_STEPS = (0, 10, 55, 100)
DIMS = {"patterns": ["layer", "split"], "regions": []}


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """Keep every test offline, quiet and inside tmp_path, with no credentials."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_API_KEY", "")
    for name in ("WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)


def _shuffled(rows: list[dict], seed: int) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def _results() -> dict[str, pa.Table]:
    rng = random.Random(0)
    pattern_rows = [
        {
            "step": step,
            "layer": layer,
            "split": split,
            "distinct": rng.randrange(1, 500),
            "n_active": rng.randrange(0, 10_000),
            "entropy": rng.random() * 8,
        }
        for step in PATTERN_STEPS
        for layer in LAYERS
        for split in SPLITS
    ]
    pattern_rows[5]["entropy"] = None  # a missing value is left out, not logged as null
    region_rows = [
        {"step": step, "2d_normalized": rng.random(), "count": rng.randrange(10, 10**6)}
        for step in REGION_STEPS
    ]
    patterns = pa.Table.from_pylist(
        _shuffled(pattern_rows, 1),
        schema=pa.schema(
            [("step", pa.int64()), ("layer", pa.string()), ("split", pa.string()),
             ("distinct", pa.int64()), ("n_active", pa.int32()), ("entropy", pa.float64())]
        ),
    )
    regions = pa.Table.from_pylist(
        _shuffled(region_rows, 2),
        schema=pa.schema([("step", pa.int64()), ("2d_normalized", pa.float64()), ("count", pa.int64())]),
    )
    return {"patterns": patterns, "regions": regions}


def _expected(results: dict[str, pa.Table]) -> dict[tuple[int, str], object]:
    """(step, key) -> value, built by walking each table's rows in plain Python."""
    expected = {}
    for analyzer, table in results.items():
        for row in table.to_pylist():
            dim_values = [str(row[d]) for d in DIMS[analyzer]]
            for column, value in row.items():
                if column == "step" or column in DIMS[analyzer] or value is None:
                    continue
                expected[(row["step"], "/".join([analyzer, *dim_values, column]))] = value
    return expected


def _layer_table() -> pa.Table:
    return pa.table({"layer": list(LAYERS), "width": [64, 32], "dead_at_end": [3, 0]})


def test_logged_history_equals_the_arrow_tables(tmp_path):
    results = _results()
    input_steps = results["patterns"].column("step").to_pylist()
    assert input_steps != sorted(input_steps), "the input must not already be in step order"

    res = log_analysis(
        results,
        dims=DIMS,
        run_id="digits-mlp-s0",
        group="digits",
        wandb_dir=tmp_path / "wb",
        config={"lr": 0.1, "batch_size": 32},
        summary_tables={"layers": _layer_table()},
    )

    assert res is not None and res.mode == "offline" and res.run_id.startswith("digits-mlp-s0-")
    assert res.run_dir.parent == tmp_path / "wb" / "wandb"
    assert res.run_dir.name.startswith("offline-run-")
    run = read_offline_run(res.run_dir)

    history = run["history"]
    steps = [row.get(STEP_KEY) for row in history]
    assert None not in steps, "every history row carries trainer/step"
    assert steps == sorted(set(PATTERN_STEPS) | set(REGION_STEPS)), "one row per step, increasing"
    observed = {
        (row[STEP_KEY], key): value
        for row in history
        for key, value in row.items()
        if key.startswith(("patterns/", "regions/"))
    }
    expected = _expected(results)
    assert observed == expected
    assert {"patterns/fc1/train/distinct", "regions/2d_normalized"} <= {key for _, key in expected}

    step_metrics = {m.get("glob_name"): m.get("step_metric") for m in run["metrics"]}
    assert step_metrics["patterns/*"] == STEP_KEY
    assert step_metrics["regions/*"] == STEP_KEY

    # summary: each series' value at its last logged step, and the final training step
    last = {}
    for (step, key), value in sorted(expected.items()):
        last[key] = value
    summary = run["summary"]
    assert {key: summary[key] for key in last} == last
    assert summary["trainer/final_step"] == max(PATTERN_STEPS + REGION_STEPS)

    # the per-layer table: logged with the last step, its JSON holds the source rows
    table_ref = summary["tables/layers"]
    assert table_ref["_type"] == "table-file"
    assert history[-1]["tables/layers.nrows"] == 2, "history flattens the table reference"
    table_json = json.loads((res.run_dir / "files" / table_ref["path"]).read_text())
    source = _layer_table()
    assert table_json["columns"] == source.column_names
    assert table_json["data"] == [list(row.values()) for row in source.to_pylist()]

    assert run["config"]["lr"] == 0.1 and run["config"]["batch_size"] == 32
    assert run["run"]["run_group"] == "digits"
    assert run["run"]["job_type"] == "analysis"
    assert run["run"]["display_name"] == "digits-mlp-s0"


def test_reanalysis_is_a_fresh_run_id_with_the_previous_noted(tmp_path):
    """Offline, one shared id per training run left two offline runs whose steps restart at 0;
    now each analysis is its own W&B run (display name = run id) and names the previous one."""
    results = {"regions": _results()["regions"]}
    wb = tmp_path / "wb"
    first = log_analysis(results, dims=DIMS, run_id="exp/run:1", wandb_dir=wb)
    second = log_analysis(results, dims=DIMS, run_id="exp/run:1", wandb_dir=wb)
    other = log_analysis(results, dims=DIMS, run_id="exp-run-1", wandb_dir=wb)

    assert first is not None and second is not None and other is not None
    base = wandb_run_id("exp/run:1")
    assert first.run_id.startswith(base + "-") and second.run_id.startswith(base + "-")
    assert first.run_id != second.run_id, "a re-analysis is a new W&B run"
    assert first.previous is None and second.previous == first.run_id
    assert not other.run_id.startswith(base), "sanitising must not merge distinct run ids"
    assert other.previous is None, "another training run's analyses are not its history"
    assert first.run_dir != second.run_dir

    run = read_offline_run(second.run_dir)
    assert run["run_id"] == second.run_id and run["run"]["display_name"] == "exp/run:1"
    assert run["config"]["previous_analysis"] == first.run_id
    assert [row[STEP_KEY] for row in run["history"]] == sorted(REGION_STEPS)


def test_analysis_run_ids_are_unique_within_a_second(tmp_path):
    wb = tmp_path / "wb"
    (wb / "wandb" / "offline-run-20261207_010000-r-20261207T010000").mkdir(parents=True)
    (wb / "wandb" / "offline-run-20261207_005900-r").mkdir()  # an id of dynatrack 0.1 (no suffix)
    (wb / "wandb" / "offline-run-20261207_010000-rx-20261207T010000").mkdir()  # another run's
    import calendar
    import time as _time

    now = calendar.timegm(_time.strptime("20261207T010000", "%Y%m%dT%H%M%S"))
    assert analysis_run_id("r", wb, now=now) == ("r-20261207T010000-2", "r-20261207T010000")
    assert analysis_run_id("rx", wb, now=now + 1) == ("rx-20261207T010001", "rx-20261207T010000")
    assert analysis_run_id("q", wb, now=now) == ("q-20261207T010000", None)
    assert len(analysis_run_id("x" * 200, wb)[0]) <= 64


def test_online_without_credentials_raises_before_any_work(tmp_path):
    wb = tmp_path / "wb"
    start = time.perf_counter()
    with pytest.raises(TrackingError, match=r"wandb login.*mode='offline'"):
        log_analysis(_results(), dims=DIMS, run_id="r", mode="online", wandb_dir=wb)
    assert time.perf_counter() - start < 20  # wandb.init alone may wait 90 s (init_timeout)
    assert not wb.exists()
    assert resolve_mode("auto") == "offline"  # WANDB_MODE=offline is honoured by "auto"


def test_auto_goes_online_only_with_credentials_and_never_shows_the_key(monkeypatch, caplog, capfd):
    monkeypatch.delenv("WANDB_MODE")
    caplog.set_level(logging.DEBUG)
    assert resolve_mode("auto") == "offline"
    with pytest.raises(TrackingError):
        resolve_mode("online")

    key = "k" * 40  # well-formed but fake; resolve_mode never contacts the server
    monkeypatch.setenv("WANDB_API_KEY", key)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("online") == "online"
    out, err = capfd.readouterr()
    assert key not in out + err + caplog.text


@pytest.mark.parametrize("failure", ["wandb_dir is a file", "invalid project"])
def test_wandb_failure_warns_and_returns_none(tmp_path, monkeypatch, caplog, failure):
    import wandb  # noqa: F401 - imported first so its import-time temp folders stay where they are

    system_tmp = tmp_path / "system-tmp"  # wandb silently falls back to <tmp>/wandb for an unusable dir
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    kwargs = {"wandb_dir": tmp_path / "wb"}
    if failure == "wandb_dir is a file":
        kwargs["wandb_dir"].write_text("not a directory")
    else:
        kwargs["project"] = "no/slashes?"  # rejected by wandb.init itself

    with caplog.at_level(logging.WARNING, logger="dynatrack.tracking"):
        result = log_analysis(_results(), dims=DIMS, run_id="r", **kwargs)

    assert result is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("dynatrack")]
    assert len(warnings) == 1 and "W&B logging of run 'r' failed" in warnings[0].getMessage()
    with pytest.raises(TrackingError):
        log_analysis(_results(), dims=DIMS, run_id="r", on_error="raise", **kwargs)
    assert not (system_tmp / "wandb").exists(), "no run may be written to a fallback directory"


def test_non_zero_rank_does_nothing(tmp_path, caplog):
    wb = tmp_path / "wb"
    with caplog.at_level(logging.INFO):
        assert log_analysis(_results(), dims=DIMS, run_id="r", rank=1, wandb_dir=wb) is None
        # not even the online credential check runs off rank 0
        assert log_analysis(_results(), dims=DIMS, run_id="r", rank=3, mode="online", wandb_dir=wb) is None
    assert not wb.exists()
    assert not (tmp_path / "wandb-default").exists()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_disabled_mode_writes_nothing(tmp_path):
    wb = tmp_path / "wb"
    assert log_analysis(_results(), dims=DIMS, run_id="r", mode="disabled", wandb_dir=wb) is None
    assert not wb.exists()


@pytest.mark.parametrize(
    ("results", "dims", "match"),
    [
        ({"patterns": pa.table({"step": [0], "layer": ["fc1"], "n": [1]})}, {}, "'layer'.*not numeric"),
        ({"patterns": pa.table({"step": [0], "n": [1]})}, {"patterns": ["layer"]}, "dimension column 'layer'"),
        (
            {"patterns": pa.table({"step": [0, 0], "layer": ["a", "a"], "n": [1, 2]})},
            {"patterns": ["layer"]},
            "more than one row",
        ),
        ({"patterns": pa.table({"epoch": [0], "n": [1]})}, {}, "integer 'step'"),
        ({"trainer": pa.table({"step": [0], "n": [1]})}, {}, "analyzer name 'trainer'"),
    ],
)
def test_malformed_tables_are_rejected_before_wandb(tmp_path, results, dims, match):
    wb = tmp_path / "wb"
    with pytest.raises(ValueError, match=match):
        log_analysis(results, dims=dims, run_id="r", wandb_dir=wb)
    assert not wb.exists()

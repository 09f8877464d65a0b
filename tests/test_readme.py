"""What the README lists (columns, analysis files, commands) matches the code, so the two cannot drift.

The W&B keys the README lists are checked against a logged offline run in
``tests/tracking/test_dashboard.py::test_readme_lists_exactly_the_logged_wandb_keys``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def table_after(marker: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table after the line starting with ``marker``."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(marker))
    rows, seen = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            seen = True
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif seen:
            break
    return rows[1:]  # without the header


MATH = {"e_j", "min_z", "i_k", "s_i"}  # symbols of formulas in the README, not columns
ARROW_NAMES = {"int64": pa.int64(), "int32": pa.int32(), "int8": pa.int8(), "string": pa.string(),
               "binary": pa.binary(), "double": pa.float64(), "list<int32>": pa.list_(pa.int32())}


@pytest.mark.parametrize("table", ["patterns", "steps", "neurons"])
def test_run_directory_columns_and_types_are_the_schema(table: str) -> None:
    from dynatrack.store import schema

    rows = table_after(f"`{table}` — one row per")
    documented = [(r[0].strip("`"), ARROW_NAMES[r[1]]) for r in rows]
    declared = getattr(schema, table.upper())
    assert documented == [(f.name, f.type) for f in declared], f"README's {table} table vs dynatrack.store.schema"


def _analysis_schemas() -> dict[str, pa.Schema]:
    from dynatrack.parallel import early, tasks, zonotope_tasks
    from dynatrack.parallel.analyze import SKIPPED_SCHEMA

    return {
        "patterns": tasks.PATTERN_COUNTS, "pattern_flips": tasks.PATTERN_FLIPS, "regions": tasks.REGIONS,
        "boundary_distance": tasks.BOUNDARY, "local_complexity": tasks.LOCAL_COMPLEXITY, "skipped": SKIPPED_SCHEMA,
        "partitions": early.PARTITION_SIZES, "partition_transitions": early.PARTITION_TRANSITIONS,
        "partition_stability": early.PARTITION_STABILITY, "partition_churn": early.PARTITION_CHURN,
        "zonotope": zonotope_tasks.ZONOTOPE, "zonotope_fixed": zonotope_tasks.ZONOTOPE_FIXED,
        "expressiveness": zonotope_tasks.EXPRESSIVENESS,
    }


def _documented_file_rows() -> dict[str, str]:
    rows = {}
    for line in README.splitlines():
        m = re.match(r"\| `([a-z_]+)\.parquet` \|(.*)", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_every_analysis_file_lists_exactly_its_columns() -> None:
    documented = _documented_file_rows()
    for name, declared in _analysis_schemas().items():
        assert name in documented, f"analysis/{name}.parquet is written but not in the README"
        text = documented[name]
        words = set(re.findall(r"(?<![\w`/<])[a-z][a-z0-9_]*(?![\w(])", text.replace("`", " ")))
        missing = [c for c in declared.names if c not in words]
        assert not missing, f"README's row for {name}.parquet does not list {missing}"
        invented = sorted(w for w in words if "_" in w and w not in declared.names and not w.startswith("__") and w not in MATH)
        assert not invented, f"README's row for {name}.parquet names {invented}, which the file does not have"


def test_documented_analyzers_and_commands_exist() -> None:
    from dynatrack.cli import build_parser
    from dynatrack.parallel.tasks import ANALYZERS

    m = re.search(r"\(comma list of (.*?);", README, re.S)
    assert m, "the --analyzers option's list"
    listed = re.findall(r"`([a-z_]+)`", m.group(1))
    assert sorted(listed) == sorted(ANALYZERS)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    block = README[README.index("\n## Command line"):README.index("\n## Bad input")]
    assert sorted(set(re.findall(r"^dynatrack (\w+)", block, re.M))) == sorted(sub.choices)


def test_sweep_config_keys_table_documents_every_key() -> None:
    """Every key of the sweep config (and every sub-key of the closed sections shown as one row) is in
    the README's table, and the table names no key the config does not know."""
    from dynatrack.sweep.config import DEFAULTS

    rows = {r[0].strip("`"): r for r in table_after("#### Config keys")}
    documented = set()
    for key, default in DEFAULTS.items():
        if key in rows:
            documented.add(key)
            if isinstance(default, dict) and key not in ("task", "compare"):  # one row: sub-keys in its text
                for sub in default:
                    assert sub in " ".join(rows[key]), f"README config row {key!r} does not mention {sub!r}"
        else:
            assert isinstance(default, dict), f"README config table lacks {key!r}"
            for sub in default:
                assert f"{key}.{sub}" in rows, f"README config table lacks {key}.{sub}"
                documented.add(f"{key}.{sub}")
    assert set(rows) == documented


def test_every_local_image_and_link_in_the_readme_exists() -> None:
    root = Path(__file__).resolve().parents[1]
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    local = [t.split("#")[0] for t in targets if not t.startswith(("http://", "https://", "#", "mailto:"))]
    assert local, "no local links found: the pattern is wrong"
    missing = [t for t in local if not (root / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"

"""Human-readable summaries of a run directory (``dynatrack inspect``, ``dynatrack demo``).

>>> _steps_text([0, 1, 2])
'0, 1, 2'
>>> _human(2048)
'2.0 KiB'
"""

from __future__ import annotations

from typing import Any


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _steps_text(steps: list[int], limit: int = 12) -> str:
    if len(steps) <= limit:
        return ", ".join(map(str, steps))
    head = ", ".join(map(str, steps[: limit - 3]))
    return f"{head}, ..., {', '.join(map(str, steps[-2:]))} ({len(steps)} steps)"


def print_summary(summary: dict[str, Any]) -> None:
    """Print what a run holds as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]run[/bold] {summary['run_id']}  [dim]{summary['path']}[/dim]")
    console.print(
        f"schema v{summary['schema_version']}, world size {summary['world_size']}, ranks {summary['ranks']}, "
        f"attempts {len(summary.get('attempts') or [])}"
    )
    probe = summary.get("probe") or {}
    if probe:
        console.print(f"probe: {probe.get('size')} samples {probe.get('splits')}, {probe.get('num_classes')} classes")
    layers = Table(title="layers")
    layers.add_column("layer")
    layers.add_column("width", justify="right")
    for layer in summary["layers"]:
        layers.add_row(layer["name"], str(layer["width"]))
    console.print(layers)
    console.print(f"pattern steps: {_steps_text(summary['pattern_steps'])}")
    console.print(f"checkpoints:   {_steps_text(summary['checkpoint_steps'])}")
    tables = Table(title="tables")
    for col in ("table", "files", "rows", "bytes"):
        tables.add_column(col, justify="left" if col == "table" else "right")
    for kind, t in summary["tables"].items():
        tables.add_row(kind, str(t["files"]), f"{t['rows']:,}", _human(t["bytes"]))
    tables.add_row("checkpoints", str(len(summary["checkpoint_steps"])), "", _human(summary["checkpoint_bytes"]))
    tables.add_row("probe set", "", "", _human(summary.get("probe_bytes", 0)))
    if summary.get("analysis_bytes"):
        tables.add_row("analysis", "", "", _human(summary["analysis_bytes"]))
    console.print(tables)
    console.print(f"total on disk: {_human(summary['total_bytes'])}")

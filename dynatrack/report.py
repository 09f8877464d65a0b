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
    commits = summary.get("commits") or {}
    incomplete = summary.get("incomplete_steps") or []
    if commits or incomplete:
        ranks = Table(title="commits per rank" + (" [yellow](incomplete steps left out)[/yellow]" if incomplete else ""))
        for col in ("rank", "committed (per attempt)", "incomplete steps"):
            ranks.add_column(col, justify="right" if col == "rank" else "left")
        by_rank = summary.get("incomplete_by_rank") or {}
        for rank in range(int(summary.get("world_size") or 0)):
            per = commits.get(rank) or commits.get(str(rank)) or {}
            text = ", ".join(f"a{a}: {'closed' if c['closed'] else 'through step ' + str(c['through'])}"
                             for a, c in sorted(per.items(), key=lambda kv: int(kv[0]))) or "[red]nothing[/red]"
            missing = by_rank.get(rank, by_rank.get(str(rank), []))
            ranks.add_row(str(rank), text, _steps_text(missing) if missing else "-")
        console.print(ranks)
    tables = Table(title="tables")
    for col in ("table", "files", "rows", "bytes"):
        tables.add_column(col, justify="left" if col == "table" else "right")
    for kind, t in summary["tables"].items():
        tables.add_row(kind, str(t["files"]), f"{t['rows']:,}", _human(t["bytes"]))
    tables.add_row("checkpoints", str(len(summary["checkpoint_steps"])), "", _human(summary["checkpoint_bytes"]))
    tables.add_row("probe set", "", "", _human(summary.get("probe_bytes", 0)))
    if summary.get("superseded_bytes"):
        tables.add_row("superseded", "", "", _human(summary["superseded_bytes"]))
    if summary.get("analysis_bytes"):
        tables.add_row("analysis", "", "", _human(summary["analysis_bytes"]))
    console.print(tables)
    console.print(f"total on disk: {_human(summary['total_bytes'])}")

"""A saved W&B workspace for dynatrack analyses: one section per analyzer, x-axis = training step.

The layout is first a plain JSON *spec* (:func:`workspace_spec`), written beside the run
(``runs/<run_id>/analysis/wandb_workspace.json``) whatever the mode; :func:`build_workspace`
turns a spec into a ``wandb_workspaces.workspaces.Workspace`` (W&B's own workspace API,
``pip install "dynatrack[workspace]"``) and :func:`save_workspace` saves it to the server, which
needs an online W&B. Offline, sync the run first, then save the spec::

    wandb sync runs/<run_id>/analysis/wandb/wandb/offline-run-*
    python -c "from dynatrack.tracking.workspace import save_workspace; \\
               save_workspace('runs/<run_id>/analysis/wandb_workspace.json', entity='me')"

>>> spec = workspace_spec(["patterns/fc1/train/distinct", "train/loss", "plots/regions"],
...                       project="dynatrack", name="dynatrack: r1")
>>> [s["name"] for s in spec["sections"]], spec["x_axis"]
(['train', 'patterns', 'plots'], 'trainer/step')
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from dynatrack.tracking.wandb_logger import STEP_KEY

SPEC_VERSION = 1
#: Section order in the workspace; analyzers not listed follow in name order, ``plots`` comes last.
SECTION_ORDER = ("train", "patterns", "partitions", "regions", "boundary", "local_complexity")
MEDIA_PREFIX = "plots"


def workspace_spec(keys: Iterable[str], *, project: str, name: str, entity: str | None = None) -> dict[str, Any]:
    """The workspace layout for the logged ``keys`` (``<analyzer>/.../<metric>``), as plain JSON.

    One section per analyzer; in it one line plot per metric (the last key component), whose
    lines are all of that analyzer's keys ending in that metric (every layer / split / radius),
    plotted against ``trainer/step``. Images (``plots/<name>``) go to a ``plots`` section of
    media panels. ``trainer/*`` and ``tables/*`` keys are not plotted.
    """
    by_section: dict[str, dict[str, list[str]]] = {}
    media: list[str] = []
    for key in sorted(set(keys)):
        head, _, rest = key.partition("/")
        if not rest or head in ("trainer", "tables"):
            continue
        if head == MEDIA_PREFIX:
            media.append(key)
            continue
        metric = rest.rsplit("/", 1)[-1]
        by_section.setdefault(head, {}).setdefault(metric, []).append(key)
    order = [s for s in SECTION_ORDER if s in by_section] + sorted(set(by_section) - set(SECTION_ORDER))
    sections: list[dict[str, Any]] = [
        {
            "name": section,
            "panels": [{"type": "line", "title": f"{section}: {metric}", "x": STEP_KEY, "y": ys}
                       for metric, ys in sorted(by_section[section].items())],
        }
        for section in order
    ]
    if media:
        sections.append({"name": MEDIA_PREFIX,
                         "panels": [{"type": "media", "title": key.split("/", 1)[1], "media_keys": [key]}
                                    for key in media]})
    return {"version": SPEC_VERSION, "entity": entity, "project": project, "name": name,
            "x_axis": STEP_KEY, "sections": sections}


def write_spec(spec: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the spec as indented JSON (atomically: a temporary file renamed)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(spec, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def build_workspace(spec: Mapping[str, Any], *, entity: str | None = None, project: str | None = None) -> Any:
    """A ``wandb_workspaces.workspaces.Workspace`` from a spec (nothing is sent anywhere).

    Raises ImportError naming the extra when ``wandb-workspaces`` is not installed, and
    ValueError when the spec has no entity and none is given.
    """
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as exc:
        raise ImportError(
            f"saving a W&B workspace needs wandb-workspaces ({exc}); pip install 'dynatrack[workspace]'"
        ) from exc
    entity = entity or spec.get("entity")
    if not entity:
        raise ValueError("the workspace spec names no W&B entity; pass entity= (your W&B user or team)")
    x_axis = spec.get("x_axis", STEP_KEY)
    sections = []
    for section in spec["sections"]:
        panels = []
        for p in section["panels"]:
            if p["type"] == "line":
                panels.append(wr.LinePlot(title=p["title"], x=p.get("x", x_axis), y=list(p["y"])))
            elif p["type"] == "media":
                panels.append(wr.MediaBrowser(title=p["title"], media_keys=list(p["media_keys"])))
            else:
                raise ValueError(f"workspace spec: unknown panel type {p['type']!r} in section {section['name']!r}")
        sections.append(ws.Section(name=section["name"], panels=panels, is_open=True,
                                   panel_settings=ws.SectionPanelSettings(x_axis=x_axis)))
    return ws.Workspace(entity=entity, project=project or spec["project"], name=spec["name"], sections=sections,
                        settings=ws.WorkspaceSettings(x_axis=x_axis))


def save_workspace(spec: Mapping[str, Any] | str | os.PathLike[str], *, entity: str | None = None,
                   project: str | None = None) -> str:
    """Build the workspace from a spec (or a spec file) and save it as a new W&B view; returns its URL.

    Needs W&B online credentials and ``wandb-workspaces``.
    """
    if not isinstance(spec, Mapping):
        with open(spec) as f:
            spec = json.load(f)
    workspace = build_workspace(spec, entity=entity, project=project)
    workspace.save()
    return str(workspace.url)

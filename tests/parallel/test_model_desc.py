"""A run directory analyzed without the user's code; nothing it names is imported; analyzers that
do not apply to a model are skipped with their reason while the others run.

References are independent of the stored description: the real model (same architecture,
the checkpoint's weights) through `regions.piecewise_linear_layers` and hooks on its modules.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from conftest import TinyNet, loader, make_data, trainer
from dynatrack import PatternRecorder, open_run, schedules
from dynatrack.analysis import local_complexity as lcx
from dynatrack.analysis import regions as reg
from dynatrack.parallel import AnalyzeConfig, analyze_run
from dynatrack.parallel.analyze import analyze_and_report, skipped_analyzers
from dynatrack.store.reader import RunError
from dynatrack.parallel.tasks import ModelUnavailableError, load_model
from dynatrack.store.model_desc import PROGRAM, ModelDescriptionError, program_module, read_model_description

ROOT = Path(__file__).resolve().parents[2]
CFG = dict(n_slices=1, n_segments=3, boundary_samples=8, lc_samples=12, lc_radii=(0.05, 0.5), lc_directions=3)


def _fit(model: pl.LightningModule, root: Path, name: str, x: torch.Tensor, y: torch.Tensor, steps: int = 4) -> str:
    warnings.filterwarnings("ignore")
    rec = PatternRecorder(str(root), run_name=name, probe={"train": (x[:32], y[:32])}, schedule=schedules.at([0, steps]),
                          checkpoint_schedule=schedules.at([0, steps]))
    trainer(steps, [rec]).fit(model, loader(x, y))
    return rec.run_dir


def _regions_reference(model: nn.Module, run_dir: str, table, input_shape) -> None:  # noqa: ANN001
    """Each region row recomputed from the real model with the checkpoint of its step."""
    run = open_run(run_dir)
    ids, _, x = run.probe_inputs("train")
    flat = x.reshape(len(x), -1).astype(np.float64)
    pos = {int(i): k for k, i in enumerate(ids)}
    assert table.num_rows > 0
    for row in table.to_pylist():
        model.load_state_dict(run.checkpoint(row["step"]))
        layers = reg.piecewise_linear_layers(model.eval(), input_shape)
        pts = [flat[pos[s]] for s in row["samples"]]
        if row["kind"] == "1d":
            want = reg.count_regions_1d(layers, pts[0], pts[1]).count
        else:
            sl = reg.slice_through(*pts)
            want = reg.count_regions_2d(layers, sl.origin, sl.u1, sl.u2).count
        assert row["count"] == want, row


def _lc_reference(model: nn.Module, run_dir: str, table, layers: list[str]) -> None:  # noqa: ANN001
    """Local complexity of the real model (hooks on its modules) at every analyzed step."""
    run = open_run(run_dir)
    _, _, x = run.probe_inputs("train")
    shape = run.manifest["probe"]["input_shape"]
    xs = torch.as_tensor(x[: CFG["lc_samples"]].reshape(-1, *shape), dtype=torch.float32)
    steps = sorted(set(table.column("step").to_pylist()))
    assert steps and table.num_rows > 0
    for step in steps:
        model.load_state_dict(run.checkpoint(step))
        model.eval()
        with torch.no_grad():
            res = lcx.local_complexity(lcx.preactivation_fn(model, layers), xs, CFG["lc_radii"], CFG["lc_directions"])
        got = {(r["layer"], r["radius"]): r["lc_sum"] for r in table.to_pylist() if r["step"] == step}
        want = {(name, float(r)): int(res.counts[li, ri]) for li, name in enumerate(res.layers)
                for ri, r in enumerate(res.radii)}
        assert got == want, step


# -- a manifest naming a shell command runs nothing ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> str:  # noqa: ANN001
    x, y = make_data(64)
    torch.manual_seed(0)
    return _fit(TinyNet(), tmp_path_factory.mktemp("runs"), "tiny", x, y)


def _hostile_copy(run_dir: str, tmp_path: Path, marker: Path, *, keep_description: bool) -> str:
    dst = tmp_path / "hostile"
    shutil.copytree(run_dir, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["model"] = {"class_path": "subprocess.Popen",
                         "init_args": {"args": f"touch {marker}", "shell": True}}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    if not keep_description:
        shutil.rmtree(dst / "model")
    return str(dst)


def test_no_description_fails_before_ray_and_runs_nothing(tiny_run, tmp_path, capsys) -> None:  # noqa: ANN001
    ray = pytest.importorskip("ray")
    from dynatrack.cli import main

    marker = tmp_path / "pwned"
    run_dir = _hostile_copy(tiny_run, tmp_path, marker, keep_description=False)
    assert not ray.is_initialized()
    with pytest.raises(ModelUnavailableError, match="--trust-model-code") as err:
        analyze_run(run_dir, config=AnalyzeConfig(**CFG), num_cpus=1, progress=False)
    assert "subprocess.Popen" in str(err.value) and "--analyzers patterns" in str(err.value)
    assert main(["analyze", run_dir, "--wandb", "disabled", "--num-cpus", "1"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("dynatrack analyze: error: ") and "stores no model description" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not ray.is_initialized()  # failed before starting Ray
    assert not marker.exists()


@pytest.mark.slow
def test_hostile_manifest_with_description_is_analyzed_without_running_it(tiny_run, tmp_path, local_ray) -> None:  # noqa: ANN001
    marker = tmp_path / "pwned"
    run_dir = _hostile_copy(tiny_run, tmp_path, marker, keep_description=True)
    results = analyze_run(run_dir, config=AnalyzeConfig(analyzers=("regions", "local_complexity"), **CFG), progress=False)
    assert not marker.exists()
    assert skipped_analyzers(results) == {}
    model = TinyNet()
    _regions_reference(model, run_dir, results["regions"], [5])
    _lc_reference(model, run_dir, results["local_complexity"], ["net.1", "net.3"])


def test_tampered_program_is_refused_before_anything_runs(tmp_path) -> None:  # noqa: ANN001
    """Shape expressions reach sympy.sympify (eval) in torch's deserializer: a hostile one must never get there."""
    from dynatrack.store.fs import RunLocation
    from dynatrack.store.model_desc import write_model_description

    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))
    loc = RunLocation.from_run_dir(str(tmp_path / "run"))
    loc.mkdir()
    desc = write_model_description(loc, model, layers=["1"], input_shape=[4])
    assert desc is not None and desc["program"]["status"] == "ok" and desc["chain"]["status"] == "unsupported"
    assert "GELU" in desc["chain"]["reason"]
    good = json.loads(loc.read_bytes(PROGRAM))
    program_module(loc, desc, model.state_dict())  # the untouched program loads
    marker = tmp_path / "pwned"
    attacks = {
        "expr_str": f"__import__('os').system('touch {marker}')",
        "target": "builtins.exec",
        "guards_code": [f"__import__('os').system('touch {marker}')"],
        "name": f"x; __import__('os').system('touch {marker}')",
    }
    for field, value in attacks.items():
        graph = json.loads(json.dumps(good))
        if field == "guards_code":
            graph["guards_code"] = value
        else:
            def put(o, done=[False]):  # noqa: ANN001, ANN202, B006 - first occurrence of the field
                if isinstance(o, dict):
                    for k in o:
                        if k == field and not done[0]:
                            o[k] = value
                            done[0] = True
                            return
                        put(o[k])
                elif isinstance(o, list):
                    for v in o:
                        put(v)

            put(graph)
            assert value in json.dumps(graph)
        Path(loc.join(PROGRAM)).write_text(json.dumps(graph))
        with pytest.raises(ModelDescriptionError, match="program"):
            program_module(loc, desc, model.state_dict())
        assert not marker.exists(), field


# -- a model defined in a training script's __main__, analyzed from another process --------------------------

SCRIPT = textwrap.dedent('''
    import sys, warnings
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from dynatrack import IndexedDataset, PatternRecorder, schedules

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    class Base(pl.LightningModule):
        def forward(self, x):
            return self.net(x)
        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class ScriptMLP(Base):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(36, 12), nn.LeakyReLU(0.05), nn.Linear(12, 9),
                                     nn.ReLU(), nn.Linear(9, 3))

    class ScriptCNN(Base):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 10), nn.GELU(),
                                     nn.Linear(10, 3))

    root = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 6, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    for name, cls in (("mlp", ScriptMLP), ("cnn", ScriptCNN)):
        torch.manual_seed(0)
        rec = PatternRecorder(root, run_name=name, probe={"train": (x[:40], y[:40])},
                              schedule=schedules.at([0, 5]), checkpoint_schedule=schedules.at([0, 5]))
        pl.Trainer(accelerator="cpu", devices=1, max_steps=5, callbacks=[rec], logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(
            cls(), DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=16, shuffle=True))
''')


class RefMLP(nn.Module):  # the script's architectures, written again: the real models as the reference
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(36, 12), nn.LeakyReLU(0.05), nn.Linear(12, 9), nn.ReLU(),
                                 nn.Linear(9, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RefCNN(RefMLP):
    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 10), nn.GELU(),
                                 nn.Linear(10, 3))


@pytest.mark.slow
def test_model_from_a_scripts_main_is_analyzed_in_another_process(tmp_path, local_ray) -> None:  # noqa: ANN001
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "runs")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlp_dir, cnn_dir = str(tmp_path / "runs" / "mlp"), str(tmp_path / "runs" / "cnn")
    assert open_run(mlp_dir).manifest["model"]["class_path"] == "__main__.ScriptMLP"
    assert not hasattr(sys.modules["__main__"], "ScriptMLP")  # the class does not exist here nor on Ray workers

    cfg = AnalyzeConfig(analyzers=("patterns", "regions", "local_complexity"), **CFG)
    mlp = analyze_run(mlp_dir, config=cfg, progress=False)
    assert skipped_analyzers(mlp) == {}
    assert read_model_description(open_run(mlp_dir).loc)["chain"]["status"] == "ok"
    _regions_reference(RefMLP(), mlp_dir, mlp["regions"], [1, 6, 6])
    _lc_reference(RefMLP(), mlp_dir, mlp["local_complexity"], ["net.2", "net.4"])
    assert sorted(set(mlp["boundary_distance"].column("step").to_pylist())) == [0, 5]

    cnn = analyze_run(cnn_dir, config=cfg, progress=False)
    skipped = skipped_analyzers(cnn)
    assert list(skipped) == ["regions"] and "Conv2d" in skipped["regions"]
    assert cnn["patterns"].num_rows > 0
    _lc_reference(RefCNN(), cnn_dir, cnn["local_complexity"], ["net.1", "net.4"])
    # load_model: the one entry point for weight analyzers, here the stored program
    model = load_model(open_run(cnn_dir), 5)
    ref = RefCNN()
    ref.load_state_dict(open_run(cnn_dir).checkpoint(5))
    xb = torch.randn(7, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(model(xb), ref.eval()(xb))


# -- issue 12: regions on a CNN / a GELU net skip with the reason; the others run ---------------------------


class TinyCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_cnn_and_gelu_skip_regions_with_reason_in_terminal_log_and_wandb(tmp_path, local_ray, capsys, caplog) -> None:  # noqa: ANN001
    from dynatrack.tracking import read_offline_run

    g = torch.Generator().manual_seed(1)
    xi, yi = torch.randn(64, 1, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    x, y = make_data(64)
    torch.manual_seed(0)
    cnn_dir = _fit(TinyCNN(), tmp_path / "runs", "cnn", xi, yi)
    gelu_dir = _fit(TinyNet(act="gelu"), tmp_path / "runs", "gelu", x, y)
    cfg = AnalyzeConfig(analyzers=("patterns", "regions", "local_complexity"), **CFG)
    for run_dir, module, layers, kind in ((cnn_dir, TinyCNN(), ["net.2"], "Conv2d"),
                                          (gelu_dir, TinyNet(act="gelu"), ["net.1", "net.3"], "GELU")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dynatrack"):
            results = analyze_and_report(run_dir, config=cfg, wandb_mode="offline")
        out = capsys.readouterr().out
        reason = skipped_analyzers(results)["regions"]
        assert list(skipped_analyzers(results)) == ["regions"] and kind in reason
        assert "regions" not in results and results["patterns"].num_rows > 0
        assert f"skipped regions: {reason[:40]}" in " ".join(out.split())
        assert any("regions skipped" in r.getMessage() and kind in r.getMessage() for r in caplog.records)
        assert pq.read_table(f"{run_dir}/analysis/skipped.parquet").to_pylist() == [
            {"analyzer": "regions", "reason": reason}]
        _lc_reference(module, run_dir, results["local_complexity"], layers)
        wandb_runs = sorted((Path(run_dir) / "analysis" / "wandb" / "wandb").glob("offline-run-*"))
        summary = read_offline_run(wandb_runs[-1])["summary"]
        assert summary["skipped/regions"] == reason
        assert any(k.startswith("local_complexity/") for k in summary)


# -- what is recorded: compiled submodules, other devices, models that cannot be exported ---------------------


def test_compiled_submodule_is_described_through_its_original_module(tmp_path) -> None:  # noqa: ANN001
    from dynatrack.analysis.chain import ChainModule, chain_layers
    from dynatrack.store.fs import RunLocation
    from dynatrack.store.model_desc import write_model_description

    model = TinyNet()
    compiled = torch.compile(model.net)
    model.net = compiled
    loc = RunLocation.from_run_dir(str(tmp_path / "run"))
    loc.mkdir()
    desc = write_model_description(loc, model, layers=["net.1", "net.3"], input_shape=[5])
    assert model.net is compiled  # put back
    assert desc["chain"]["status"] == "ok" and desc["program"]["status"] == "ok"
    # what the recorder's checkpoints hold: keys as the user wrote them, without _orig_mod
    state = {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}
    assert set(state) == {f"net.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    want = reg.piecewise_linear_layers(compiled._orig_mod, 5)
    got = chain_layers(desc["chain"]["steps"], state)
    assert [layer.name for layer in got] == ["net.1", "net.3", "net.4"]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.weight, b.weight)
    # the program, as if recorded on a GPU: its device fields say cuda; it runs on the CPU
    Path(loc.join(PROGRAM)).write_text(Path(loc.join(PROGRAM)).read_text().replace('"type": "cpu"', '"type": "cuda"'))
    x = torch.randn(9, 5)
    with torch.no_grad():
        z = compiled._orig_mod[0](x)
    assert torch.equal(program_module(loc, desc, state).preactivations(x)["net.1"], z)
    assert torch.equal(ChainModule(desc["chain"]["steps"], state).preactivations(x)["net.1"], z)


class DataDependent(TinyNet):
    """Python control flow on tensor values: torch.export cannot export it, nor is it a chain."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out if float(x.sum()) > 0 else 2 * out


def test_a_model_that_cannot_be_exported_is_recorded_with_the_reason_and_one_warning(tmp_path, caplog) -> None:  # noqa: ANN001
    x, y = make_data(64)
    with caplog.at_level(logging.WARNING, logger="dynatrack"):
        run_dir = _fit(DataDependent(), tmp_path, "dd", x, y, steps=2)
    run = open_run(run_dir)
    assert run.checkpoint_steps() == [0, 2]  # the fit went on
    desc = read_model_description(run.loc)
    assert desc["program"]["status"] == "failed" and desc["program"]["reason"].startswith("torch.export failed")
    assert desc["chain"]["status"] == "unsupported" and "does not reproduce" in desc["chain"]["reason"]
    mine = [r for r in caplog.records if r.name.startswith("dynatrack.store.model_desc")]
    assert len(mine) == 1 and "--trust-model-code" in mine[0].getMessage()
    assert not Path(run_dir, PROGRAM).exists()
    with pytest.raises(ModelUnavailableError, match="not exported"):
        load_model(run, 0)
    model = load_model(run, 2, trust_model_code=True)  # the opt-in imports the class (importable here)
    assert isinstance(model, DataDependent)
    # both weight analyzers skipped: nothing asked for applies, so a clear error gives each reason
    with pytest.raises(RunError) as err:
        analyze_run(run_dir, config=AnalyzeConfig(analyzers=("regions", "local_complexity"), **CFG), progress=False)
    assert "regions does not apply" in str(err.value) and "does not reproduce" in str(err.value)
    assert "local_complexity does not apply" in str(err.value) and "torch.export failed" in str(err.value)


def test_bf16_model_is_described_and_computes_in_bf16(tmp_path) -> None:  # noqa: ANN001
    from dynatrack.analysis.chain import ChainModule
    from dynatrack.store.fs import RunLocation
    from dynatrack.store.model_desc import write_model_description

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).to(torch.bfloat16)
    loc = RunLocation.from_run_dir(str(tmp_path / "run"))
    loc.mkdir()
    desc = write_model_description(loc, model, layers=["1"], input_shape=[4])
    assert desc["chain"]["status"] == "ok" and desc["program"]["status"] == "ok"
    x = torch.randn(16, 4)  # probe inputs are stored as float32
    with torch.no_grad():
        z = model[0](x.to(torch.bfloat16))
    assert torch.equal(ChainModule(desc["chain"]["steps"], model.state_dict()).preactivations(x)["1"], z)
    assert torch.equal(program_module(loc, desc, model.state_dict()).preactivations(x)["1"], z)

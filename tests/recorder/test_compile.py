"""``torch.compile``'d models: layer names as written, every scheduled step recorded, bits right.

The tests compile with ``backend="eager"`` / ``"aot_eager"`` (Dynamo's graph capture and guards, as
with inductor, without the C++ build that would take minutes on two cores).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch.nn import functional as F

from conftest import TinyNet, assert_signs, loader, make_data, trainer
from dynatrack import PatternRecorder, open_run, schedules
from dynatrack.analysis.chain import chain_layers
from dynatrack.store.model_desc import read_model_description


@pytest.fixture
def fresh_dynamo(monkeypatch):  # noqa: ANN201
    # the default (hooks added after compiling are not guarded), restored after the test
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pre_activations(state: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    z1 = F.linear(x, state["net.0.weight"], state["net.0.bias"])
    z2 = F.linear(torch.relu(z1), state["net.2.weight"], state["net.2.bias"])
    return {"net.1": z1, "net.3": z2}


def compiled_fit(tmp_path, how: str, backend: str, steps: int = 9, called_before: bool = False):  # noqa: ANN001, ANN201
    x, y = make_data()
    torch.manual_seed(0)
    model = TinyNet()
    if how == "submodule":
        model.net = torch.compile(model.net, backend=backend)
    else:
        model = torch.compile(model, backend=backend)
    if called_before:  # compiled (without hook checks) before the recorder's setup
        model(x[:16]).sum().backward()
        model.zero_grad()
    rec = PatternRecorder(str(tmp_path / "runs"), probe=(x, y), schedule=schedules.every(3),
                          batch_schedule=schedules.every(2), checkpoint_schedule=schedules.every(1))
    trainer(steps, [rec]).fit(model, loader(x, y))
    return open_run(rec.run_dir), x


def check_run(run, x: torch.Tensor, steps: int) -> None:  # noqa: ANN001
    assert run.widths == {"net.1": 13, "net.3": 20}  # not net._orig_mod.1
    assert run.recorded_steps("patterns", source="batch") == list(range(0, steps, 2))
    assert run.recorded_steps("patterns", source="probe") == list(range(0, steps + 1, 3))
    state = run.checkpoint(4)
    assert set(state) == {f"net.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    # the stored model description names the same layers and checkpoint keys (weight analyses join them)
    desc = read_model_description(run.loc)
    assert [layer.name for layer in chain_layers(desc["chain"]["steps"], state)] == ["net.1", "net.3", "net.4"]
    batch = run.patterns(source="batch").to_pandas()
    for step in range(0, steps, 2):
        z = pre_activations(run.checkpoint(step), x)
        for layer in ("net.1", "net.3"):
            rows = batch[(batch.step == step) & (batch.layer == layer)]
            assert len(rows) == 16
            ids = torch.as_tensor(rows.sample_id.to_numpy().copy())
            bits = torch.as_tensor([list(b) for b in rows.bits]).to(torch.uint8).numpy()
            assert_signs(bits, z[layer][ids])
    for step in range(0, steps + 1, 3):
        z = pre_activations(run.checkpoint(step), x)
        for layer in ("net.1", "net.3"):
            ids, bits = run.pattern_bits(step, layer)
            assert_signs(bits, z[layer][torch.as_tensor(ids)])


@pytest.mark.parametrize("how", ["submodule", "whole"])
def test_compiled_model_records_every_scheduled_step_under_its_own_names(tmp_path, fresh_dynamo, how):
    run, x = compiled_fit(tmp_path, how, "eager")
    check_run(run, x, 9)


def test_compiled_and_called_before_fit(tmp_path, fresh_dynamo):
    run, x = compiled_fit(tmp_path, "submodule", "eager", called_before=True)
    check_run(run, x, 9)


@pytest.mark.slow
def test_compiled_with_aot_autograd(tmp_path, fresh_dynamo):
    run, x = compiled_fit(tmp_path, "submodule", "aot_eager")
    check_run(run, x, 9)


def test_fullgraph_compile_is_refused_at_setup_with_what_to_do(tmp_path, fresh_dynamo):
    from dynatrack.recorder import RecorderError

    x, y = make_data()
    model = TinyNet()
    model.net = torch.compile(model.net, backend="eager", fullgraph=True)
    rec = PatternRecorder(str(tmp_path / "runs"), probe=(x, y), batch_schedule=schedules.every(2))
    with pytest.raises(RecorderError, match="compile without fullgraph=True"):
        trainer(3, [rec]).fit(model, loader(x, y))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing written

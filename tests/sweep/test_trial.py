"""One trial as a plain Lightning fit (no Ray): learning-rate rule, trial.json, checkpoint layout."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from dynatrack import open_run
from dynatrack.sweep.config import plan_trials, validate_config
from dynatrack.sweep.data import build_net, make_task
from dynatrack.sweep.manifest import prepare
from dynatrack.sweep.trial import fit_plain, trial_spec

TASK = {"name": "synthetic", "seed": 2, "n_train": 64, "n_test": 48}


class LrSeen(pl.Callback):
    """The learning rate (and momentum) the optimizer applies at each update."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.momentum: set[float] = set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001, ANN201
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.momentum.add(optimizer.param_groups[0]["momentum"])


def test_linear_scaling_with_warmup_and_the_trial_record(tmp_path):
    cfg = validate_config({
        "name": "lr", "root": str(tmp_path), "task": dict(TASK), "model": {"hidden": [9]}, "batch_sizes": [8, 16],
        "workers": 1, "seeds": [3], "epochs": 2,
        "optimizer": {"lr": 0.1, "lr_rule": "linear", "base_batch": 8, "warmup_steps": 3, "momentum": 0.5},
        "recorder": {"schedule": {"every": 1}}})
    path, _, _ = prepare(cfg)
    trial = next(t for t in plan_trials(cfg) if t["batch_size"] == 16)
    assert trial["max_steps"] == 2 * (64 // 16) and trial["lr"] == pytest.approx(0.2)
    used = LrSeen()
    record = fit_plain(trial_spec(cfg, trial, path), callbacks=[used])
    # the lr applied by update s: 0.1 * 16 / 8, warmed up linearly over 3 updates, computed by hand
    assert used.lrs == pytest.approx([0.2 * min(1.0, (s + 1) / 3) for s in range(8)])
    assert used.momentum == {0.5}
    steps = open_run(path / trial["trial_id"]).steps().to_pandas().sort_values("step")
    assert steps.step.tolist() == list(range(8)) and (steps.batch_size == 16).all()
    # trial.json: the final metrics recomputed from the final checkpoint loaded into a bare build_net
    info = json.loads((path / trial["trial_id"] / "trial.json").read_text())
    assert info == {**info, "final_step": 8, "initial_state": "checkpoints/step=0.pt",
                    "final_state": "checkpoints/step=8.pt"} and record["final_step"] == 8
    train, test, meta = make_task(**TASK)
    net = build_net({"hidden": [9], "activation": "relu"}, meta)
    ck = torch.load(path / trial["trial_id"] / info["final_state"], weights_only=True)
    net.load_state_dict({k[len("net."):]: v for k, v in ck.items()})
    with torch.no_grad():
        x, y = test.tensors
        logits = net(x)
        acc = sum(int(logits[i].argmax()) == int(y[i]) for i in range(len(y))) / len(y)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
    assert info["final_metrics"]["test_acc"] == pytest.approx(acc)
    assert info["final_metrics"]["test_loss"] == pytest.approx(loss, rel=1e-5)
    # the step-0 checkpoint is the seed's shared init
    init = torch.load(Path(path, "init", "seed=3.pt"), weights_only=True)
    ck0 = torch.load(path / trial["trial_id"] / info["initial_state"], weights_only=True)
    assert all(torch.equal(ck0[f"net.{k}"], v) for k, v in init.items())

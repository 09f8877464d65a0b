"""The `steps` table's lr is the learning rate of that step's own update, also under a per-step scheduler."""

from __future__ import annotations

import torch

from conftest import TinyNet, loader, make_data, trainer
from dynatrack import PatternRecorder, open_run, schedules


class WarmupNet(TinyNet):
    """SGD with a per-step linear warm-up: update s (0-based) uses lr = 0.1 * (s + 1) / 10."""

    def configure_optimizers(self):  # noqa: ANN201
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 10)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):  # noqa: ANN001, ANN201
        self.applied_lrs.append(optimizer.param_groups[0]["lr"])  # what this update really uses
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


def test_steps_lr_is_the_lr_of_that_steps_update_under_a_per_step_scheduler(tmp_path) -> None:  # noqa: ANN001
    x, y = make_data()
    model = WarmupNet()
    model.applied_lrs = []
    rec = PatternRecorder(str(tmp_path), run_name="lr", probe=(x[:16], y[:16]), schedule=schedules.every(1))
    trainer(8, [rec]).fit(model, loader(x, y))
    steps = open_run(rec.run_dir).steps().sort_by("step")
    got = dict(zip(steps.column("step").to_pylist(), steps.column("lr").to_pylist()))
    # by hand: update s uses 0.1 * (s + 1) / 10; and the model saw the same values
    for s in range(8):
        assert abs(got[s] - 0.1 * (s + 1) / 10) < 1e-12, (s, got[s])
        assert abs(got[s] - model.applied_lrs[s]) < 1e-12

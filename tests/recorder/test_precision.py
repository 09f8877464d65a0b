"""Mixed precision (bf16 autocast on CPU): what the recorder records.

The batch source records the training forward as it ran (under autocast: bf16 pre-activations);
the probe forward runs outside the training step's autocast, in the weights' own dtype (float32).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from conftest import TinyNet, loader, trainer
from dynatrack import PatternRecorder, open_run, schedules


def preacts(state: dict, x: torch.Tensor) -> list[torch.Tensor]:
    z1 = F.linear(x, state["net.0.weight"], state["net.0.bias"])
    return [z1, F.linear(torch.relu(z1), state["net.2.weight"], state["net.2.bias"])]


def signs(bits: np.ndarray, width: int) -> np.ndarray:
    return np.unpackbits(bits, axis=1, count=width).astype(bool)


def test_bf16_mixed_records_the_bf16_training_forward_and_a_float32_probe(tmp_path, data):
    x, y = data
    torch.manual_seed(0)
    rec = PatternRecorder(str(tmp_path / "runs"), probe=(x, y), schedule=schedules.every(2),
                          batch_schedule=schedules.every(2))
    trainer(6, [rec], precision="bf16-mixed").fit(TinyNet(), loader(x, y, batch_size=96))
    run = open_run(rec.run_dir)
    assert run.recorded_steps("patterns", source="batch") == [0, 2, 4]
    batch = run.patterns(source="batch").to_pandas()
    flips = 0  # batch signs where bf16 and float32 disagree: the check tells the two apart
    for step in (0, 2, 4):
        state = run.checkpoint(step)
        assert state["net.0.weight"].dtype == torch.float32  # the weights stay float32
        for k, (layer, width) in enumerate(run.widths.items()):
            ids, bits = run.pattern_bits(step, layer)  # probe: float32, exactly the plain forward's signs
            z = preacts(state, x[torch.as_tensor(ids)])[k]
            np.testing.assert_array_equal(signs(bits, width), (z > 0).numpy())
            rows = batch[(batch.step == step) & (batch.layer == layer)]
            ids = torch.as_tensor(rows.sample_id.to_numpy().copy())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                zb = preacts(state, x[ids])[k]
            assert zb.dtype == torch.bfloat16
            got = signs(np.stack([np.frombuffer(b, np.uint8) for b in rows.bits]), width)
            np.testing.assert_array_equal(got, (zb > 0).numpy())
            flips += int(((zb > 0) != (preacts(state, x[ids])[k] > 0)).sum())
    assert flips > 0


def test_bf16_true_records_the_bf16_model_for_both_sources(tmp_path, data):
    # the probe inputs are converted as Lightning converts the training batches (here to bf16)
    x, y = data
    torch.manual_seed(0)
    rec = PatternRecorder(str(tmp_path / "runs"), probe=(x, y), schedule=schedules.every(2),
                          batch_schedule=schedules.every(2))
    trainer(4, [rec], precision="bf16-true").fit(TinyNet(), loader(x, y, batch_size=96))
    run = open_run(rec.run_dir)
    batch = run.patterns(source="batch").to_pandas()
    for step in (0, 2):
        state = run.checkpoint(step)
        assert state["net.0.weight"].dtype == torch.bfloat16
        for k, (layer, width) in enumerate(run.widths.items()):
            ids, bits = run.pattern_bits(step, layer)
            z = preacts(state, x[torch.as_tensor(ids)].to(torch.bfloat16))[k]
            np.testing.assert_array_equal(signs(bits, width), (z > 0).numpy())
            rows = batch[(batch.step == step) & (batch.layer == layer)]
            z = preacts(state, x[torch.as_tensor(rows.sample_id.to_numpy().copy())].to(torch.bfloat16))[k]
            got = signs(np.stack([np.frombuffer(b, np.uint8) for b in rows.bits]), width)
            np.testing.assert_array_equal(got, (z > 0).numpy())

"""Check the CUDA recording path in one command; print one JSON object.

    python jobs/gpu_check.py                 # on a machine with CUDA (exit 0 without one: nothing to check)
    python jobs/gpu_check.py --device cpu    # the same code path on the CPU (gloo instead of NCCL)

1. Records a digits MLP fit (64-64-64-64-10, Adam) on 1 GPU and, where there are several GPUs, a
   2-GPU DDP fit (NCCL), each in its own process, with probe patterns (train + test, 1,797 samples)
   on a log schedule, the training batch's own patterns every 10 steps and the weights at every
   recorded step.
2. Recomputes every recorded bit on the CPU from the saved weights, in float64: for each recorded
   (step, layer, split, source) row, the pre-activation of the hooked module for that sample
   (probe: the stored probe input; batch: the training sample with that id). A bit whose
   recomputed pre-activation is within ``--tol`` of zero is not counted (float32 on the GPU may
   round it to either side) but reported; any other difference is a mismatch. The neuron
   counts (``neurons.active``, summed over ranks) are checked against the recomputed probe bits.
3. Measures the recorder's overhead at its defaults (``PatternRecorder(root, probe=...)``: probe
   patterns on ``log_spaced()``, their weights, no batch patterns): fits without and with the
   recorder, interleaved (plain, recorder, plain, ...), training-loop wall time (CUDA
   synchronized), medians and the median of the per-pair ratios.

Exit status: 0 when every compared bit matches (or there is no CUDA), 1 on a mismatch.

Output (abridged)::

    {"cuda": true, "device": "NVIDIA H100 80GB HBM3", "gpus": 1, "ok": true,
     "fits": [{"devices": 1, "strategy": "auto", "backend": "nccl|none", "bits_compared": ...,
               "mismatches": 0, "near_zero": ..., "neuron_count_mismatches": 0, ...}],
     "overhead": {"steps": 300, "pairs": 5, "plain_s": [...], "recorder_s": [...],
                  "ratio_of_medians": 1.0x, "median_paired_ratio": 1.0x}}
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("gpu_check")
HIDDEN = [64, 64, 64]


def _quiet() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    from dynatrack.console import quiet_third_party

    quiet_third_party(lightning_info=False)


# -- one recorded fit (a child process: Lightning's ddp re-executes this script) -------------------


def fit(root: str, run_name: str, device: str, devices: int, steps: int) -> None:
    import lightning.pytorch as pl

    from dynatrack import PatternRecorder, schedules
    from dynatrack.models import DigitsDataModule, DigitsMLP

    _quiet()
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=0)
    model = DigitsMLP(hidden=HIDDEN, lr=1e-3)
    probe_steps, batch_steps = schedules.log_spaced(dense=5), schedules.every(10)
    rec = PatternRecorder(root, run_name=run_name, probe=dm.probe(), schedule=probe_steps, batch_schedule=batch_steps,
                          checkpoint_schedule=schedules.union([probe_steps, batch_steps]), seed=0)
    trainer = pl.Trainer(accelerator=device, devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_steps=steps, callbacks=[rec], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, dm)
    if trainer.global_rank == 0:
        backend = None
        if devices > 1:
            import torch.distributed as dist

            backend = dist.get_backend() if dist.is_initialized() else None
        Path(root, run_name, "gpu_check_fit.json").write_text(json.dumps({
            "devices": devices, "strategy": "ddp" if devices > 1 else "auto", "backend": backend,
            "accelerator": device, "steps": steps}))


def run_fit_process(root: str, run_name: str, device: str, devices: int, steps: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--fit", "--root", root, "--run-name", run_name,
           "--device", device, "--devices", str(devices), "--steps", str(steps)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the {devices}-device fit failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    info = json.loads(Path(root, run_name, "gpu_check_fit.json").read_text())
    info["fit_s"] = round(time.perf_counter() - start, 2)
    return info


# -- every recorded bit against a CPU recomputation -------------------------------------------------


def recompute(model: Any, layers: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """float64 pre-activations (the hooked modules' inputs) of ``layers`` for inputs ``x``."""
    import torch

    modules = dict(model.named_modules())
    captured: dict[str, np.ndarray] = {}
    hooks = [modules[name].register_forward_hook(
        lambda mod, inp, out, name=name: captured.__setitem__(name, inp[0].detach().reshape(len(x), -1).numpy()))
        for name in layers]
    try:
        with torch.no_grad():
            model(torch.as_tensor(x, dtype=torch.float64))
    finally:
        for h in hooks:
            h.remove()
    return captured


def compare_run(run_dir: str, tol: float) -> dict[str, Any]:
    """Every recorded bit of the run against float64 pre-activations recomputed from its checkpoints."""
    import torch

    from dynatrack import open_run
    from dynatrack.models import DigitsMLP, load_digits_tensors

    run = open_run(run_dir)
    layers = [name for name in run.widths if "@" not in name]
    splits = sorted((run.manifest.get("probe") or {}).get("splits") or ["train"])
    probe = {s: run.probe_inputs(s) for s in splits}
    train_x = load_digits_tensors(0)[0].tensors[0].numpy().astype(np.float64)
    model = DigitsMLP(hidden=HIDDEN).double().eval()
    stats = {"steps_checked": 0, "rows_compared": 0, "bits_compared": 0, "mismatches": 0, "near_zero": 0,
             "neuron_counts_compared": 0, "neuron_count_mismatches": 0, "first_mismatch": None}
    ckpts = set(run.checkpoint_steps())
    pattern_steps = run.recorded_steps("patterns")
    missing = sorted(set(pattern_steps) - ckpts)
    if missing:
        raise RuntimeError(f"recorded steps without weights: {missing}")
    neurons = run.neurons(merged=True).to_pandas()
    for step in pattern_steps:
        state = {k: v.double() for k, v in run.checkpoint(step).items()}
        model.load_state_dict(state)
        stats["steps_checked"] += 1
        for source in ("probe", "batch"):
            for split in (splits if source == "probe" else [None]):
                for layer in layers:
                    t = run.patterns(step=step, layer=layer, split=split, source=source,
                                     columns=["sample_id", "bits"])
                    if t.num_rows == 0:
                        continue
                    ids = t.column("sample_id").to_numpy()
                    got = np.unpackbits(np.stack([np.frombuffer(b, np.uint8) for b in t.column("bits").to_pylist()]),
                                        axis=1, count=run.widths[layer]).astype(bool)
                    if source == "probe":
                        pid, _, px = probe[split]
                        pos = {int(i): k for k, i in enumerate(pid)}
                        x = px.reshape(len(px), -1).astype(np.float64)[[pos[int(i)] for i in ids]]
                    else:
                        x = train_x[ids]
                    z = recompute(model, [layer], x)[layer]
                    clear = np.abs(z) > tol
                    bad = clear & (got != (z > 0))
                    stats["rows_compared"] += len(ids)
                    stats["bits_compared"] += int(clear.sum())
                    stats["near_zero"] += int((~clear).sum())
                    stats["mismatches"] += int(bad.sum())
                    if bad.any() and stats["first_mismatch"] is None:
                        r, c = np.argwhere(bad)[0]
                        stats["first_mismatch"] = {"step": int(step), "layer": layer, "split": split, "source": source,
                                                   "sample_id": int(ids[r]), "neuron": int(c), "z": float(z[r, c])}
                    if source == "probe" and len(neurons):
                        sel = neurons[(neurons.step == step) & (neurons.layer == layer) & (neurons.split == split)]
                        if len(sel):
                            active = sel.sort_values("neuron").active.to_numpy()
                            want = (z > 0).sum(axis=0)
                            slack = (~clear).sum(axis=0)
                            stats["neuron_counts_compared"] += len(active)
                            stats["neuron_count_mismatches"] += int((np.abs(active - want) > slack).sum())
    del torch
    return stats


# -- overhead: with vs without the recorder, interleaved -------------------------------------------


def overhead(device: str, steps: int, pairs: int, root: str) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    from dynatrack import PatternRecorder
    from dynatrack.models import DigitsDataModule, DigitsMLP

    _quiet()

    class LoopTimer(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start

    def one(with_recorder: bool, k: int) -> float:
        pl.seed_everything(k, verbose=False)
        dm = DigitsDataModule(batch_size=64, seed=0)
        timer = LoopTimer()
        callbacks: list[Any] = [timer]
        if with_recorder:
            callbacks.append(PatternRecorder(root, run_name=f"overhead-{k}", probe=dm.probe()))
        trainer = pl.Trainer(accelerator=device, devices=1, max_steps=steps, callbacks=callbacks, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0)
        trainer.fit(DigitsMLP(hidden=HIDDEN, lr=1e-3), dm)
        return timer.seconds

    one(False, 10_000)  # warm-up: CUDA context, kernels, data
    plain, rec = [], []
    for k in range(pairs):
        plain.append(one(False, k))
        rec.append(one(True, k))
    return {"steps": steps, "pairs": pairs, "config": "PatternRecorder(root, probe=dm.probe()) defaults",
            "plain_s": [round(v, 4) for v in plain], "recorder_s": [round(v, 4) for v in rec],
            "ratio_of_medians": round(float(np.median(rec) / np.median(plain)), 4),
            "median_paired_ratio": round(float(np.median(np.asarray(rec) / np.asarray(plain))), 4)}


# -- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default; exits 0 with a message without CUDA) or cpu (the same path, gloo)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of each recorded fit (default 60)")
    p.add_argument("--ddp-devices", type=int, default=None,
                   help="devices of the DDP fit (default: 2 where there are 2+ GPUs, none on the CPU)")
    p.add_argument("--overhead-steps", type=int, default=300, help="steps of each overhead fit (default 300)")
    p.add_argument("--pairs", type=int, default=5, help="interleaved without/with pairs (default 5; 0: skip)")
    p.add_argument("--tol", type=float, default=1e-4, help="|pre-activation| below which a bit is not compared")
    p.add_argument("--root", default=None, help="where the runs go (default: a temporary directory, removed)")
    p.add_argument("--timeout", type=float, default=540, help="seconds allowed for each recorded fit")
    # internal: one recorded fit in this process
    p.add_argument("--fit", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--run-name", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.fit:
        fit(args.root, args.run_name, args.device, args.devices, args.steps)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "ok": True,
                          "message": "no CUDA device on this machine: nothing to check (use --device cpu to run "
                                     "the same checks on the CPU)"}))
        return 0
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    ddp = args.ddp_devices if args.ddp_devices is not None else (2 if gpus >= 2 else 0)
    if args.device == "cuda" and ddp > gpus:
        raise SystemExit(f"--ddp-devices {ddp} > {gpus} GPUs on this machine")
    out: dict[str, Any] = {"cuda": args.device == "cuda", "accelerator": args.device, "gpus": gpus,
                           "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                           "torch": torch.__version__, "fits": []}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = args.root or tmp
        for devices in [1] + ([ddp] if ddp > 1 else []):
            name = f"check-{args.device}-{devices}"
            info = run_fit_process(root, name, args.device, devices, args.steps, args.timeout)
            info.update(compare_run(os.path.join(root, name), args.tol))
            out["fits"].append(info)
        if args.pairs > 0:
            out["overhead"] = overhead(args.device, args.overhead_steps, args.pairs, root)
    out["ok"] = all(f["mismatches"] == 0 and f["neuron_count_mismatches"] == 0 and f["bits_compared"] > 0
                    for f in out["fits"])
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Ray job entry point: run (or resume) a batch-size sweep.

    ray job submit --working-dir . -- python jobs/sweep.py --config configs/batch_sweep.yaml

Inside ``ray job submit`` the sweep runs on the job's cluster (``RAY_ADDRESS`` is set by Ray); run
directly it starts a local Ray. Use an absolute ``root`` in the config (or ``--root``) so the sweep
directory outlives the job's temporary working directory. Prints the summary as JSON; exits 1 when
a trial failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from dynatrack.parallel.sweep import run_sweep  # noqa: E402
from dynatrack.sweep.config import SweepConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/batch_sweep.yaml")
    parser.add_argument("--root", default=None, help="override the config's root (where <name>/ is created)")
    parser.add_argument("--address", default=None, help="Ray cluster; default: the job's cluster or a local Ray")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config)
        if args.root is not None:
            cfg["root"] = args.root
        result = run_sweep(cfg, address=args.address)
    except (SweepConfigError, RuntimeError) as exc:
        sys.stderr.write(f"jobs/sweep.py: error: {exc}\n")
        return 2
    json.dump({k: result[k] for k in ("sweep_dir", "ran", "skipped", "failed", "timings", "trials")}, sys.stdout,
              indent=2)
    sys.stdout.write("\n")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ray job entry point: analyze one run directory.

    ray job submit --working-dir . -- python jobs/analyze.py --config configs/analyze.yaml --run runs/<run_id>

Inside ``ray job submit`` the job connects to its cluster (``RAY_ADDRESS`` is set
by Ray); run directly it starts a local Ray. Results land in
``<run>/analysis/*.parquet`` and in a W&B run (offline unless configured).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from dynatrack.cli import load_analyze_config  # noqa: E402
from dynatrack.parallel.analyze import analyze_and_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/analyze.yaml")
    parser.add_argument("--run", required=True, help="the run directory (<root>/<run_id>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg, ray_opts, wandb_opts = load_analyze_config(args.config)
    analyze_and_report(args.run, config=cfg, address=ray_opts.get("address"), num_cpus=ray_opts.get("num_cpus"),
                       wandb_mode=wandb_opts.get("mode", "offline"), project=wandb_opts.get("project", "dynatrack"),
                       group=wandb_opts.get("group"), wandb_init_timeout=wandb_opts.get("init_timeout"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""DVC stage `configure`: validate params.yaml and write one resolved config file per run.

Each `train@<run>-<seed>` stage depends on its run's file, not on params.yaml directly, so a
change to the base configuration retrains exactly the runs whose settings it changes: a run
that overrides the changed key gets a byte-identical file and stays cached. Before any run
trains, it prints which runs will train and about how long that takes here (stages/cost.py).
"""

import argparse
import json
import shutil
from pathlib import Path

from stages import config, cost
from stages.errors import run_cli
from stages.files import make_temp_dir, replace_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("configs"))
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="the trained runs")
    args = parser.parse_args()

    params = config.load_params(args.params)
    configs = config.resolve_all(params)
    staging = make_temp_dir(args.out)
    try:
        for run, cfg in configs.items():
            text = json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"
            (staging / f"{run}.json").write_text(text)
        replace_dir(staging, args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"configure: {len(configs)} runs: {', '.join(configs)}")
    print(cost.plan_line(configs, config.seeds(params), args.runs, cost.TIMINGS))


if __name__ == "__main__":
    run_cli(main)

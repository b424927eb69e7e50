"""Model selection on the validation split: train a run of params.yaml with changes, print
its validation accuracy. The test set plays no part: its slot holds the validation split.

    python benchmarks/select_on_val.py --run mixer --epochs 10 --set blocks=4 --set hflip=false

Each `--set key=value` is a YAML value applied like `dvc exp run -S` (top-level run keys, or
`models.<preset>.<key>`). One JSON line per run is appended to `--log`.
"""

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from stages.config import load_params, resolve_run
from stages.data import Dataset, load_dataset
from stages.errors import UserError, run_cli
from stages.model import count_parameters, forward_flops
from stages.training import fit, pick_device

REPO = Path(__file__).resolve().parents[1]


def apply(params: dict, run: str, assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    if not sep:
        raise UserError(f"--set {assignment!r} must be key=value")
    value = yaml.safe_load(text)
    path = key.split(".")
    target = params["runs"][run] if len(path) == 1 else params
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], dest="changes")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--data", type=Path, default=REPO / "data/fashion-mnist")
    parser.add_argument("--log", type=Path, default=None, help="append one JSON line per run")
    args = parser.parse_args()

    params = load_params(args.params)
    params["runs"][args.run] = dict(params["runs"].get(args.run) or {}, epochs=args.epochs)
    for change in args.changes:
        apply(params, args.run, change)
    cfg = resolve_run(params, args.run)
    data = load_dataset(
        args.data, val_size=cfg.val_size, split_seed=cfg.split_seed,
        train_limit=cfg.train_limit, test_limit=1,
    )
    data = Dataset(data.train, data.val, data.val)  # the test set stays out of selection
    started = time.perf_counter()
    model, summary = fit(
        cfg, data, seed=args.seed, live_dir=None, checkpoint=None, device=pick_device(),
        label=args.run,
    )
    best = max(summary["history"], key=lambda r: r["val/accuracy"])
    result = {
        "run": args.run,
        "changes": args.changes,
        "epochs": args.epochs,
        "seed": args.seed,
        "val_accuracy": summary["final"]["val/accuracy"],
        "best_val_accuracy": best["val/accuracy"],
        "train_accuracy": summary["final"]["train/accuracy"],
        "parameters": count_parameters(model),
        "forward_mflop": forward_flops(cfg.model) / 1e6,
        "seconds_per_epoch": summary["seconds_per_epoch"],
        "wall_seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    if args.log is not None:
        with args.log.open("a") as log:
            log.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    run_cli(main)

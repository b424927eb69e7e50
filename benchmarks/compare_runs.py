"""Compare trained runs image by image: each run's validation and test accuracy, and for every
pair the difference, the images one run gets right and the other wrong (n10, n01), and the
difference in standard deviations of the paired sampling noise, sqrt(n10 + n01) / N (z, as in
McNemar's test: about that spread is expected between two equally accurate models).

    python benchmarks/compare_runs.py RUN [RUN ...]   # `train` stage output folders

Every model predicts as the plain model (`cpu_kernels: off`), so the comparison does not depend
on which path trained it.
"""

import argparse
import itertools
import math
from pathlib import Path

import torch

from stages.data import load_dataset
from stages.errors import UserError, run_cli
from stages.training import load_trained, predict

SPLITS = ("val", "test")


def predictions(run: Path, data_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """split: (predicted classes, labels) of the model a train stage saved in `run`."""
    model_file = run / "model.pt"
    if not model_file.is_file():
        raise UserError(f"{run} holds no trained model (model.pt): give `train` stage folders")
    model, cfg = load_trained(model_file)
    data = load_dataset(
        data_dir,
        val_size=cfg.val_size,
        split_seed=cfg.split_seed,
        train_limit=cfg.train_limit,
        test_limit=cfg.test_limit,
    )
    return {
        split: (predict(model, getattr(data, split), cfg).argmax(1), getattr(data, split).labels)
        for split in SPLITS
    }


def paired(first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor) -> dict:
    """The accuracy difference of two runs' predictions and its paired noise."""
    right_first, right_second = first == labels, second == labels
    n10 = int((right_first & ~right_second).sum())
    n01 = int((~right_first & right_second).sum())
    difference = (n10 - n01) / len(labels)
    sd = math.sqrt(n10 + n01) / len(labels)
    return {
        "difference": difference,
        "n10": n10,
        "n01": n01,
        "disagree": int((first != second).sum()),
        "z": difference / sd if sd else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="train stage output folders")
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    args = parser.parse_args()
    results = {run: predictions(run, args.data) for run in args.runs}
    for run, by_split in results.items():
        accuracies = ", ".join(
            f"{split} {(predicted == labels).double().mean().item():.4f} ({len(labels)} images)"
            for split, (predicted, labels) in by_split.items()
        )
        print(f"{run}: {accuracies}")
    for first, second in itertools.combinations(args.runs, 2):
        for split in SPLITS:
            (a, labels), (b, _) = results[first][split], results[second][split]
            p = paired(a, b, labels)
            print(
                f"{first} - {second}, {split}: {100 * p['difference']:+.2f} points, "
                f"n10 {p['n10']}, n01 {p['n01']}, predicted differently {p['disagree']}, "
                f"z {p['z']:+.2f}"
            )


if __name__ == "__main__":
    run_cli(main)

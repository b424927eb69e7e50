"""The test accuracy the report's notebook measured: the trained model in training mode.

The notebook scored the test set every epoch without switching to eval mode, so dropout was on
and BatchNorm normalised each shuffled batch of 256 by its own statistics. The pipeline scores
in eval mode. This prints both for trained runs, the training-mode number as a mean over
`--repeats` shuffles and dropout draws, to tell how much of a gap to a published value the
measurement alone explains.

    python benchmarks/train_mode_test.py RUN [RUN ...]   # `train` stage output folders
"""

import argparse
import copy
import statistics
from pathlib import Path

import torch

from stages.data import Split, load_dataset
from stages.errors import UserError, run_cli
from stages.training import evaluate, load_trained

NOTEBOOK_BATCH = 256


@torch.no_grad()
def training_mode_accuracy(model: torch.nn.Module, test: Split, seed: int) -> float:
    """Accuracy over shuffled batches with dropout on and BatchNorm on batch statistics; a copy
    of the model is used, as training mode also moves BatchNorm's running statistics."""
    net = copy.deepcopy(model).train()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(test), generator=generator)
    correct = 0
    for start in range(0, len(test), NOTEBOOK_BATCH):
        idx = order[start : start + NOTEBOOK_BATCH]
        correct += (net(test.images[idx]).argmax(1) == test.labels[idx]).sum().item()
    return correct / len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train stage output folders")
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print("| run | eval mode | training mode (mean ± std) | difference |")
    print("| --- | --- | --- | --- |")
    for run in args.runs:
        model_file = run / "model.pt"
        if not model_file.is_file():
            raise UserError(f"{run} holds no trained model (model.pt): give `train` stage folders")
        model, cfg = load_trained(model_file)
        test = load_dataset(
            args.data, val_size=cfg.val_size, split_seed=cfg.split_seed, test_limit=cfg.test_limit
        ).test
        _, eval_accuracy = evaluate(model, test, cfg)
        scores = [training_mode_accuracy(model, test, seed) for seed in range(args.repeats)]
        mean, std = statistics.fmean(scores), statistics.stdev(scores)
        print(
            f"| {run.parent.name} | {eval_accuracy:.4f} | {mean:.4f} ± {std:.4f} "
            f"| {mean - eval_accuracy:+.4f} |"
        )


if __name__ == "__main__":
    run_cli(main)

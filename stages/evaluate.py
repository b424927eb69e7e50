"""DVC stage `evaluate@<run>-<seed>`: test loss, accuracy, per-class accuracy, confusion matrix.

The trained model is evaluated once more in eval mode (dropout off, BatchNorm running
statistics) and the results are logged with dvclive; a diverged run is recorded as such.
"""

import argparse
import json
from pathlib import Path

from dvclive import Live

from stages import cost
from stages.data import CLASSES, class_key, load_dataset
from stages.errors import UserError, run_cli
from stages.fast import accelerate
from stages.training import evaluate_logits, load_trained, pick_device, predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="the train stage's folder")
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    model_file, summary_file = args.train / "model.pt", args.train / "summary.json"
    if not model_file.is_file() or not summary_file.is_file():
        raise UserError(f"{args.train} holds no finished training run (model.pt, summary.json)")
    summary = json.loads(summary_file.read_text())
    model, cfg = load_trained(model_file)

    live = Live(str(args.out), dvcyaml=False, save_dvc_exp=False)
    live.log_metric("diverged", int(summary["diverged"]), plot=False)
    if summary["diverged"]:
        live.log_metric("diverged_epoch", summary["diverged_epoch"], plot=False)
        print(f"evaluate: the run diverged in epoch {summary['diverged_epoch']}; nothing to test")
    else:
        device = pick_device()
        test = load_dataset(
            args.data, val_size=cfg.val_size, split_seed=cfg.split_seed, test_limit=cfg.test_limit
        ).test.to(device)
        net, _ = accelerate(model.to(device), cfg, device)
        logits = predict(net, test, cfg)
        loss, accuracy = evaluate_logits(logits, test.labels)
        predicted = logits.argmax(1).cpu()
        labels = test.labels.cpu()
        live.log_metric("test/loss", loss, plot=False)
        live.log_metric("test/accuracy", accuracy, plot=False)
        for index, name in enumerate(CLASSES):
            mask = labels == index
            if mask.any():
                class_accuracy = (predicted[mask] == index).float().mean().item()
                live.log_metric(f"per_class/{class_key(name)}", class_accuracy, plot=False)
        live.log_sklearn_plot(
            "confusion_matrix",
            [CLASSES[i] for i in labels.tolist()],
            [CLASSES[i] for i in predicted.tolist()],
            name="confusion_matrix.json",
        )
        print(f"evaluate: test accuracy {accuracy:.4f}, loss {loss:.4f} ({len(test)} images)")
    live.end()
    cost.record(summary["run"], {"evaluate_seconds": cost.process_seconds()})


if __name__ == "__main__":
    run_cli(main)

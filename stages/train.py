"""DVC stage `train@<run>-<seed>`: train one run with one seed; save model, summary, curves."""

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import torch

from stages import cost
from stages.config import RunConfig
from stages.data import load_dataset
from stages.errors import UserError, run_cli
from stages.files import atomic_write, write_json
from stages.model import count_parameters
from stages.training import fit, pick_device


def load_run_config(path: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(json.loads(path.read_text()), str(path))
    except FileNotFoundError:
        raise UserError(f"run config {path} does not exist: run `dvc repro configure`") from None
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise UserError(f"run config {path} is not a resolved config ({exc})") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="configs/<run>.json")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--out", type=Path, required=True, help="output folder of this run")
    parser.add_argument("--checkpoint", type=Path, required=True, help="resumable state")
    args = parser.parse_args()

    cfg = load_run_config(args.config)
    data = load_dataset(
        args.data,
        val_size=cfg.val_size,
        split_seed=cfg.split_seed,
        train_limit=cfg.train_limit,
        test_limit=cfg.test_limit,
    )
    device = pick_device()
    label = f"{args.config.stem}-{args.seed}"
    started, before_fit = datetime.now(UTC), cost.process_seconds()
    model, summary = fit(
        cfg,
        data,
        seed=args.seed,
        live_dir=args.out / "live",
        checkpoint=args.checkpoint,
        device=device,
        label=label,
    )
    summary = {
        "run": args.config.stem,
        "seed": args.seed,
        "parameters": count_parameters(model),
        "train_images": len(data.train),
        "val_images": len(data.val),
        "test_images": len(data.test),
        **summary,
        # when and where this process trained (after a resume: its part), in UTC
        "trained": [started.isoformat(), datetime.now(UTC).isoformat()],
        "machine": cost.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": cfg.to_dict(),
    }
    state = {"config": cfg.to_dict(), "state_dict": model.state_dict()}
    atomic_write(args.out / "model.pt", lambda tmp: torch.save(state, tmp))
    write_json(args.out / "summary.json", summary)
    args.checkpoint.unlink(missing_ok=True)  # the run is complete; a rerun starts afresh
    if summary["eval_seconds_per_epoch"] is not None:  # None: it resumed with nothing left
        setup = before_fit + summary["setup_seconds"]
        cost.record(args.config.stem, cost.train_record(cfg, summary, setup))


if __name__ == "__main__":
    run_cli(main)

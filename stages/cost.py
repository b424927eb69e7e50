"""What a change to params.yaml will train, and about how long that takes on this machine.

The train and evaluate stages record how long they took in TIMINGS, a machine-local file beside
the checkpoints (outside git and DVC). From it, the configure stage prints the cost of a change
before anything trains, and `python -m stages.cost -S key=value ...` prints it before
`dvc exp run -S key=value ...` is started (the same overrides, applied by DVC's own code).
"""

import argparse
import json
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from stages import config
from stages.data import TEST_IMAGES, TRAIN_IMAGES
from stages.errors import UserError, run_cli
from stages.files import write_json
from stages.model import forward_flops

TIMINGS = Path("checkpoints/timings.json")
TRAIN_FIELDS = ("setup_seconds", "train_seconds_per_epoch", "eval_seconds_per_epoch")


def machine() -> str:
    """Names this machine in TIMINGS (host, processor, CPUs), so that times copied from another
    machine are not taken for its own."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        found = None
    processor = found.group(1).strip() if found else platform.processor() or platform.machine()
    return f"{platform.node()}, {processor}, {os.cpu_count()} CPUs"


def process_seconds() -> float:
    """Wall time since this process started: interpreter start-up and imports included."""
    import psutil

    return time.time() - psutil.Process().create_time()


def read_timings(path: Path = TIMINGS) -> dict[str, dict[str, Any]]:
    """This machine's measured runs, by run name; empty where nothing was measured yet."""
    try:
        return json.loads(path.read_text()).get(machine(), {})
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def record(run: str, times: dict[str, Any], path: Path = TIMINGS) -> None:
    """Merge `times` into this machine's entry for `run`."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        data = {}
    data.setdefault(machine(), {}).setdefault(run, {}).update(times)
    write_json(path, data)


def image_counts(cfg: config.RunConfig) -> tuple[int, int]:
    """Images trained on per epoch, and evaluated per epoch (validation + test)."""
    train = TRAIN_IMAGES - cfg.val_size
    if cfg.train_limit is not None:
        train = min(train, cfg.train_limit)
    test = TEST_IMAGES if cfg.test_limit is None else min(TEST_IMAGES, cfg.test_limit)
    return train, cfg.val_size + test


def train_record(cfg: config.RunConfig, summary: dict[str, Any], setup: float) -> dict:
    """What `estimate` needs of a finished training run."""
    train, evaluated = image_counts(cfg)
    return {
        "block": cfg.model.block,
        "precision": cfg.precision,
        "flops": forward_flops(cfg.model),
        "train_images": train,
        "eval_images": evaluated,
        "setup_seconds": setup,
        "train_seconds_per_epoch": summary["seconds_per_epoch"],
        "eval_seconds_per_epoch": summary["eval_seconds_per_epoch"],
    }


def estimate(run: str, cfg: config.RunConfig, measured: dict[str, dict]) -> float | None:
    """Seconds to train and evaluate `run` with `cfg`, scaled from the same run's last
    measurement here (by FLOPs, images and epochs), else from a run with the same kind of block
    and precision; None when there is neither."""
    usable = {
        name: m
        for name, m in measured.items()
        if all(m.get(key) is not None for key in TRAIN_FIELDS)
    }
    like = [
        m
        for m in usable.values()
        if (m["block"], m["precision"]) == (cfg.model.block, cfg.precision)
    ]
    m = usable.get(run) or (like[0] if like else None)
    if m is None:
        return None
    train, evaluated = image_counts(cfg)
    flops = forward_flops(cfg.model) / m["flops"]
    per_epoch = flops * (
        m["train_seconds_per_epoch"] * train / m["train_images"]
        + m["eval_seconds_per_epoch"] * evaluated / m["eval_images"]
    )
    return m["setup_seconds"] + cfg.epochs * per_epoch + m.get("evaluate_seconds", 0.0)


def to_train(
    configs: dict[str, config.RunConfig], seeds: list[int], runs_dir: Path
) -> list[tuple[str, int]]:
    """The (run, seed) pairs whose last trained result in `runs_dir` has other settings, or
    none: what `dvc repro` will train, unless its run-cache already holds them."""
    pending = []
    for run, cfg in configs.items():
        settings = json.loads(json.dumps(cfg.to_dict()))  # as the summary stores it
        for seed in seeds:
            summary = runs_dir / f"{run}-{seed}" / "train" / "summary.json"
            try:
                trained = json.loads(summary.read_text())["config"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                trained = None
            if trained != settings:
                pending.append((run, seed))
    return pending


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def plan_line(
    configs: dict[str, config.RunConfig], seeds: list[int], runs_dir: Path, timings: Path
) -> str:
    """One line: which runs will train, and about how long that takes on this machine."""
    pending = to_train(configs, seeds, runs_dir)
    if not pending:
        return "cost: no run's settings changed; nothing to train"
    measured = read_timings(timings)
    seconds = {(run, seed): estimate(run, configs[run], measured) for run, seed in pending}
    known = [s for s in seconds.values() if s is not None]
    names = ", ".join(f"{run}-{seed}" for run, seed in pending)
    line = f"cost: will train {len(pending)} of {len(configs) * len(seeds)} runs ({names})"
    if not known:
        return line + ": no time measured on this machine yet"
    line += f": about {duration(sum(known))} on this machine, from its measured times"
    unknown = [f"{run}-{seed}" for (run, seed), s in seconds.items() if s is None]
    if unknown:
        line += f"; not yet measured here: {', '.join(unknown)}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Print what `dvc exp run` with these overrides would train, and its cost."
    )
    parser.add_argument(
        "-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
        help="an override as `dvc exp run -S` takes it; repeat for several",
    )  # fmt: skip
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--timings", type=Path, default=TIMINGS)
    args = parser.parse_args()

    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "params.yaml"
        shutil.copyfile(args.params, params)
        try:
            apply_overrides(params, args.set_param)
        except InvalidArgumentError as exc:
            cause = f": {exc.__cause__}".splitlines()[0] if exc.__cause__ else ""
            raise UserError(f"bad override in {' '.join(args.set_param)}{cause}") from None
        values = config.load_params(params)
    configs = config.resolve_all(values)
    print(plan_line(configs, config.seeds(values), args.runs, args.timings))


if __name__ == "__main__":
    run_cli(main)

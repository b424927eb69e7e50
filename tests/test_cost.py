"""The cost of a change before it runs: which runs will train, and their time scaled from this
machine's measurements (stages/cost.py)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import config, cost
from stages.model import forward_flops

REPO = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
MEASURED = {  # one full-data run of `final` on this machine
    "setup_seconds": 5.0,
    "train_seconds_per_epoch": 40.0,
    "eval_seconds_per_epoch": 3.0,
    "evaluate_seconds": 4.0,
}


@pytest.fixture
def timings(tmp_path) -> Path:
    path = tmp_path / "timings.json"
    final = config.resolve_run(PARAMS, "final")
    summary = {
        "seconds_per_epoch": MEASURED["train_seconds_per_epoch"],
        "eval_seconds_per_epoch": MEASURED["eval_seconds_per_epoch"],
    }
    cost.record("final", cost.train_record(final, summary, MEASURED["setup_seconds"]), path)
    cost.record("final", {"evaluate_seconds": MEASURED["evaluate_seconds"]}, path)
    return path


def trained(runs: Path, run: str, seed: int, cfg: config.RunConfig) -> None:
    folder = runs / f"{run}-{seed}" / "train"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"config": cfg.to_dict()}))


def test_the_same_run_scales_with_epochs_and_images(timings):
    measured = cost.read_timings(timings)
    final = config.resolve_run(PARAMS, "final")
    assert cost.estimate("final", final, measured) == pytest.approx(5 + 60 * 43 + 4)
    quick = dataclasses.replace(final, epochs=2, train_limit=5500, test_limit=5000)
    # a tenth of the training images; 10,000 of the 15,000 evaluated images
    assert cost.estimate("final", quick, measured) == pytest.approx(5 + 2 * (4 + 2) + 4)


def test_another_run_of_the_same_kind_scales_with_its_flops(timings):
    measured = cost.read_timings(timings)
    final = config.resolve_run(PARAMS, "final")
    blocks_3 = config.resolve_run(PARAMS, "blocks-3")
    ratio = forward_flops(blocks_3.model) / forward_flops(final.model)
    assert ratio > 1.5
    assert cost.estimate("blocks-3", blocks_3, measured) == pytest.approx(5 + 60 * 43 * ratio + 4)
    # the modern Mixer: another block and precision, never measured here
    assert cost.estimate("mixer", config.resolve_run(PARAMS, "mixer"), measured) is None


def test_another_machines_timings_are_not_used(timings):
    data = json.loads(timings.read_text())
    timings.write_text(json.dumps({"elsewhere x86_64 64 CPUs": data[cost.machine()]}))
    assert cost.read_timings(timings) == {}


def test_only_runs_with_other_settings_or_no_result_will_train(tmp_path):
    configs = config.resolve_all(PARAMS)
    runs = tmp_path / "runs"
    trained(runs, "final", 0, configs["final"])
    trained(runs, "radam", 0, dataclasses.replace(configs["radam"], lr=0.5))
    pending = cost.to_train(configs, [0, 1], runs)
    assert ("final", 0) not in pending
    assert ("radam", 0) in pending and ("final", 1) in pending
    assert len(pending) == 2 * len(configs) - 1


def test_the_plan_line_names_the_runs_the_time_and_what_is_unknown(tmp_path, timings):
    params = {**PARAMS, "runs": {k: PARAMS["runs"][k] for k in ("final", "radam", "mixer")}}
    params["studies"] = {"final": {"final": "final model"}}
    configs = config.resolve_all(params)
    runs = tmp_path / "runs"
    trained(runs, "radam", 0, configs["radam"])
    # radam is trained: final (5 + 60 x 43 + 4 s) and the unmeasured mixer are left
    assert cost.plan_line(configs, [0], runs, timings) == (
        "cost: will train 2 of 3 runs (final-0, mixer-0): about 43 min on this machine, from "
        "its measured times; not yet measured here: mixer-0"
    )
    assert cost.plan_line(configs, [0], runs, tmp_path / "none.json") == (
        "cost: will train 2 of 3 runs (final-0, mixer-0): no time measured on this machine yet"
    )
    for run, cfg in configs.items():
        if run != "radam":
            trained(runs, run, 0, cfg)
    assert cost.plan_line(configs, [0], runs, timings) == (
        "cost: no run's settings changed; nothing to train"
    )


@pytest.mark.parametrize(
    ("seconds", "text"), [(42, "42 s"), (125, "2 min"), (3600 + 7 * 60, "1 h 07 min")]
)
def test_durations_read_naturally(seconds, text):
    assert cost.duration(seconds) == text


def test_the_command_applies_overrides_as_dvc_does(tmp_path, timings):
    runs = tmp_path / "runs"
    configs = config.resolve_all(PARAMS)
    for run, cfg in configs.items():
        trained(runs, run, 0, cfg)
    command = [sys.executable, "-m", "stages.cost", "--runs", str(runs), "--timings", str(timings)]
    proc = subprocess.run(
        [*command, "-S", "seeds=[0]", "-S", "optimizer=radam", "-S", "lr=1e-3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # every run that inherits optimizer or lr; mixer sets both, radam sets the optimizer only
    changed = "final-0, blocks-2-0, blocks-3-0, radam-0, sgd-0, init-normal-0, init-kaiming-0"
    assert proc.stdout.startswith(f"cost: will train 7 of 8 runs ({changed}): about "), proc.stdout

    bad = subprocess.run(
        [*command, "-S", "optimizer=adamax"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "error: run 'final': optimizer='adamax' is not allowed; "
        "choose one of: adam, radam, sgd, adamw"
    ]
    broken = subprocess.run(
        [*command, "-S", "lr=[0.1"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert broken.returncode == 2 and len(broken.stderr.splitlines()) == 1, broken.stderr
    assert broken.stderr.startswith("error: bad override in lr=[0.1"), broken.stderr

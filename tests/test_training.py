"""The train and evaluate stages for real, on a slice of the real data: determinism, resume
after `kill -9`, divergence, and a missing data folder."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from stages import cost, training
from stages.config import RunConfig, resolve_run
from stages.fetch import fetch

REPO = Path(__file__).resolve().parents[1]
TINY = {"epochs": 3, "batch_size": 64, "train_limit": 1500, "val_size": 300, "test_limit": 300}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, fashion_mnist) -> Path:
    out = tmp_path_factory.mktemp("data") / "fashion-mnist"
    fetch([str(fashion_mnist)], out)
    return out


def write_config(folder: Path, run: str = "final", mixer_precision="fp32", **changes) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(TINY, **changes)
    # The Mixer warms up for 1 of the 3 tiny epochs, so the cosine decay runs too; in fp32, as
    # bf16 is emulated (many times slower) on CPUs without it and has a test of its own.
    params["runs"]["mixer"].update(warmup_epochs=1, precision=mixer_precision)
    path = folder / "tiny.json"
    path.write_text(json.dumps(resolve_run(params, run).to_dict()))
    return path


def train_cmd(config: Path, data: Path, out: Path, checkpoint: Path, seed: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "stages.train", "--config", str(config), "--seed", str(seed),
        "--data", str(data), "--out", str(out), "--checkpoint", str(checkpoint),
    ]  # fmt: skip


def run_stage(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


def history(out: Path) -> list[dict]:
    """Per-epoch metrics without the wall-clock times."""
    summary = json.loads((out / "summary.json").read_text())
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in summary["history"]]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, data_dir):
    """Uninterrupted tiny runs, each trained once per module on first use: (run name, seed) ->
    (its config file, its output folder)."""
    trained: dict[tuple[str, int], tuple[Path, Path]] = {}

    def get(run: str, seed: int = 0) -> tuple[Path, Path]:
        if (run, seed) not in trained:
            folder = tmp_path_factory.mktemp(f"{run}-{seed}")
            config = write_config(folder, run)
            cmd = train_cmd(config, data_dir, folder / "out", folder / "state.pt", seed=seed)
            proc = run_stage(cmd)
            assert proc.returncode == 0, proc.stderr
            assert not (folder / "state.pt").exists()  # a finished run removes its checkpoint
            summary = json.loads((folder / "out" / "summary.json").read_text())
            assert summary["machine"] == cost.machine() and summary["torch"] == torch.__version__
            trained[run, seed] = config, folder / "out"
        return trained[run, seed]

    return get


@pytest.fixture(params=["final", "mixer"])
def reference(request, tiny_runs) -> tuple[Path, Path]:
    """The report's final model, and the Mixer, which adds augmentation, label smoothing and a
    per-batch cosine schedule: paths that resume and learning must hold for."""
    return tiny_runs(request.param)


@pytest.fixture
def final_reference(tiny_runs) -> tuple[Path, Path]:
    return tiny_runs("final")


def test_another_seed_gives_other_metrics(final_reference, tiny_runs):
    _, seed1 = tiny_runs("final", seed=1)
    assert history(seed1) != history(final_reference[1])


def test_bf16_autocast_trains_and_warns_where_emulated(tmp_path, data_dir):
    """The Mixer's own precision, bf16, end to end for one short epoch: it changes the
    arithmetic (other metrics than fp32 under the same seed) and still learns; where the CPU
    lacks bf16 the stage warns."""
    short = {"epochs": 1, "train_limit": 512, "val_size": 256, "test_limit": 256}
    runs = {}
    for precision in ("bf16", "fp32"):
        folder = tmp_path / precision
        folder.mkdir()
        config = write_config(folder, "mixer", precision, **short)
        proc = run_stage(train_cmd(config, data_dir, folder / "out", folder / "state.pt"))
        assert proc.returncode == 0, proc.stderr
        runs[precision] = history(folder / "out")
        warned = "precision bf16 is emulated on a CPU without bf16 instructions" in proc.stderr
        native = training.bf16_is_native(torch.device("cpu"))
        assert warned == (precision == "bf16" and not native)
    assert runs["bf16"] != runs["fp32"]
    assert runs["bf16"][0]["val/accuracy"] > 0.2, runs["bf16"]


def test_bf16_where_it_is_emulated_gets_a_one_line_warning(monkeypatch):
    """`precision: bf16` on a CPU without bf16 instructions (emulated, far slower) warns in one
    line naming the fix; fp32, or bf16 where the CPU has it, does not."""
    mixer = resolve_run(yaml.safe_load((REPO / "params.yaml").read_text()), "mixer")
    cpu = torch.device("cpu")
    monkeypatch.setattr(training, "bf16_is_native", lambda device: False)
    warning = training.precision_warning(mixer, cpu, "mixer-0")
    assert warning.startswith("warning: mixer-0: precision bf16 is emulated on a CPU without")
    assert "\n" not in warning
    assert "precision=fp32" in warning
    fp32 = RunConfig.from_dict({**mixer.to_dict(), "precision": "fp32"}, "test")
    assert training.precision_warning(fp32, cpu, "mixer-0") is None
    monkeypatch.setattr(training, "bf16_is_native", lambda device: True)
    assert training.precision_warning(mixer, cpu, "mixer-0") is None


def test_kill_9_mid_run_then_rerun_resumes_and_matches_uninterrupted(tmp_path, data_dir, reference):
    config, expected_out = reference
    out, checkpoint = tmp_path / "killed", tmp_path / "killed.pt"
    victim = subprocess.Popen(
        train_cmd(config, data_dir, out, checkpoint),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600  # a loaded machine may first build the fused kernels
    while not checkpoint.exists() and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.02)
    assert checkpoint.exists(), "no checkpoint was written within 600 s"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert checkpoint.exists() and not (out / "model.pt").exists()

    resumed = run_stage(train_cmd(config, data_dir, out, checkpoint))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stdout
    # bitwise the same run as the uninterrupted one (same seed, on the CPU)
    assert history(out) == history(expected_out)
    final = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    expected = torch.load(expected_out / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    # the dvclive curves are rebuilt whole: one row per epoch, none repeated
    rows = (out / "live" / "plots" / "metrics" / "test" / "accuracy.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["1", "2", "3"]


def test_tiny_runs_learn(reference):
    """Three epochs on 1,500 images: far above chance (0.1) on the validation split."""
    _, out = reference
    runs = history(out)
    assert runs[-1]["val/accuracy"] > 0.6, runs
    assert runs[-1]["train/loss"] < runs[0]["train/loss"]


def test_checkpoint_of_another_config_is_not_resumed(tmp_path, data_dir):
    config = write_config(tmp_path, epochs=1)
    checkpoint = tmp_path / "state.pt"
    torch.save({"key": {"config": "another run", "seed": 0, "code": "old"}}, checkpoint)
    proc = run_stage(train_cmd(config, data_dir, tmp_path / "out", checkpoint))
    assert proc.returncode == 0, proc.stderr
    assert "ignoring checkpoint" in proc.stdout
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["epochs_completed"] == 1


def test_divergence_is_recorded_and_evaluate_reports_it(tmp_path, data_dir):
    config = write_config(tmp_path, optimizer="sgd", lr=1.0e6, epochs=2)
    out = tmp_path / "train"
    proc = run_stage(train_cmd(config, data_dir, out, tmp_path / "c.pt"))
    assert proc.returncode == 0, proc.stderr  # a grid of runs carries on
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] is True
    assert summary["diverged_epoch"] == 1
    assert summary["epochs_completed"] == 0

    evaluated = run_stage(
        [sys.executable, "-m", "stages.evaluate", "--train", str(out), "--data", str(data_dir),
         "--out", str(tmp_path / "eval")]
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["diverged"] == 1 and metrics["diverged_epoch"] == 1
    assert "test" not in metrics


def test_missing_data_folder_is_a_one_line_error_and_writes_nothing(tmp_path):
    config = write_config(tmp_path)
    out = tmp_path / "train"
    proc = run_stage(train_cmd(config, tmp_path / "nowhere", out, tmp_path / "c.pt"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data folder")
    assert "dvc repro fetch" in lines[0]
    assert not out.exists() and not (tmp_path / "c.pt").exists()


def test_selection_script_scores_on_validation_only(tmp_path, data_dir):
    log = tmp_path / "selection.jsonl"
    proc = run_stage(
        [sys.executable, "benchmarks/select_on_val.py", "--run", "mixer", "--epochs", "1",
         "--data", str(data_dir), "--log", str(log), "--set", "train_limit=256",
         "--set", "val_size=128", "--set", "models.mixer.drop_path=0.0", "--set", "precision=fp32"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(log.read_text())
    assert result["changes"] == [
        "train_limit=256", "val_size=128", "models.mixer.drop_path=0.0", "precision=fp32"
    ]
    assert 0.0 < result["val_accuracy"] <= 1.0
    assert "test" not in " ".join(result)  # no test metric is reported
    bad = run_stage(
        [sys.executable, "benchmarks/select_on_val.py", "--run", "mixer", "--epochs", "1",
         "--data", str(data_dir), "--set", "lr=-1"]
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: run 'mixer': lr=-1 must be in (0.0, inf)"]


def test_batch_mixing_trains_with_soft_targets_and_repeats_under_a_seed(tmp_path, data_dir):
    """MixUp and CutMix on (one per batch): the loop takes soft targets; the same seed gives
    exactly the same accuracies, and other ones than without mixing."""
    results = []
    for i, mixing in enumerate((["mixup_alpha=0.2", "cutmix_alpha=1.0"],) * 2 + ([],)):
        log = tmp_path / f"mix{i}.jsonl"
        changes = ["train_limit=256", "val_size=128", "precision=fp32", *mixing]
        proc = run_stage(
            [sys.executable, "benchmarks/select_on_val.py", "--run", "mixer", "--epochs", "1",
             "--data", str(data_dir), "--log", str(log)]
            + [arg for change in changes for arg in ("--set", change)]
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(log.read_text()))
    mixed, again, plain = ({k: r[k] for k in ("val_accuracy", "train_accuracy")} for r in results)
    assert 0.0 < mixed["val_accuracy"] <= 1.0
    assert mixed == again
    assert mixed != plain


def test_speed_benchmark_times_every_path(data_dir):
    """The benchmark (and so benchmarks/gpu_check.sh) runs each path, compares it to (a) and
    gives each part of the fast path's gain."""
    proc = run_stage(
        [sys.executable, "benchmarks/bench_speed.py", "--data", str(data_dir),
         "--steps", "2", "--rounds", "2", "--warmup", "1", "--bf16"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if " s/epoch (" in line]
    names = ["(a)", "(b)", "(c)", "(c1)", "(c2)", "(e)", "(m)", "(m1)"]
    assert [row.split()[0] for row in rows] == names
    assert all(re.search(r"\d+\.\d\dx vs \(a\)$", row) for row in rows), rows
    assert "(c) runs: fused CPU kernels" in proc.stdout
    gains = re.findall(r"^gain of .*: (\d+\.\d\d)x \((\S+) / (\S+)\)$", proc.stdout, re.M)
    assert [(slow, fast) for _, slow, fast in gains] == [
        ("(b)", "(c)"), ("(c1)", "(c)"), ("(c2)", "(c)"), ("(m)", "(m1)")
    ]


def test_paired_comparison_of_two_runs(tmp_path, data_dir, final_reference, tiny_runs):
    """benchmarks/compare_runs.py compares runs image by image: a run against itself agrees
    everywhere, and the counts of two runs add up to their accuracy difference."""
    _, out = final_reference
    _, other = tiny_runs("final", seed=1)
    proc = run_stage(
        [sys.executable, "benchmarks/compare_runs.py", "--data", str(data_dir), str(out), str(out),
         str(other)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    accuracy = {
        m[1]: float(m[2])
        for m in re.finditer(r"^(\S+): val [\d.]+ \(\d+ images\), test ([\d.]+)", proc.stdout, re.M)
    }
    pairs = [
        [int(m[1]), int(m[2]), int(m[3])]
        for m in re.finditer(
            r", test: [+-][\d.]+ points, n10 (\d+), n01 (\d+), predicted differently (\d+)",
            proc.stdout,
        )
    ]
    assert pairs[0] == [0, 0, 0]  # one run, twice
    n10, n01, disagree = pairs[1]
    assert disagree >= n10 + n01 > 0
    difference = accuracy[str(out)] - accuracy[str(other)]
    assert (n10 - n01) / TINY["test_limit"] == pytest.approx(difference, abs=2e-4)
    missing = run_stage([sys.executable, "benchmarks/compare_runs.py", str(tmp_path / "none")])
    assert missing.returncode == 2 and "holds no trained model" in missing.stderr


def test_training_mode_test_accuracy_beside_eval_mode(tmp_path, data_dir, final_reference):
    """benchmarks/train_mode_test.py scores the test set as the notebook did (training mode) and
    as the pipeline does (eval mode); the eval-mode number is the one the run recorded."""
    _, out = final_reference
    proc = run_stage(
        [sys.executable, "benchmarks/train_mode_test.py", "--data", str(data_dir),
         "--repeats", "2", str(out)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    row_pattern = r"^\| \S+ \| ([\d.]+) \| ([\d.]+) ± ([\d.]+) \| ([+-][\d.]+) \|$"
    row = re.search(row_pattern, proc.stdout, re.M)
    assert row, proc.stdout
    eval_mode, training_mode, spread, difference = map(float, row.groups())
    recorded = json.loads((out / "summary.json").read_text())["final"]["test/accuracy"]
    assert eval_mode == pytest.approx(recorded, abs=1 / TINY["test_limit"])
    assert spread > 0  # dropout and batch statistics change with each draw
    assert difference == pytest.approx(training_mode - eval_mode, abs=2e-4) and difference != 0
    missing = run_stage([sys.executable, "benchmarks/train_mode_test.py", str(tmp_path / "none")])
    assert missing.returncode == 2 and "holds no trained model" in missing.stderr

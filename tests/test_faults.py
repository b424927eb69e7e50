"""Faults on a tiny real pipeline: Ctrl-C or kill -9 during `dvc repro`, a corrupted data
file, a diverging run inside the grid.

(Bitwise-equal resume after kill -9: tests/test_training.py; bad params: tests/test_pipeline.py
and tests/test_config.py; two queued experiments at once: tests/test_pipeline.py.)
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_helpers import env, make_project, run, stages_run

from stages.data import RAW_MD5, md5_hex

pytestmark = pytest.mark.pipeline
ONE_RUN = {
    "epochs": 3,
    "batch_size": 64,
    "train_limit": 1500,
    "runs": {"final": {}},
    "studies": {"final": {"final": "final model"}},
}


@pytest.fixture
def project(tmp_path, fashion_mnist) -> Path:
    return make_project(tmp_path, fashion_mnist, **ONE_RUN)


def default_sigint() -> None:
    """As in a terminal: a runner started in the background (`cmd &`) inherits SIGINT ignored,
    and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")] + [p for p in root.rglob(".*.old")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_interrupted_repro_leaves_nothing_trusted_and_the_next_repro_resumes(project, sig):
    """SIGINT to the whole process group, as Ctrl-C in a terminal sends it; or SIGKILL to it."""
    checkpoint = project / "checkpoints" / "final-0.pt"
    repro = subprocess.Popen(
        ["dvc", "repro"], cwd=project, env=env(), start_new_session=True,
        preexec_fn=default_sigint, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline and repro.poll() is None:
        time.sleep(0.05)
    assert repro.poll() is None, "dvc repro ended before the first epoch's checkpoint"
    os.killpg(repro.pid, sig)
    output, _ = repro.communicate(timeout=120)
    assert repro.returncode != 0, output

    train = project / "runs" / "final-0" / "train"
    assert not (train / "model.pt").exists() and not (train / "summary.json").exists()
    assert temp_files(project / "runs") == [] and temp_files(project / "checkpoints") == []
    assert "train@final-0" not in (project / "dvc.lock").read_text()

    again = run(project, "dvc", "repro")
    assert "resuming after epoch" in again.stdout
    assert {"train@final-0", "evaluate@final-0", "report"} <= stages_run(again.stdout)
    assert (train / "model.pt").exists()
    assert "up to date" in run(project, "dvc", "status").stdout


def test_a_flipped_byte_in_the_data_is_refused_then_restored_by_fetch(project):
    run(project, "dvc", "repro", "fetch", "configure")
    victim = project / "data" / "fashion-mnist" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    data = bytearray(victim.read_bytes())
    data[5000] ^= 0xFF
    victim.write_bytes(bytes(data))

    proc = subprocess.run(
        [sys.executable, "-m", "stages.train", "--config", "configs/final.json", "--seed", "0",
         "--out", "runs/final-0/train", "--checkpoint", "checkpoints/final-0.pt"],
        cwd=project, env=env(), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(victim.relative_to(project)) in lines[0]
    assert RAW_MD5["t10k-labels-idx1-ubyte"] in lines[0] and md5_hex(bytes(data)) in lines[0]
    assert not (project / "runs" / "final-0" / "train").exists()

    assert "modified:" in run(project, "dvc", "status", "fetch").stdout
    repro = run(project, "dvc", "repro", "fetch")  # reruns fetch, or restores it from the cache
    assert "Stage 'fetch' is cached" in repro.stdout or stages_run(repro.stdout) == {"fetch"}
    assert md5_hex(victim.read_bytes()) == RAW_MD5["t10k-labels-idx1-ubyte"]


def test_a_diverging_run_is_recorded_and_the_grid_completes(tmp_path, fashion_mnist):
    project = make_project(
        tmp_path,
        fashion_mnist,
        epochs=2,
        runs={"final": {}, "sgd": {"optimizer": "sgd", "lr": 1.0e6}},
        studies={"optimizer": {"final": "Adam", "sgd": "SGD"}},
    )
    repro = run(project, "dvc", "repro")  # exits 0: the divergence is data, not a crash
    assert {"train@sgd-0", "evaluate@sgd-0", "report"} <= stages_run(repro.stdout)
    report = (project / "results" / "report.md").read_text()
    assert re.search(r"\| SGD \| - \| diverged at epoch \d+ \|", report), report
    assert "Diverged here: SGD." in report

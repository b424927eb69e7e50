"""Faults on a tiny real pipeline: Ctrl-C during `dvc repro`, a corrupted data file.

(kill -9 and resume: tests/test_training.py; bad params: tests/test_pipeline.py and
tests/test_config.py; divergence: tests/test_training.py and tests/test_report.py; two queued
experiments at once: tests/test_pipeline.py.)
"""

import os
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
def project(tmp_path, shared_data) -> Path:
    return make_project(tmp_path, shared_data, **ONE_RUN)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")] + [p for p in root.rglob(".*.old")]


def test_ctrl_c_during_repro_leaves_nothing_trusted_and_the_next_repro_completes(project):
    """SIGINT to the whole process group, as Ctrl-C in a terminal sends it."""
    checkpoint = project / "checkpoints" / "final-0.pt"
    repro = subprocess.Popen(
        ["dvc", "repro"], cwd=project, env=env(), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline and repro.poll() is None:
        time.sleep(0.05)
    assert repro.poll() is None, "dvc repro ended before the first epoch's checkpoint"
    os.killpg(repro.pid, signal.SIGINT)
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

"""End to end: the real DVC pipeline on a small slice of the real data, in a temporary git repo.

One module-scoped project is built and reproduced once; the tests then act on it in order
(repro, no-op repro, an experiment, bad params, the queue).
"""

import contextlib
import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
from pipeline_helpers import make_project, one_error_line, run, stages_run

pytestmark = pytest.mark.pipeline


def experiments(project: Path) -> dict[str, dict]:
    """name -> params and metrics of every experiment that `dvc exp show` lists."""
    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    return {
        exp["name"]: exp["revs"][0]["data"]
        for base in shown
        for exp in base.get("experiments") or []
    }


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, fashion_mnist) -> tuple[Path, str]:
    """The tiny project after its first `dvc repro` (committed), and that command's output."""
    project = make_project(tmp_path_factory.mktemp("pipeline"), fashion_mnist)
    first = run(project, "dvc", "repro")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "repro")
    return project, first.stdout


@pytest.fixture
def project(reproduced) -> Path:
    return reproduced[0]


def test_repro_runs_every_stage_once_then_nothing(reproduced):
    project, first_output = reproduced
    listed = set(run(project, "dvc", "stage", "list", "--name-only").stdout.split())
    assert len(listed) == 9  # fetch, configure, 3 x train, 3 x evaluate, report
    assert stages_run(first_output) == listed
    second = run(project, "dvc", "repro")
    assert stages_run(second.stdout) == set()
    assert "up to date" in run(project, "dvc", "status").stdout
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    assert set(metrics) == {"final", "blocks-2", "radam"}
    assert 0.0 < metrics["final"] <= 1.0
    assert (project / "results" / "report.md").read_text().count("## Study:") == 3
    for name in ("blocks", "optimizer", "final", "confusion_final"):
        png = (project / "results" / "figures" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


def test_exp_run_reruns_exactly_the_runs_that_use_the_changed_key(project):
    out = run(project, "dvc", "exp", "run", "-S", "optimizer=radam", "--name", "use-radam").stdout
    # `radam` already sets optimizer=radam, so its resolved config is byte-identical.
    assert stages_run(out) == {
        "configure",
        "train@final-0",
        "train@blocks-2-0",
        "evaluate@final-0",
        "evaluate@blocks-2-0",
        "report",
    }
    assert "Stage 'train@radam-0' didn't change, skipping" in out
    # said before training, with a time from the first repro's measurements
    assert "cost: will train 2 of 3 runs (final-0, blocks-2-0): about " in out
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    # The base run with radam is the radam run: same config, same seed, same numbers.
    assert metrics["final"] == metrics["radam"]

    assert "use-radam" in experiments(project)

    diff = json.loads(run(project, "dvc", "metrics", "diff", "HEAD", "use-radam", "--json").stdout)
    assert "final" in diff["results/metrics.json"]
    plots = json.loads(run(project, "dvc", "plots", "diff", "HEAD", "use-radam", "--json").stdout)
    revisions = {rev for rows in plots["data"].values() for row in rows for rev in row["revisions"]}
    assert {"HEAD", "use-radam"} <= revisions
    run(project, "git", "checkout", "-q", "--", ".")
    run(project, "dvc", "checkout", "-q")


def test_params_typo_fails_cleanly(project):
    before = run(project, "git", "status", "--porcelain").stdout
    lock = (project / "dvc.lock").read_text()

    typo = run(project, "dvc", "exp", "run", "-S", "optimiser=adam", check=False)
    assert typo.returncode != 0
    assert "optimiser" in typo.stdout + typo.stderr
    assert run(project, "git", "status", "--porcelain").stdout == before

    bad = run(project, "dvc", "exp", "run", "-S", "optimizer=adamax", check=False)
    assert bad.returncode != 0
    message = bad.stdout + bad.stderr
    assert "optimizer='adamax' is not allowed; choose one of: adam, radam, sgd, adamw" in message
    assert stages_run(message) == {"configure"}  # nothing trained
    assert (project / "dvc.lock").read_text() == lock
    run(project, "git", "checkout", "-q", "--", "params.yaml")  # DVC leaves the typed value
    assert run(project, "git", "status", "--porcelain").stdout == before


def stop_queue_workers(project: Path) -> None:
    """Kill whatever the queue's workers still run: each leads a process group of its own."""
    for pidfile in (project / ".dvc" / "tmp" / "exps" / "celery").glob("*.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            group = os.getpgid(int(pidfile.read_text()))
            if group != os.getpgrp():
                os.killpg(group, signal.SIGKILL)


def test_two_queued_experiments_run_in_parallel(project, tmp_path, printout):
    run(project, "dvc", "exp", "run", "--queue", "-S", "lr=0.02,0.005")
    try:
        run(project, "dvc", "queue", "start", "-j", "2", log=tmp_path / "queue-start.log")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = run(project, "dvc", "queue", "status", timeout=120).stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(3)
    finally:
        stop_queue_workers(project)
    logs = "".join(path.read_text() for path in (project / ".dvc/tmp/exps/celery").glob("*.out"))
    assert status.count("Success") == 2, f"{status}\n{logs[-4000:]}"
    queued = {
        name: data
        for name, data in experiments(project).items()
        if data["params"]["params.yaml"]["data"]["lr"] in (0.02, 0.005)
    }
    by_lr = {
        data["params"]["params.yaml"]["data"]["lr"]: data["metrics"]["results/metrics.json"]["data"]
        for data in queued.values()
    }
    assert {0.02, 0.005} <= set(by_lr)
    assert by_lr[0.02] != by_lr[0.005]  # each experiment kept its own results
    # both trained at once: each experiment's span of training, from its own runs' summaries
    spans = {}
    try:
        for name in queued:
            run(project, "dvc", "exp", "apply", name)
            times = [
                [datetime.fromisoformat(t) for t in json.loads(summary.read_text())["trained"]]
                for summary in project.glob("runs/*/train/summary.json")
            ]
            spans[name] = (min(t[0] for t in times), max(t[1] for t in times))
    finally:
        run(project, "git", "checkout", "-q", "--", ".")
        run(project, "dvc", "checkout", "-q")
    (start_a, end_a), (start_b, end_b) = spans.values()
    overlap = (min(end_a, end_b) - max(start_a, start_b)).total_seconds()
    lines = ["queued experiments' training intervals (UTC):"]
    for name, (start, end) in spans.items():
        lines.append(f"  {name}: {start:%H:%M:%S.%f} to {end:%H:%M:%S.%f}")
    lines.append(f"  overlap: {overlap:.1f} s")
    printout("\n".join(lines))
    assert max(start_a, start_b) < min(end_a, end_b), spans  # the intervals overlap


# (-S value, what the one-line error must name): one of each kind of value DVC parses from `-S`
# (a word, a bool-like word, a number-like word, an integer, a nested key, a list). Every
# rule's message is checked in-process by tests/test_config.py.
BAD_SET_PARAMS = [
    ("optimizer=adamax", "optimizer='adamax' is not allowed; choose one of: adam, radam, sgd"),
    ("hflip=maybe", "hflip='maybe' must be true or false"),
    ("lr=fast", "lr='fast' must be a number"),
    ("epochs=0", "epochs=0 must be an integer >= 1"),
    ("models.report.patch_size=5", "patch_size=5 does not divide the 28-pixel image"),
    (
        "models.report.token_mlp=[80,60,40]",
        "token_mlp=[80, 60, 40] must be [hidden, out] or a list",
    ),
]


@pytest.mark.parametrize(("override", "message"), BAD_SET_PARAMS)
def test_bad_set_param_is_one_clear_line_and_trains_nothing(project, override, message):
    lock = (project / "dvc.lock").read_text()
    proc = run(project, "dvc", "exp", "run", "-S", override, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in one_error_line(output), output
    assert stages_run(output) == {"configure"}
    assert (project / "dvc.lock").read_text() == lock
    run(project, "git", "checkout", "-q", "--", "params.yaml")
    assert run(project, "dvc", "status", "configure").stdout.strip().endswith("up to date.")


@pytest.mark.parametrize(
    ("edit", "prefix", "message"),
    [
        (
            "optimiser: adam\n",
            "error:",
            "unknown key 'optimiser' in params.yaml (did you mean 'optimizer'?)",
        ),
        ("epochs: [1\n", "ERROR:", "unable to read: 'params.yaml'"),  # DVC reads it first
    ],
)
def test_bad_params_file_is_one_clear_line_and_trains_nothing(project, edit, prefix, message):
    """Our stage's one line, or where DVC itself refuses the file, DVC's one line and none of
    ours."""
    params = project / "params.yaml"
    original = params.read_text()
    lock = (project / "dvc.lock").read_text()
    try:
        params.write_text(original + edit)
        proc = run(project, "dvc", "repro", check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert message in one_error_line(output, prefix), output
        if prefix == "ERROR:":
            assert not any(line.startswith("error:") for line in output.splitlines()), output
        assert not any(s.startswith("train@") for s in stages_run(output))
        assert (project / "dvc.lock").read_text() == lock
    finally:
        params.write_text(original)


def test_results_are_shared_through_a_folder_remote(project, tmp_path):
    """Machine A pushes its committed results to a folder; machine B (another clone) pulls them
    and `dvc repro` trains nothing. (Experiments through the run-cache: tests/test_remote_s3.py.)"""
    run(project, "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    run(project, "git", "commit", "-qam", "a shared DVC remote")
    run(project, "dvc", "push")

    clone = tmp_path / "machine-b"
    run(tmp_path, "git", "clone", "-q", str(project), str(clone))
    run(clone, "dvc", "pull")
    repro = run(clone, "dvc", "repro")
    assert stages_run(repro.stdout) == set()
    for name in ("results/metrics.json", "runs/final-0/train/model.pt"):
        assert (clone / name).read_bytes() == (project / name).read_bytes()

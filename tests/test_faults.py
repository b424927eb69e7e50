"""Faults on a tiny real pipeline: Ctrl-C during `dvc repro`, kill -9 again and again at random
moments and inside writes, a corrupted data file, a diverging run in the grid.

(Bitwise-equal resume after kill -9: tests/test_training.py; bad params: tests/test_pipeline.py
and tests/test_config.py; two queued experiments at once: tests/test_pipeline.py.)
"""

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch
import yaml
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


def test_ctrl_c_leaves_nothing_trusted_and_the_next_repro_resumes(project):
    """SIGINT to the whole process group, as Ctrl-C in a terminal sends it. (SIGKILL: the
    random-kill test below.)"""
    checkpoint = project / "checkpoints" / "final-0.pt"
    repro = subprocess.Popen(
        ["dvc", "repro"], cwd=project, env=env(), start_new_session=True,
        preexec_fn=default_sigint, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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


# --- SIGKILL at random moments ------------------------------------------------------------------

KILL_GRID = {
    "epochs": 3,
    "runs": {"final": {}, "radam": {"optimizer": "radam"}},
    "studies": {"optimizer": {"final": "Adam", "radam": "RAdam"}},
}
KILL_SEED = "FAULTS_KILL_SEED"  # replays one schedule of kills
RANDOM_KILLS = 4
WRITE_LOG = Path(__file__).with_name("write_log")  # its sitecustomize.py logs every write
# Writes a kill must land inside at least once: the final path such a write pauses on (a plain
# file opened but nothing written to it yet, a temporary file written but not yet renamed), and
# up to which of one process's writes of that kind it may be (drawn; 1 where a later one might
# never come: a resumed run writes fewer checkpoints, the last repro may finish one stage only).
MID_WRITE = {
    "checkpoint": (r"^checkpoints/[^/]+-\d+\.pt$", 1),
    "model.pt": (r"^runs/[^/]+/train/model\.pt$", 1),
    "dvclive": (r"^runs/[^/]+/train/live/", 9),  # 9 files each epoch, a resume writes them again
    "dvc.lock": (r"^dvc\.lock$", 1),
}
# DVC writes these two in place (truncate, then write): a kill inside that write leaves them
# cut short and DVC refuses to run until they are removed, which is what the test then does.
DVC_IN_PLACE = ("dvc.lock", ".dvc/tmp/rwlock")
# The only time-dependent content of the outputs, left out of the comparison.
REPORT_TIMES = ("seconds per epoch", "minutes per seed")  # the report's timed columns
SUMMARY_TIMES = ("trained", "seconds_per_epoch", "setup_seconds", "eval_seconds_per_epoch")
EPOCH_TIMES = ("epoch_seconds",)
TIME_FILES = {"epoch_seconds.tsv"}
# stages.files.make_temp_dir's folders: .<name>.<pid>.<8 random characters>
TEMP_DIR = re.compile(r"^\..+\.[a-z0-9_]{8}$")


@dataclass
class Kill:
    moment: float | None  # drawn, in seconds of the reference run; None: it waited for a write
    aim: str  # the kind of write it waited for, or where the moment is: "<stage> +<s>"
    at: float  # seconds into its repro
    running: str
    writing: list[str]
    notes: list[str] = field(default_factory=list)


class WriteLog:
    """The events that tests/write_log/sitecustomize.py appends, read as they come."""

    def __init__(self, path: Path):
        self.path, self.events, self._offset = path, [], 0

    def read(self) -> list[dict]:
        if self.path.exists():
            with self.path.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
            complete = data[: data.rfind(b"\n") + 1]
            self._offset += len(complete)
            self.events += [json.loads(line) for line in complete.splitlines()]
        return self.events

    def since(self, t: float) -> list[dict]:
        return [e for e in self.read() if e["t"] >= t]


def in_progress(events: list[dict]) -> list[str]:
    """The final paths of the writes begun and not completed in `events` (one killed repro)."""
    writes = {}
    for e in events:
        if e["event"] == "open":
            writes[e["pid"], e["path"]] = e["target"]
        elif e["event"] == "done":
            writes.pop((e["pid"], e["path"]), None)
    return sorted(set(writes.values()))


def stage_of(argv: list[str]) -> str:
    """`train@final-0` for the process `python -m stages.train ... --out runs/final-0/train`."""
    if "-m" not in argv:
        return "dvc" if any(a.endswith("dvc") for a in argv) else " ".join(argv)
    module = argv[argv.index("-m") + 1].removeprefix("stages.")
    out = argv[argv.index("--out") + 1] if "--out" in argv else ""
    return f"{module}@{out.split('/')[1]}" if out.startswith("runs/") else module


def started(events: list[dict]) -> list[str]:
    return [stage_of(e["argv"]) for e in events if e["event"] == "proc"]


def running(events: list[dict]) -> str:
    alive = {e["pid"]: stage_of(e["argv"]) for e in events if e["event"] == "proc"}
    for e in events:
        if e["event"] == "exit":
            alive.pop(e["pid"], None)
    return ", ".join(dict.fromkeys(alive.values())) or "-"


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the repro's whole process group, and wait until none of it runs any more."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = []
        for p in psutil.process_iter(["status"]):
            with contextlib.suppress(OSError):
                if os.getpgid(p.pid) == proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        if not alive:
            return
        time.sleep(0.02)
    raise AssertionError(f"processes of the killed repro still run: {alive}")


def logged_env(log: Path, root: Path, pauses: dict[str, int] | None = None) -> dict[str, str]:
    extra = {"WRITE_LOG": str(log), "WRITE_LOG_ROOT": str(root)}
    if pauses:
        extra["WRITE_LOG_PAUSE"] = json.dumps(pauses)
    path = os.pathsep.join(p for p in (str(WRITE_LOG), os.environ.get("PYTHONPATH")) if p)
    return {**env(), "PYTHONPATH": path, **extra}


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def lock_matches(project: Path, out: dict) -> bool:
    """Whether an output in the workspace is the one a dvc.lock entry records: a file's MD5, or a
    folder's, which is DVC's MD5 of its listing (each file's MD5 and path, as JSON)."""
    path, md5 = project / out["path"], out["md5"]
    if not md5.endswith(".dir"):
        return path.is_file() and md5_of(path) == md5
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    found = [{"md5": md5_of(p), "relpath": p.relative_to(path).as_posix()} for p in files]
    listing = json.dumps(found, sort_keys=True).encode()
    return path.is_dir() and hashlib.md5(listing).hexdigest() + ".dir" == md5


def lock_entries(project: Path) -> dict[str, dict]:
    lock = project / "dvc.lock"
    return yaml.safe_load(lock.read_text())["stages"] if lock.exists() else {}


def comparable(path: Path):
    """A file's content for comparing two runs, without its time-dependent parts only:
    tensors for .pt files, JSON for summaries, an MD5 for every other file."""
    if path.name in TIME_FILES:
        return None
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=False)
    if path.name == "summary.json" or path.match("live/metrics.json"):
        data = json.loads(path.read_text())
        for key in SUMMARY_TIMES if path.name == "summary.json" else ():
            data.pop(key)
        for record in [data, data.get("final") or {}, *data.get("history", [])]:
            for key in EPOCH_TIMES:
                record.pop(key, None)
        return data
    if path.name == "report.md":  # its cost section's times
        text, columns = path.read_text(), []
        lines = []
        for line in text.splitlines():
            cells = line.split(" | ")
            if line.startswith("Time of the grid per seed"):
                cells = ["Time of the grid per seed: (time)"]
            elif "seconds per epoch" in cells:
                columns = [i for i, cell in enumerate(cells) if cell in REPORT_TIMES]
            elif columns and line.startswith("| ") and len(cells) > max(columns):
                for column in columns:
                    cells[column] = "(time)"
            else:
                columns = []
            lines.append(" | ".join(cells))
        return "\n".join(lines)
    return md5_of(path)


def outputs(project: Path, paths: list[str]) -> dict[str, object]:
    found = {}
    for name in paths:
        path = project / name
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and (value := comparable(file)) is not None:
                found[file.relative_to(project).as_posix()] = value
    return found


def assert_same(actual, expected, where: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where}: tensors differ"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert isinstance(actual, list | tuple) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def leftovers(project: Path) -> list[str]:
    """Temporary files and folders anywhere in the project (git's own folder aside)."""
    found = []
    for path in project.rglob("*"):
        rel = path.relative_to(project)
        name = path.name
        if rel.parts[0] == ".git":
            continue
        old = name.startswith(".") and name.endswith(".old")
        if name.endswith(".tmp") or old or (path.is_dir() and TEMP_DIR.match(name)):
            found.append(rel.as_posix())
    return found


def repro(
    project: Path,
    env: dict[str, str],
    log: WriteLog,
    output: Path,
    kill_at: tuple[str, float] | None = None,
    kill_on_pause: bool = False,
) -> tuple[int | None, float, float]:
    """One `dvc repro`, killed `kill_at` = (stage, s) after that stage's process started, or as
    soon as a write pauses. Returns its exit status (None when killed), its start and end."""
    with output.open("a") as out:
        start = time.monotonic()
        proc = subprocess.Popen(
            ["dvc", "repro"], cwd=project, env=env, start_new_session=True,
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        while proc.poll() is None:
            now = time.monotonic()
            events = log.since(start) if kill_at or kill_on_pause else []
            paused = kill_on_pause and any(e["event"] == "pause" for e in events)
            due = kill_at and any(
                e["event"] == "proc" and stage_of(e["argv"]) == kill_at[0]
                and now >= e["t"] + kill_at[1]
                for e in events
            )  # fmt: skip
            if paused or due:
                kill_group(proc)
                return None, start, now
            assert now < start + 600, "dvc repro did not finish within 600 s"
            time.sleep(0.01)
    return proc.returncode, start, time.monotonic()


def position(ref_events: list[dict], ref_start: float, moment: float) -> tuple[str, float]:
    """Where the reference was `moment` s into its run: in (or after) which stage, how long
    after that stage's process started."""
    starts = [(e["t"] - ref_start, stage_of(e["argv"])) for e in ref_events if e["event"] == "proc"]
    t, stage = max((t, stage) for t, stage in starts if t <= moment and stage != "dvc")
    return stage, moment - t


def aimed_at(kind: str, target: str) -> bool:
    return re.search(MID_WRITE[kind][0], target) is not None


def after_kill(project: Path, kill: Kill, number: int) -> dict[str, object]:
    """Checks right after a kill; returns the outputs that dvc.lock now trusts."""
    for name in DVC_IN_PLACE:
        if name in kill.writing:  # as a user must: DVC cannot read what it left
            size = (project / name).stat().st_size
            (project / name).unlink()
            kill.notes.append(f"DVC left {name} cut short, {size} bytes: removed")
    entries = lock_entries(project)
    for stage, entry in entries.items():
        for out in entry.get("outs", []):
            assert lock_matches(project, out), f"after kill {number}, {stage} trusts {out}"
    return outputs(project, [out["path"] for e in entries.values() for out in e.get("outs", [])])


def kill_table(seed: int, reference_s: float | None, kills: list[Kill], total_s: float) -> str:
    reference = "unfinished" if reference_s is None else f"{reference_s:.1f} s"
    lines = [
        f"SIGKILL at random moments: seed {seed} (replay: {KILL_SEED}={seed}), reference run "
        f"{reference}",
        "moment: drawn, s into the reference run; aimed at: that moment's place in the pipeline,",
        "or a kind of write; killed: s into its repro",
        f"{'#':>2}  {'moment':>6}  {'aimed at':<24}  {'killed':>6}  {'running':<24}  being written",
    ]
    for i, k in enumerate(kills, 1):
        moment = "-" if k.moment is None else f"{k.moment:.1f}"
        written = ", ".join(k.writing) or "-"
        note = f"  [{'; '.join(k.notes)}]" if k.notes else ""
        lines.append(
            f"{i:>2}  {moment:>6}  {k.aim:<24}  {k.at:>6.1f}  {k.running:<24}  {written}{note}"
        )
    lines.append(f"{len(kills)} kills, then a repro to the end; test time {total_s:.1f} s")
    return "\n".join(lines)


def test_sigkill_at_random_moments_leaves_the_same_results_as_an_uninterrupted_run(
    tmp_path, fashion_mnist, printout
):
    """`dvc repro` killed with SIGKILL again and again, at moments drawn from a seeded random
    generator and inside checkpoint, model.pt, dvclive and dvc.lock writes, then run to the
    end: the results are bit for bit those of an uninterrupted run, DVC trusts no output a stage
    did not finish, and no temporary file is left. The table of kills prints with its seed;
    FAULTS_KILL_SEED=<seed> replays that schedule."""
    test_started = time.monotonic()
    seed = int(os.environ.get(KILL_SEED) or random.SystemRandom().randrange(10**6))
    rng = random.Random(seed)

    reference = make_project(tmp_path / "reference", fashion_mnist, **KILL_GRID)
    project = make_project(tmp_path / "killed", fashion_mnist, **KILL_GRID)
    ref_log, log = WriteLog(tmp_path / "reference.log"), WriteLog(tmp_path / "killed.log")
    output = tmp_path / "killed.out"
    kills: list[Kill] = []
    trusted: list[dict[str, object]] = []  # after each kill: the outputs dvc.lock trusts
    # Until each kind of write in MID_WRITE has been hit, a repro is killed at its n-th write of
    # a kind not hit yet (n drawn), paused inside that write; meanwhile the uninterrupted
    # reference runs. Then N moments drawn on the reference's clock, across the rest of the run
    # (from where the reference started the stage this copy was in); each repro is killed at the
    # next one, at the same place in the pipeline: as long after the same stage's start.
    nth = {kind: rng.randint(1, most) for kind, (_, most) in MID_WRITE.items()}
    moments, timed, reference_s = None, 0, None
    try:
        with ThreadPoolExecutor(1) as pool:
            ref_env = logged_env(ref_log.path, reference)
            ref_out = tmp_path / "reference.out"
            uninterrupted = pool.submit(repro, reference, ref_env, ref_log, ref_out)
            while True:
                missing = [kind for kind in MID_WRITE if kind not in {k.aim for k in kills}]
                if moments is None and not missing:
                    _, ref_start, ref_end = uninterrupted.result()
                    reference_s = ref_end - ref_start
                    # from where the reference started the stage this copy is in now
                    stage = [name for name in started(log.read()) if name != "dvc"][-1]
                    since = next(
                        e["t"] - ref_start for e in ref_log.read()
                        if e["event"] == "proc" and stage_of(e["argv"]) == stage
                    )  # fmt: skip
                    moments = sorted(rng.uniform(since, reference_s) for _ in range(RANDOM_KILLS))
                moment = moments[timed] if moments and timed < len(moments) else None
                kill_at = None if moment is None else position(ref_log.read(), ref_start, moment)
                pauses = {MID_WRITE[kind][0]: nth[kind] for kind in missing}
                run_env = logged_env(log.path, project, pauses)
                status, start, end = repro(project, run_env, log, output, kill_at, bool(pauses))
                if status is not None:
                    break
                events = log.since(start)
                paused = [e for e in events if e["event"] == "pause"]
                where = "" if kill_at is None else f"{kill_at[0]} +{kill_at[1]:.1f} s"
                kill = Kill(moment, where, end - start, running(events), in_progress(events))
                if paused:
                    target = paused[0]["target"]
                    kill.moment, kill.aim = None, next(k for k in missing if aimed_at(k, target))
                    assert target in kill.writing, events[-20:]
                else:
                    timed += 1
                kills.append(kill)
                trusted.append(after_kill(project, kill, len(kills)))
            ref_status, ref_start, ref_end = uninterrupted.result()
            assert ref_status == 0, ref_out.read_text()
            reference_s = ref_end - ref_start
        assert status == 0, output.read_text()[-3000:]

        assert {k.aim for k in kills} >= set(MID_WRITE)
        assert "up to date" in run(project, "dvc", "status").stdout
        # DVC's own temporary files (its cache, its run cache) stay where a kill landed inside
        # DVC's write of one; the table names them. Nothing else may be left.
        left, dvcs = leftovers(project), set()
        for kill in kills:
            for path in left:
                if path.startswith(".dvc/") and path in kill.writing:
                    kill.notes.append(f"DVC left its temporary {path}")
                    dvcs.add(path)
        assert sorted(set(left) - dvcs) == []
        paths = [out["path"] for entry in lock_entries(reference).values() for out in entry["outs"]]
        expected = outputs(reference, paths)
        assert_same(outputs(project, paths), expected, "outputs")
        for i, found in enumerate(trusted, 1):
            assert_same(found, {name: expected[name] for name in found}, f"trusted after kill {i}")
    finally:
        printout(kill_table(seed, reference_s, kills, time.monotonic() - test_started))

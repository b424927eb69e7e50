"""The report stage on synthetic run folders: tables, spread rule, verdicts, diverged runs,
and the plot data that dvc.yaml declares as DVC plots.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import run as run_command
from stage_cli import run_stage_cli

from stages.config import resolve_run
from stages.data import CLASSES, class_key
from stages.report import CURVES, PUBLISHED

REPO = Path(__file__).resolve().parents[1]
REPO_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(runs: Path, name: str, seed: int, test_acc: float | None, diverged_at=None):
    """Write what the train and evaluate stages would write for one run and seed."""
    history = [
        {"epoch": e, "train/loss": 1.0 / e, "train/accuracy": 0.8 + 0.01 * e,
         "val/loss": 0.5, "val/accuracy": 0.85, "test/loss": 0.4,
         "test/accuracy": (test_acc or 0.5) - 0.01 * (3 - e), "lr": 0.01, "epoch_seconds": 2.0}
        for e in range(1, (diverged_at or 4))
    ]  # fmt: skip
    summary = {
        "run": name, "seed": seed, "parameters": 87550, "train_images": 55000,
        "val_images": 5000, "test_images": 10000, "epochs_completed": len(history),
        "diverged": diverged_at is not None, "diverged_epoch": diverged_at,
        "final": history[-1] if history else None, "device": "cpu",
        "machine": "vm, AMD EPYC, 2 CPUs", "threads": 2, "cpu_kernels": "plain torch",
        "seconds_per_epoch": 2.0 if history else None, "history": history,
        "eval_seconds_per_epoch": 1.0 if history else None, "setup_seconds": 3.0,
        "config": dataclasses.replace(resolve_run(REPO_PARAMS, name), epochs=3).to_dict(),
    }  # fmt: skip
    train = runs / f"{name}-{seed}" / "train"
    train.mkdir(parents=True)
    (train / "summary.json").write_text(json.dumps(summary))
    evaluation = runs / f"{name}-{seed}" / "eval"
    evaluation.mkdir(parents=True)
    metrics = {"diverged": int(diverged_at is not None)}
    if diverged_at is None:
        metrics["test"] = {"loss": 0.3, "accuracy": test_acc}
        metrics["per_class"] = {class_key(c): 0.9 for c in CLASSES}
        cm = [{"actual": c, "predicted": c} for c in CLASSES for _ in range(9)]
        cm += [{"actual": c, "predicted": CLASSES[0]} for c in CLASSES]
        (evaluation / "plots" / "sklearn").mkdir(parents=True)
        (evaluation / "plots" / "sklearn" / "confusion_matrix.json").write_text(json.dumps(cm))
    else:
        metrics["diverged_epoch"] = diverged_at
    (evaluation / "metrics.json").write_text(json.dumps(metrics))


def make_report(
    tmp_path: Path,
    accuracies: dict[str, list],
    seeds: list[int],
    modern: bool = False,
    own_process: bool = False,
) -> Path:
    """accuracies: run -> per-seed test accuracy, or ('diverged', epoch). The stage runs in the
    test's process, or with `own_process` as `python -m stages.report`."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["seeds"] = seeds
    params["runs"] = {"final": {}, "blocks-2": {"blocks": 2}, "sgd": {"optimizer": "sgd"}}
    params["studies"] = {
        "blocks": {"final": "1 block", "blocks-2": "2 blocks"},
        "optimizer": {"final": "Adam", "sgd": "SGD"},
        "final": {"final": "final model"},
    }
    if modern:
        params["runs"]["mixer"] = REPO_PARAMS["runs"]["mixer"]
        params["studies"]["modern"] = {"final": "report's final", "mixer": "modern Mixer"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for run, values in accuracies.items():
        for seed, value in zip(seeds, values, strict=True):
            if isinstance(value, tuple):
                fake_run(tmp_path / "runs", run, seed, None, diverged_at=value[1])
            else:
                fake_run(tmp_path / "runs", run, seed, value)
    args = ["--params", str(tmp_path / "params.yaml"), "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "results")]  # fmt: skip
    proc = run_stage_cli("stages.report", *args, own_process=own_process)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "results"


def table_row(report: str, label: str, study: str) -> str:
    section = report.split(f"## Study: {study}")[1].split("## ")[0]
    return next(line for line in section.splitlines() if line.startswith(f"| {label}"))


def test_single_seed_tables_published_values_and_diverged_run(tmp_path):
    results = make_report(
        tmp_path,
        {"final": [0.90], "blocks-2": [0.88], "sgd": [("diverged", 7)]},
        seeds=[0],
        own_process=True,
    )
    report = (results / "report.md").read_text()
    assert table_row(report, "1 block", "blocks") == (
        "| 1 block | 3 | 0.830 | 0.900 | 0.333 | 0.300 | 0.904 / 0.884 / 0.158 | +0.016 "
        "| **no** (1) |"
    )
    assert (
        "| SGD | - | diverged at epoch 7 | - | - | - | failed to produce a stable model | - | - |"
        in (report)
    )
    assert "Diverged here: SGD." in report
    assert "Not confirmed here" not in report  # 1 block is best, as the report claims
    assert "with one seed per run the spread is unknown" in report
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics == {"final": 0.9, "blocks-2": 0.88, "diverged": {"sgd": 1}}


def test_multi_seed_mean_std_and_the_spread_rule(tmp_path):
    results = make_report(
        tmp_path,
        {
            "final": [0.900, 0.902, 0.904],  # mean 0.902, std 0.002
            "blocks-2": [0.850, 0.852, 0.854],  # far below: a real difference
            "sgd": [0.899, 0.903, 0.901],  # within the spread of final
        },
        seeds=[0, 1, 2],
    )
    report = (results / "report.md").read_text()
    assert "| 0.902 ± 0.002 |" in table_row(report, "1 block", "blocks")
    assert "Holds: 1 block beats 2 blocks beyond the spread" in report
    assert "Not supported: Adam is ahead of SGD only within the seed-to-seed spread" in report
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["blocks-2"] == pytest.approx(0.852)
    assert metrics["std"] == {"final": 0.002, "blocks-2": 0.002, "sgd": 0.002}


def test_a_row_lands_within_one_point_or_two_std_of_its_published_value(tmp_path):
    results = make_report(
        tmp_path,
        {
            "final": [0.88, 0.90, 0.92],  # std 0.02: 0.016 from the published 0.884 lands
            "blocks-2": [0.864, 0.865, 0.866],  # 0.012 from 0.853 with std 0.001: does not
            "sgd": [0.7, 0.7, 0.7],
        },
        seeds=[0, 1, 2],
    )
    report = (results / "report.md").read_text()
    assert table_row(report, "1 block", "blocks").endswith("| +0.016 | yes |")
    assert table_row(report, "2 blocks", "blocks").endswith("| +0.012 | **no** |")
    assert table_row(report, "SGD", "optimizer").endswith("| - | - |")  # nothing published
    (tmp_path / "one").mkdir()
    one_seed = make_report(
        tmp_path / "one", {"final": [0.893], "blocks-2": [0.86], "sgd": [0.7]}, seeds=[0]
    )
    report = (one_seed / "report.md").read_text()
    assert table_row(report, "1 block", "blocks").endswith("| +0.009 | yes |")
    assert table_row(report, "2 blocks", "blocks").endswith("| +0.007 | yes |")


def test_a_row_that_does_not_land_shows_its_measured_cause_and_sgd_its_failure_claim(tmp_path):
    """published.yaml's `cause` prints beside a row that does not land, never beside one that
    does; a run published as a failure is said to have trained where no seed diverged."""
    results = make_report(
        tmp_path,
        {"final": [0.904, 0.905, 0.906], "blocks-2": [0.853] * 3, "sgd": [0.84, 0.85, 0.86]},
        seeds=[0, 1, 2],
    )
    report = (results / "report.md").read_text()
    published = yaml.safe_load(PUBLISHED.read_text())
    blocks = report.split("## Study: blocks")[1].split("## ")[0]
    assert table_row(report, "1 block", "blocks").endswith("| +0.021 | **no** (1) |")
    assert f"- (1) 1 block: {published['blocks']['runs']['final']['cause']}" in blocks
    assert table_row(report, "2 blocks", "blocks").endswith("| +0.000 | yes |")
    assert "(2)" not in blocks
    optimizer = report.split("## Study: optimizer")[1].split("## ")[0]
    assert f"- (1) Adam: {published['optimizer']['runs']['final']['cause']}" in optimizer
    assert (
        'SGD, published as "failed to produce a stable model": here every seed trained without '
        "diverging, to 0.850 ± 0.010 test accuracy." in optimizer
    )
    final = report.split("## Study: final")[1].split("## ")[0]
    assert table_row(report, "final model", "final").endswith("| +0.003 | yes |")
    assert "- (1)" not in final


def test_a_claim_that_does_not_hold_is_said_so(tmp_path):
    results = make_report(
        tmp_path,
        {"final": [0.85, 0.851], "blocks-2": [0.90, 0.901], "sgd": [0.80, ("diverged", 2)]},
        seeds=[0, 1],
    )
    report = (results / "report.md").read_text()
    assert "**Does not hold here**: 2 blocks has the best test accuracy, beyond" in report
    assert "| SGD (1 of 2 seeds diverged) |" in report


def test_figures_are_real_pngs(tmp_path):
    results = make_report(tmp_path, {"final": [0.9], "blocks-2": [0.8], "sgd": [0.7]}, seeds=[0])
    names = {p.name for p in (results / "figures").iterdir()}
    assert names == {"blocks.png", "optimizer.png", "final.png", "confusion_final.png"}
    for png in (results / "figures").iterdir():
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000, png
    report = (results / "report.md").read_text()
    assert "![blocks](figures/blocks.png)" in report


def test_figure_epochs_are_whole_numbers(tmp_path, monkeypatch):
    """A 3-epoch run's curves get ticks at epochs 1, 2, 3, not 1.0, 1.5, ..."""
    from stages import report

    figures = []
    monkeypatch.setattr(report, "save_png", lambda fig, path: figures.append(fig))
    runs = tmp_path / "runs"
    fake_run(runs, "final", 0, 0.9)
    fake_run(runs, "blocks-2", 0, 0.8)
    results = {name: report.load_run(runs, name, [0]) for name in ("final", "blocks-2")}
    report.study_figure("blocks", {"final": "1 block", "blocks-2": "2 blocks"}, results, tmp_path)
    (fig,) = figures
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(t == int(t) for t in ticks), ticks
        assert ax.get_ylabel() in {"loss", "accuracy"}


def test_runs_not_trained_yet_are_named_left_out_and_not_judged(tmp_path):
    """A grid built over several starts reports what it has, and says what it lacks."""
    results = make_report(
        tmp_path, {"final": [0.90, 0.91], "blocks-2": [0.85, 0.86]}, seeds=[0, 1]
    )
    shutil.rmtree(tmp_path / "runs" / "blocks-2-1" / "eval")  # trained, not evaluated
    proc = run_stage_cli(
        "stages.report", "--params", str(tmp_path / "params.yaml"),
        "--runs", str(tmp_path / "runs"), "--out", str(results),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "3 runs and seeds left out, not trained yet" in proc.stderr
    report = (results / "report.md").read_text()
    assert (
        "**Incomplete**: 3 of 6 runs and seeds are not trained yet, and are left out: "
        "blocks-2-1, sgd-0, sgd-1." in report
    )
    assert table_row(report, "2 blocks", "blocks").startswith("| 2 blocks (1 of 2 seeds) | 3 |")
    assert "| 0.850 |" in table_row(report, "2 blocks", "blocks")
    assert table_row(report, "SGD", "optimizer").startswith("| SGD | - | not trained yet |")
    assert "Not judged yet: SGD not trained (`dvc repro`)." in report
    assert (
        "Holds in the ordering, but with one seed of 2 blocks the spread is unknown" in report
    )
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics == {"final": 0.905, "blocks-2": 0.85, "std": {"final": 0.00707}}


def test_no_run_trained_is_a_clear_error(tmp_path):
    with pytest.raises(AssertionError, match=r"no run is trained and evaluated yet"):
        make_report(tmp_path, {}, seeds=[0])


def test_with_one_seed_a_different_winner_is_not_confirmed_rather_than_refuted(tmp_path):
    results = make_report(tmp_path, {"final": [0.85], "blocks-2": [0.90], "sgd": [0.8]}, seeds=[0])
    report = (results / "report.md").read_text()
    assert (
        "Not confirmed here: 2 blocks has the best test accuracy, but with one seed per run the "
        "spread is unknown" in report
    )
    assert "Does not hold" not in report


@pytest.mark.parametrize(
    ("mixer", "met"), [([0.931, 0.933, 0.935], True), ([0.926, 0.928, 0.930], False)]
)
def test_modern_study_goal_and_cost_table(tmp_path, mixer, met):
    results = make_report(
        tmp_path,
        {"final": [0.900, 0.902, 0.904], "blocks-2": [0.85] * 3, "sgd": [0.8] * 3, "mixer": mixer},
        seeds=[0, 1, 2],
        modern=True,
    )
    report = (results / "report.md").read_text()
    goal = next(line for line in report.splitlines() if line.startswith("Goal:"))
    mean = sum(mixer) / 3
    assert goal.startswith("Goal: mean test accuracy of modern Mixer at least 0.930: ")
    assert ("**not met**" not in goal) == met
    assert f"({mean:.3f} ± 0.002 over 3 seeds)" in goal
    assert "Holds: modern Mixer beats report's final beyond the spread" in report
    assert "| 0.938 / 0.902 / 0.16 |" in table_row(report, "report's final", "modern")
    cost = report.split("## Cost")[1]
    machine = "vm, AMD EPYC, 2 CPUs, 2 threads, plain torch"  # 3 x 14.3 MFLOP x 55k images
    assert f"| final | 2.0 ± 0.0 | 0.1 ± 0.0 | fp32 | 87,550 | 14.3 | 2.37 | {machine} |" in cost
    assert "| mixer | 2.0 ± 0.0 | 0.1 ± 0.0 | bf16 |" in cost
    # Per run: 3 epochs of 2 s training and 1 s evaluation, 3 s set-up; 4 runs a seed.
    per_seed = "; ".join(f"seed {seed}: 48 s (4 of 4 runs)" for seed in range(3))
    assert f"over the runs trained: {per_seed}." in cost


CURVE_FOLDERS = [metric.replace("/", "-") for metric, _ in CURVES]
Y_LABELS = {
    "train-loss": "training loss",
    "train-accuracy": "training accuracy",
    "test-accuracy": "test accuracy (eval mode)",
}


def plot_ids(studies: dict) -> set[str]:
    return {f"results/plots/{curve}/{study}.json" for curve in CURVE_FOLDERS for study in studies}


def test_plot_data_one_series_per_run_by_label_from_epoch_1_mean_over_seeds(tmp_path):
    stale = tmp_path / "results" / "plots" / "train-loss" / "removed-study.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("[]")
    results = make_report(
        tmp_path,
        {"final": [0.85, 0.87], "blocks-2": [0.80, 0.82], "sgd": [0.70, ("diverged", 3)]},
        seeds=[0, 1],
    )
    studies = yaml.safe_load((tmp_path / "params.yaml").read_text())["studies"]
    written = {p.relative_to(tmp_path).as_posix() for p in results.rglob("plots/*/*.json")}
    assert written == plot_ids(studies)  # the stale study's file is gone
    for curve in CURVE_FOLDERS:
        for study, members in studies.items():
            rows = json.loads((results / "plots" / curve / f"{study}.json").read_text())
            assert all(set(row) == {"epoch", "run", "value"} for row in rows)
            # SGD's diverged seed stopped after 2 epochs: its curve is as long as the shortest.
            assert [(row["run"], row["epoch"]) for row in rows] == [
                (label, epoch)
                for run, label in members.items()
                for epoch in ([1, 2] if run == "sgd" else [1, 2, 3])
            ]
    rows = json.loads((results / "plots" / "test-accuracy" / "blocks.json").read_text())
    # fake_run: test accuracy at epoch e is the final one - 0.01 * (3 - e); means 0.86 and 0.81
    assert {(row["run"], row["epoch"]): round(row["value"], 6) for row in rows} == {
        ("1 block", 1): 0.84, ("1 block", 2): 0.85, ("1 block", 3): 0.86,
        ("2 blocks", 1): 0.79, ("2 blocks", 2): 0.80, ("2 blocks", 3): 0.81,
    }  # fmt: skip
    loss = json.loads((results / "plots" / "train-loss" / "optimizer.json").read_text())
    assert [round(row["value"], 6) for row in loss if row["run"] == "Adam"] == [1.0, 0.5, 0.333333]


def curve_plots(pipeline: dict) -> list[tuple[str, dict]]:
    """dvc.yaml's top-level plots other than the confusion matrix, as (target, properties)."""
    entries = [next(iter(entry.items())) for entry in pipeline["plots"]]
    return [(target, props) for target, props in entries if props.get("template") != "confusion"]


def test_dvc_yaml_plots_name_no_run_and_read_the_report_stage_output():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    report_outs = [next(iter(out)) if isinstance(out, dict) else out
                   for out in pipeline["stages"]["report"]["outs"]]  # fmt: skip
    assert "results/plots" in report_outs
    plots = curve_plots(pipeline)
    assert [target for target, _ in plots] == [f"results/plots/{c}" for c in CURVE_FOLDERS]
    text = yaml.safe_dump(plots)
    assert "runs/" not in text and "${" not in text
    for target, props in plots:
        assert props["x"] == "epoch" and isinstance(props["y"], str), target  # no per-file y
        assert props["y_label"] and props["x_label"] == "epoch", target
        assert (REPO / ".dvc" / "plots" / f"{props['template']}.json").is_file(), target


def test_dvc_plots_diff_names_each_line_by_run_label_and_revision(tmp_path):
    """End to end with DVC on synthetic runs: no training, a few seconds."""
    make_report(tmp_path, {"final": [0.9], "blocks-2": [0.8], "sgd": [0.7]}, seeds=[0])
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    run_command(tmp_path, "git", "init", "-q")
    run_command(tmp_path, "dvc", "init", "-q")
    run_command(tmp_path, "dvc", "config", "core.analytics", "false")
    shutil.copytree(REPO / ".dvc" / "plots", tmp_path / ".dvc" / "plots")
    run_command(tmp_path, "git", "add", "-A")
    run_command(tmp_path, "git", "commit", "-qm", "report")
    shown = json.loads(run_command(tmp_path, "dvc", "plots", "diff", "HEAD", "--json").stdout)
    assert "errors" not in shown, shown["errors"]
    studies = yaml.safe_load((tmp_path / "params.yaml").read_text())["studies"]
    curves = {name: plot for name, (plot,) in shown["data"].items() if name.startswith("results/")}
    assert set(curves) == plot_ids(studies)
    for name, plot in curves.items():
        study = Path(name).stem
        spec = plot["content"]
        rows = spec["data"]["values"]
        assert {(row["run"], row["rev"]) for row in rows} == {
            (label, rev) for label in studies[study].values() for rev in ("HEAD", "workspace")
        }, name
        assert {row["epoch"] for row in rows} == {1, 2, 3}, name
        calculated = {t["as"]: t["calculate"] for t in spec.get("transform", []) if "as" in t}
        legend = calculated.get(spec["encoding"]["color"]["field"], "")
        assert "datum.run" in legend and "datum.rev" in legend, spec["encoding"]["color"]
        assert spec["encoding"]["x"]["field"] == "epoch"
        assert spec["encoding"]["x"]["title"] == "epoch"
        assert spec["encoding"]["y"]["title"] == Y_LABELS[Path(name).parent.name]

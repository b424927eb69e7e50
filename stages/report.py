"""DVC stage `report`: every run's final numbers, the report's tables, figures and verdicts.

Reads each `runs/<run>-<seed>/` folder named by params.yaml (runs x seeds), and writes
`results/metrics.json` (each run's mean test accuracy and its spread over seeds),
`results/report.md` (one table per study beside the published values, a verdict per study,
every other number), PNG figures, and the
same curves as DVC plot data in `results/plots/<curve>/<study>.json`, one series per run named
by its study label, so that `dvc.yaml` declares the plots without naming any run.

The rule for calling a difference real is RULE below; the report states it. A run and seed
not yet trained and evaluated is left out and named at the top of the report, so that a grid
built over several starts (`dvc repro --single-item report`) can be read, and committed, as it
grows.
"""

import argparse
import json
import math
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import yaml

from stages import config, cost
from stages.data import CLASSES, class_key
from stages.errors import UserError, run_cli
from stages.files import atomic_write, make_temp_dir, replace_dir, write_json, write_text
from stages.model import forward_flops

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

RULE = (
    "A difference between two runs is called real when, with at least 2 seeds each, their mean "
    "test accuracies are further apart than twice the standard error of the difference, "
    "2 * sqrt(s_a^2 / n_a + s_b^2 / n_b); with one seed there is no spread to judge against."
)
LANDS = (
    "A row lands on its published value when its mean test accuracy is within max(0.01, 2 std) "
    "of it (std over seeds; 0.01 alone with one seed)."
)
PUBLISHED = Path(__file__).with_name("published.yaml")
CURVES = (
    ("train/loss", "training loss"),
    ("train/accuracy", "training accuracy"),
    ("test/accuracy", "test accuracy"),
)


@dataclass
class RunResult:
    """One run over the seeds of params.yaml that have been trained and evaluated."""

    name: str
    seeds: list[int]
    summaries: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    diverged_epochs: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)  # seeds not trained and evaluated yet

    @property
    def seed_note(self) -> str:
        """`(1 of 3 seeds)` where seeds are missing; empty when all are there."""
        if not self.missing:
            return ""
        return f" ({len(self.seeds)} of {len(self.seeds) + len(self.missing)} seeds)"

    @property
    def completed(self) -> list[int]:
        return [i for i, s in enumerate(self.summaries) if not s["diverged"]]

    def values(self, metric: str) -> list[float]:
        """`metric` of every seed that did not diverge."""
        out = []
        for i in self.completed:
            if metric == "test_accuracy":
                out.append(self.evals[i]["test"]["accuracy"])
            elif metric == "test_loss":
                out.append(self.evals[i]["test"]["loss"])
            else:
                out.append(self.summaries[i]["final"][metric])
        return out


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def read_eval(folder: Path) -> dict[str, Any]:
    """The evaluate stage's dvclive summary, with its confusion matrix rows when present."""
    metrics = json.loads((folder / "metrics.json").read_text())
    cm_file = folder / "plots" / "sklearn" / "confusion_matrix.json"
    metrics["confusion"] = json.loads(cm_file.read_text()) if cm_file.is_file() else []
    return metrics


def load_run(runs_dir: Path, name: str, seeds: list[int]) -> RunResult:
    """The seeds whose train summary and test metrics both exist; the others as `missing`."""
    present, missing, summaries, evals = [], [], [], []
    for seed in seeds:
        folder = runs_dir / f"{name}-{seed}"
        summary_file = folder / "train" / "summary.json"
        if not (summary_file.is_file() and (folder / "eval" / "metrics.json").is_file()):
            missing.append(seed)
            continue
        present.append(seed)
        summaries.append(json.loads(summary_file.read_text()))
        evals.append(read_eval(folder / "eval"))
    result = RunResult(name, present, summaries, evals, missing=missing)
    result.diverged_epochs = [s["diverged_epoch"] for s in summaries if s["diverged"]]
    return result


def top_metrics(results: dict[str, RunResult]) -> dict[str, Any]:
    """results/metrics.json: each run's mean test accuracy under its own name, then `std`
    (over seeds, with several) and `diverged` (seeds, where any did) by run. Short names keep
    `dvc exp show` readable in a terminal; every other number is in the report."""
    means, spreads, diverged = {}, {}, {}
    for run, result in results.items():
        mean, std = mean_std(result.values("test_accuracy"))
        if mean is not None:
            means[run] = round(mean, 5)
        if std is not None:
            spreads[run] = round(std, 5)
        if result.diverged_epochs:
            diverged[run] = len(result.diverged_epochs)
    extra = {"std": spreads, "diverged": diverged}
    return means | {key: value for key, value in extra.items() if value}


def fmt(values: list[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def differs(a: list[float], b: list[float]) -> bool | None:
    """True/False by the rule in the module docstring; None when either side has < 2 seeds."""
    if len(a) < 2 or len(b) < 2:
        return None
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return abs(statistics.fmean(a) - statistics.fmean(b)) > 2 * se


def verdict(claim: dict[str, Any], members: dict[str, str], results: dict[str, RunResult]) -> str:
    """Does the report's conclusion hold here? Judged on mean test accuracy and its spread."""
    scores = {run: results[run].values("test_accuracy") for run in members}
    ranked = sorted((r for r in scores if scores[r]), key=lambda r: -statistics.fmean(scores[r]))
    diverged = [members[r] for r in members if results[r].diverged_epochs]
    notes = f" Diverged here: {', '.join(diverged)}." if diverged else ""
    for run, pub in claim.get("runs", {}).items():
        if isinstance(pub, str) and run in members and not results[run].diverged_epochs:
            notes += (
                f" {members[run]}, published as \"{pub}\": here every seed trained without "
                f"diverging, to {fmt(scores[run])} test accuracy."
            )
    untrained = [members[r] for r in members if not results[r].seeds]
    if untrained:
        return (
            f"Report: {claim['claim']}. Not judged yet: {', '.join(untrained)} not trained "
            f"(`dvc repro`).{notes}"
        )
    if len(members) == 1 or not ranked:
        return f"Report: {claim['claim']}.{notes}"

    def one_seed(*runs: str) -> str:
        if all(len(scores[r]) < 2 for r in members):
            return "with one seed per run"
        return "with one seed of " + " and ".join(members[r] for r in runs if len(scores[r]) < 2)

    best, claimed = ranked[0], claim["best"]
    if best != claimed:
        real = differs(scores[best], scores[claimed])
        if real is None:
            judgement = (
                f"Not confirmed here: {members[best]} has the best test accuracy, but "
                f"{one_seed(best, claimed)} the spread is unknown"
            )
        elif real:
            judgement = (
                f"**Does not hold here**: {members[best]} has the best test accuracy, beyond "
                "the seed-to-seed spread"
            )
        else:
            judgement = (
                f"Not supported: {members[best]} is ahead of {members[claimed]}, within the "
                "seed-to-seed spread"
            )
        return f"Report: {claim['claim']}. {judgement}.{notes}"
    runner_up = ranked[1] if len(ranked) > 1 else None
    if runner_up is None:
        return f"Report: {claim['claim']}. Holds: every other run diverged.{notes}"
    real = differs(scores[best], scores[runner_up])
    if real is None:
        judgement = (
            f"Holds in the ordering, but {one_seed(best, runner_up)} the spread is unknown: "
            "run with several seeds (README) to judge it"
        )
    elif real:
        judgement = f"Holds: {members[best]} beats {members[runner_up]} beyond the spread"
    else:
        judgement = (
            f"Not supported: {members[best]} is ahead of {members[runner_up]} only within the "
            "seed-to-seed spread"
        )
    return f"Report: {claim['claim']}. {judgement}.{notes}"


def goal_line(goal: dict[str, Any], members: dict[str, str], results: dict[str, RunResult]) -> str:
    """Whether a run's mean test accuracy reaches a stated goal."""
    run, target = goal["run"], goal["test_accuracy"]
    scores = results[run].values("test_accuracy")
    if not results[run].seeds:
        return f"Goal: {members[run]} at {target:.3f} test accuracy: not judged yet (not trained)."
    if not scores:
        return f"Goal: {members[run]} at {target:.3f} test accuracy: not met (every seed diverged)."
    mean, _ = mean_std(scores)
    met = "met" if mean >= target else "**not met**"
    return (
        f"Goal: mean test accuracy of {members[run]} at least {target:.3f}: {met} "
        f"({fmt(scores)} over {len(scores)} seed{'s' if len(scores) > 1 else ''})."
    )


def lands(test: list[float], published: float) -> bool:
    """The rule LANDS: is a run's mean test accuracy its published value, given its spread?"""
    mean, std = mean_std(test)
    return abs(mean - published) <= max(0.01, 2 * std if std is not None else 0.0)


def study_table(
    study: str, members: dict[str, str], results: dict[str, RunResult], published: dict
) -> str:
    rows = [
        "| run | epochs | train acc | test acc | loss | test loss | published train / test / loss "
        "| test acc - published | lands |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    causes = []  # measured reasons for rows that do not land, from published.yaml
    for run, label in members.items():
        result = results[run]
        pub = (published.get(study) or {}).get("runs", {}).get(run)
        if isinstance(pub, dict):
            pub_text = f"{pub['train_accuracy']} / {pub['test_accuracy']} / {pub['loss']}"
        else:
            pub_text = pub or "-"
        if not result.seeds:
            rows.append(f"| {label} | - | not trained yet | - | - | - | {pub_text} | - | - |")
            continue
        if not result.completed:
            epochs = ", ".join(str(e) for e in result.diverged_epochs)
            rows.append(
                f"| {label}{result.seed_note} | - | diverged at epoch {epochs} | - | - | - "
                f"| {pub_text} | - | - |"
            )
            continue
        test = result.values("test_accuracy")
        delta, landed = "-", "-"
        if isinstance(pub, dict):
            delta = f"{statistics.fmean(test) - pub['test_accuracy']:+.3f}"
            landed = "yes" if lands(test, pub["test_accuracy"]) else "**no**"
            if landed != "yes" and "cause" in pub:
                causes.append(f"({len(causes) + 1}) {label}: {pub['cause']}")
                landed += f" ({len(causes)})"
        epochs = {s["epochs_completed"] for s in result.summaries}
        note = result.seed_note
        if result.diverged_epochs:
            note += f" ({len(result.diverged_epochs)} of {len(result.seeds)} seeds diverged)"
        rows.append(
            f"| {label}{note} | {'/'.join(map(str, sorted(epochs)))} "
            f"| {fmt(result.values('train/accuracy'))} | {fmt(test)} "
            f"| {fmt(result.values('train/loss'))} | {fmt(result.values('test_loss'))} "
            f"| {pub_text} | {delta} | {landed} |"
        )
    return "\n".join(rows + (["", *(f"- {cause}" for cause in causes)] if causes else []))


def mean_curve(result: RunResult, metric: str) -> list[float]:
    """Per-epoch mean over seeds, as long as the shortest completed history."""
    histories = [s["history"] for s in result.summaries if s["history"]]
    if not histories:
        return []
    length = min(len(h) for h in histories)
    return [statistics.fmean(h[e][metric] for h in histories) for e in range(length)]


def plot_rows(members: dict[str, str], results: dict[str, RunResult], metric: str) -> list[dict]:
    """One study's curve as DVC plot rows: epochs from 1 (as in the figures), runs by label."""
    return [
        {"epoch": epoch, "run": label, "value": value}
        for run, label in members.items()
        for epoch, value in enumerate(mean_curve(results[run], metric), start=1)
    ]


def write_plot_data(
    studies: dict[str, dict[str, str]], results: dict[str, RunResult], folder: Path
) -> None:
    """`folder/<curve>/<study>.json` for every curve and study, swapped in as a whole folder.

    A study removed from params.yaml then leaves no stale plot behind.
    """
    staging = make_temp_dir(folder)
    try:
        for metric, _ in CURVES:
            for study, members in studies.items():
                path = staging / metric.replace("/", "-") / f"{study}.json"
                write_json(path, plot_rows(members, results, metric))
        replace_dir(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_png(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def study_figure(study: str, members: dict[str, str], results: dict[str, RunResult], path: Path):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (metric, title) in zip(axes, CURVES, strict=True):
        for run, label in members.items():
            curve = mean_curve(results[run], metric)
            if curve:
                ax.plot(range(1, len(curve) + 1), curve, label=label + results[run].seed_note)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(title.split()[-1])
        ax.grid(alpha=0.3)
    axes[0].legend()
    seeds = max(len(results[run].seeds) + len(results[run].missing) for run in members)
    fig.suptitle(f"Study: {study} (mean over {seeds} seed{'s' if seeds > 1 else ''})")
    fig.tight_layout()
    save_png(fig, path)


def confusion(result: RunResult) -> list[list[int]]:
    """Confusion counts of the first completed seed, from dvclive's confusion matrix file."""
    index = {name: i for i, name in enumerate(CLASSES)}
    matrix = [[0] * len(CLASSES) for _ in CLASSES]
    for row in result.evals[result.completed[0]]["confusion"]:
        matrix[index[row["actual"]]][index[row["predicted"]]] += 1
    return matrix


def confusion_figure(matrix: list[list[int]], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(
                j,
                i,
                count,
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > max(map(max, matrix)) / 2 else "black",
            )
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    fig.colorbar(image)
    fig.tight_layout()
    save_png(fig, path)


def training_minutes(summary: dict[str, Any]) -> float:
    """Minutes of training steps over all of a run's epochs, resumed parts included."""
    return sum(r["epoch_seconds"] for r in summary["history"]) / 60


def stage_minutes(summary: dict[str, Any]) -> float:
    """Training plus the per-epoch evaluation and set-up: the train stage's own time."""
    evaluation = (summary["eval_seconds_per_epoch"] or 0.0) * summary["epochs_completed"]
    return training_minutes(summary) + (evaluation + summary["setup_seconds"]) / 60


def threads(summary: dict[str, Any]) -> str:
    return f"{summary['threads']} thread{'s' if summary['threads'] > 1 else ''}"


def cost_section(results: dict[str, RunResult], seeds: list[int]) -> list[str]:
    """Each run's time, size and FLOPs, and where it trained; the grid's time per seed."""
    rows, per_seed, runs_per_seed = [], dict.fromkeys(seeds, 0.0), dict.fromkeys(seeds, 0)
    for run, r in results.items():
        if not r.summaries:
            continue
        summary = r.summaries[0]
        cfg = config.RunConfig.from_dict(summary["config"], f"the summary of run {run}")
        flops = forward_flops(cfg.model)
        seconds = [s["seconds_per_epoch"] for s in r.summaries if s["seconds_per_epoch"]]
        for seed, s in zip(r.seeds, r.summaries, strict=True):
            per_seed[seed] += stage_minutes(s)
            runs_per_seed[seed] += 1
        where = sorted({f"{s['machine']}, {threads(s)}, {s['cpu_kernels']}" for s in r.summaries})
        rows.append(
            f"| {run} | {fmt(seconds, 1)} | {fmt([training_minutes(s) for s in r.summaries], 1)} "
            f"| {cfg.precision} | {summary['parameters']:,} | {flops / 1e6:.1f} "
            f"| {3 * flops * summary['train_images'] / 1e12:.2f} | {'; '.join(where)} |"
        )
    grid = "; ".join(
        f"seed {seed}: {cost.duration(minutes * 60)} ({runs_per_seed[seed]} of {len(results)} runs)"
        for seed, minutes in per_seed.items()
    )
    return [
        "## Cost",
        "",
        "Training time: the training steps of every epoch, without the per-epoch evaluation and "
        "DVC's own work, on the machine named (host, CPU, CPUs; the threads and the path that "
        "trained, `docs/speed.md`). Training FLOPs: the Linear "
        "layers' multiply-adds x 2, forward + backward = 3 x forward, per training epoch.",
        "",
        "Time of the grid per seed, the train stages' own time (training, per-epoch evaluation "
        f"and set-up) over the runs trained: {grid}.",
        "",
        "| run | seconds per epoch | minutes per seed | precision | parameters "
        "| forward MFLOP per image | training TFLOP per epoch | machine |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()

    params = config.load_params(args.params)
    seeds, studies = config.seeds(params), config.studies(params)
    published = yaml.safe_load(PUBLISHED.read_text())
    results = {run: load_run(args.runs, run, seeds) for run in config.run_names(params)}
    trained = [r for r in results.values() if r.seeds]
    if not trained:
        raise UserError(f"{args.runs}: no run is trained and evaluated yet: run `dvc repro`")
    missing = [f"{r.name}-{seed}" for r in results.values() for seed in r.missing]

    write_json(args.out / "metrics.json", top_metrics(results))
    write_plot_data(studies, results, args.out / "plots")
    figures = args.out / "figures"
    first = trained[0].summaries[0]
    lines = [
        "# Reproduction of the report's studies",
        "",
        "Generated by the `report` stage from the metrics of every run; no number here is typed "
        "by hand. Published values: the report, as listed in stages/published.yaml.",
        "",
        f"- Data: {first['train_images']} training images ({first['val_images']} more held out "
        f"for validation), {first['test_images']} test images",
        f"- Epochs: {first['config']['epochs']}; seeds: {', '.join(map(str, seeds))}; "
        f"device: {first['device']}",
        "- train acc and loss: running means over the last epoch in training mode (as the report "
        "measured them), on augmented images and label-smoothed targets where a run uses them; "
        "test acc: eval mode, after the last epoch",
        "- a ± b: mean ± standard deviation over seeds. " + RULE + " " + LANDS,
        "",
    ]
    if missing:
        lines += [
            f"**Incomplete**: {len(missing)} of {len(results) * len(seeds)} runs and seeds are "
            f"not trained yet, and are left out: {', '.join(missing)}.",
            "",
        ]
    for study, members in studies.items():
        study_figure(study, members, results, figures / f"{study}.png")
        lines += [
            f"## Study: {study}",
            "",
            study_table(study, members, results, published),
            "",
            verdict(published.get(study, {"claim": "-", "best": None}), members, results),
            "",
            *(
                [goal_line(published[study]["goal"], members, results), ""]
                if "goal" in published.get(study, {})
                else []
            ),
            f"![{study}](figures/{study}.png)",
            "",
        ]
    final = results.get("final")
    if final is not None and final.completed:
        matrix = confusion(final)
        confusion_figure(
            matrix, "Final model: confusion matrix (test set)", figures / "confusion_final.png"
        )
        per_class = final.evals[final.completed[0]].get("per_class", {})
        lines += [
            "## Final model: confusion matrix and per-class accuracy",
            "",
            f"Seed {final.seeds[final.completed[0]]}.",
            "",
            "![confusion matrix](figures/confusion_final.png)",
            "",
            "| class | test accuracy |",
            "| --- | --- |",
            *(f"| {name} | {per_class[class_key(name)]:.3f} |" for name in CLASSES),
            "",
        ]
    lines += cost_section(results, seeds)
    write_text(args.out / "report.md", "\n".join(lines))
    print(
        f"report: {args.out / 'report.md'}, {args.out / 'metrics.json'}, {figures}/, "
        f"{args.out / 'plots'}/"
    )
    if missing:
        print(f"report: {len(missing)} runs and seeds left out, not trained yet", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)

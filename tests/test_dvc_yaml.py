"""dvc.yaml's stages depend on all the repository code their commands run."""

import re
from pathlib import Path

import pytest
import yaml

from stages.sources import ROOT, code_digest, code_files

DVC_YAML = ROOT / "dvc.yaml"


def stage_module(cmd: str) -> str:
    match = re.search(r"python -m (stages(?:\.\w+)+)", cmd)
    assert match, f"stage command {cmd!r} runs no `python -m stages.<module>`"
    return match.group(1)


def undeclared_code(stage: dict) -> list[str]:
    """Files that the stage's command runs but that none of its deps (a file or a folder
    above it) covers."""
    deps = [ROOT / dep for dep in stage.get("deps", [])]
    return [
        str(path.relative_to(ROOT))
        for path in code_files(stage_module(stage["cmd"]))
        if not any(path == dep or dep in path.parents for dep in deps)
    ]


@pytest.mark.parametrize("name", list(yaml.safe_load(DVC_YAML.read_text())["stages"]))
def test_every_stage_depends_on_the_code_it_runs(name):
    stage = yaml.safe_load(DVC_YAML.read_text())["stages"][name]
    assert undeclared_code(stage) == []


def test_a_missing_dependency_is_found():
    stage = {
        "cmd": "python -m stages.train --config x",
        "deps": ["stages/train.py", "stages/training.py", "stages/model.py"],
    }
    missing = undeclared_code(stage)
    assert "stages/fast/kernels.cpp" in missing  # a compiled source the fast path loads
    assert "stages/config.py" in missing
    assert "stages/train.py" not in missing


def test_code_files_follow_imports_transitively():
    names = {p.relative_to(ROOT).as_posix() for p in code_files("stages.evaluate")}
    assert {"stages/evaluate.py", "stages/training.py", "stages/fast/notebook.py"} <= names
    assert "stages/report.py" not in names  # not imported by evaluate
    report = {p.relative_to(ROOT).as_posix() for p in code_files("stages.report")}
    assert not any(name.startswith("stages/fast/") for name in report)


def test_checkpoint_key_changes_with_the_code_training_runs(tmp_path, monkeypatch):
    """The checkpoint key is digested from the same file list, so an edit to any of them
    (here: the compiled kernels' source) makes old checkpoints unusable."""
    import stages.sources as sources

    copy = tmp_path / "stages"
    for path in code_files("stages.train"):
        target = copy / path.relative_to(ROOT / "stages")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    monkeypatch.setattr(sources, "ROOT", tmp_path)
    monkeypatch.setattr(sources, "PACKAGE", copy)
    before = code_digest("stages.train")
    assert before == code_digest("stages.train")
    kernel = copy / "fast" / "kernels.cpp"
    kernel.write_text(kernel.read_text() + "\n// edited\n")
    assert code_digest("stages.train") != before
    assert Path(copy / "report.py").exists() is False  # report.py is not part of training


def test_the_reports_outputs_are_kept_in_git():
    """A clone reads the committed reference (report, metrics, figures, plot data) without a
    DVC remote: every output of the report stage is `cache: false`."""
    outs = yaml.safe_load(DVC_YAML.read_text())["stages"]["report"]["outs"]
    assert all(isinstance(out, dict) for out in outs), outs
    assert [next(iter(out.values())) for out in outs] == [{"cache": False}] * len(outs)
    assert {next(iter(out)) for out in outs} == {
        "results/metrics.json", "results/report.md", "results/figures", "results/plots"
    }  # fmt: skip

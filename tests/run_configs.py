"""The repository's params.yaml, and run configurations with some of its keys changed."""

import copy
from pathlib import Path

import yaml

from stages.config import RunConfig, resolve_run

REPO = Path(__file__).resolve().parents[1]


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def config(params: dict, run: str = "final", preset: dict | None = None, **base) -> RunConfig:
    """The run's configuration with base keys and preset (models.report) keys changed."""
    p = copy.deepcopy(params)
    p.update(base)
    p["models"]["report"].update(preset or {})
    return resolve_run(p, run)

"""The pages `dvc plots show/diff` write need no network: .dvc/config names our HTML template,
which inlines the vendored vega bundles (DVC's own page loads them from a CDN: blank offline)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_helpers import REPO, make_project, run

VENDOR = REPO / ".dvc" / "plots" / "vendor"
SCRIPT = REPO / "scripts" / "offline_plots_template.py"
ONE_RUN = {"runs": {"final": {}}, "studies": {"final": {"final": "final model"}}}
PLOTS = 4  # the confusion matrix and the `final` study's three curves


def bundles() -> list[tuple[str, str, str]]:
    """(package, version, file under vendor/) from the script that writes the template."""
    spec = importlib.util.spec_from_file_location("offline_plots_template", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BUNDLES


def assert_offline(page: Path) -> None:
    """No script from elsewhere, every vendored bundle inline, and specs of its major version."""
    html = page.read_text(encoding="utf8")
    tags = re.findall(r"<script\b[^>]*>", html, re.IGNORECASE)
    assert len(tags) == 3 + PLOTS and not any("src" in tag.lower() for tag in tags), tags
    assert not re.search(r"""\bsrc\s*=\s*["']?(https?:)?//""", html, re.IGNORECASE)
    assert "cdn.jsdelivr" not in html
    for name, version, bundle in bundles():
        code = (VENDOR / bundle).read_text(encoding="utf8")
        assert f'"{version}"' in code, f"{bundle} is not {name} {version}"
        assert code in html, f"{page} lacks {bundle}"
        assert (VENDOR / bundle).with_name("LICENSE").is_file()
    lite_major = next(v for n, v, _ in bundles() if n == "vega-lite").split(".")[0]
    assert html.count("vegaEmbed('#") == PLOTS
    assert set(re.findall(r"schema/vega-lite/v(\d+)\.json", html)) == {lite_major}


def test_template_is_written_from_the_vendored_bundles():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.pipeline
def test_plots_show_and_diff_write_pages_that_load_nothing_from_the_network(
    tmp_path, fashion_mnist
):
    project = make_project(tmp_path, fashion_mnist, **ONE_RUN)
    run(project, "dvc", "repro")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "repro")
    shown = run(project, "dvc", "plots", "show").stdout
    assert_offline(project / "dvc_plots" / "index.html")
    assert (project / "dvc_plots" / "index.html").as_uri() in shown
    # Elsewhere, away from .dvc/: the page still holds everything it needs.
    elsewhere = tmp_path / "elsewhere"  # DVC makes the folder, not its parents
    run(project, "dvc", "plots", "diff", "HEAD", "-o", str(elsewhere))
    assert_offline(elsewhere / "index.html")

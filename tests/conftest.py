from pathlib import Path

import pytest
from data_sources import CACHE, fashion_mnist_folder, sources_for_tests


@pytest.fixture(scope="session")
def fashion_mnist(tmp_path_factory) -> Path:
    """A folder of upstream's four Fashion-MNIST .gz files, from the first source that has them:
    the fetch stage's (FASHION_MNIST_DIR, Debian's folder, the download), then CI's ../shared."""
    out = tmp_path_factory.mktemp("fashion-mnist")
    return fashion_mnist_folder(sources_for_tests(), CACHE, out)[1]


PRINTOUT = "printout"


@pytest.fixture
def printout(record_property):
    """printout(text): text for the reader (kill schedules, timings), shown after the run."""
    return lambda text: record_property(PRINTOUT, text)


def pytest_terminal_summary(terminalreporter):
    """Every test's printout, passed or failed: also from xdist's workers, whose own output
    pytest does not show."""
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            for name, text in getattr(report, "user_properties", []):
                if name == PRINTOUT:
                    terminalreporter.write_line(f"{report.nodeid}:\n{text}")


def pytest_collection_modifyitems(items):
    """The end-to-end modules first, so that under xdist the long ones start at once and the
    unit tests fill in around them; the sort is stable, so each module keeps its order."""
    items.sort(key=lambda item: item.get_closest_marker("pipeline") is None)

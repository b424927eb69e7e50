from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-mnist"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The four original Fashion-MNIST files, from ../shared beside the checkout (as in CI)."""
    if not (SHARED_DATA / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"the test data is missing: expected {SHARED_DATA} (../shared beside the repo)")
    return SHARED_DATA

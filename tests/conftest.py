from pathlib import Path

import pytest
from data_sources import CACHE, fashion_mnist_folder, sources_for_tests


@pytest.fixture(scope="session")
def fashion_mnist(tmp_path_factory) -> Path:
    """A folder of upstream's four Fashion-MNIST .gz files, from the first source that has them:
    the fetch stage's (FASHION_MNIST_DIR, Debian's folder, the download), then CI's ../shared."""
    out = tmp_path_factory.mktemp("fashion-mnist")
    return fashion_mnist_folder(sources_for_tests(), CACHE, out)[1]

"""GPU tests: skipped as a whole on machines without CUDA (CI, the 2-core development machine)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run tests/gpu/run.sh on a machine with an NVIDIA GPU")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)

"""GPU tier: skipped without CUDA. Reuses the tiny-model fixtures of the CPU integration tests."""

from __future__ import annotations

import pytest
import torch

from tests.integration.conftest import run_config, tiny_model_dir  # noqa: F401 - fixtures re-exported


def pytest_collection_modifyitems(config, items):
    here = [i for i in items if "tests/gpu/" in str(i.fspath).replace("\\", "/")]
    for item in here:
        item.add_marker(pytest.mark.gpu)
        if not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs this tier)"))

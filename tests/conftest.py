"""Fixtures over the tiny-model helpers in tests/helpers.py."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import make_engine  # noqa: E402
from server.engine import Engine  # noqa: E402


@pytest.fixture(scope="module", params=["t5", "llama"])
def engine(request) -> Engine:
    return make_engine(request.param)


def pytest_collection_modifyitems(config, items) -> None:
    """GPU tests are collected everywhere and skipped, with the reason shown, without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""`taskserve predict` against a real server on the real default backbone with the demo store
(marker `real`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.cli import main
from server.settings import Settings
from serving import running_server

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("cli") / "store"
    demo = Path(__file__).parents[2] / "demo_store"
    with running_server(Settings(store=store, seed_store=demo, device="cpu", dtype="float32", embedded_worker=False)) as base:
        yield base


def test_predict_with_a_demo_task(url: str, capsys) -> None:
    assert main(["predict", "--task", "movie-sentiment-pha", "--url", url, "An absolutely wonderful film, I loved it."]) == 0
    out = capsys.readouterr().out
    assert "-> 'positive'" in out


def test_unknown_task_is_a_clear_error(url: str, capsys) -> None:
    assert main(["predict", "--task", "nope", "--url", url, "x"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err

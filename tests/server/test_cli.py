"""The `taskserve` CLI on the real default backbone (marker `real`)."""

from __future__ import annotations

import pytest

from server.cli import main

pytestmark = pytest.mark.real


def test_predict_with_a_demo_task(capsys) -> None:
    assert main(["predict", "--task", "sentiment", "--device", "cpu", "An absolutely wonderful film, I loved it."]) == 0
    out = capsys.readouterr().out
    assert "-> 'positive'" in out


def test_unknown_task_is_a_clear_error(capsys) -> None:
    assert main(["predict", "--task", "nope", "--device", "cpu", "x"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err

"""Readers of the BIG-bench and VADER formats, on handmade fixtures in tests/fixtures/data."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.data.readers import DataError, LabeledText, read_bigbench, read_vader

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "data"


def test_bigbench_labels_are_the_single_best_target_score() -> None:
    task = read_bigbench(FIXTURES / "task.json")
    assert task.name == "tiny_arguments"
    assert task.description == "Decide whether a short argument is logically valid"
    assert task.labels == ("Invalid", "Valid")
    # 12 rows: a tie, a row scoring its only choice 0 and one without target_scores are skipped
    assert len(task.examples) == 9
    assert LabeledText("A claim with contradictory gold labels.", "Valid") in task.examples
    assert not any("tie" in e.text or "no answer" in e.text or "generative" in e.text for e in task.examples)
    assert all(e.text == e.text.strip() for e in task.examples)
    by_text = {e.text: e.label for e in task.examples}
    assert by_text[
        "Do you think the following argument is 'Valid' or 'Invalid'? My uncle smoked and lived long, "
        "so smoking is harmless."
    ] == "Invalid"


def test_bigbench_missing_file_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_bigbench(tmp_path / "winowhy" / "task.json")
    assert "taskserve data fetch" in info.value.message and "winowhy" in info.value.message
    assert (info.value.type, info.value.status) == ("data_error", 422)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"name": "x"}', "no `examples`"),
        ('{"examples": [{"input": "a"}]}', "no example"),
    ],
)
def test_bigbench_bad_file_names_file_and_problem(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "task.json"
    path.write_text(content)
    with pytest.raises(DataError, match=problem) as info:
        read_bigbench(path)
    assert str(path) in info.value.message


def test_vader_keeps_rated_rows_decodes_latin1_and_drops_neutral() -> None:
    raw = (FIXTURES / "tiny_GroundTruth.txt").read_bytes()
    assert b"\r\n" in raw and b"caf\xe9" in raw  # the fixture really is latin-1 with CRLF
    rows = read_vader(FIXTURES / "tiny_GroundTruth.txt")
    assert [r.label for r in rows].count("positive") == 5
    assert [r.label for r in rows].count("negative") == 4
    texts = {r.text: r.label for r in rows}
    assert texts["A warm, funny and clever little café of a film."] == "positive"
    assert texts["Pleasant enough for a rainy afternoon."] == "positive"  # +1.0 is on the boundary
    assert texts["The sequel is weaker than the original."] == "negative"  # -1.0 too
    assert texts["Tom & Jerry would be proud of these gags."] == "positive"  # entity unescaped
    assert texts["Lovely performances all round."] == "positive"
    assert not any(t.startswith(("The film opens", "It is a movie", "Runtime")) for t in texts)
    assert not any("\r" in t for t in texts)


def test_vader_threshold_and_utf8_files(tmp_path: Path) -> None:
    path = tmp_path / "x_GroundTruth.txt"
    path.write_bytes("1\t1.5\tA mess of clichés.\r\n2\t-2.5\tAwful.\r\n3\t-1.2\tMeh.\r\n".encode())
    assert read_vader(path) == [
        LabeledText("A mess of clichés.", "positive"),
        LabeledText("Awful.", "negative"),
        LabeledText("Meh.", "negative"),
    ]
    assert read_vader(path, min_abs=2.0) == [LabeledText("Awful.", "negative")]


def test_vader_does_not_split_rows_on_latin1_control_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x_GroundTruth.txt"
    path.write_bytes(b"1\t2.0\tWait for it\x85 wonderful.\r\n")  # \x85 is NEL for str.splitlines()
    assert read_vader(path) == [LabeledText("Wait for it\x85 wonderful.", "positive")]


@pytest.mark.parametrize(("line", "problem"), [(b"1\t2.0", "expected `id"), (b"1\tgood\tNice.", "not a number")])
def test_vader_malformed_row_names_file_and_line(tmp_path: Path, line: bytes, problem: str) -> None:
    path = tmp_path / "x_GroundTruth.txt"
    path.write_bytes(b"1\t2.0\tFine.\r\n" + line + b"\r\n")
    with pytest.raises(DataError, match=problem) as info:
        read_vader(path)
    assert f"{path}:2" in info.value.message


def test_vader_missing_file_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="taskserve data fetch"):
        read_vader(tmp_path / "tweets_GroundTruth.txt")

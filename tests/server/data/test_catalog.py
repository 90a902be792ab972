"""The data catalog: entry invariants, the serving spec, and `load` on fixture files."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from server.data import catalog
from server.data.catalog import CATALOG, HELD_OUT, MIX, CatalogTask, load, spec
from server.data.readers import DataError, LabeledText
from server.errors import NotFound
from server.task import TASK_NAME

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "data"
ENTRIES = list(CATALOG.values())


def test_groups_are_disjoint_and_names_unique() -> None:
    assert len(CATALOG) == len(MIX) + len(HELD_OUT)
    assert not {t.name for t in MIX} & {t.name for t in HELD_OUT}
    assert not {t.source for t in MIX} & {t.source for t in HELD_OUT}  # held-out data is never trained on
    assert {t.name for t in HELD_OUT} == {"tweet-sentiment", "nyt-sentiment", "metaphor", "logical-fallacy", "irony"}


@pytest.mark.parametrize("task", ENTRIES, ids=lambda t: t.name)
def test_entry_is_well_formed(task: CatalogTask) -> None:
    assert TASK_NAME.match(task.name)
    assert "{text}" in task.template and task.template == task.template.rstrip()
    assert len(set(task.labels)) == len(task.labels) >= 2
    assert task.description.strip() and task.metric == "accuracy"
    if task.scoring == "first":
        assert len({word[0] for word in task.labels}) == len(task.labels)


@pytest.mark.parametrize("task", ENTRIES, ids=lambda t: t.name)
def test_spec_keeps_the_verbalizer_words_as_labels(task: CatalogTask) -> None:
    """The leading space a decoder-only label is scored with is `Backbone.label_ids`'s
    (tests/server/test_backbone.py), not part of the label."""
    decoder = spec(task)
    assert decoder.labels == task.labels
    assert decoder.template == "{description}\n" + task.template and decoder.description == task.description
    assert decoder.render("Some input.").startswith(task.description + "\n")
    assert decoder.scoring == task.scoring and decoder.extra["source"] == task.source
    assert "Some input." in decoder.render("Some input.")


def test_binary_word_tasks_use_first_token_scoring_and_intent_mean() -> None:
    assert CATALOG["intent"].scoring == "mean" and len(CATALOG["intent"].labels) == 7
    assert all(t.scoring == "first" for t in ENTRIES if len(t.labels) == 2)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"template": "no placeholder"}, "template"),
        ({"verbalizers": {"a": "yes", "b": "yes"}}, "distinct"),
        ({"verbalizers": {"a": " yes", "b": "no"}}, "single lowercase"),
        ({"verbalizers": {"a": "correct", "b": "certain"}, "scoring": "first"}, "first letters"),
        ({"source": "bigbench:../etc"}, "source"),
    ],
)
def test_invalid_entries_are_refused(change: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        dataclasses.replace(CATALOG["fever"], **change)


def _data_dir(tmp_path: Path) -> Path:
    """A data dir holding the fixtures where the catalog expects logical-fallacy and tweet-sentiment."""
    (tmp_path / "bigbench" / "logical_fallacy_detection").mkdir(parents=True)
    shutil.copy(FIXTURES / "task.json", tmp_path / "bigbench" / "logical_fallacy_detection" / "task.json")
    (tmp_path / "vader").mkdir()
    shutil.copy(FIXTURES / "tiny_GroundTruth.txt", tmp_path / "vader" / "tweets_GroundTruth.txt")
    return tmp_path


def test_load_bigbench_strips_prefixes_maps_labels_and_dedupes(tmp_path: Path) -> None:
    data = load("logical-fallacy", _data_dir(tmp_path))
    assert data.task is CATALOG["logical-fallacy"]
    texts = [e.text for e in data.examples]
    # the kettle argument appears under both prefixes; the contradictory claim is dropped
    assert texts.count("Every kettle is a pot. Mira owns a kettle. Therefore Mira owns a pot.") == 1
    assert not any("contradictory" in t or t.startswith(("This AI", "Do you think")) for t in texts)
    assert sorted(e.label for e in data.examples) == ["invalid"] * 3 + ["valid"] * 3
    assert LabeledText("If it rains the road is wet. It rains. Therefore the road is wet.", "valid") in data.examples


def test_load_drops_inputs_longer_than_max_chars(tmp_path: Path, monkeypatch) -> None:
    short = dataclasses.replace(CATALOG["logical-fallacy"], max_chars=70)
    monkeypatch.setitem(catalog.CATALOG, "logical-fallacy", short)
    texts = [e.text for e in load("logical-fallacy", _data_dir(tmp_path)).examples]
    assert texts and all(len(t) <= 70 for t in texts)
    assert len(texts) < 6


def test_load_vader_maps_sentiment(tmp_path: Path) -> None:
    data = load("tweet-sentiment", _data_dir(tmp_path))
    assert {e.label for e in data.examples} == {"positive", "negative"} and len(data.examples) == 9


def test_load_refuses_unknown_names_missing_files_and_unmapped_labels(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not in the data catalog"):
        load("no-such-task", tmp_path)
    with pytest.raises(DataError, match="taskserve data fetch"):
        load("fever", tmp_path)
    path = tmp_path / "bigbench" / "fact_checker" / "fever" / "task.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"examples": [{"input": "x", "target_scores": {"maybe": 1, "true": 0}}]}))
    with pytest.raises(DataError, match="maybe"):
        load("fever", tmp_path)


def test_bigbench_tasks_are_the_catalog_sources() -> None:
    assert "fact_checker/fever" in catalog.bigbench_tasks()
    assert len(catalog.bigbench_tasks()) == sum(t.kind == "bigbench" for t in ENTRIES)

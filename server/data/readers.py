"""Readers for the two offline data sets: BIG-bench `task.json` files and VADER ground-truth files.

Both turn a file into `LabeledText` rows with the data set's own labels; mapping labels to
verbalizers, length caps and de-duplication belong to `server.data.catalog`. Every problem with a
file is a `DataError` naming the file, so a broken cache is diagnosed without a traceback.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from server.errors import DataError

FETCH_HINT = "run `taskserve data fetch`"


@dataclass(frozen=True)
class LabeledText:
    """One classification example: input text and its label (raw, or a verbalizer word)."""

    text: str
    label: str


@dataclass(frozen=True)
class BigBenchTask:
    """A BIG-bench multiple-choice task: its human-written description is what IP conditions on."""

    name: str
    description: str
    labels: tuple[str, ...]
    """Sorted union of the `target_scores` keys of all examples."""
    examples: list[LabeledText]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: not found; {FETCH_HINT}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None


def _single_max(target_scores: object) -> str | None:
    """The key with the unique highest positive score, else None (no answer, or a tie)."""
    if not isinstance(target_scores, dict) or not target_scores:
        return None
    best = max(target_scores.values())
    winners = [key for key, score in target_scores.items() if score == best]
    return winners[0] if len(winners) == 1 and best > 0 else None


def read_bigbench(task_json: Path) -> BigBenchTask:
    """Read a BIG-bench `task.json`. Examples without `target_scores` or without a single correct
    answer are skipped: rank classification needs exactly one gold label."""
    raw = _read_bytes(task_json)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{task_json}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise DataError(f"{task_json}: not a BIG-bench task (no `examples` list)")
    labels: set[str] = set()
    examples: list[LabeledText] = []
    for example in data["examples"]:
        if not isinstance(example, dict) or not isinstance(example.get("input"), str):
            continue
        scores = example.get("target_scores")
        if isinstance(scores, dict):
            labels.update(scores)
        label = _single_max(scores)
        if label is not None and example["input"].strip():
            examples.append(LabeledText(example["input"].strip(), label))
    if not examples:
        raise DataError(f"{task_json}: no example has target_scores with a single correct answer")
    name = str(data.get("name") or task_json.parent.name)
    return BigBenchTask(name, str(data.get("description", "")), tuple(sorted(labels)), examples)


def _decode(raw: bytes) -> str:
    """VADER's files are documented as latin-1, but in the 3.3.2 archive the movie-review and tweet
    files are UTF-8 ("clichés" would read as "clichÃ©s"): UTF-8 when it decodes, else latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_vader(path: Path, min_abs: float = 1.0) -> list[LabeledText]:
    """Read a VADER `*_GroundTruth.txt` (`id \\t mean_rating \\t text`, ratings in [-4, 4]).

    Rows rated >= `min_abs` are "positive", <= -`min_abs` "negative"; the weakly rated rows in
    between are dropped because their polarity is not agreed on. HTML entities (`&amp;` in the
    tweets) are unescaped.
    """
    if min_abs <= 0:
        raise DataError(f"{path}: min_abs must be > 0, got {min_abs}")
    examples: list[LabeledText] = []
    # split on "\n" only: str.splitlines() would also split on \x85 and friends inside a text
    for number, line in enumerate(_decode(_read_bytes(path)).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise DataError(f"{path}:{number}: expected `id<TAB>rating<TAB>text`, got {line[:60]!r}")
        try:
            rating = float(fields[1])
        except ValueError:
            raise DataError(f"{path}:{number}: rating {fields[1]!r} is not a number") from None
        text = html.unescape(fields[2].strip())
        if text and abs(rating) >= min_abs:
            examples.append(LabeledText(text, "positive" if rating > 0 else "negative"))
    if not examples:
        raise DataError(f"{path}: no row rated at least {min_abs} in absolute value")
    return examples

"""The real tasks taskserve trains and evaluates on, drawn from BIG-bench and VADER (DESIGN.md,
"Real data available offline").

`MIX` is the multi-task training mixture (source prompts, shared IP/PHA networks); `HELD_OUT` are
the few-shot transfer targets and never appear in the mixture. Each entry fixes the template and
scoring rule with the task (see `server.data.spec`), an IP-style instruction as description
(seed 000 §3.2 / Table 6), and one common word per label. Templates end in a cue ("A:",
"Sentiment:") for decoder-only models and never repeat a cue the BIG-bench input already carries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from server.data.readers import LabeledText, read_bigbench, read_vader
from server.errors import DataError
from server.data.spec import Scoring, TaskSpec
from server.errors import NotFound
from server.task import TASK_NAME

_SOURCE_RE = re.compile(r"^(bigbench:[a-z0-9_]+(/[a-z0-9_]+)*|vader:[A-Za-z0-9]+_GroundTruth\.txt)$")

ATTRIBUTION = {
    "bigbench": "BIG-bench (Srivastava et al., 2022, arXiv:2206.04615), Apache License 2.0",
    "vader": "Hutto & Gilbert (2014), VADER, ICWSM-14; vaderSentiment, MIT License",
}


@dataclass(frozen=True)
class CatalogTask:
    """One task of the catalog: where its data is and how it is posed to the backbone."""

    name: str
    """Our task name (the `task` of API requests)."""
    source: str
    """`bigbench:<task path under benchmark_tasks>` or `vader:<*_GroundTruth.txt file>`."""
    description: str
    """IP-style instruction describing the task to the model."""
    template: str
    """Input template with `{text}`, ending in an answer cue."""
    verbalizers: dict[str, str] = field(hash=False)
    """Raw data-set label -> verbalizer word (the task's label)."""
    scoring: Scoring = "mean"
    """`first` only where the words differ in their first token (binary word labels)."""
    metric: str = "accuracy"
    max_chars: int = 600
    """Longer inputs are dropped: training runs on CPU."""
    strip_prefixes: tuple[str, ...] = ()
    """Boilerplate instructions some BIG-bench inputs start with; removed, the description says it."""

    def __post_init__(self) -> None:
        if not TASK_NAME.match(self.name):
            raise ValueError(f"name: {self.name!r} does not match {TASK_NAME.pattern}")
        if not _SOURCE_RE.match(self.source):
            raise ValueError(f"{self.name}: source {self.source!r} is not bigbench:<task> or vader:<file>")
        if "{text}" not in self.template:
            raise ValueError(f"{self.name}: template must contain {{text}}")
        words = list(self.verbalizers.values())
        if len(words) < 2 or len(set(words)) != len(words):
            raise ValueError(f"{self.name}: verbalizers must be at least two distinct words")
        if any(not re.fullmatch(r"[a-z]+", word) for word in words):
            raise ValueError(f"{self.name}: verbalizers must be single lowercase words, got {words}")
        # first-token scoring must also hold on byte-level tokenizers (ByT5): distinct first letters
        if self.scoring == "first" and len({word[0] for word in words}) != len(words):
            raise ValueError(f"{self.name}: scoring=first needs verbalizers with distinct first letters")
        if self.max_chars < 1:
            raise ValueError(f"{self.name}: max_chars must be >= 1")

    @property
    def kind(self) -> str:
        return self.source.split(":", 1)[0]

    @property
    def labels(self) -> tuple[str, ...]:
        """The verbalizer words, in catalog order."""
        return tuple(self.verbalizers.values())


@dataclass(frozen=True)
class Dataset:
    """A catalog task's examples, labels already mapped to verbalizer words."""

    task: CatalogTask
    examples: list[LabeledText]


_YES_NO = {"yes": "yes", "no": "no"}
_SENTIMENT = {"positive": "positive", "negative": "negative"}

MIX: tuple[CatalogTask, ...] = (
    CatalogTask(
        "movie-sentiment", "vader:movieReviewSnippets_GroundTruth.txt",
        "Tell me whether this movie review is positive or negative:",
        "Review: {text}\nSentiment:", _SENTIMENT, scoring="first",
    ),
    CatalogTask(
        "fever", "bigbench:fact_checker/fever",
        "Tell me whether the claim is true or false:",
        "{text}\nA:", {"true": "true", "false": "false"}, scoring="first",  # input ends in "Q: ...?"
    ),
    CatalogTask(
        "implicatures", "bigbench:implicatures",
        "Tell me whether the answer of Speaker 2 means yes or no:",
        "{text}\nQ: Does Speaker 2 mean yes or no?\nA:", _YES_NO, scoring="first",
    ),
    CatalogTask(
        "intent", "bigbench:intent_recognition",
        "Tell me what the user wants: add to a playlist, book a restaurant, get the weather, play "
        "music, rate a book, find a creative work or find a screening:",
        "{text}\nIntent:",  # input starts with "Utterance:"
        {
            "add_to_playlist": "playlist", "book_restaurant": "restaurant", "get_weather": "weather",
            "play_music": "music", "rate_book": "book", "search_creative_work": "creative",
            "search_screening_event": "screening",
        },
    ),
    CatalogTask(
        "strategyqa", "bigbench:strategyqa",
        "Answer the question with yes or no:",
        "Q: {text}\nA:", {"Yes": "yes", "No": "no"}, scoring="first",
    ),
    CatalogTask(
        "epistemic", "bigbench:epistemic_reasoning",
        "Tell me whether the premise entails the hypothesis:",
        "{text}\nQ: Does the premise entail the hypothesis?\nA:",
        {"entailment": "yes", "non-entailment": "no"}, scoring="first",
    ),
    CatalogTask(
        "winowhy", "bigbench:winowhy",
        "Tell me whether the explanation of what the pronoun refers to is correct or incorrect:",
        "{text}\nThe reasoning is", {"correct": "correct", "incorrect": "incorrect"}, scoring="first",
    ),
)

HELD_OUT: tuple[CatalogTask, ...] = (
    CatalogTask(
        "tweet-sentiment", "vader:tweets_GroundTruth.txt",
        "Tell me whether this tweet is positive or negative:",
        "Tweet: {text}\nSentiment:", _SENTIMENT, scoring="first",
    ),
    CatalogTask(
        "nyt-sentiment", "vader:nytEditorialSnippets_GroundTruth.txt",
        "Tell me whether this sentence from a newspaper editorial is positive or negative:",
        "Sentence: {text}\nSentiment:", _SENTIMENT, scoring="first",
    ),
    CatalogTask(
        "metaphor", "bigbench:metaphor_boolean",
        "Tell me whether the second sentence correctly paraphrases the metaphor in the first:",
        "{text}\nQ: Does the second sentence correctly paraphrase the first?\nA:",
        {"True": "yes", "False": "no"}, scoring="first",
    ),
    CatalogTask(
        "logical-fallacy", "bigbench:logical_fallacy_detection",
        "Tell me whether the argument is logically valid or invalid:",
        "Argument: {text}\nQ: Is this argument valid or invalid?\nA:",
        {"Valid": "valid", "Invalid": "invalid"}, scoring="first",
        # every argument appears twice, under each of these two prefixes (de-duplicated by load())
        strip_prefixes=(
            (
                "This AI is identifying whether statements contain fallacies. The AI responds with "
                "'Valid' or 'Invalid' as appropriate."
            ),
            "Do you think the following argument is 'Valid' or 'Invalid'?",
        ),
    ),
    CatalogTask(
        "irony", "bigbench:irony_identification",
        "Tell me whether the sentence is ironic:",
        "Sentence: {text}\nQ: Is this ironic?\nA:", {"ironic": "yes", "not ironic": "no"}, scoring="first",
    ),
)

CATALOG: dict[str, CatalogTask] = {task.name: task for task in MIX + HELD_OUT}

DESCRIBED = "{{description}}\n{template}"
"""How a task's template carries its description (IP's sample modification m = s + x, for every method)."""


def get(name: str) -> CatalogTask:
    try:
        return CATALOG[name]
    except KeyError:
        raise NotFound(f"task {name!r} is not in the data catalog ({', '.join(CATALOG)})") from None


def spec(task: CatalogTask) -> TaskSpec:
    """The serving spec of a catalog task: the description on its own line, then the task's
    template — every method sees the description, as a user who gives one expects (and as the
    default template of `POST /v1/tasks` has it). Its labels are the verbalizer words; how a word
    is scored on each backbone kind is `Backbone.label_ids`."""
    extra = {"source": task.source, "attribution": ATTRIBUTION[task.kind]}
    return TaskSpec(
        template=DESCRIBED.format(template=task.template), labels=task.labels, description=task.description,
        scoring=task.scoring, metric=task.metric, extra=extra,
    )


def source_path(task: CatalogTask, data_dir: Path) -> Path:
    """Where `taskserve data fetch` puts the task's file under `data_dir`."""
    kind, path = task.source.split(":", 1)
    return data_dir / "bigbench" / path / "task.json" if kind == "bigbench" else data_dir / "vader" / path


def bigbench_tasks() -> list[str]:
    """The BIG-bench task paths the catalog needs (what `fetch` extracts)."""
    return sorted({t.source.split(":", 1)[1] for t in CATALOG.values() if t.kind == "bigbench"})


def _strip(text: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if text.startswith(prefix):
            return text[len(prefix):].strip()
    return text


def _dedupe(examples: list[LabeledText]) -> list[LabeledText]:
    """Drop repeated rows (they would leak across splits) and texts given contradictory labels."""
    labels_of: dict[str, set[str]] = {}
    for example in examples:
        labels_of.setdefault(example.text, set()).add(example.label)
    kept = dict.fromkeys(e for e in examples if len(labels_of[e.text]) == 1)
    return list(kept)


def load(name: str, data_dir: Path) -> Dataset:
    """A catalog task's examples: prefixes stripped, inputs over `max_chars` dropped, labels mapped
    to verbalizer words, duplicates removed; in file order."""
    task = get(name)
    path = source_path(task, data_dir)
    rows = read_bigbench(path).examples if task.kind == "bigbench" else read_vader(path)
    unknown = sorted({row.label for row in rows} - set(task.verbalizers))
    if unknown:
        raise DataError(f"{path}: labels {unknown} have no verbalizer in catalog task {name!r}")
    examples = [
        LabeledText(text, task.verbalizers[row.label])
        for row in rows
        if len(text := _strip(row.text, task.strip_prefixes)) <= task.max_chars and text
    ]
    examples = _dedupe(examples)
    if not examples:
        raise DataError(f"{path}: no example of {name!r} is at most {task.max_chars} characters long")
    return Dataset(task, examples)

"""Demo tasks on the embedded default, built in-process (the store arrives with the serving issue).

Only tasks whose outputs mean something before any training are shown:
- `sentiment`: zero-shot rank classification with the served template (an empty soft prompt is the
  plain backbone; first-token scoring of " negative" / " positive");
- `sentiment-ip`: IP from its description alone (the shared IP nets start at I = 0, so until the
  learning issue trains them this is the description-prefixed zero-shot model);
- `answer`: a generative task, greedy decoding.
All rows of all tasks run as ONE mixed batch.
"""

from __future__ import annotations

import torch

from server.data.spec import TaskSpec
from server.engine import Engine, Request, Result

SENTIMENT = TaskSpec(
    template="Review: {text}\nSentiment:",
    labels=(" negative", " positive"),
    description="Tell me the sentiment of the film review:",
    scoring="first",
    extra={"source": "demo; template from DESIGN.md's SmolLM2 measurement"},
)
ANSWER = TaskSpec(
    template="<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
    description="Answer the question briefly:",
    max_new_tokens=24,
)
EXAMPLES = [
    Request("sentiment", "A wonderful, moving film with superb acting."),
    Request("sentiment-ip", "Dull, tedious and far too long."),
    Request("answer", "What is the capital of France?"),
    Request("sentiment", "A boring mess with a terrible script."),
]


def add_demo_tasks(engine: Engine) -> list[str]:
    empty = torch.zeros(0, engine.backbone.d_model)
    tasks = [
        engine.new_task("sentiment", "prompt_tuning", SENTIMENT, init={"prompt": empty}),
        engine.new_task("answer", "prompt_tuning", ANSWER, init={"prompt": empty}),
    ]
    if engine.form is not None or engine.backbone.is_encoder_decoder:
        tasks.append(engine.new_task("sentiment-ip", "ip", SENTIMENT))
    for task in tasks:
        engine.add_task(task)
    return [t.name for t in tasks]


def format_results(requests: list[Request], results: list[Result]) -> str:
    lines = []
    for req, res in zip(requests, results):
        scores = "" if res.scores is None else "  " + " ".join(f"{k.strip()}={v:.3f}" for k, v in res.scores.items())
        lines.append(f"{req.task:<13} {req.text[:46]!r:<50} -> {res.output.strip()!r}{scores}")
    return "\n".join(lines)

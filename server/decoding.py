"""Token-by-token generation for the generative rows of a batch: greedy or sampled (temperature,
top-p, a per-row seed), stop sequences, log-probabilities, and tokens handed out as they come.

A `Decoding` holds one batch's generative rows after the first pass. Each `advance()` picks every
live row's next token, hands the new text to the row's sink (streaming) and feeds the tokens to the
model for the next step, so a caller can interleave other work between steps (the batcher runs new
batches between them: iteration-level scheduling). `run()` advances to the end.

Reproducible sampling: a row's token is drawn by inverse-CDF from one uniform number per step out
of the row's own generator, seeded by the request (`Sampling.seed`). With the batch-invariant
logits of the engine (equal to 1e-5), the same seed gives the same tokens whatever else shares the
batch — a different draw would need a uniform number landing within 1e-5 of a CDF boundary.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from server.configs import require


@dataclass(frozen=True)
class Sampling:
    """How a generative row picks its tokens (the OpenAI-style request options)."""

    temperature: float = 0.0
    """0: greedy (the most likely token); above 0: sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probabilities reach `top_p` (nucleus)."""
    seed: int | None = None
    """Seed of the row's sampler: the same seed gives the same tokens (None: a random one)."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first of these strings; it is not part of the output."""
    logprobs: int = 0
    """Also record each generated token's log-probability and this many most likely alternatives."""

    def __post_init__(self) -> None:
        require(0 <= self.temperature <= 10, "temperature", "must be in [0, 10]")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]")
        require(len(self.stop) <= 8 and all(self.stop), "stop", "at most 8 non-empty strings")


GREEDY = Sampling()


@dataclass(frozen=True)
class TokenEvent:
    """What a streaming sink receives: new text, or the row's end (`finish_reason` set)."""

    text: str
    token: int | None = None
    logprob: float | None = None
    top: dict[str, float] | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class Generated:
    """A finished generation as another engine (vLLM) hands it back: what a `Decoding` row ends with."""

    text: str
    tokens: list[int]
    finish_reason: str  # "stop" or "length"
    logprobs: list[dict] | None = None


@dataclass
class _Row:
    sampling: Sampling
    max_new: int
    sink: Callable[[TokenEvent], None] | None
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    text: str = ""  # decoded so far (before any stop string)
    sent: int = 0  # characters of `text` handed to the sink
    finish_reason: str | None = None


class Decoding:
    """Generation for g rows after their first pass. `step(None)` gives the first next-token
    logits [g, vocab]; `step(tokens [g])` feeds a token per row and gives the next logits."""

    def __init__(self, step: Callable[[Tensor | None], Tensor], sampling: list[Sampling], max_new: list[int], eos_id: int,
                 decode: Callable[[list[int]], str], sinks: list[Callable[[TokenEvent], None] | None] | None = None) -> None:
        self._step, self.eos_id, self._decode = step, eos_id, decode
        sinks = sinks or [None] * len(sampling)
        self.rows = [
            _Row(s, n, sink, None if s.temperature == 0 else torch.Generator().manual_seed(s.seed if s.seed is not None else secrets.randbits(63)))
            for s, n, sink in zip(sampling, max_new, sinks, strict=True)
        ]
        self._holdback = max((len(stop) for r in self.rows for stop in r.sampling.stop), default=1) - 1
        self._logits = step(None)  # [g, vocab]

    @property
    def done(self) -> bool:
        return all(r.finish_reason is not None for r in self.rows)

    def advance(self) -> list[int]:
        """One token for every live row; returns the rows that finished with it."""
        logits = self._logits.float()  # [g, vocab]
        chosen = logits.argmax(-1)  # [g] greedy by default, on the device
        sampled = [i for i, r in enumerate(self.rows) if r.finish_reason is None and r.sampling.temperature > 0]
        if sampled:
            picks = {i: self._sample(logits[i], self.rows[i]) for i in sampled}
            chosen = chosen.clone()
            chosen[torch.tensor(sampled, device=chosen.device)] = torch.tensor([picks[i] for i in sampled], device=chosen.device)
        want_logprobs = any(r.sampling.logprobs and r.finish_reason is None for r in self.rows)
        logp = logits.log_softmax(-1) if want_logprobs else None
        ids = chosen.tolist()  # one device-to-host copy per step
        finished = []
        for i, (row, token) in enumerate(zip(self.rows, ids)):
            if row.finish_reason is not None:
                continue
            if token == self.eos_id:
                self._finish(row, "stop")
            else:
                self._append(row, token, logp[i] if logp is not None and row.sampling.logprobs else None)
                if row.finish_reason is None and len(row.tokens) >= row.max_new:
                    self._finish(row, "length")
            if row.finish_reason is not None:
                finished.append(i)
        if not self.done:
            self._logits = self._step(chosen)
        return finished

    def run(self) -> None:
        while not self.done:
            self.advance()

    def outcome(self, i: int) -> _Row:
        return self.rows[i]

    # ---- per row ---------------------------------------------------------------------------
    @staticmethod
    def _sample(logits: Tensor, row: _Row) -> int:
        """Inverse-CDF draw from softmax(logits / T) restricted to the top-p nucleus."""
        probs = (logits / row.sampling.temperature).softmax(-1).cpu().double()  # [vocab]
        order = probs.argsort(descending=True)
        sorted_probs = probs[order]
        cumulative = sorted_probs.cumsum(0)
        keep = int((cumulative < row.sampling.top_p).sum()) + 1  # the smallest prefix reaching top_p
        nucleus = sorted_probs[:keep] / sorted_probs[:keep].sum()
        u = float(torch.rand((), generator=row.generator, dtype=torch.float64))
        index = min(int(torch.searchsorted(nucleus.cumsum(0), torch.tensor(u, dtype=torch.float64))), keep - 1)
        return int(order[index])

    def _append(self, row: _Row, token: int, logp: Tensor | None) -> None:
        row.tokens.append(token)
        text = self._decode(row.tokens)
        cut = min((text.find(stop) for stop in row.sampling.stop if stop in text), default=-1)
        record = None
        if logp is not None:
            top = logp.topk(row.sampling.logprobs)
            record = {"token": self._decode([token]), "logprob": float(logp[token]),
                      "top": {self._decode([t]): float(v) for t, v in zip(top.indices.tolist(), top.values.tolist())}}
            row.logprobs.append(record)
        if cut >= 0:
            row.text = text[:cut]
            self._finish(row, "stop")
            return
        row.text = text
        ready = len(text) - self._holdback if row.sampling.stop else len(text)
        if row.sink is not None and ready > row.sent:
            row.sink(TokenEvent(text[row.sent : ready], token, record and record["logprob"], record and record["top"]))
            row.sent = ready

    def _finish(self, row: _Row, reason: str) -> None:
        row.finish_reason = reason
        if row.sink is not None:
            if len(row.text) > row.sent:
                row.sink(TokenEvent(row.text[row.sent :]))
                row.sent = len(row.text)
            row.sink(TokenEvent("", finish_reason=reason))

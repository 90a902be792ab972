"""Bodies of the OpenAI-compatible endpoints (`model` = a task's name, as vLLM and SGLang name adapters).

Fields follow OpenAI's API reference; fields taskserve cannot honour are accepted at their neutral
value and refused otherwise with a 422 that says so (never silently ignored).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.schemas import MAX_NEW_TOKENS
from server.decoding import Sampling


Stop = Annotated[str, Field(min_length=1)]


class _OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=64)
    """The task's name."""
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1)
    """One choice per prompt (taskserve samples once per row)."""
    stop: Stop | Annotated[list[Stop], Field(max_length=8)] | None = None
    """A stop string or up to 8 (each non-empty: `Sampling` refuses an empty one)."""
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float = Field(default=0.0, ge=0, le=0)
    frequency_penalty: float = Field(default=0.0, ge=0, le=0)

    def sampling(self, logprobs: int) -> Sampling:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=stop, logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_OpenAIBody):
    prompt: Annotated[str, Field(max_length=100_000)] | Annotated[list[Annotated[str, Field(max_length=100_000)]], Field(max_length=1024)]
    """One prompt or a list of up to 1024 (one choice per prompt, in order); each is the task's input
    text, bounded in characters as `/v1/predict`'s `text` is (tokens are bounded by max_input_tokens)."""
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: Literal[False] = Field(default=False, description="not supported: must be false")
    best_of: int | None = Field(default=None, ge=1, le=1)
    suffix: None = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: the text ones
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_OpenAIBody):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "taskserve"
    parent: str | None = None
    """The backbone a task runs on (vLLM's convention for adapters); None for the backbone itself."""
    root: str
    """Where the model comes from: the backbone's source, or `taskserve:<method>` for a task."""
    method: str | None = None
    status: str | None = None
    labels: list[str] | None = None
    """A classification task's labels (its completions answer one of them)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

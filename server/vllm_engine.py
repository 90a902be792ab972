"""vLLM as a second engine, for the rows whose modulation is a prefix of input embeddings.

Prompt tuning, TPV and ATTEMPT change nothing inside the backbone: a row is [soft prompt; tokens]
as embeddings. vLLM takes exactly that (`{"prompt_embeds": [n, d]}`, with `enable_prompt_embeds`),
so those rows — and plain backbone rows — run on vLLM's continuous batching and paged KV cache,
while methods that act inside the network (IP's hidden-state scales, PHA's adapters) stay on the
native engine (docs/architecture.md says why they are not a vLLM model plugin).

- Classification (first-token scoring): one step with `logprob_token_ids` = the labels' first tokens
  returns their log-probabilities under the full softmax (`logprobs=20` would not do: a label is
  often outside the top 20). Multi-token labels under `sum`/`mean` stay native (the engine decides).
- Generation: vLLM's own sampler (temperature, top-p, a per-request seed: reproducible, but not the
  native engine's draws), stop strings, the backbone's end-of-sequence id, log-probabilities, text
  streamed to the row's sink as vLLM produces it.

`AsyncLLM` runs its engine core in a separate process; this object owns an asyncio loop on its own
thread, so it serves any caller thread (the server's engine thread hands rows over and goes on with
the next batch): `score` and `generate` return `concurrent.futures.Future`s. Cancelling one aborts
its vLLM request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from server.configs import require
from server.decoding import Generated, Sampling, TokenEvent
from server.errors import BackendFailed

log = logging.getLogger("taskserve.vllm")


@dataclass(frozen=True)
class VllmConfig:
    """How the vLLM engine is started (the `TASKSERVE_VLLM_*` settings)."""

    model: Path
    """The backbone's Hugging Face folder (the one the native engine loads): config, tokenizer, weights."""
    dtype: str = "float32"
    """`float32`, `bfloat16` or `float16`: the serving dtype of the native engine, so both backends agree."""
    device: str = "cpu"
    """`cpu` or `cuda` (vLLM places the model itself; `cuda:N` is chosen with CUDA_VISIBLE_DEVICES)."""
    max_model_len: int | None = None
    """Longest prefix + input + generation in tokens; None: the model's own limit."""
    kv_cache_gb: float | None = None
    """Memory for the paged KV cache in GiB (None: 2 on a CPU; on a GPU `gpu_memory_utilization` decides)."""
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory vLLM may take (weights + KV cache); the native engine's copy of the
    backbone (IP and PHA rows) needs the rest."""
    tensor_parallel_size: int = 1
    """GPUs one backbone is split across (for backbones that outgrow one GPU)."""
    enforce_eager: bool | None = None
    """Skip CUDA graphs / compilation (None: eager on a CPU, where compiling costs ~2 min per start)."""
    max_num_seqs: int = 128
    """Most sequences vLLM runs in one step."""
    cpu_threads: str | None = None
    """CPU cores vLLM's worker binds its OpenMP threads to (`VLLM_CPU_OMP_THREADS_BIND`, e.g. `0-1`);
    None: every core this process may use (vLLM's `auto` keeps one free: ~20 % slower on 2 cores)."""

    def __post_init__(self) -> None:
        require(self.dtype in ("float32", "bfloat16", "float16"), "dtype", "must be float32, bfloat16 or float16")
        require(self.device in ("cpu", "cuda"), "device", "must be cpu or cuda")
        require(self.max_model_len is None or self.max_model_len >= 16, "max_model_len", "must be >= 16 or None")
        require(self.kv_cache_gb is None or self.kv_cache_gb > 0, "kv_cache_gb", "must be > 0 or None")
        require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        require(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        require(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")


def _cpu_list() -> str:
    """The CPUs this process may use as ranges, e.g. `0-1` (what VLLM_CPU_OMP_THREADS_BIND takes)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    ranges, start, prev = [], cpus[0], cpus[0]
    for cur in cpus[1:]:
        if cur != prev + 1:
            ranges.append(f"{start}-{prev}")
            start = cur
        prev = cur
    ranges.append(f"{start}-{prev}")
    return ",".join(ranges)


class VllmEngine:
    """One vLLM `AsyncLLM` on the backbone folder, fed prompt embeddings."""

    name = "vllm"

    def __init__(self, config: VllmConfig, eos_id: int) -> None:
        self.config, self.eos_id = config, eos_id
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-client", daemon=True)
        self._thread.start()
        try:
            self._llm = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    async def _start(self):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        c = self.config
        if c.device == "cpu":
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", c.cpu_threads or _cpu_list())  # the engine-core process reads it
        kv_gb = c.kv_cache_gb if c.kv_cache_gb is not None else (2.0 if c.device == "cpu" else None)
        args = AsyncEngineArgs(
            model=str(c.model),
            tokenizer=str(c.model),
            dtype=c.dtype,
            enable_prompt_embeds=True,
            max_model_len=c.max_model_len,
            kv_cache_memory_bytes=int(kv_gb * 2**30) if kv_gb else None,
            gpu_memory_utilization=c.gpu_memory_utilization,
            tensor_parallel_size=c.tensor_parallel_size,
            enforce_eager=c.enforce_eager if c.enforce_eager is not None else c.device == "cpu",
            max_num_seqs=c.max_num_seqs,
            seed=0,
            disable_log_stats=True,
        )
        log.info("starting vLLM on %s (%s, kv cache %s GiB, tensor parallel %d, eager %s)", c.model, c.dtype, kv_gb, c.tensor_parallel_size, args.enforce_eager)
        return AsyncLLM.from_engine_args(args)

    # ---- what the engine calls (any thread) -------------------------------------------------
    def score(self, embeds: Tensor, token_ids: list[int]) -> Future:
        """embeds [n, d] -> Future[list[float]]: log p(token | prompt) for each of `token_ids`."""
        return asyncio.run_coroutine_threadsafe(self._score(embeds, token_ids), self._loop)

    def generate(self, embeds: Tensor, max_new: int, sampling: Sampling, sink: Callable[[TokenEvent], None] | None = None) -> Future:
        """embeds [n, d] -> Future[Generated]; `sink` receives the text as it is produced."""
        return asyncio.run_coroutine_threadsafe(self._generate(embeds, max_new, sampling, sink), self._loop)

    def close(self) -> None:
        try:
            self._llm.shutdown()
            self._llm = None  # its __del__ shuts down again: let that happen now, not at interpreter exit
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    # ---- on the client loop ------------------------------------------------------------------
    @staticmethod
    def _prompt(embeds: Tensor) -> dict:
        return {"prompt_embeds": embeds.detach().to("cpu").contiguous()}

    async def _run(self, embeds: Tensor, params):
        try:
            async for out in self._llm.generate(self._prompt(embeds), params, request_id=uuid.uuid4().hex):
                yield out
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - vLLM's own failure becomes the row's error
            raise BackendFailed(f"vLLM: {type(exc).__name__}: {exc}") from exc

    async def _score(self, embeds: Tensor, token_ids: list[int]) -> list[float]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=sorted(set(token_ids)), detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for out in self._run(embeds, params):
            final = out
        step = final.outputs[0].logprobs[0]  # token id -> Logprob, the asked ids among them
        return [float(step[t].logprob) for t in token_ids]

    async def _generate(self, embeds: Tensor, max_new: int, sampling: Sampling, sink: Callable[[TokenEvent], None] | None) -> Generated:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=max_new,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            stop_token_ids=[self.eos_id],
            logprobs=sampling.logprobs or None,
            output_kind=RequestOutputKind.DELTA,
        )
        text, tokens, records, reason = [], [], [], None
        async for out in self._run(embeds, params):
            piece = out.outputs[0]
            new = [t for t in piece.token_ids if t != self.eos_id]  # the native engine never counts the end token
            tokens += new
            step_records = [self._record(t, lp, sampling.logprobs) for t, lp in zip(piece.token_ids, piece.logprobs or []) if t != self.eos_id]
            records += step_records
            if piece.text:
                text.append(piece.text)
                if sink is not None:
                    last = step_records[-1] if step_records else None
                    sink(TokenEvent(piece.text, new[-1] if new else None, last and last["logprob"], last and last["top"]))
            reason = piece.finish_reason or reason
        reason = "length" if reason == "length" else "stop"
        if sink is not None:
            sink(TokenEvent("", finish_reason=reason))
        return Generated("".join(text), tokens, reason, records if sampling.logprobs else None)

    @staticmethod
    def _record(token: int, step: dict, top_n: int) -> dict:
        """One generated token's log-probability and its top alternatives, as the native engine writes them."""
        chosen = step[token]
        top = sorted((lp for lp in step.values() if lp.rank is not None and lp.rank <= top_n), key=lambda lp: lp.rank)
        return {"token": chosen.decoded_token or "", "logprob": float(chosen.logprob), "top": {lp.decoded_token or "": float(lp.logprob) for lp in top}}


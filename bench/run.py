"""Throughput of one mixed-task, mixed-method forward vs. one forward per task (HF PEFT).

What is measured (all in ONE process, same backbone weights, dtype, device and input texts):
  (a) ours, one task: B rows of one soft-prompt task (the registered method that serves PEFT's
      PROMPT_TUNING adapters, 100-token prompt), 2-label rank classification scored on the first
      label token, inputs of exactly L tokens;
  (b) ours, the same B rows spread over N = 8 / 32 / 128 such tasks (capped at B), rows shuffled
      so tasks interleave — one forward for the whole batch;
  (c) ours, the B rows spread over tasks of every registered method (rows of methods that read
      the task description also carry it, as the method prescribes), in one pass and as the
      server runs them (`run_each`: split into passes by length where that saves compute);
  (d) HF PEFT as users serve prompt tuning today: one PeftModel holding N PromptTuningConfig
      adapters (num_virtual_tokens=100), requests grouped per task, `set_adapter(name)` and one
      padded forward per group (left padding on decoder-only), label = argmax of the two label tokens' last-position logits
      (we pass `logits_to_keep=1`, PEFT's best case); plus a single adapter over all B rows;
  (e) the same B rows of one task as a generative task (max_new_tokens=4) vs. classification.
Every number is end to end from request text to label/output (tokenization included on both
sides, the same ByT5 byte tokenizer), median of >= 5 timed repetitions after >= 2 warm-ups, the
repetitions interleaved across configurations (background load hits all alike),
`torch.cuda.synchronize()` before every clock read on GPU. PEFT adapters hold exactly our tasks'
prompts, so both sides compute the same function; the `agree` column is the share of rows where
both pick the same label (a check that the comparison is apples to apples, not a test).

Why (DESIGN.md, "Performance"): the engine's claim is that tasks and methods travel as data, so a
batch mixing N tasks costs about what a one-task batch costs (ratio mixed-N / one-task ~ 1), while
grouping by task cuts the batch into N small forwards (PEFT grouped-N falls with N). Rank
classification needs one prompt pass; generation needs one pass per new token.

Models have RANDOM weights at the real shapes (nothing is downloaded): SmolLM2-135M (Llama, 30
layers, d=576, vocab 49152) with a MiniLM-shaped BERT as IP's form module, and T5-base (12+12
layers, d=768). Speed does not depend on the weights' values.

    python -m bench.run [--device cpu|cuda] [--shape smollm2|t5-base|all] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers
from peft import PromptTuningConfig, TaskType, get_peft_model
from transformers import BertConfig, BertModel, ByT5Tokenizer, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from server.backbone import Backbone, FormModule, contiguous_head_input, freeze
from server.data.spec import TaskSpec
from server.engine import Engine, Request, default_methods
from server.methods import Method, method_class, method_for_peft, method_ids
from server.settings import cpu_has_native_bf16

RESULTS = Path(__file__).parent / "results"
PROMPT = method_for_peft("PROMPT_TUNING")  # our counterpart of PEFT's prompt tuning
PLAIN = next(m for m in method_ids() if m not in method_ids(trainable=True))  # the backbone alone (nothing to train)
OTHER_STATIC = next(m for m in method_ids() if method_class(m).static_prefix and m != PROMPT)  # TPV: θ_init + τ, one fixed prompt
N_VIRTUAL = 100
TEMPLATE = "Review: {text}\nSentiment: "
LABELS = ("negative", "positive")  # distinct first bytes, so first-token scoring is meaningful
DESCRIPTION = "Classify the sentiment."
WORDS = "the film was a quiet and moving story but its plot felt thin while actors gave warm sharp dull bright performances".split()


class ByteTokenizer(ByT5Tokenizer):
    """ByT5 (one token per byte). A random model may generate ids past the 384 ByT5 ids of its
    real-size vocabulary: they decode as a byte instead of raising (benchmark only)."""

    def _convert_id_to_token(self, index: int) -> str:
        return super()._convert_id_to_token(index if index < self.offset + 256 else self.offset + index % 256)


def build(shape: str, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, FormModule | None]:
    torch.manual_seed(0)
    if shape == "smollm2":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000, tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=None))
        bert = BertModel(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536))
        form = FormModule(model=freeze(bert).to(device), tokenizer=ByT5Tokenizer())  # fp32, like the real MiniLM
    else:
        model = T5ForConditionalGeneration(T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0))
        form = None  # T5's encoder is IP's form module
    return freeze(model).to(device=device, dtype=dtype), form


def make_texts(n: int, chars: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words: list[str] = []
        while len(" ".join(words)) < chars:
            words.append(rng.choice(WORDS))
        texts.append(" ".join(words)[:chars])
    return texts


def spread(n_rows: int, names: list[str], seed: int) -> list[str]:
    """Row -> task, round robin over `names`, shuffled so tasks interleave in the batch."""
    rows = [names[i % len(names)] for i in range(n_rows)]
    random.Random(seed).shuffle(rows)
    return rows


def clock(fn: Callable[[], object], cuda: bool) -> float:
    """Seconds of one call, the device drained before both clock reads."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timeit(fns: list[Callable[[], object]], warmup: int, reps: int, cuda: bool) -> list[list[float]]:
    """Per fn: `reps` timings after `warmup` calls. Repetitions are interleaved (rep 1 of every fn,
    then rep 2, ...) so drifting background load hits every configuration alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times):
            out.append(clock(fn, cuda))
    return times


def peft_runner(model: torch.nn.Module, tokenizer: ByT5Tokenizer, prompts: list[str], row_task: list[str], label_ids: list[int], is_t5: bool) -> Callable[[], list[str]]:
    """Group rows per adapter; per group: set_adapter, one padded forward, argmax over labels."""
    device, start = model.device, getattr(model.config, "decoder_start_token_id", None)

    def run() -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        for row, name in enumerate(row_task):
            groups[name].append(row)
        out = [""] * len(row_task)
        for name, rows in groups.items():
            model.set_adapter(name)
            enc = tokenizer([prompts[r] for r in rows], padding=True, return_tensors="pt", add_special_tokens=is_t5).to(device)
            if is_t5:
                dec = torch.full((len(rows), 1), start, dtype=torch.long, device=device)
                logits = model(**enc, decoder_input_ids=dec).logits[:, -1]  # [g, vocab]
            else:
                logits = model(**enc, logits_to_keep=1).logits[:, -1]  # [g, vocab]
            for r, best in zip(rows, logits[:, label_ids].argmax(-1).tolist()):
                out[r] = LABELS[best]
        return out

    return run


def hf_runner(model: torch.nn.Module, tokenizer: ByT5Tokenizer, prompts: list[str], label_ids: list[int], is_t5: bool) -> Callable[[], list[str]]:
    """The backbone alone as HF runs it: one padded forward of the rendered rows, argmax over labels
    (the reference for our `plain` rows: what the engine adds per batch)."""
    device, start = model.device, getattr(model.config, "decoder_start_token_id", None)

    def run() -> list[str]:
        enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=is_t5).to(device)
        if is_t5:
            dec = torch.full((len(prompts), 1), start, dtype=torch.long, device=device)
            logits = model(**enc, decoder_input_ids=dec).logits[:, -1]  # [B, vocab]
        else:
            logits = model(**enc, logits_to_keep=1).logits[:, -1]  # [B, vocab]
        return [LABELS[best] for best in logits[:, label_ids].argmax(-1).tolist()]

    return run


def run_shape(shape: str, device: str, batch: int, length: int, warmup: int, reps: int, dtype: torch.dtype | None = None) -> dict:
    cuda = device == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    model, form = build(shape, device, dtype)
    is_t5 = shape == "t5-base"
    peft_base = copy.deepcopy(model)  # PEFT gets its own copy: our engine's hooks are not on it
    contiguous_head_input(peft_base)  # but the LM-head fix is (a fair anchor: without it HF's sliced last position costs an embedding copy per row)
    backbone = Backbone.from_model(model, ByteTokenizer())
    engine = Engine(backbone, form, default_methods(backbone, form))

    spec = TaskSpec(template=TEMPLATE, labels=LABELS, description=DESCRIPTION, scoring="first")
    gen_spec = TaskSpec(template=TEMPLATE, description=DESCRIPTION, max_new_tokens=4)
    chars = length - len(backbone.encode(spec.render("")))  # inputs of exactly `length` tokens
    texts = make_texts(batch, chars)
    prompts = [spec.render(t) for t in texts]
    assert all(len(backbone.encode(p)) == length for p in prompts)
    label_ids = [backbone.encode_target(label)[0] for label in LABELS]

    n_list = sorted({min(n, batch) for n in (8, 32, 128)})
    pt_names = [f"pt-{i}" for i in range(max(n_list))]
    prompt = {}  # task name -> its soft prompt [m, d], copied into the PEFT adapters below
    for i, name in enumerate(pt_names):
        task = engine.tasks.new(name, PROMPT, spec, seed=i)
        prompt[name] = task.params["prompt"].detach().clone()
        engine.tasks.add(task)
    engine.tasks.add(engine.tasks.new("pt-gen", PROMPT, gen_spec, init={"prompt": prompt["pt-0"]}))
    engine.tasks.add(engine.tasks.new("bare", PLAIN, spec))  # the backbone alone: what a row costs without a prompt
    engine.tasks.add(engine.tasks.new("tpv-one", OTHER_STATIC, spec, seed=7))
    methods = method_ids()
    per_method = max(1, min(8, batch // len(methods)))
    mixed_names = []
    for method in methods:
        for i in range(per_method):
            name = f"{method.replace('_', '-')}-{i}"
            engine.tasks.add(engine.tasks.new(name, method, spec, seed=1000 + i))
            mixed_names.append(name)

    # PEFT: the same prompts as our soft-prompt tasks (seq2seq keeps 2n rows; the encoder uses the first n)
    task_type = TaskType.SEQ_2_SEQ_LM if is_t5 else TaskType.CAUSAL_LM
    pmodel = get_peft_model(peft_base, PromptTuningConfig(task_type=task_type, num_virtual_tokens=N_VIRTUAL), adapter_name=pt_names[0])
    for name in pt_names[1:]:
        pmodel.add_adapter(name, PromptTuningConfig(task_type=task_type, num_virtual_tokens=N_VIRTUAL))
    with torch.no_grad():
        for name in pt_names:
            pmodel.prompt_encoder[name].embedding.weight[:N_VIRTUAL].copy_(prompt[name])
    pmodel.eval()
    peft_tok = ByT5Tokenizer(padding_side="right" if is_t5 else "left")

    def ours(row_task: list[str], passes: bool = False) -> Callable[[], list[str]]:
        """`passes`: the server's path (`run_each`), which may split the batch into passes by length."""
        requests = [Request(task, text) for task, text in zip(row_task, texts)]
        if passes:
            return lambda: [r.output for r in engine.run_each(requests)]
        return lambda: [r.output for r in engine.run(requests)]

    configs: list[tuple[str, str, int, Callable[[], list[str]]]] = [("ours/1-task", "a", 1, ours(["pt-0"] * batch))]
    configs += [("ours/plain", "a", 1, ours(["bare"] * batch)), ("ours/1-tpv-task", "a", 1, ours(["tpv-one"] * batch))]
    configs += [(f"ours/mixed-{n}", "b", n, ours(spread(batch, pt_names[:n], seed=n))) for n in n_list]
    configs.append((f"ours/all-methods-{len(mixed_names)}", "c", len(mixed_names), ours(spread(batch, mixed_names, seed=5))))
    configs.append((f"ours/all-methods-{len(mixed_names)}-passes", "c", len(mixed_names), ours(spread(batch, mixed_names, seed=5), passes=True)))
    configs.append(("hf/plain", "d", 1, hf_runner(pmodel.get_base_model(), peft_tok, prompts, label_ids, is_t5)))
    configs.append(("peft/1-adapter", "d", 1, peft_runner(pmodel, peft_tok, prompts, ["pt-0"] * batch, label_ids, is_t5)))
    configs += [(f"peft/grouped-{n}", "d", n, peft_runner(pmodel, peft_tok, prompts, spread(batch, pt_names[:n], seed=n), label_ids, is_t5)) for n in n_list]
    configs.append(("ours/generate-4", "e", 1, ours(["pt-gen"] * batch)))

    runs: dict[str, dict] = {}
    answers: dict[str, list[str]] = {}
    with torch.inference_mode():
        print(f"{shape}: timing {len(configs)} configurations, {warmup} warm-ups + {reps} interleaved repetitions each", flush=True)
        for (name, part, n_tasks, fn), times in zip(configs, timeit([c[3] for c in configs], warmup, reps, cuda)):
            med = statistics.median(times)
            runs[name] = {"part": part, "tasks": n_tasks, "median_s": med, "rows_per_s": batch / med, "times_s": times}
            answers[name] = fn()
            print(f"  {name:22s} {batch / med:9.1f} rows/s  (median {med * 1e3:.1f} ms)", flush=True)
        generated = [r.completion_tokens for r in engine.run([Request("pt-gen", t) for t in texts])]  # new tokens per row
        sched = statistics.median(timeit([lambda: engine.schedule([Request("pt-0", t) for t in texts])], 1, reps, cuda)[0])

    def rate(name: str) -> float:
        return runs[name]["rows_per_s"]

    ratios: dict[str, float] = {"ours-1-task / peft-1-adapter": rate("ours/1-task") / rate("peft/1-adapter")}
    ratios["ours-plain / hf-plain"] = rate("ours/plain") / rate("hf/plain")
    ratios["row cost: prompt-tuning / plain (time over time)"] = rate("ours/plain") / rate("ours/1-task")
    ratios["row cost: tpv / plain (time over time)"] = rate("ours/plain") / rate("ours/1-tpv-task")
    for n in n_list:
        ratios[f"ours-mixed-{n} / ours-1-task"] = rate(f"ours/mixed-{n}") / rate("ours/1-task")
        ratios[f"ours-mixed-{n} / peft-grouped-{n}"] = rate(f"ours/mixed-{n}") / rate(f"peft/grouped-{n}")
    ratios[f"ours-all-methods-{len(mixed_names)} / ours-1-task"] = rate(f"ours/all-methods-{len(mixed_names)}") / rate("ours/1-task")
    ratios["all-methods passes by length / one pass"] = rate(f"ours/all-methods-{len(mixed_names)}-passes") / rate(f"ours/all-methods-{len(mixed_names)}")
    ratios["classify / generate-4"] = rate("ours/1-task") / rate("ours/generate-4")

    agree = {"peft/1-adapter": _agree(answers["ours/1-task"], answers["peft/1-adapter"]), "hf/plain": _agree(answers["ours/plain"], answers["hf/plain"])}
    for n in n_list:
        agree[f"peft/grouped-{n}"] = _agree(answers[f"ours/mixed-{n}"], answers[f"peft/grouped-{n}"])
    described = [m for m in methods if method_class(m).render is not Method.render]  # methods that render more than the template
    extra = {m: len(backbone.encode(engine.tasks.method(m).render(spec, texts[0]))) - length for m in described}
    return {
        "shape": shape,
        "device": device,
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "batch": batch,
        "input_tokens": length,
        "prompt_tokens": N_VIRTUAL,
        "description_tokens": extra,
        "labels": list(LABELS),
        "scoring": "first",
        "warmup": warmup,
        "reps": reps,
        "tasks_per_method_in_the_mix": per_method,
        "schedule_median_s": sched,
        "mean_generated_tokens": sum(generated) / batch,
        "runs": runs,
        "ratios": ratios,
        "agreement_with_peft": agree,
    }


def _agree(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    isa = "native bf16" if cpu_has_native_bf16() else "no native bf16"  # two "AMD EPYC" machines differ here: the table must say which
    return f"{cpu} ({os.cpu_count()} CPUs, {isa}, torch threads {torch.get_num_threads()})"


def tables(res: dict) -> tuple[str, str]:
    """(plain aligned text, Markdown) tables of one shape's results."""
    one, agree = res["runs"]["ours/1-task"]["rows_per_s"], res["agreement_with_peft"]
    head = ["config", "part", "tasks", "rows/s", "median ms", "vs ours 1-task", "vs PEFT same N", "agree"]
    rows = []
    for name, run in res["runs"].items():
        peer = name.replace("ours/mixed-", "peft/grouped-") if name.startswith("ours/mixed-") else ""
        vs_peft = f"{run['rows_per_s'] / res['runs'][peer]['rows_per_s']:.2f}x" if peer else ""
        rows.append([name, run["part"], str(run["tasks"]), f"{run['rows_per_s']:.1f}", f"{run['median_s'] * 1e3:.1f}", f"{run['rows_per_s'] / one:.2f}x", vs_peft, f"{agree[name]:.2f}" if name in agree else ""])
    title = f"{res['shape']} on {res['device_name']} ({res['dtype']}), B={res['batch']}, L={res['input_tokens']} (+{res['prompt_tokens']} prompt)"
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    ratio_lines = [f"  {k:44s} {v:6.2f}x" for k, v in res["ratios"].items()]
    text = "\n".join([title, fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows), "ratios (rows/s over rows/s):", *ratio_lines])
    md = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "| ratio | value |", "|---|---:|", *(f"| {k} | {v:.2f}x |" for k, v in res["ratios"].items())]
    md += ["", f"torch {res['versions']['torch']}, transformers {res['versions']['transformers']}, peft {res['versions']['peft']}; "
           f"median of {res['reps']} after {res['warmup']} warm-ups; ours' schedule (render + tokenize B rows): {res['schedule_median_s'] * 1e3:.1f} ms; "
           "".join(f"{m} rows carry +{n} description tokens; " for m, n in res.get("description_tokens", {}).items()) + f"generate-4 produced {res['mean_generated_tokens']:.1f} new tokens per row."]
    return text, "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=("smollm2", "t5-base", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole CPU run ends in a few minutes")
    parser.add_argument("--batch", type=int, help="rows per batch B (default 128 on cuda, 32 on cpu, 8 with --quick)")
    parser.add_argument("--length", type=int, help="input tokens L (default 128 on cuda, 64 on cpu, 32 with --quick)")
    parser.add_argument("--reps", type=int, help="timed repetitions (>= 5)")
    parser.add_argument("--warmup", type=int, help="warm-up runs (>= 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    batch = args.batch or (8 if args.quick else 128 if cuda else 32)
    length = args.length or (32 if args.quick else 128 if cuda else 64)
    reps, warmup = max(5, args.reps or (10 if cuda else 5)), max(2, args.warmup or (3 if cuda else 2))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    outputs = []
    for shape in ("smollm2", "t5-base") if args.shape == "all" else (args.shape,):
        res = run_shape(shape, args.device, batch, length, warmup, reps, getattr(torch, args.dtype) if args.dtype else None)
        res["quick"] = args.quick
        text, md = tables(res)
        stem = RESULTS / f"{shape}-{args.device}-{res['dtype']}-b{batch}-{stamp}"
        stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        stem.with_suffix(".md").write_text(md)
        outputs.append((text, md, stem))
        gc.collect()  # the engine's hooks hold reference cycles: free this shape's models now
        if cuda:
            torch.cuda.empty_cache()
    for text, md, stem in outputs:
        print(f"\n{text}\n\n{md}\nwritten: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()

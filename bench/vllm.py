"""The vLLM backend vs the native engine vs HF + PEFT grouped per task, 32 prompt-family tasks mixed.

One process, one backbone folder (the real SmolLM2-135M-Instruct: vLLM needs a real config and
tokenizer; speed does not depend on the weights), one dtype, the same rows for every side:
- classification: B rows spread over 32 tasks, 2 labels scored on the first label token —
  (a) `fixed`: 32 tasks of the static-prompt methods (prompt tuning, TPV; 100-token prompts), the three ways: vLLM
  (`prompt_embeds`, `logprob_token_ids`), the native engine (one mixed forward, cached prefixes)
  and HF PEFT (one PROMPT_TUNING adapter per task holding the same prompt, rows grouped per task,
  `set_adapter` + one padded forward per group, PEFT's best case `logits_to_keep=1`);
  (b) `mixed`: 32 tasks of every trained prefix-only method (ATTEMPT too: PEFT has none): vLLM vs native;
- generation: one row per `fixed` task made generative, greedy, N new tokens: tokens/s of vLLM
  (continuous batching), the native engine (one batch decoded token by token) and PEFT (per task
  `generate`).
Repetitions are interleaved across configurations and the median is reported; `agree` is the share
of rows whose label (or generated text) equals the native engine's (a check, not a test). The native
configurations run a second time after vLLM is shut down (`, vllm closed`): vLLM's idle engine process
takes CPU time from whatever runs beside it.

    python -m bench.vllm [--dtype float32|bfloat16] [--rows 64] [--new-tokens 32] [--reps 5]
    (`make bench-vllm` runs it in .venv-vllm)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.run import device_name, timeit
from server.data.spec import TaskSpec
from server.engine import Engine, Request
from server.factory import build_engine
from server.methods import method_class, method_ids
from server.settings import Settings

RESULTS = Path(__file__).parent / "results"
CLASSIFY = TaskSpec(template="Review: {text}\nSentiment:", labels=("negative", "positive"), description="Tell me the sentiment of the film review:", scoring="first")
GENERATE = TaskSpec(template="{text}", description="Continue the text:", max_new_tokens=32)
WORDS = "the film was a wonderful moving story with superb acting but far too long and the script felt dull in places".split()


def make_texts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def spread(n: int, methods: list[str]) -> list[str]:
    """n tasks' methods, round robin."""
    return [methods[i % len(methods)] for i in range(n)]


def add_tasks(engines: list[Engine], prefix: str, methods: list[str], spec: TaskSpec) -> list[str]:
    """Tasks made by the first engine (prompts moved off their init), added to every engine."""
    names = []
    for i, method in enumerate(methods):
        task = engines[0].tasks.new(f"{prefix}-{i}", method, spec, seed=i)
        with torch.no_grad():
            for p in task.params.values():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.3 * p.std())
        for engine in engines:
            engine.tasks.add(task)
        names.append(task.name)
    return names


def peft_model(engine: Engine, names: list[str]):
    """One PeftModel with one PROMPT_TUNING adapter per fixed-prompt task, holding its very prompt."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    prompts = {n: engine.tasks.method(engine.tasks[n].method, engine.tasks[n].module_version).fixed_prompt(engine.tasks[n]) for n in names}
    length = next(iter(prompts.values())).shape[0]
    config = lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=length)  # noqa: E731
    model = get_peft_model(copy.deepcopy(engine.backbone.model), config(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config())
    with torch.no_grad():
        for name, prompt in prompts.items():
            model.prompt_encoder[name].embedding.weight.copy_(prompt.to(model.dtype))
    model.eval()
    tokenizer = copy.deepcopy(engine.backbone.tokenizer)
    tokenizer.padding_side = "left"
    return model, tokenizer


def peft_classify(engine: Engine, model, tokenizer, rows: list[Request]):
    labels = engine.tasks[rows[0].task].spec.labels
    first = [engine.backbone.label_ids(label, CLASSIFY.template)[0] for label in labels]

    def run() -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            groups[r.task].append(i)
        out = [""] * len(rows)
        with torch.no_grad():
            for task, index in groups.items():
                model.set_adapter(task)
                enc = tokenizer([engine.tasks[task].spec.render(rows[i].text) for i in index], padding=True, return_tensors="pt", add_special_tokens=False)
                logits = model(**enc, logits_to_keep=1).logits[:, -1]  # [g, vocab]
                for i, best in zip(index, logits[:, first].argmax(-1).tolist()):
                    out[i] = labels[best]
        return out

    return run


def peft_generate(engine: Engine, model, tokenizer, rows: list[Request], new_tokens: int):
    def run() -> list[str]:
        out = []
        with torch.no_grad():
            for r in rows:  # one task per row: the grouped way is one generate per task
                model.set_adapter(r.task)
                enc = tokenizer([engine.tasks[r.task].spec.render(r.text)], return_tensors="pt", add_special_tokens=False)
                ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=engine.backbone.pad_id)
                out.append(engine.backbone.decode(ids[0, enc["input_ids"].shape[1]:].tolist()))
        return out

    return run


def markdown(result: dict) -> str:
    """The run as the Markdown table of docs/performance.md."""
    lines = [f"### vLLM backend vs native vs HF PEFT on {result['device_name']} ({result['dtype']})", "",
             f"{result['rows']} classification rows over {result['tasks']['fixed']} tasks, {result['tasks']['generate']} rows x {result['new_tokens']} "
             f"greedy new tokens; median of {result['reps']} after {result['warmup']} warm-up; vllm {result['versions']['vllm']}, torch {result['versions']['torch']}; "
             f"load average before {result['load_average_before'][0]:.1f}, after {result['load_average_after'][0]:.1f}.", "",
             "| configuration | rate | median s | agrees with native |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {run['rate']:.1f} {run['unit']} | {run['median_s']:.3f} | {run['agree_with_native']:.2f} |" for name, run in result["runs"].items()]
    lines += ["", "| ratio (rate over rate) | value |", "|---|---:|", *(f"| {k} | {v:.2f}x |" for k, v in result["ratios"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, default=64, help="classification rows per batch")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--render", type=Path, help="only print the Markdown table of an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text())), end="")
        return 0
    load_before = os.getloadavg()

    settings = Settings(backend="vllm", dtype=args.dtype, seed_store=None, embedded_worker=False)
    hybrid = build_engine(settings)  # prompt-family rows on vLLM
    native = Engine(hybrid.backbone, hybrid.runner.form)  # the same backbone, every row here (cached prefixes)
    engines = [native, hybrid]
    # fixed prompts: the methods whose prompt is static (PEFT PROMPT_TUNING holds it); every trained prefix-only method for `mixed`
    static = [m for m in method_ids(trainable=True) if method_class(m).static_prefix]
    prefix = [m for m in method_ids(trainable=True) if method_class(m).prefix_only]
    fixed = add_tasks(engines, "fixed", spread(32, static), CLASSIFY)
    mixed = add_tasks(engines, "mixed", spread(32, prefix), CLASSIFY)
    writers = add_tasks(engines, "gen", spread(32, static), GENERATE)
    texts = make_texts(args.rows, 40, seed=0)
    fixed_rows = [Request(fixed[i % len(fixed)], t) for i, t in enumerate(texts)]
    mixed_rows = [Request(mixed[i % len(mixed)], t) for i, t in enumerate(texts)]
    gen_rows = [Request(n, t, max_new_tokens=args.new_tokens) for n, t in zip(writers, make_texts(len(writers), 12, seed=1))]
    model, tokenizer = peft_model(native, fixed + writers)

    outputs: dict[str, list[str]] = {}

    def keep(name: str, fn):
        def run():
            outputs[name] = [r.output if hasattr(r, "output") else r for r in fn()]
        return run

    configs = {
        "classify fixed / vllm": keep("classify fixed / vllm", lambda: hybrid.run_each(fixed_rows)),
        "classify fixed / native": keep("classify fixed / native", lambda: native.run(fixed_rows)),
        "classify fixed / peft grouped": keep("classify fixed / peft grouped", peft_classify(native, model, tokenizer, fixed_rows)),
        "classify mixed / vllm": keep("classify mixed / vllm", lambda: hybrid.run_each(mixed_rows)),
        "classify mixed / native": keep("classify mixed / native", lambda: native.run(mixed_rows)),
        "generate / vllm": keep("generate / vllm", lambda: hybrid.run_each(gen_rows)),
        "generate / native": keep("generate / native", lambda: native.run(gen_rows)),
        "generate / peft grouped": keep("generate / peft grouped", peft_generate(native, model, tokenizer, gen_rows, args.new_tokens)),
    }
    times = dict(zip(configs, timeit(list(configs.values()), args.warmup, args.reps, cuda=False)))
    gen_tokens = {name: sum(len(hybrid.backbone.tokenizer.encode(o, add_special_tokens=False)) for o in outputs[name]) for name in configs if name.startswith("generate")}
    runs = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        workload, side = name.rsplit(" / ", 1)
        reference = outputs[f"{workload} / native"]
        agree = sum(a == b for a, b in zip(outputs[name], reference)) / len(reference)
        unit = ("tokens/s", gen_tokens[name] / median) if name.startswith("generate") else ("rows/s", len(outputs[name]) / median)
        runs[name] = {"median_s": median, "times_s": ts, "unit": unit[0], "rate": unit[1], "agree_with_native": agree}
    # vLLM's engine process polls while idle; the native rows above ran beside it. Run them again with
    # vLLM shut down (a native-only server has no such process) and report both.
    hybrid.close()
    native_only = {name: fn for name, fn in configs.items() if name.endswith(" / native")}
    for name, ts in zip(native_only, timeit(list(native_only.values()), args.warmup, args.reps, cuda=False)):
        median = statistics.median(ts)
        rate = gen_tokens[name] / median if name.startswith("generate") else len(outputs[name]) / median
        runs[f"{name}, vllm closed"] = {**runs[name], "median_s": median, "times_s": ts, "rate": rate}
    ratios = {f"{w} vllm / {o}": runs[f"{w} / vllm"]["rate"] / runs[f"{w} / {o}"]["rate"]
              for w in ("classify fixed", "classify mixed", "generate") for o in ("native", "native, vllm closed", "peft grouped") if f"{w} / {o}" in runs}
    result = {
        "device": "cpu", "device_name": device_name("cpu"), "dtype": args.dtype, "rows": args.rows, "new_tokens": args.new_tokens,
        "reps": args.reps, "warmup": args.warmup, "tasks": {"fixed": len(fixed), "mixed": len(mixed), "generate": len(writers)},
        "runs": runs, "ratios": ratios, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "versions": {"torch": torch.__version__, "vllm": __import__("vllm").__version__},
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"vllm-cpu-{args.dtype}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"{result['device_name']}, {args.dtype}, {args.rows} classification rows, {len(writers)} x {args.new_tokens} new tokens; median of {args.reps}")
    print(f"{'config':38s} {'rate':>12s} {'median s':>9s} {'agree':>6s}")
    for name, run in runs.items():
        print(f"{name:38s} {run['rate']:8.1f} {run['unit']:>3s} {run['median_s']:9.3f} {run['agree_with_native']:6.2f}")
    for name, value in ratios.items():
        print(f"  {name:48s} {value:6.2f}x")
    print(f"load average before {load_before}, after {result['load_average_after']}\nwrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

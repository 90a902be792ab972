"""The `taskserve` command line.

Subcommands: `serve` (the HTTP API over the store, with an embedded training worker), `worker`
(training jobs), `train` / `eval` (multi-task training and evaluation on the real data), `data fetch`,
`store export|import` (store seeds such as the demo store), `tasks` / `jobs` / `predict` (a running
server, over the client), `prepare` (the offline models), `bench` (the benchmark harness of a source
checkout). Common options: --backbone, --device, --dtype, --store (or the TASKSERVE_* variables).
Method choices come from the method registry (plugins named in TASKSERVE_PLUGINS included).
"""

from __future__ import annotations

import argparse
import sys
import time

from server.errors import InvalidRequest, NotFound, TaskservError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", help="smollm2 (default), a local HF folder or a hub id [TASKSERVE_BACKBONE]")
    parser.add_argument("--device", help="auto | cpu | cuda[:N] [TASKSERVE_DEVICE]")
    parser.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 [TASKSERVE_DTYPE]")
    parser.add_argument("--store", help="adapter store folder [TASKSERVE_STORE]")


def _settings(args: argparse.Namespace):
    from server.settings import Settings

    overrides = {k: v for k in ("backbone", "device", "dtype", "store") if (v := getattr(args, k, None))}
    return Settings(**overrides)


def cmd_predict(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            result = client.predict(args.task, args.text, max_new_tokens=args.max_new_tokens)
        except NotFound as exc:
            print(f"unknown task {args.task!r} ({exc.message})", file=sys.stderr)
            return 2
    scores = "" if result.scores is None else "  " + " ".join(f"{k}={v:.3f}" for k, v in result.scores.items())
    print(f"{result.task} v{result.task_version} {args.text[:46]!r} -> {result.output!r}{scores}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api import create_app

    settings = _settings(args)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, timeout_graceful_shutdown=30)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from server.worker import main as worker_main

    return worker_main(_settings(args))


def cmd_store(args: argparse.Namespace) -> int:
    from pathlib import Path

    from adapters_store.store import Store

    settings = _settings(args)
    store = Store(settings.store, settings.db_url)
    try:
        if args.action == "export":
            done = store.export(Path(args.path), args.tasks.split(",") if args.tasks else None)
        else:
            done = store.import_from(Path(args.path))
    finally:
        store.close()
    for item in done:
        print(item)
    print(f"{args.action}ed {len(done)} artifacts", file=sys.stderr)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from server.data.sources import main as fetch_main

    data_dir = args.data_dir or str(_settings(args).cache_dir / "data")
    return fetch_main(["--data-dir", data_dir, *(["--index-url", args.index_url] if args.index_url else [])])


class _ProgressLine:
    """One self-overwriting progress line on stderr (a bar without a dependency)."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, stage: str, p) -> None:
        width = 30
        filled = int(width * p.step / max(1, p.total))
        rate = (time.monotonic() - self.started) / max(1, p.step)
        extra = f" val={p.metrics['val_accuracy']:.3f}" if p.metrics else ""
        end = "\n" if p.step == p.total or p.metrics else ""
        print(f"\r{stage:<10} [{'#' * filled}{'.' * (width - filled)}] {p.step}/{p.total} loss={p.loss:.4f}{extra} ({rate:.2f} s/step)", end=end, file=sys.stderr, flush=True)
        if p.step == p.total:
            self.started = time.monotonic()


def _task_names(value: str | None, default) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()] if value else [t.name for t in default]


def _write_json(path: str, payload) -> None:
    import json
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    print(f"wrote {out}", file=sys.stderr)


def _experiment_setup(args: argparse.Namespace, names: list[str]):
    from adapters_store.store import Store
    from server.factory import build_engine
    from server.store_sync import attach
    from server.training.experiments import load_task_data

    settings = _settings(args)
    torch_seed(args.seed)
    engine = build_engine(settings, training=True)
    store = Store(settings.store, settings.db_url)
    attach(store, engine)
    data_dir = settings.cache_dir / "data"
    data = {n: load_task_data(n, data_dir, seed=args.seed, max_test=args.eval_rows) for n in names}
    for d in data.values():
        if args.max_train:
            d.train = d.train[: args.max_train]
    return settings, engine, store, data


def torch_seed(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _train_config(args: argparse.Namespace):
    from server.training.trainer import TrainConfig

    defaults = TrainConfig()
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr or defaults.lr, prompt_lr=args.prompt_lr, prompt_lr_relative=args.prompt_lr_relative or defaults.prompt_lr_relative,
        eval_every=args.eval_every or max(10, args.steps // 5), eval_rows=args.val_rows, seed=args.seed,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from server.data import catalog
    from server.methods import method_ids
    from server.methods.recipe import served_name
    from server.training.experiments import multitask

    names = _task_names(args.tasks, catalog.MIX)
    settings, engine, store, data = _experiment_setup(args, names)
    methods = method_ids(trainable=True) if args.method == "all" else [args.method]  # registry order: ATTEMPT's sources come first
    checkpoints = Path(args.checkpoints) if args.checkpoints else settings.store / "checkpoints" / "multitask"
    for method in methods:
        if args.skip_done and all(store.registry.exists(served_name(n, method)) for n in names):
            print(f"{method}: its multi-task tasks are published already; skipped", file=sys.stderr)
            continue
        overrides = _config_for(method, args.config)
        if overrides:
            _fresh_module(engine, method, overrides)
        report = multitask(engine, store, method, names, data, _train_config(args), eval_rows=args.eval_rows, on_progress=_ProgressLine(),
                           publish=not args.no_publish, checkpoints=None if args.no_publish else checkpoints)
        print(f"{'task':<18} {'test acc':>9} {'test F1':>8} {'n':>5}")
        for name, metrics in report["tasks"].items():
            test = metrics["test"]
            print(f"{name:<18} {test['accuracy']:>9.3f} {test['f1_macro']:>8.3f} {test['n']:>5}")
        mean = sum(m["test"]["accuracy"] for m in report["tasks"].values()) / len(report["tasks"])
        print(f"{'average':<18} {mean:>9.3f}   ({method}, {report['train_seconds']} s, module v{report.get('module_version', '-')})")
        if args.out:
            _write_json(args.out.replace("{method}", method), report)
    store.close()
    return 0


def _config_for(method: str, items: list[str]) -> list[str]:
    """The --config items for `method`: unqualified ones (KEY=VALUE) apply to every method trained,
    qualified ones (METHOD.KEY=VALUE) to that method only."""
    out = []
    for item in items:
        key = item.partition("=")[0]
        scope, dot, field = key.rpartition(".")
        if not dot:
            out.append(item)
        elif scope == method:
            out.append(item[len(scope) + 1 :])
    return out


def _fresh_module(engine, method: str, overrides: list[str]) -> None:
    """Replace the method's current module by a freshly initialised one with config overrides
    (KEY=VALUE; values parsed as JSON, else kept as strings); multi-task training then starts from it."""
    import dataclasses
    import json

    current = engine.tasks.method(method)
    changes = {}
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            changes[key] = json.loads(value)
        except ValueError:
            changes[key] = value
    try:
        config = dataclasses.replace(current.config, **changes)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"--config: {exc}") from None
    engine.tasks.set_module(method, 0, type(current)(engine.dims, config=config, embedding=engine.backbone.embedding.weight))


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from server.data import catalog
    from server.training import experiments

    default = catalog.HELD_OUT if args.few_shot else catalog.MIX
    names = _task_names(args.tasks, default)
    _, engine, store, data = _experiment_setup(args, names)
    report: dict = {"tasks": names, "seed": args.seed}
    if args.zero_shot:
        report["zero_shot"] = experiments.zero_shot(engine, data, args.eval_rows)
    report["served"] = experiments.evaluate_served(engine, data, args.eval_rows)
    if args.few_shot:
        import json
        from pathlib import Path

        from server.training.trainer import TrainConfig

        ks = [int(k) for k in args.few_shot.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        methods = args.methods.split(",")
        partial = Path(f"{args.out}.partial.jsonl") if args.out else None
        earlier = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()] if partial and partial.exists() else []
        request = "catalog" if args.catalog_request else "default"
        earlier = [r for r in earlier if r.get("request", "catalog") == request]  # a rerun resumes the same sweep

        def log(r: dict) -> None:  # one line per run, and a JSON line per run so a long sweep is never lost (and resumes)
            print(f"  {r['task']:<16} {r['method']:<14} k={r['k']:<3} seed={r['seed']} acc={r['test']['accuracy']:.3f} {r['chosen']} ({r['seconds']} s)", file=sys.stderr, flush=True)
            if partial:
                with partial.open("a") as f:
                    f.write(json.dumps(r, default=str) + "\n")

        config = TrainConfig.for_job(steps=args.few_shot_steps, batch_size=args.batch_size, lr=args.lr, prompt_lr=args.prompt_lr, seed=args.seed)
        if args.prompt_lr_relative:
            config = dataclasses.replace(config, prompt_lr_relative=args.prompt_lr_relative)
        done = {(r["task"], r["method"], r["k"], r["seed"]) for r in earlier}
        new = experiments.few_shot_transfer(engine, methods, data, ks, seeds, config, args.eval_rows, on_result=log,
                                            default_request=not args.catalog_request, folds=args.folds, done=done)
        report["few_shot"] = earlier + new
        report["few_shot_summary"] = experiments.summarize_few_shot(report["few_shot"])
    methods_served = sorted({m for per in report["served"].values() for m in per})
    print(f"{'task':<18} {'zero-shot':>10} " + " ".join(f"{m:>13}" for m in methods_served))
    for name in names:
        zs = report.get("zero_shot", {}).get(name, {}).get("accuracy", float("nan"))
        cells = " ".join(f"{report['served'].get(name, {}).get(m, {}).get('accuracy', float('nan')):>13.3f}" for m in methods_served)
        print(f"{name:<18} {zs:>10.3f} {cells}")
    for task, methods in report.get("few_shot_summary", {}).items():
        for method, ks in methods.items():
            cells = "  ".join(f"k={k}: {m:.3f}±{s:.3f}" for k, (m, s) in sorted(ks.items()))
            print(f"{task:<18} {method:<14} {cells}")
    if args.out:
        _write_json(args.out, report)
    store.close()
    return 0


def _client(args: argparse.Namespace):
    import os

    from client import Client

    settings = _settings(args)
    url = args.url or os.environ.get("TASKSERVE_URL") or f"http://{settings.host}:{settings.port}"
    return Client(url, api_key=settings.api_key)


def cmd_tasks(args: argparse.Namespace) -> int:
    import json

    with _client(args) as client:
        if args.action == "list":
            for task in client.tasks():
                print(f"{task['name']:<32} {task['method']:<14} v{task['version']}  {task['status']:<8} {'served' if task['served'] else '-'}")
        elif args.action == "show":
            print(json.dumps(client.task(args.name), indent=2))
        elif args.action == "create":
            fields = {
                "description": args.description, "template": args.template, "scoring": args.scoring,
                "labels": [label.strip() for label in args.labels.split(",")] if args.labels else None,
                "examples": read_examples(args.examples) if args.examples else None,
                "train": {"steps": args.steps} if args.steps else None,
            }
            created = client.create_task(args.name, args.method, **fields)
            task = created["task"]
            print(f"{task['name']} ({task['method']}): {task['status']}" + (f", training job {created['job']}" if created.get("job") else ""))
        else:
            client.delete_task(args.name)
            print(f"deleted {args.name}")
    return 0


def read_examples(path: str) -> list[dict[str, str]]:
    """Few-shot examples from a .jsonl file (one {"text", "label" | "target"} object per line) or
    a .csv file with a header naming `text` and `label` (or `target`) columns."""
    import csv
    import json
    from pathlib import Path

    file = Path(path)
    try:
        if file.suffix == ".csv":
            with file.open(newline="") as handle:
                rows = [dict(row) for row in csv.DictReader(handle)]
        else:
            rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"--examples: cannot read {path} ({exc})") from None
    keep = ("text", "label", "target")
    return [{k: str(v) for k, v in row.items() if k in keep and v not in (None, "")} for row in rows]


def cmd_jobs(args: argparse.Namespace) -> int:
    import json

    with _client(args) as client:
        print(json.dumps(client.job(args.id), indent=2))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from server import assets

    return assets.main([])


def cmd_bench(args: argparse.Namespace) -> int:
    """The harness lives in the source checkout's bench/ (it needs the test extra's peft), not in
    the installed package: run it as `python -m bench.run` from there."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("bench.run") is None:
        print("taskserve bench runs bench/run.py of a source checkout; run it from the repository root", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "bench.run", *args.bench_args])


def build_parser() -> argparse.ArgumentParser:
    from server.methods import method_ids

    parser = argparse.ArgumentParser(prog="taskserve", description="Multi-task inference server over one frozen backbone.")
    sub = parser.add_subparsers(dest="command", required=True)
    predict = sub.add_parser("predict", help="predict one row with any task of a running server (TASKSERVE_URL)")
    predict.add_argument("--task", required=True)
    predict.add_argument("--max-new-tokens", type=int, default=None)
    predict.add_argument("--url", help="server URL (default TASKSERVE_URL or http://TASKSERVE_HOST:TASKSERVE_PORT)")
    predict.add_argument("text")
    predict.set_defaults(func=cmd_predict)
    serve = sub.add_parser("serve", help="run the HTTP API on TASKSERVE_HOST:TASKSERVE_PORT over the store (TASKSERVE_STORE)")
    _common(serve)
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="run queued training jobs from the store's registry until SIGTERM")
    _common(worker)
    worker.set_defaults(func=cmd_worker)
    store_cmd = sub.add_parser("store", help="export ready tasks (and the shared modules they use) as a store seed, or import one")
    store_cmd.add_argument("action", choices=("export", "import"))
    store_cmd.add_argument("path", help="the seed folder (export: created)")
    store_cmd.add_argument("--store", help="adapter store folder [TASKSERVE_STORE]")
    store_cmd.add_argument("--tasks", help="export only these comma-separated tasks")
    store_cmd.set_defaults(func=cmd_store)
    data = sub.add_parser("data", help="fetch the offline training data (BIG-bench, VADER) into the cache")
    data.add_argument("action", choices=("fetch",))
    data.add_argument("--data-dir", help="default: TASKSERVE_CACHE_DIR/data")
    data.add_argument("--index-url", help="package index (default: PIP_INDEX_URL or PyPI)")
    data.set_defaults(func=cmd_data)
    for name, helptext in (("train", "multi-task training of a method's shared modules on catalog tasks; publishes them into the store"),
                           ("eval", "per-task test metrics: zero-shot baseline, served tasks, few-shot transfer")):
        cmd = sub.add_parser(name, help=helptext)
        _common(cmd)
        cmd.add_argument("--tasks", help="comma-separated catalog task names (train: the mix; eval --few-shot: the held-out tasks)")
        cmd.add_argument("--steps", type=int, default=300)
        cmd.add_argument("--batch-size", type=int, default=8)
        cmd.add_argument("--lr", type=float)
        cmd.add_argument("--prompt-lr", type=float, help="soft-prompt learning rate, absolute (default: relative to the embedding RMS)")
        cmd.add_argument("--prompt-lr-relative", type=float, help="soft-prompt learning rate in units of the embedding RMS (default 0.1)")
        cmd.add_argument("--eval-every", type=int)
        cmd.add_argument("--val-rows", type=int, default=100, help="validation rows per task per evaluation")
        cmd.add_argument("--eval-rows", type=int, default=300, help="test rows per task")
        cmd.add_argument("--max-train", type=int, help="cap on training rows per task")
        cmd.add_argument("--seed", type=int, default=0)
        cmd.add_argument("--out", help="write the report as JSON here (train: `{method}` in the path is replaced)")
    train_cmd, eval_cmd = sub.choices["train"], sub.choices["eval"]
    train_cmd.add_argument("--method", required=True, choices=[*method_ids(trainable=True), "all"], help="a method, or all of them in registry order")
    train_cmd.add_argument("--no-publish", action="store_true", help="report only; publish nothing")
    train_cmd.add_argument("--config", action="append", default=[], metavar="[METHOD.]KEY=VALUE", help="start from a fresh shared module with this config field changed (repeatable; METHOD. limits it to one method)")
    train_cmd.add_argument("--checkpoints", help="where stages checkpoint; rerunning the same command resumes (default: STORE/checkpoints/multitask)")
    train_cmd.add_argument("--skip-done", action="store_true", help="skip methods whose <task>-<method> tasks the store holds already (resuming --method all)")
    train_cmd.set_defaults(func=cmd_train)
    eval_cmd.add_argument("--zero-shot", action="store_true", help="also score the backbone alone with the description")
    eval_cmd.add_argument("--few-shot", help="comma-separated k values: few-shot transfer runs on the tasks")
    eval_cmd.add_argument("--seeds", default="0,1,2")
    eval_cmd.add_argument("--methods", default=",".join(method_ids(trainable=True)), help="comma-separated methods for --few-shot (default: every trainable one)")
    eval_cmd.add_argument("--few-shot-steps", type=int, default=60, help="training steps of each few-shot task (a job's default)")
    eval_cmd.add_argument("--folds", type=int, default=2, help="cross-validation folds of each few-shot task (a job's default)")
    eval_cmd.add_argument("--catalog-request", action="store_true", help="pose few-shot tasks with the catalog's template instead of a default request's")
    eval_cmd.set_defaults(func=cmd_eval)
    tasks = sub.add_parser("tasks", help="list / show / create / delete tasks on a running server (TASKSERVE_URL)")
    tasks.add_argument("action", choices=("list", "show", "create", "delete"))
    tasks.add_argument("name", nargs="?")
    tasks.add_argument("--url", help="server URL (default TASKSERVE_URL or http://TASKSERVE_HOST:TASKSERVE_PORT)")
    tasks.add_argument("--method", choices=method_ids(), help="create: the task's method")
    tasks.add_argument("--examples", metavar="FILE", help="create: few-shot examples (.jsonl or .csv with text,label columns): a training job")
    tasks.add_argument("--labels", help="create: comma-separated labels (a classification task)")
    tasks.add_argument("--description", help="create: what the task is, in words")
    tasks.add_argument("--template", help="create: input template with {text}")
    tasks.add_argument("--scoring", choices=("first", "sum", "mean"), help="create: how labels are scored")
    tasks.add_argument("--steps", type=int, help="create: training steps of the job")
    tasks.set_defaults(func=cmd_tasks)
    jobs = sub.add_parser("jobs", help="show a training job on a running server")
    jobs.add_argument("action", choices=("show",))
    jobs.add_argument("id")
    jobs.add_argument("--url")
    jobs.set_defaults(func=cmd_jobs)
    prepare = sub.add_parser("prepare", help="convert / locate the offline default models")
    prepare.set_defaults(func=cmd_prepare)
    bench = sub.add_parser("bench", help="run the benchmark harness (arguments go to bench/run.py)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from server.methods import load_plugins
    from server.settings import Settings

    load_plugins(Settings().plugin_modules)  # plugin methods are valid choices
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is cmd_tasks and args.action in ("show", "create", "delete") and not args.name:
        parser.error(f"tasks {args.action} needs a task name")
    if args.func is cmd_tasks and args.action == "create" and not args.method:
        parser.error("tasks create needs --method")
    try:
        return args.func(args)
    except TaskservError as exc:
        print(f"error ({exc.type}): {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

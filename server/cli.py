"""The `taskserve` command line.

Subcommands today: `serve` (the HTTP API over the store), `demo` (what `make serve` runs until the
serving issue is finished), `predict` (one row against a demo task), `prepare` (convert/locate the
offline models), `bench` (bench/run.py). `worker`, `train`, `eval` and `tasks` arrive with the
serving and learning issues.
Common options: --backbone, --device, --dtype (or the TASKSERVE_* environment variables).
"""

from __future__ import annotations

import argparse
import sys
import time

from server.errors import TaskservError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", help="smollm2 (default), a local HF folder or a hub id [TASKSERVE_BACKBONE]")
    parser.add_argument("--device", help="auto | cpu | cuda[:N] [TASKSERVE_DEVICE]")
    parser.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 [TASKSERVE_DTYPE]")
    parser.add_argument("--store", help="adapter store folder [TASKSERVE_STORE]")


def _settings(args: argparse.Namespace):
    from server.settings import Settings

    overrides = {k: v for k in ("backbone", "device", "dtype", "store") if (v := getattr(args, k, None))}
    return Settings(**overrides)


def _engine(args: argparse.Namespace):
    from server import assets
    from server.backbone import load_backbone, load_form_module
    from server.engine import Engine

    settings = _settings(args)
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    start = time.perf_counter()
    backbone = load_backbone(assets.resolve_backbone(settings.backbone, settings.cache_dir), device=device, dtype=dtype)
    form = None
    if not backbone.is_encoder_decoder:
        form = load_form_module(assets.resolve_form_module(settings.form_module, settings.cache_dir), device=device)
    engine = Engine(backbone, form)
    print(f"loaded {settings.backbone} ({backbone.kind}, d={backbone.d_model}, {backbone.n_layers} layers, "
          f"fingerprint {backbone.fingerprint}) on {device}/{str(dtype).removeprefix('torch.')} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return engine


def cmd_demo(args: argparse.Namespace) -> int:
    from server.demo import EXAMPLES, add_demo_tasks, format_results

    engine = _engine(args)
    add_demo_tasks(engine)
    start = time.perf_counter()
    results = engine.run(EXAMPLES)
    print(format_results(EXAMPLES, results))
    print(f"{len(EXAMPLES)} rows over {len({r.task for r in EXAMPLES})} tasks in one batch: {time.perf_counter() - start:.2f} s", file=sys.stderr)
    print("The HTTP server (taskserve serve) arrives with the serving issue.", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from server.demo import add_demo_tasks, format_results
    from server.engine import Request

    engine = _engine(args)
    names = add_demo_tasks(engine)
    if args.task not in names:
        print(f"unknown task {args.task!r}; demo tasks: {', '.join(names)}", file=sys.stderr)
        return 2
    requests = [Request(args.task, args.text, max_new_tokens=args.max_new_tokens)]
    print(format_results(requests, engine.run(requests)))
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
        else:
            client.delete_task(args.name)
            print(f"deleted {args.name}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    import json

    with _client(args) as client:
        print(json.dumps(client.job(args.id), indent=2))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from server import assets

    return assets.main([])


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.run import main as bench_main

    return bench_main(args.bench_args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskserve", description="Multi-task inference server over one frozen backbone.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="load the default backbone and run demo tasks in one mixed batch")
    _common(demo)
    demo.set_defaults(func=cmd_demo)
    predict = sub.add_parser("predict", help="predict one row with a demo task")
    _common(predict)
    predict.add_argument("--task", required=True)
    predict.add_argument("--max-new-tokens", type=int, default=None)
    predict.add_argument("text")
    predict.set_defaults(func=cmd_predict)
    serve = sub.add_parser("serve", help="run the HTTP API on TASKSERVE_HOST:TASKSERVE_PORT over the store (TASKSERVE_STORE)")
    _common(serve)
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="run queued training jobs from the store's registry until SIGTERM")
    _common(worker)
    worker.set_defaults(func=cmd_worker)
    tasks = sub.add_parser("tasks", help="list / show / delete tasks on a running server (TASKSERVE_URL)")
    tasks.add_argument("action", choices=("list", "show", "delete"))
    tasks.add_argument("name", nargs="?")
    tasks.add_argument("--url", help="server URL (default TASKSERVE_URL or http://TASKSERVE_HOST:TASKSERVE_PORT)")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "action", None) in ("show", "delete") and args.func is cmd_tasks and not args.name:
        parser.error(f"tasks {args.action} needs a task name")
    try:
        return args.func(args)
    except TaskservError as exc:
        print(f"error ({exc.type}): {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

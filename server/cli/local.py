"""Subcommands that run here: the server, a worker, store seeds, the data, the models, the benchmark."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.cli.common import add_common, settings_from


def cmd_serve(args: argparse.Namespace) -> int:
    from server.api.app import check_exposure, serve

    settings = settings_from(args)
    check_exposure(settings)
    return serve(settings)


def cmd_worker(args: argparse.Namespace) -> int:
    from server.worker import main as worker_main

    return worker_main(settings_from(args))


def cmd_store(args: argparse.Namespace) -> int:
    from adapters_store.store import Store

    settings = settings_from(args)
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

    data_dir = args.data_dir or str(settings_from(args).cache_dir / "data")
    return fetch_main(["--data-dir", data_dir, *(["--index-url", args.index_url] if args.index_url else [])])


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


def add_parsers(sub) -> None:
    serve = sub.add_parser("serve", help="run the HTTP API on TASKSERVE_HOST:TASKSERVE_PORT over the store (TASKSERVE_STORE)")
    add_common(serve)
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="run queued training jobs from the store's registry until SIGTERM")
    add_common(worker)
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
    prepare = sub.add_parser("prepare", help="convert / locate the offline default models")
    prepare.set_defaults(func=cmd_prepare)
    bench = sub.add_parser("bench", help="run the benchmark harness (arguments go to bench/run.py)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

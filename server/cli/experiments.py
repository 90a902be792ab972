"""`taskserve train` and `taskserve eval`: multi-task training and evaluation on the real data."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from server.cli.common import add_common, settings_from, write_json
from server.cli.progress import TrainingBars
from server.errors import InvalidRequest

if TYPE_CHECKING:
    from server.settings import Settings


def _task_names(value: str | None, default) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()] if value else [t.name for t in default]


def _experiment_setup(args: argparse.Namespace, names: list[str]):
    from adapters_store.store import Store
    from server.factory import build_engine
    from server.store_sync import attach
    from server.training.experiments import load_task_data

    settings = settings_from(args)
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


def _train_config(args: argparse.Namespace, settings: Settings):
    from server.training.trainer import TrainConfig

    defaults = TrainConfig()
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr or defaults.lr, prompt_lr=args.prompt_lr, prompt_lr_relative=args.prompt_lr_relative or defaults.prompt_lr_relative,
        eval_every=args.eval_every or max(10, args.steps // 5), eval_rows=args.val_rows, seed=args.seed,
        autocast=settings.resolved_train_autocast(),  # what a server's worker would train in
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
        report = multitask(engine, store, method, names, data, _train_config(args, settings), eval_rows=args.eval_rows, on_progress=TrainingBars(),
                           publish=not args.no_publish, checkpoints=None if args.no_publish else checkpoints)
        print(f"{'task':<18} {'test acc':>9} {'test F1':>8} {'n':>5}")
        for name, metrics in report["tasks"].items():
            test = metrics["test"]
            print(f"{name:<18} {test['accuracy']:>9.3f} {test['f1_macro']:>8.3f} {test['n']:>5}")
        mean = sum(m["test"]["accuracy"] for m in report["tasks"].values()) / len(report["tasks"])
        print(f"{'average':<18} {mean:>9.3f}   ({method}, {report['train_seconds']} s, module v{report.get('module_version', '-')})")
        if args.out:
            write_json(args.out.replace("{method}", method), report)
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
    settings, engine, store, data = _experiment_setup(args, names)
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
        config = dataclasses.replace(config, autocast=settings.resolved_train_autocast())
        if args.prompt_lr_relative:
            config = dataclasses.replace(config, prompt_lr_relative=args.prompt_lr_relative)
        done = {(r["task"], r["method"], r["k"], r["seed"]) for r in earlier}
        new = experiments.few_shot_transfer(engine, methods, data, ks, seeds, config, args.eval_rows, on_result=log,
                                            default_request=not args.catalog_request, folds=args.folds, done=done, on_progress=TrainingBars())
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
        write_json(args.out, report)
    store.close()
    return 0


def add_parsers(sub) -> None:
    from server.methods import method_ids

    for name, helptext in (("train", "multi-task training of a method's shared modules on catalog tasks; publishes them into the store"),
                           ("eval", "per-task test metrics: zero-shot baseline, served tasks, few-shot transfer")):
        cmd = sub.add_parser(name, help=helptext)
        add_common(cmd)
        cmd.add_argument("--tasks", help="comma-separated catalog task names (train: the mix; eval --few-shot: the held-out tasks)")
        cmd.add_argument("--steps", type=int, default=300)
        cmd.add_argument("--batch-size", type=int, default=8)
        cmd.add_argument("--lr", type=float)
        cmd.add_argument("--prompt-lr", type=float, help="soft-prompt learning rate, absolute (default: relative to the embedding RMS)")
        cmd.add_argument("--prompt-lr-relative", type=float, help="soft-prompt learning rate in units of the embedding RMS (default 0.03)")
        cmd.add_argument("--train-autocast", choices=["auto", "bfloat16", "off"], help="mixed precision of training, as the server's TASKSERVE_TRAIN_AUTOCAST (its default; auto: bf16 on CUDA and on a CPU with native bf16, off elsewhere)")
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

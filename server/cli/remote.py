"""Subcommands that talk to a running server over the client: `predict`, `tasks`, `jobs`."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

from server import peft_format
from server.cli.common import add_url, client_from
from server.cli.progress import JobBar
from server.errors import InvalidRequest, NotFound


def cmd_predict(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        try:
            result = client.predict(args.task, args.text, max_new_tokens=args.max_new_tokens)
        except NotFound as exc:
            print(f"unknown task {args.task!r} ({exc.message})", file=sys.stderr)
            return 2
    scores = "" if result.scores is None else "  " + " ".join(f"{k}={v:.3f}" for k, v in result.scores.items())
    print(f"{result.task} v{result.task_version} {args.text[:46]!r} -> {result.output!r}{scores}")
    return 0


def read_examples(path: str) -> list[dict[str, str]]:
    """Few-shot examples from a .jsonl file (one {"text", "label" | "target"} object per line) or
    a .csv file with a header naming `text` and `label` (or `target`) columns."""
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


def _labels(value: str | None) -> list[str] | None:
    return [label.strip() for label in value.split(",")] if value else None


def cmd_tasks(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        if args.action == "list":
            for task in client.tasks():
                print(f"{task['name']:<32} {task['method']:<14} v{task['version']}  {task['status']:<8} {'served' if task['served'] else '-'}")
        elif args.action == "show":
            print(json.dumps(client.task(args.name), indent=2))
        elif args.action == "create":
            fields = {
                "description": args.description, "template": args.template, "scoring": args.scoring, "labels": _labels(args.labels),
                "examples": read_examples(args.examples) if args.examples else None,
                "train": {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("prompt_lr", args.prompt_lr)) if v} or None,
            }
            created = client.create_task(args.name, args.method, **fields)
            task = created["task"]
            print(f"{task['name']} ({task['method']}): {task['status']}" + (f", training job {created['job']}" if created.get("job") else ""))
            if args.wait and created.get("job"):
                return _follow(client, created["job"])
        elif args.action == "import-peft":
            return _import_peft(client, args)
        elif args.action == "export-peft":
            return _export_peft(client, args)
        else:
            client.delete_task(args.name)
            print(f"deleted {args.name}")
    return 0


def _import_peft(client, args: argparse.Namespace) -> int:
    """A PEFT PROMPT_TUNING checkpoint becomes a soft-prompt task (the prompt PEFT applies, sent as
    the task's `init.prompt`); the server refuses one that does not fit its backbone (422)."""
    from server.methods import method_for_peft

    checkpoint = peft_format.read(Path(args.path))
    fields = {"description": args.description, "template": args.template, "scoring": args.scoring, "labels": _labels(args.labels),
              "init": {"prompt": checkpoint.prompt.tolist()}}
    created = client.create_task(args.name, method_for_peft("PROMPT_TUNING"), **fields)
    print(f"imported {args.path} ({checkpoint.prompt.shape[0]} virtual tokens of {checkpoint.prompt.shape[1]}, base {checkpoint.base_model}) "
          f"as {created['task']['name']} v{created['task']['version']}")
    return 0


def _export_peft(client, args: argparse.Namespace) -> int:
    """A task's fixed soft prompt as a PEFT PROMPT_TUNING checkpoint (`PeftModel.from_pretrained` loads it)."""
    prompt = client.task_prompt(args.name)
    folder = peft_format.write(Path(args.path), torch.tensor(prompt["prompt"]), seq2seq=prompt["seq2seq"], base_model=args.base_model or prompt["backbone"])
    print(f"exported {args.name} v{prompt['version']} ({prompt['method']}, {len(prompt['prompt'])} virtual tokens) to {folder}")
    return 0


def _follow(client, job_id: str) -> int:
    from server.errors import JobFailed

    try:
        job = client.wait_for_job(job_id, JobBar(job_id))
    except JobFailed as exc:
        print(f"error ({exc.type}): {exc.message}", file=sys.stderr)
        return 1
    metrics = job.get("metrics") or {}
    print(f"job {job_id} succeeded: published {metrics.get('method')} ({metrics.get('chosen')}), held-out accuracy {(metrics.get('validation') or {}).get('accuracy')}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        if args.action == "list":
            for job in client.jobs(args.status):
                progress = job.get("progress") or {}
                print(f"{job['id']}  {job['task']:<32} {job['status']:<10} {progress.get('step', '-')}/{progress.get('total', '-')}")
        elif args.action == "watch":
            return _follow(client, args.id)
        else:
            print(json.dumps(client.job(args.id), indent=2))
    return 0


def add_parsers(sub) -> None:
    from server.methods import method_ids

    predict = sub.add_parser("predict", help="predict one row with any task of a running server (TASKSERVE_URL)")
    predict.add_argument("--task", required=True)
    predict.add_argument("--max-new-tokens", type=int, default=None)
    add_url(predict)
    predict.add_argument("text")
    predict.set_defaults(func=cmd_predict)
    tasks = sub.add_parser("tasks", help="list / show / create / delete / import-peft / export-peft tasks on a running server")
    tasks.add_argument("action", choices=("list", "show", "create", "delete", "import-peft", "export-peft"))
    tasks.add_argument("name", nargs="?", help="the task (import-peft: the checkpoint folder; then --name)")
    tasks.add_argument("path", nargs="?", help="export-peft: the checkpoint folder to write")
    add_url(tasks)
    tasks.add_argument("--name", dest="new_name", help="import-peft: the new task's name")
    tasks.add_argument("--method", choices=method_ids(), help="create: the task's method")
    tasks.add_argument("--examples", metavar="FILE", help="create: few-shot examples (.jsonl or .csv with text,label columns): a training job")
    tasks.add_argument("--labels", help="create / import-peft: comma-separated labels (a classification task)")
    tasks.add_argument("--description", help="create / import-peft: what the task is, in words")
    tasks.add_argument("--template", help="create / import-peft: input template with {text}")
    tasks.add_argument("--scoring", choices=("first", "sum", "mean"), help="create / import-peft: how labels are scored")
    tasks.add_argument("--steps", type=int, help="create: training steps of the job")
    tasks.add_argument("--lr", type=float, help="create: the job's learning rate for networks")
    tasks.add_argument("--prompt-lr", type=float, help="create: the job's soft-prompt learning rate, absolute (default: scaled to the backbone)")
    tasks.add_argument("--wait", action="store_true", help="create: follow the training job to its end (a progress bar)")
    tasks.add_argument("--base-model", help="export-peft: base_model_name_or_path to record (default: the backbone's fingerprint)")
    tasks.set_defaults(func=cmd_tasks)
    jobs = sub.add_parser("jobs", help="list, show or watch training jobs on a running server")
    jobs.add_argument("action", choices=("list", "show", "watch"))
    jobs.add_argument("id", nargs="?")
    jobs.add_argument("--status", help="list: only jobs of this status")
    add_url(jobs)
    jobs.set_defaults(func=cmd_jobs)


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Argument rules argparse cannot state."""
    if args.func is cmd_tasks:
        if args.action == "import-peft":
            if not args.name or not args.new_name:
                parser.error("tasks import-peft needs the checkpoint folder and --name")
            args.path, args.name = args.name, args.new_name
        elif args.action in ("show", "create", "delete", "export-peft") and not args.name:
            parser.error(f"tasks {args.action} needs a task name")
        if args.action == "create" and not args.method:
            parser.error("tasks create needs --method")
        if args.action == "export-peft" and not args.path:
            parser.error("tasks export-peft needs a folder to write")
    if args.func is cmd_jobs and args.action in ("show", "watch") and not args.id:
        parser.error(f"jobs {args.action} needs a job id")

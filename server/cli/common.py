"""What the subcommands share: the common options, Settings from them, the client, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", help="smollm2 (default), a local HF folder or a hub id [TASKSERVE_BACKBONE]")
    parser.add_argument("--device", help="auto | cpu | cuda[:N] [TASKSERVE_DEVICE]")
    parser.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 [TASKSERVE_DTYPE]")
    parser.add_argument("--store", help="adapter store folder [TASKSERVE_STORE]")


def add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="server URL (default TASKSERVE_URL or http://TASKSERVE_HOST:TASKSERVE_PORT)")


def settings_from(args: argparse.Namespace):
    from server.settings import Settings

    overrides = {k: v for k in ("backbone", "device", "dtype", "store", "train_autocast") if (v := getattr(args, k, None))}
    return Settings(**overrides)


def client_from(args: argparse.Namespace):
    from client import Client

    settings = settings_from(args)
    url = getattr(args, "url", None) or os.environ.get("TASKSERVE_URL") or f"http://{settings.host}:{settings.port}"
    return Client(url, api_key=settings.api_key)


def write_json(path: str, payload: Any) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    print(f"wrote {out}", file=sys.stderr)

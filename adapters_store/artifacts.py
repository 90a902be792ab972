"""Artifacts: `weights.safetensors` + `manifest.json` per published version, published atomically.

Layout under the store root:
    tasks/<name>/v<version>/{weights.safetensors, manifest.json}
    shared/<method>/v<version>/{weights.safetensors, manifest.json}
Publishing writes into `<parent>/.tmp-<random>/`, fsyncs both files and the folder, then renames the
folder to `v<version>` (atomic on POSIX) and fsyncs the parent. A crash at any point leaves either no
version folder or a complete one; stray `.tmp-*` folders are ignored by readers and removed by
`sweep_temp`. The manifest records the sha256 of the weights file, checked on every load.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from server import atomic
from server.atomic import sha256_file
from server.errors import Conflict, CorruptArtifact
from server.task import check_task_name

WEIGHTS, MANIFEST = "weights.safetensors", "manifest.json"


def inside(base: Path, path: Path, what: str = "the store") -> Path:
    """`path`, refused (CorruptArtifact) unless it stays under `base` once links are resolved: an artifact
    is read and written only inside its store (a task folder, its parent or a file of it replaced by a
    link out is refused, before anything is opened through it)."""
    try:
        real, home = Path(path).resolve(), Path(base).resolve()
    except (OSError, RuntimeError) as exc:  # a link loop
        raise CorruptArtifact(f"{path}: cannot be resolved ({exc})") from exc
    if not real.is_relative_to(home):
        raise CorruptArtifact(f"{path} leads to {real}, outside {what} ({home}); links out of {what} are refused")
    return Path(path)


def task_dir(root: Path, name: str, version: int) -> Path:
    return inside(root, Path(root) / "tasks" / check_task_name(name) / f"v{version}")


def shared_dir(root: Path, method: str, version: int) -> Path:
    return inside(root, Path(root) / "shared" / check_task_name(method) / f"v{version}")


def publish(target: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write tensors + manifest to `target` atomically; returns the manifest as written.
    Idempotent: publishing the same weights to an existing version returns its manifest; other
    weights under an existing version are refused (versions are immutable)."""
    target = Path(target)
    weights = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    digest = hashlib.sha256(weights).hexdigest()
    if target.exists():
        existing = read_manifest(target)
        if existing.get("sha256") == digest:
            return existing
        raise Conflict(f"{target.parent.name} v{target.name[1:]} already exists with other weights; publish a new version")
    full = {
        **manifest,
        "sha256": digest,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
        "created_at": manifest.get("created_at") or datetime.now(UTC).isoformat(),
    }
    with atomic.new_folder(target) as tmp:  # the rename fails if the target appeared meanwhile
        (tmp / WEIGHTS).write_bytes(weights)
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True))
    return full


def read_manifest(folder: Path) -> dict[str, Any]:
    path = inside(folder, Path(folder) / MANIFEST, "its artifact folder")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptArtifact(f"{folder}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise CorruptArtifact(f"{folder}: the manifest is a JSON {type(manifest).__name__}, not an object")
    return manifest


def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and manifest of a published folder; the weights' sha256 must match the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    weights = inside(folder, folder / WEIGHTS, "its artifact folder")
    try:
        actual = sha256_file(weights)
    except OSError as exc:
        raise CorruptArtifact(f"{folder}: missing weights ({exc})") from exc
    if actual != manifest.get("sha256"):
        raise CorruptArtifact(f"{folder}: weights sha256 {actual[:12]}… does not match the manifest's {str(manifest.get('sha256'))[:12]}…")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptArtifact(f"{folder}: unreadable weights ({exc})") from exc
    return tensors, manifest


def sweep_temp(root: Path) -> int:
    """Remove temp folders left by crashed publishers; returns how many."""
    home = Path(root).resolve()
    return sum(atomic.sweep(parent, ".tmp-*") for parent in Path(root).glob("*/*") if parent.resolve().is_relative_to(home))  # never through a link out

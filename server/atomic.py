"""Atomic files and folders, and the sha256 of a file: the one place taskserve writes durably.

Everything is written beside its target under a hidden temporary name, fsynced, then renamed into
place (atomic on POSIX) and the parent folder fsynced. A reader sees the old content or the new,
never half of either; a crash leaves at most a temporary sibling, which `sweep` removes. Used by
the store's artifacts and seeds, the trainer's checkpoints, the data fetcher and the model cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shareable(path: Path) -> None:
    """mkstemp / mkdtemp create 0600 / 0700; published files get the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def replacing_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; write it, and on a clean exit it replaces `dest`.
    On an exception the temporary file is removed and `dest` is untouched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _shareable(tmp)
        fsync(tmp)
        os.replace(tmp, dest)
        fsync(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the replace; a leftover only on failure


def write_bytes(dest: Path, data: bytes) -> Path:
    with replacing_file(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


@contextlib.contextmanager
def new_folder(target: Path, *, prefix: str = ".tmp-", replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; fill it, and on a clean exit it becomes
    `target` (every file fsynced first). Without `replace` the final `os.rename` fails if `target`
    appeared meanwhile; with it an existing `target` is moved aside and swapped out."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield tmp
        for path in [*sorted(tmp.rglob("*"), reverse=True), tmp]:  # files before their folders
            _shareable(path)
            fsync(path)
        if replace and target.exists():
            old = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a leftover only on failure


def copy_folder(source: Path, target: Path) -> Path:
    """Copy a folder to `target` atomically; a no-op when `target` exists (artifacts are immutable)."""
    if not Path(target).exists():
        with new_folder(target) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
    return Path(target)


def sweep(parent: Path, pattern: str = ".*tmp*") -> int:
    """Remove temporary siblings that crashed writers left in `parent`; returns how many."""
    removed = 0
    for tmp in Path(parent).glob(pattern):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed += 1
    return removed

"""`taskserve data fetch`: download the two offline source archives into a cache and extract the
files the catalog uses.

The archives are PyPI source distributions (DESIGN.md, "Real data available offline"):
`bigbench==1.0.0` (BIG-bench task JSONs, 358 MB) and `vadersentiment==3.3.2` (VADER ground truth).
They are fetched with urllib, not `pip download`: bigbench's sdist declares a direct-URL dependency
(bleurt), which pip refuses to resolve even with `--no-deps`. The file URL is looked up in the PyPI
*simple* index (`--index-url`, else `PIP_INDEX_URL`, else pypi.org) so mirrors work, with the pinned
files.pythonhosted.org URL as fallback; whatever the source, the archive must match its pinned
SHA-256 before it is used. Downloads and extracted files are written to a temporary name and
renamed, so an interrupted run leaves nothing half-written and a rerun only does what is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import os
import re
import sys
import tarfile
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urljoin, urlsplit

from server.data.catalog import CATALOG, bigbench_tasks
from server.atomic import replacing_file, sha256_file, write_bytes
from server.errors import DataError

Progress = Callable[[str], None]

DEFAULT_INDEX = "https://pypi.org/simple"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    """A pinned source archive on PyPI."""

    project: str
    """Project name in the simple index."""
    filename: str
    url: str
    """Pinned download URL, used when the index cannot be read."""
    sha256: str


BIGBENCH = Archive(
    "bigbench",
    "bigbench-1.0.0.tar.gz",
    "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
    "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
)
VADER = Archive(
    "vadersentiment",
    "vaderSentiment-3.3.2.tar.gz",
    "https://files.pythonhosted.org/packages/77/8c/4a48c10a50f750ae565e341e697d74a38075a3e43ff0df6f1ab72e186902/"
    "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
)

BIGBENCH_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_LICENSE = "vaderSentiment-3.3.2/LICENSE.txt"
_GROUND_TRUTH = re.compile(r"^hutto_ICWSM_2014/([A-Za-z0-9]+_GroundTruth\.txt)$")

ATTRIBUTION_TEXT = """\
Data used by taskserve, extracted unmodified by `taskserve data fetch`.

bigbench/  BIG-bench task files (task.json) from the source archive of bigbench==1.0.0
           (https://github.com/google/BIG-bench). Licensed under the Apache License 2.0.
           Srivastava et al. (2022). Beyond the Imitation Game: Quantifying and extrapolating
           the capabilities of language models. arXiv:2206.04615. Each task's authors are
           listed in its README in the BIG-bench repository.

vader/     VADER ground-truth sentiment ratings (*_GroundTruth.txt) from
           additional_resources/hutto_ICWSM_2014.tar.gz in the source archive of
           vaderSentiment==3.3.2 (https://github.com/cjhutto/vaderSentiment; MIT License,
           see vader/LICENSE.txt). Please cite:
           Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for
           Sentiment Analysis of Social Media Text. Eighth International Conference on
           Weblogs and Social Media (ICWSM-14). Ann Arbor, MI, June 2014.
"""


# --- download ------------------------------------------------------------------------------------


class _Links(HTMLParser):
    """The `href`s of a PEP 503 simple-index page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.extend(value for name, value in attrs if name == "href" and value)


def find_in_index(page: str, page_url: str, filename: str) -> tuple[str, str | None] | None:
    """(absolute URL, advertised sha256 or None) of `filename` on a simple-index page, or None."""
    parser = _Links()
    parser.feed(page)
    for href in parser.hrefs:
        url, _, fragment = href.partition("#")
        if unquote(PurePosixPath(urlsplit(url).path).name) == filename:
            digest = fragment.removeprefix("sha256=") if fragment.startswith("sha256=") else None
            return urljoin(page_url, url), digest
    return None


def resolve_url(archive: Archive, index_url: str | None, progress: Progress) -> str:
    """The archive's URL from the simple index, or the pinned URL when the index cannot be read,
    does not list the file, or advertises a different hash (a different file)."""
    base = index_url or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX
    page_url = f"{base.rstrip('/')}/{archive.project}/"
    try:
        request = urllib.request.Request(page_url, headers={"Accept": "text/html"})
        with urllib.request.urlopen(request, timeout=60) as response:
            page = response.read().decode("utf-8", errors="replace")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        progress(f"{archive.filename}: index {page_url} unreadable ({exc}); using the pinned URL")
        return archive.url
    found = find_in_index(page, page_url, archive.filename)
    if found is None or found[1] not in (None, archive.sha256):
        progress(f"{archive.filename}: not listed with the pinned hash on {page_url}; using the pinned URL")
        return archive.url
    return found[0]


def download(url: str, dest: Path, sha256: str, progress: Progress) -> None:
    """Download `url` to `dest` atomically (a progress bar on a terminal); `dest` appears only once
    its SHA-256 is `sha256`."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    try:
        with replacing_file(dest) as part, urllib.request.urlopen(url, timeout=60) as response, part.open("wb") as file:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, desc=dest.name, unit="B", unit_scale=True, file=sys.stderr, disable=None) as bar:
                while chunk := response.read(_CHUNK):
                    file.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            file.flush()
            if digest.hexdigest() != sha256:  # raised inside: the partial file is removed, dest untouched
                raise DataError(f"{dest.name}: sha256 {digest.hexdigest()} from {url} is not the pinned {sha256}")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise DataError(f"{dest.name}: download from {url} failed ({exc})") from None
    progress(f"{dest.name}: {dest.stat().st_size >> 20} MiB, sha256 verified")


def ensure_archive(archive: Archive, data_dir: Path, index_url: str | None, progress: Progress) -> Path:
    """The verified archive in `data_dir`, downloaded only when absent or not the pinned file."""
    dest = data_dir / archive.filename
    if dest.is_file() and sha256_file(dest) == archive.sha256:
        progress(f"{archive.filename}: already downloaded")
        return dest
    url = resolve_url(archive, index_url, progress)
    progress(f"{archive.filename}: downloading {url}")
    download(url, dest, archive.sha256, progress)
    return dest


# --- extraction ----------------------------------------------------------------------------------


def _check_member(member: tarfile.TarInfo, archive: str) -> None:
    """Refuse absolute or `..` member names anywhere in an archive: the pinned hash makes this
    unexpected, so it means a broken or hostile file rather than something to skip."""
    name = member.name
    if name.startswith("/") or "\\" in name or ".." in PurePosixPath(name).parts:
        raise DataError(f"{archive}: unsafe member path {name!r}")


def _regular(member: tarfile.TarInfo, archive: str) -> None:
    """A file we extract must be a regular file (no links that would write elsewhere)."""
    if not member.isreg():
        raise DataError(f"{archive}: member {member.name!r} is not a regular file")


def _write_atomic(root: Path, relative: str, data: bytes) -> Path:
    """Write `data` to `root/relative` atomically; refuse a path that leaves `root`."""
    dest = root / relative
    if not dest.resolve().is_relative_to(root.resolve()):
        raise DataError(f"{relative!r}: would be written outside {root}")
    return write_bytes(dest, data)


def extract_bigbench(archive: Path, tasks: Iterable[str], out: Path, progress: Progress) -> list[Path]:
    """Extract `<task>/task.json` of each task into `out/<task>/task.json`, streaming the archive
    once for all of them (random access into a 358 MB gzip would re-read it per file). Tasks
    already extracted are skipped; returns the files written."""
    wanted = {f"{BIGBENCH_PREFIX}{task}/task.json": f"{task}/task.json" for task in tasks}
    wanted = {member: rel for member, rel in wanted.items() if not (out / rel).is_file()}
    if not wanted:
        progress(f"{archive.name}: all BIG-bench tasks already extracted")
        return []
    written: list[Path] = []
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            _check_member(member, archive.name)
            if member.name not in wanted:
                continue
            _regular(member, archive.name)
            written.append(_write_atomic(out, wanted.pop(member.name), tar.extractfile(member).read()))
            if not wanted:
                break
    if wanted:
        raise DataError(f"{archive.name}: missing {sorted(wanted)}")
    progress(f"{archive.name}: extracted {len(written)} BIG-bench task files into {out}")
    return written


def _vader_members(archive: Path) -> tuple[bytes, bytes]:
    """The inner ground-truth tarball and the licence text of the VADER sdist."""
    found: dict[str, bytes] = {}
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            _check_member(member, archive.name)
            if member.name in (VADER_INNER, VADER_LICENSE):
                _regular(member, archive.name)
                found[member.name] = tar.extractfile(member).read()
    missing = sorted({VADER_INNER, VADER_LICENSE} - set(found))
    if missing:
        raise DataError(f"{archive.name}: missing {missing}")
    return found[VADER_INNER], found[VADER_LICENSE]


def extract_vader(archive: Path, out: Path, progress: Progress) -> list[Path]:
    """Extract `hutto_ICWSM_2014/*_GroundTruth.txt` (a tarball inside the sdist) and the licence
    into `out`. Skipped when the files the catalog reads and the licence are already there."""
    needed = [t.source.split(":", 1)[1] for t in CATALOG.values() if t.kind == "vader"]
    if all((out / name).is_file() for name in [*needed, "LICENSE.txt"]):
        progress(f"{archive.name}: VADER files already extracted")
        return []
    inner, license_text = _vader_members(archive)
    inner_name = f"{archive.name}:{VADER_INNER}"
    written = [_write_atomic(out, "LICENSE.txt", license_text)]
    with tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz") as tar:
        for member in tar.getmembers():
            _check_member(member, inner_name)
            if match := _GROUND_TRUTH.match(member.name):
                _regular(member, inner_name)
                written.append(_write_atomic(out, match[1], tar.extractfile(member).read()))
    missing = sorted(name for name in needed if not (out / name).is_file())
    if missing:
        raise DataError(f"{inner_name}: missing {missing}")
    progress(f"{archive.name}: extracted {len(written) - 1} VADER ground-truth files into {out}")
    return written


def fetch(data_dir: Path, index_url: str | None = None, progress: Progress = print) -> dict[str, Path]:
    """Download (if needed) and extract everything the catalog uses into `data_dir`; returns the
    extracted folders (`bigbench`, `vader`) and the `attribution` file.

    Each archive is fetched on its own: one that cannot be had does not keep the other's tasks
    from being extracted; the error then names what is missing and which catalog tasks need it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    for key, archive, extract in (("bigbench", BIGBENCH, lambda path: extract_bigbench(path, bigbench_tasks(), data_dir / "bigbench", progress)),
                                  ("vader", VADER, lambda path: extract_vader(path, data_dir / "vader", progress))):
        try:
            extract(ensure_archive(archive, data_dir, index_url, progress))
        except DataError as exc:
            needing = sorted(t.name for t in CATALOG.values() if t.kind == key)
            failures.append(f"{exc.message} — catalog tasks without data: {', '.join(needing)}")
    attribution = _write_atomic(data_dir, "ATTRIBUTION.txt", ATTRIBUTION_TEXT.encode())
    if failures:
        raise DataError("; ".join(failures))
    return {"bigbench": data_dir / "bigbench", "vader": data_dir / "vader", "attribution": attribution}


def main(argv: Sequence[str] | None = None) -> int:
    """`taskserve data fetch [--data-dir DIR] [--index-url URL]` (argv: the arguments after `fetch`)."""
    from server.settings import Settings

    parser = argparse.ArgumentParser(prog="taskserve data fetch", description=fetch.__doc__)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: <cache_dir>/data")
    parser.add_argument("--index-url", default=None, help="PyPI simple index (default: $PIP_INDEX_URL or pypi.org)")
    args = parser.parse_args(argv)
    data_dir = (args.data_dir or Settings().cache_dir / "data").expanduser()
    try:
        paths = fetch(data_dir, args.index_url)
    except DataError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    for key, path in paths.items():
        print(f"{key}: {path}")
    print()
    print(ATTRIBUTION_TEXT, end="")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""Fetching and extracting the source archives, on tiny archives built here in the real layout
(no network: downloads read file:// URLs)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.error
from pathlib import Path

import pytest

from server.data import sources
from server.data.catalog import bigbench_tasks
from server.data.readers import DataError
from server.data.sources import (
    BIGBENCH_PREFIX,
    VADER_INNER,
    VADER_LICENSE,
    Archive,
    download,
    ensure_archive,
    extract_bigbench,
    extract_vader,
    fetch,
    find_in_index,
    resolve_url,
)

GROUND_TRUTH = [
    "movieReviewSnippets_GroundTruth.txt", "tweets_GroundTruth.txt",
    "nytEditorialSnippets_GroundTruth.txt", "amazonReviewSnippets_GroundTruth.txt",
]


def _tar_gz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A gzipped tar of regular files (name -> content) and symlinks (name -> target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def _bigbench_sdist(path: Path, extra: dict[str, bytes] | None = None, links: dict[str, str] | None = None) -> Path:
    members = {"bigbench-1.0.0/setup.py": b"# setup", "bigbench-1.0.0/bigbench/benchmark_tasks/other/task.json": b"{}"}
    members |= {f"{BIGBENCH_PREFIX}{task}/task.json": f'{{"name": "{task}"}}'.encode() for task in bigbench_tasks()}
    path.write_bytes(_tar_gz(members | (extra or {}), links))
    return path


def _vader_sdist(path: Path, inner_extra: dict[str, bytes] | None = None) -> Path:
    inner = {f"hutto_ICWSM_2014/{name}": f"1\t2.0\t{name}\r\n".encode() for name in GROUND_TRUTH}
    inner["hutto_ICWSM_2014/tweets_anonDataRatings.txt"] = b"not extracted"
    inner["hutto_ICWSM_2014/_README_.txt"] = b"readme"
    members = {VADER_INNER: _tar_gz(inner | (inner_extra or {})), VADER_LICENSE: b"The MIT License (MIT)\n"}
    path.write_bytes(_tar_gz(members | {"vaderSentiment-3.3.2/setup.py": b"# setup"}))
    return path


def _quiet(message: str) -> None:
    pass


def test_extract_bigbench_writes_every_catalog_task_and_is_idempotent(tmp_path: Path) -> None:
    archive = _bigbench_sdist(tmp_path / "bb.tar.gz")
    out = tmp_path / "data" / "bigbench"
    written = extract_bigbench(archive, bigbench_tasks(), out, _quiet)
    assert sorted(written) == sorted(out / task / "task.json" for task in bigbench_tasks())
    assert (out / "fact_checker" / "fever" / "task.json").read_text() == '{"name": "fact_checker/fever"}'
    assert not (out / "other").exists() and not list(out.rglob("*.tmp"))
    (out / "winowhy" / "task.json").write_text("kept")
    assert extract_bigbench(archive, bigbench_tasks(), out, _quiet) == []
    assert (out / "winowhy" / "task.json").read_text() == "kept"
    (out / "winowhy" / "task.json").unlink()
    assert extract_bigbench(archive, bigbench_tasks(), out, _quiet) == [out / "winowhy" / "task.json"]


def test_extract_bigbench_reports_missing_tasks(tmp_path: Path) -> None:
    archive = _bigbench_sdist(tmp_path / "bb.tar.gz")
    with pytest.raises(DataError, match="no_such_task"):
        extract_bigbench(archive, ["winowhy", "no_such_task"], tmp_path / "out", _quiet)


@pytest.mark.parametrize("name", ["bigbench-1.0.0/../../escaped.txt", "/tmp/absolute.txt"])
def test_extract_bigbench_refuses_path_traversal(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "bb.tar.gz"
    archive.write_bytes(_tar_gz({name: b"x", f"{BIGBENCH_PREFIX}winowhy/task.json": b"{}"}))
    with pytest.raises(DataError, match="unsafe member"):
        extract_bigbench(archive, ["winowhy"], tmp_path / "a" / "b" / "out", _quiet)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "a").exists()


def test_extract_bigbench_refuses_a_link_in_place_of_a_task(tmp_path: Path) -> None:
    archive = tmp_path / "bb.tar.gz"
    archive.write_bytes(_tar_gz({}, links={f"{BIGBENCH_PREFIX}winowhy/task.json": "/etc/passwd"}))
    with pytest.raises(DataError, match="not a regular file"):
        extract_bigbench(archive, ["winowhy"], tmp_path / "out", _quiet)


def test_extract_vader_reads_the_nested_tarball(tmp_path: Path) -> None:
    archive = _vader_sdist(tmp_path / "vader.tar.gz")
    out = tmp_path / "vader"
    written = extract_vader(archive, out, _quiet)
    assert sorted(p.name for p in out.iterdir()) == sorted([*GROUND_TRUTH, "LICENSE.txt"])
    assert len(written) == 5
    assert (out / "tweets_GroundTruth.txt").read_bytes() == b"1\t2.0\ttweets_GroundTruth.txt\r\n"
    assert extract_vader(archive, out, _quiet) == []


def test_extract_vader_refuses_traversal_inside_the_inner_tarball(tmp_path: Path) -> None:
    archive = _vader_sdist(tmp_path / "vader.tar.gz", {"hutto_ICWSM_2014/../../evil_GroundTruth.txt": b"x"})
    with pytest.raises(DataError, match="unsafe member"):
        extract_vader(archive, tmp_path / "data" / "vader", _quiet)
    assert not list(tmp_path.rglob("evil*"))


def _archive_for(path: Path) -> Archive:
    return Archive("tiny", path.name, path.as_uri(), hashlib.sha256(path.read_bytes()).hexdigest())


def test_download_refuses_a_hash_mismatch(tmp_path: Path) -> None:
    source = tmp_path / "src" / "x.tar.gz"
    source.parent.mkdir()
    source.write_bytes(b"archive bytes")
    dest = tmp_path / "x.tar.gz"
    with pytest.raises(DataError, match="not the pinned"):
        download(source.as_uri(), dest, "0" * 64, _quiet)
    assert not dest.exists() and not dest.with_name("x.tar.gz.part").exists()
    download(source.as_uri(), dest, _archive_for(source).sha256, _quiet)
    assert dest.read_bytes() == b"archive bytes"


def test_ensure_archive_skips_a_verified_file_and_replaces_a_wrong_one(tmp_path: Path) -> None:
    source = tmp_path / "src" / "x.tar.gz"
    source.parent.mkdir()
    source.write_bytes(b"archive bytes")
    pinned = _archive_for(source)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "x.tar.gz").write_bytes(b"archive bytes")
    offline = Archive("tiny", "x.tar.gz", (tmp_path / "gone").as_uri(), pinned.sha256)
    assert ensure_archive(offline, data_dir, (tmp_path / "no-index").as_uri(), _quiet) == data_dir / "x.tar.gz"
    (data_dir / "x.tar.gz").write_bytes(b"truncated")
    messages: list[str] = []
    ensure_archive(pinned, data_dir, (tmp_path / "no-index").as_uri(), messages.append)
    assert (data_dir / "x.tar.gz").read_bytes() == b"archive bytes"
    assert any("pinned URL" in m for m in messages)  # the unreadable index fell back to the pin


def test_find_in_index_resolves_relative_links_and_hashes() -> None:
    page = (
        '<html><body><a href="../../packages/aa/bigbench-0.0.1.tar.gz#sha256=11">bigbench-0.0.1.tar.gz</a>'
        '<a href="../../packages/bb/bigbench-1.0.0.tar.gz#sha256=abc" data-requires-python="">x</a></body></html>'
    )
    url = "https://mirror.example/simple/bigbench/"
    assert find_in_index(page, url, "bigbench-1.0.0.tar.gz") == (
        "https://mirror.example/packages/bb/bigbench-1.0.0.tar.gz", "abc"
    )
    assert find_in_index(page, url, "bigbench-2.0.tar.gz") is None


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        (f'<a href="../../files/tiny-1.0.tar.gz#sha256={"ab" * 32}">t</a>', "https://mirror.example/files/tiny-1.0.tar.gz"),
        ('<a href="../../files/tiny-1.0.tar.gz">t</a>', "https://mirror.example/files/tiny-1.0.tar.gz"),
        (f'<a href="../../files/tiny-1.0.tar.gz#sha256={"cd" * 32}">t</a>', "https://pinned.example/tiny-1.0.tar.gz"),
        ('<a href="../../files/tiny-0.9.tar.gz">t</a>', "https://pinned.example/tiny-1.0.tar.gz"),
        (None, "https://pinned.example/tiny-1.0.tar.gz"),
    ],
    ids=["same-hash", "no-hash", "other-hash", "not-listed", "unreachable"],
)
def test_resolve_url_uses_the_index_only_for_the_pinned_file(monkeypatch, page: str | None, expected: str) -> None:
    requested: list[str] = []

    def urlopen(request, timeout):
        requested.append(request.full_url)
        if page is None:
            raise urllib.error.URLError("offline")
        return io.BytesIO(page.encode())

    monkeypatch.setattr(sources.urllib.request, "urlopen", urlopen)
    archive = Archive("tiny", "tiny-1.0.tar.gz", "https://pinned.example/tiny-1.0.tar.gz", "ab" * 32)
    assert resolve_url(archive, "https://mirror.example/simple/", _quiet) == expected
    assert requested == ["https://mirror.example/simple/tiny/"]


def test_resolve_url_reads_pip_index_url(monkeypatch) -> None:
    requested: list[str] = []
    monkeypatch.setenv("PIP_INDEX_URL", "https://corp.example/pypi/simple")

    def urlopen(request, timeout):
        requested.append(request.full_url)
        return io.BytesIO(b"")

    monkeypatch.setattr(sources.urllib.request, "urlopen", urlopen)
    resolve_url(Archive("tiny", "t.tar.gz", "https://pinned.example/t.tar.gz", "ab" * 32), None, _quiet)
    assert requested == ["https://corp.example/pypi/simple/tiny/"]


def test_fetch_downloads_extracts_and_attributes_then_skips(tmp_path: Path, monkeypatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    bigbench = _archive_for(_bigbench_sdist(mirror / "bigbench-1.0.0.tar.gz"))
    vader = _archive_for(_vader_sdist(mirror / "vaderSentiment-3.3.2.tar.gz"))
    monkeypatch.setattr(sources, "BIGBENCH", bigbench)
    monkeypatch.setattr(sources, "VADER", vader)
    data_dir = tmp_path / "data"
    messages: list[str] = []
    paths = fetch(data_dir, index_url=(tmp_path / "no-index").as_uri(), progress=messages.append)
    assert paths == {
        "bigbench": data_dir / "bigbench", "vader": data_dir / "vader", "attribution": data_dir / "ATTRIBUTION.txt"
    }
    assert (data_dir / "bigbench" / "fact_checker" / "fever" / "task.json").is_file()
    assert (data_dir / "vader" / "movieReviewSnippets_GroundTruth.txt").is_file()
    attribution = paths["attribution"].read_text()
    assert "Apache License 2.0" in attribution and "Hutto, C.J. & Gilbert, E.E. (2014)" in attribution
    assert not list(data_dir.glob("*.part"))
    messages.clear()
    (mirror / "bigbench-1.0.0.tar.gz").unlink()  # a second run must not need the network
    fetch(data_dir, index_url=(tmp_path / "no-index").as_uri(), progress=messages.append)
    assert not any("downloading" in m for m in messages)
    assert any("already extracted" in m for m in messages)


def test_an_archive_that_cannot_be_had_does_not_keep_the_other_from_being_extracted(tmp_path: Path, monkeypatch) -> None:
    """BIG-bench's archive unreachable (as it was on 2026-12-07: HTTP 403): VADER's tasks are still
    extracted, and the error names what failed and which catalog tasks are left without data."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setattr(sources, "BIGBENCH", Archive("bigbench", "bigbench-1.0.0.tar.gz", (tmp_path / "gone.tar.gz").as_uri(), "0" * 64))
    monkeypatch.setattr(sources, "VADER", _archive_for(_vader_sdist(mirror / "vaderSentiment-3.3.2.tar.gz")))
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as caught:
        fetch(data_dir, index_url=(tmp_path / "no-index").as_uri(), progress=_quiet)
    assert (data_dir / "vader" / "movieReviewSnippets_GroundTruth.txt").is_file()
    assert "bigbench-1.0.0.tar.gz" in caught.value.message and "vader" not in caught.value.message.lower()
    assert "fever" in caught.value.message and "movie-sentiment" not in caught.value.message


def test_main_prints_attribution_and_fails_cleanly(tmp_path: Path, monkeypatch, capsys) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setattr(sources, "BIGBENCH", _archive_for(_bigbench_sdist(mirror / "bigbench-1.0.0.tar.gz")))
    monkeypatch.setattr(sources, "VADER", _archive_for(_vader_sdist(mirror / "vaderSentiment-3.3.2.tar.gz")))
    args = ["--data-dir", str(tmp_path / "data"), "--index-url", (tmp_path / "no-index").as_uri()]
    assert sources.main(args) == 0
    assert "ICWSM-14" in capsys.readouterr().out
    monkeypatch.setattr(sources, "VADER", Archive("v", "v.tar.gz", (tmp_path / "gone.tar.gz").as_uri(), "0" * 64))
    assert sources.main(args) == 1
    assert "error:" in capsys.readouterr().err

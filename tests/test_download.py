"""Stage `download` against a real HTTP server on loopback: exact bytes, resume after a dropped connection
or a network fault, checksums, free space, clear errors, and versions that follow the source's identity."""

import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import threading
import time
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import tasks.download as download_module
from storage.errors import ConfigError, DataIntegrityError, DiskFullError, GptflowError, TransientError
from storage.store import Store
from tasks.download import STAGE, DownloadConfig, archive_names, sources_identity
from tasks.stage import is_transient

PAYLOAD = bytes(range(256)) * 4096 + b"the end"  # ~1 MiB, every byte value, not a multiple of any chunk


@dataclass
class Behaviour:
    """What the test server does; the handler reads it on every request."""

    body: bytes = PAYLOAD
    etag: str = '"v1"'
    last_modified: str = "Wed, 01 May 2024 00:00:00 GMT"
    status: int | None = None  # answer every request with this status instead
    head_status: int | None = None  # answer HEAD requests with this status instead
    no_validators: bool = False  # send no ETag, Last-Modified or Content-Length: a body ends where the connection does
    drop_first_gets: int = 0  # this many GETs send half the body, then cut the connection
    honour_range: bool = True
    change_after_head: tuple[bytes, str] | None = None  # (body, etag) the file becomes right after a HEAD
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def gets(self) -> list[dict[str, str]]:
        return [headers for method, _, headers in self.requests if method == "GET"]


class Handler(BaseHTTPRequestHandler):
    behaviour: Behaviour  # set on a per-server subclass

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _record(self) -> None:
        self.behaviour.requests.append((self.command, self.path, dict(self.headers)))

    def _validators(self) -> None:
        if self.behaviour.no_validators:
            return
        self.send_header("ETag", self.behaviour.etag)
        self.send_header("Last-Modified", self.behaviour.last_modified)
        self.send_header("Accept-Ranges", "bytes")

    def _length(self, n: int) -> None:
        if not self.behaviour.no_validators:
            self.send_header("Content-Length", str(n))

    def do_HEAD(self) -> None:
        self._record()
        if status := self.behaviour.status or self.behaviour.head_status:
            self.send_error(status)
            return
        self.send_response(200)
        self._validators()
        self._length(len(self.behaviour.body))
        self.end_headers()
        if self.behaviour.change_after_head:
            self.behaviour.body, self.behaviour.etag = self.behaviour.change_after_head
            self.behaviour.change_after_head = None

    def do_GET(self) -> None:
        self._record()
        b = self.behaviour
        if b.status:
            self.send_error(b.status)
            return
        start, end = 0, len(b.body) - 1
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        ranged = bool(match and b.honour_range and (if_range is None or if_range == b.etag))
        if ranged:
            start, end = int(match[1]), min(int(match[2] or end), end)
        body = b.body[start : end + 1]
        self.send_response(206 if ranged else 200)
        self._validators()
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(b.body)}")
        self._length(len(body))
        self.end_headers()
        if b.drop_first_gets > 0:
            b.drop_first_gets -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up midway (as these tests make it do) is no error of the server's


@pytest.fixture
def server():
    behaviour = Behaviour()
    handler = type("BoundHandler", (Handler,), {"behaviour": behaviour})
    httpd = QuietServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, behaviour
    httpd.shutdown()
    httpd.server_close()


@dataclass
class Disk:
    """The disk as the download's partial files see it (every other write goes to the real one)."""

    room: int | None = None  # bytes it takes before it is full (ENOSPC)
    error: int | None = None  # an errno every write fails with
    before_first_write: Callable[[], None] | None = None  # run once, before the first write


@pytest.fixture
def disk(monkeypatch) -> Disk:
    state = Disk()
    real_write = os.write

    def write(fd: int, data) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(".partial"):
            return real_write(fd, data)
        if state.before_first_write is not None:
            hook, state.before_first_write = state.before_first_write, None
            hook()
        if state.error is not None:
            raise OSError(state.error, os.strerror(state.error))
        if state.room is not None:
            if state.room == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data = data[: state.room]  # a write that fills the disk writes what fits (as write(2) does)
            state.room -= len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    return state


Usage = namedtuple("Usage", "total used free")


def free_space(monkeypatch, free: int) -> list[Path]:
    """Make every filesystem report `free` bytes free; returns the paths asked about."""
    asked: list[Path] = []

    def disk_usage(path) -> Usage:
        asked.append(Path(path))
        return Usage(1 << 40, (1 << 40) - free, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return asked


def config(*sources, **overrides) -> DownloadConfig:
    fast = {"backoff_seconds": 0.0, "timeout_seconds": 10.0, "chunk_bytes": 64 * 1024}
    return DownloadConfig(sources=list(sources), **{**fast, **overrides})


def download(tmp_path: Path, cfg: DownloadConfig):
    return STAGE.run(tmp_path / "store", cfg)


def archive(tmp_path: Path, ref, name: str) -> bytes:
    return (Store(tmp_path / "store").path("download", ref.version) / "archives" / name).read_bytes()


def scratch_files(tmp_path: Path, pattern: str = "*") -> list[Path]:
    return [p for p in (tmp_path / "store" / "download" / ".work").rglob(pattern) if p.is_file()]


def nothing_published(tmp_path: Path) -> bool:
    stage_dir = tmp_path / "store" / "download"
    return not stage_dir.exists() or not [p for p in stage_dir.iterdir() if not p.name.startswith(".")]


def test_plain_download_is_byte_exact_and_recorded(tmp_path, server):
    base, behaviour = server
    ref = download(tmp_path, config(f"{base}/openwebtext.tar.xz"))
    assert archive(tmp_path, ref, "openwebtext.tar.xz") == PAYLOAD
    [record] = Store(tmp_path / "store").manifest("download", ref.version)["metrics"]["sources"]
    assert record == {
        "url": f"{base}/openwebtext.tar.xz",
        "file": "openwebtext.tar.xz",
        "bytes": len(PAYLOAD),
        "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
        "etag": '"v1"',
        "last_modified": "Wed, 01 May 2024 00:00:00 GMT",
        "resumes": 0,
    }


def test_a_dropped_connection_resumes_with_a_range_request(tmp_path, server):
    base, behaviour = server
    behaviour.drop_first_gets = 1
    ref = download(tmp_path, config(f"{base}/data.xz"))
    assert archive(tmp_path, ref, "data.xz") == PAYLOAD
    first, second = behaviour.gets()
    assert "Range" not in first
    assert second["Range"] == f"bytes={len(PAYLOAD) // 2}-"
    assert second["If-Range"] == '"v1"'
    metrics = Store(tmp_path / "store").manifest("download", ref.version)["metrics"]
    assert metrics["sources"][0]["resumes"] == 1


def test_a_server_that_ignores_range_still_gives_exact_bytes(tmp_path, server):
    base, behaviour = server
    behaviour.drop_first_gets = 1
    behaviour.honour_range = False
    ref = download(tmp_path, config(f"{base}/data.xz"))
    assert archive(tmp_path, ref, "data.xz") == PAYLOAD
    assert len(behaviour.gets()) == 2 and "Range" in behaviour.gets()[1]


def test_a_failed_attempt_leaves_the_partial_file_for_the_next_attempt_to_resume(tmp_path, server):
    base, behaviour = server
    behaviour.drop_first_gets = 1
    cfg = config(f"{base}/data.xz", resume_attempts=0)
    with pytest.raises(TransientError, match="data.xz"):
        download(tmp_path, cfg)  # what Prefect's task retry would run again
    assert nothing_published(tmp_path)
    ref = download(tmp_path, cfg)
    assert archive(tmp_path, ref, "data.xz") == PAYLOAD
    assert behaviour.gets()[1]["Range"] == f"bytes={len(PAYLOAD) // 2}-"


def test_sha256_mismatch_fails_and_publishes_nothing(tmp_path, server):
    base, _ = server
    wrong = "0" * 64
    cfg = config({"url": f"{base}/data.xz", "sha256": wrong})
    with pytest.raises(DataIntegrityError) as caught:
        download(tmp_path, cfg)
    message = str(caught.value)
    assert f"{base}/data.xz" in message and wrong in message and hashlib.sha256(PAYLOAD).hexdigest() in message
    assert "\n" not in message
    assert not is_transient(caught.value)
    assert nothing_published(tmp_path)
    assert not list((tmp_path / "store" / "download" / ".work").rglob("*.partial"))


def test_a_matching_sha256_is_the_identity_and_needs_no_head_request(tmp_path, server):
    base, behaviour = server
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    ref = download(tmp_path, config({"url": f"{base}/data.xz", "sha256": digest.upper()}))
    assert archive(tmp_path, ref, "data.xz") == PAYLOAD
    assert [method for method, _, _ in behaviour.requests] == ["GET"]
    again = download(tmp_path, config({"url": f"{base}/data.xz", "sha256": digest}))
    assert again.version == ref.version and again.reused
    assert len(behaviour.requests) == 1  # reused without asking the server anything


def test_404_is_a_clear_error_that_is_not_retried(tmp_path, server):
    base, behaviour = server
    behaviour.status = 404
    with pytest.raises(ConfigError) as caught:
        download(tmp_path, config(f"{base}/missing.xz"))
    assert f"{base}/missing.xz" in str(caught.value) and "404" in str(caught.value)
    assert not is_transient(caught.value)
    # with a sha256 there is no HEAD: the GET's 404 fails the same way, at once
    with pytest.raises(ConfigError, match="404"):
        download(tmp_path, config({"url": f"{base}/missing.xz", "sha256": "a" * 64}, resume_attempts=5))
    assert len(behaviour.gets()) == 1
    assert nothing_published(tmp_path)


def test_503_is_transient(tmp_path, server):
    base, behaviour = server
    behaviour.status = 503
    with pytest.raises(TransientError, match="503"):
        download(tmp_path, config(f"{base}/busy.xz"))
    with pytest.raises(TransientError, match="503") as caught:
        download(tmp_path, config({"url": f"{base}/busy.xz", "sha256": "a" * 64}, resume_attempts=2))
    assert is_transient(caught.value)
    assert len(behaviour.gets()) == 3  # the first try and two in-attempt retries


def test_an_unreachable_server_is_transient(tmp_path):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TransientError, match=f"127.0.0.1:{port}"):
        download(tmp_path, config(f"http://127.0.0.1:{port}/data.xz"))


def test_same_source_reuses_its_version_and_a_new_etag_makes_a_new_one(tmp_path, server):
    base, behaviour = server
    cfg = config(f"{base}/data.xz")
    first = download(tmp_path, cfg)
    again = download(tmp_path, cfg)
    assert again.version == first.version and again.reused
    assert len(behaviour.gets()) == 1  # the second run only asked HEAD

    behaviour.body, behaviour.etag = b"new data " * 1000, '"v2"'
    changed = download(tmp_path, cfg)
    assert changed.version != first.version and not changed.reused
    assert archive(tmp_path, changed, "data.xz") == b"new data " * 1000
    assert Store(tmp_path / "store").latest("download") == changed.version


def test_local_paths_and_file_urls_are_copied_exactly(tmp_path):
    source = tmp_path / "in" / "my archive.tar.xz"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    ref = download(tmp_path, config(str(source), source.as_uri()))
    assert archive(tmp_path, ref, "my_archive.tar.xz") == PAYLOAD
    assert archive(tmp_path, ref, "my_archive-2.tar.xz") == PAYLOAD
    assert download(tmp_path, config(str(source), source.as_uri())).reused

    source.write_bytes(PAYLOAD + b"more")  # a rewritten file is a new version
    changed = download(tmp_path, config(str(source), source.as_uri()))
    assert changed.version != ref.version
    assert archive(tmp_path, changed, "my_archive.tar.xz") == PAYLOAD + b"more"


def test_a_source_already_in_a_stored_version_is_linked_not_fetched_again(tmp_path, server, monkeypatch):
    first, second = tmp_path / "urlsf_subset00.tar", tmp_path / "urlsf_subset01.tar"
    first.write_bytes(PAYLOAD)
    second.write_bytes(PAYLOAD[::-1])
    base, behaviour = server
    behaviour.body = PAYLOAD + b"http"
    url = f"{base}/owt.tar"
    before = download(tmp_path, config(str(first), url))
    copies: list[str] = []
    real_copy = download_module.copy_local
    monkeypatch.setattr(download_module, "copy_local", lambda path, *a: copies.append(path.name) or real_copy(path, *a))
    gets_before = len(behaviour.gets())
    after = download(tmp_path, config(str(first), url, str(second)))  # a nightly: one new source
    assert copies == ["urlsf_subset01.tar"] and len(behaviour.gets()) == gets_before  # only the new one is read
    old, new = (Store(tmp_path / "store").path("download", ref.version) / "archives" for ref in (before, after))
    assert (new / "urlsf_subset00.tar").stat().st_ino == (old / "urlsf_subset00.tar").stat().st_ino
    assert archive(tmp_path, after, "owt.tar") == PAYLOAD + b"http"
    assert archive(tmp_path, after, "urlsf_subset01.tar") == PAYLOAD[::-1]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    scratch = download(fresh, config(str(first), url, str(second)))
    assert (
        Store(fresh / "store").manifest("download", scratch.version)["files"]
        == Store(tmp_path / "store").manifest("download", after.version)["files"]
    )


def test_a_damaged_stored_copy_is_not_reused(tmp_path):
    source = tmp_path / "urlsf_subset00.tar"
    source.write_bytes(PAYLOAD)
    before = download(tmp_path, config(str(source)))
    stored = Store(tmp_path / "store").path("download", before.version) / "archives" / "urlsf_subset00.tar"
    stored.chmod(0o644)
    with open(stored, "r+b") as f:  # same size, other bytes: only a hash tells
        f.write(b"X")
    other = tmp_path / "other.tar"
    other.write_bytes(b"another source")
    after = download(tmp_path, config(str(source), str(other)))
    assert archive(tmp_path, after, "urlsf_subset00.tar") == PAYLOAD


def test_a_missing_local_file_names_its_path(tmp_path):
    missing = tmp_path / "nowhere" / "data.tar.xz"
    with pytest.raises(ConfigError, match=re.escape(str(missing))) as caught:
        download(tmp_path, config(str(missing)))
    assert not is_transient(caught.value)


def test_a_hostile_url_path_stays_inside_archives(tmp_path, server):
    base, _ = server
    ref = download(tmp_path, config(f"{base}/../../x", f"{base}/%2e%2e%2f%2e%2e%2fetc%2fpasswd", f"{base}/.."))
    version_dir = Store(tmp_path / "store").path("download", ref.version)
    files = sorted(p.relative_to(version_dir).as_posix() for p in version_dir.rglob("*") if p.is_file())
    assert files == ["archives/download", "archives/passwd", "archives/x", "manifest.json"]
    assert not (tmp_path / "x").exists() and not (tmp_path / "store" / "x").exists()


def test_archive_names_are_safe_and_distinct():
    names = archive_names(
        [
            "https://host/a/openwebtext.tar.xz",
            "https://host/b/openwebtext.tar.xz?sig=1",
            "https://host/..%2F..%2Fescape.xz",
            "https://host/dir/",
            "https://host/.hidden",
            "https://host/C:%5Cwin%5Cpath.tar",
            "file:///tmp/with%20space.tar",
        ]
    )
    assert names == [
        "openwebtext.tar.xz",
        "openwebtext-2.tar.xz",
        "escape.xz",
        "dir",
        "hidden",
        "path.tar",
        "with_space.tar",
    ]
    assert all("/" not in n and not n.startswith(".") for n in names)


def test_config_collects_every_problem_in_one_error():
    with pytest.raises(ValueError, match="at least one"):
        DownloadConfig(sources=[])
    with pytest.raises(ValueError) as caught:
        DownloadConfig(sources=["ftp://host/a.xz", "/data/a.xz", "/data/a.xz"])
    assert "unsupported scheme 'ftp'" in str(caught.value) and "listed twice" in str(caught.value)
    with pytest.raises(ValueError, match="sha256"):
        DownloadConfig(sources=[{"url": "/data/a.xz", "sha256": "not-a-hash"}])


def test_runtime_settings_do_not_change_the_version(tmp_path):
    source = tmp_path / "a.xz"
    source.write_bytes(b"x" * 100)
    slow = config(str(source), timeout_seconds=600, chunk_bytes=4096, resume_attempts=20, backoff_seconds=5)
    assert download(tmp_path, config(str(source))).version == download(tmp_path, slow).version
    assert os.path.exists(tmp_path / "store" / "download" / "latest")


def test_a_file_that_changes_after_its_identity_was_taken_is_not_stored_under_that_identity(tmp_path, server):
    base, behaviour = server
    behaviour.change_after_head = (b"newer " * 1000, '"v2"')
    cfg = config(f"{base}/data.xz")
    with pytest.raises(TransientError, match="changed while being fetched"):
        download(tmp_path, cfg)
    assert nothing_published(tmp_path)
    ref = download(tmp_path, cfg)  # the retry sees the new identity, so the new file gets its own version
    assert archive(tmp_path, ref, "data.xz") == b"newer " * 1000


# -- sources without validators: identified by their content ------------------------------------------------


def test_a_body_without_validators_is_identified_by_its_content_on_every_run(tmp_path, server):
    base, behaviour = server
    behaviour.no_validators = True
    behaviour.drop_first_gets = 1  # the first body ends early, and nothing in the response can tell
    cfg = config(f"{base}/data.xz")
    short = download(tmp_path, cfg)
    assert archive(tmp_path, short, "data.xz") == PAYLOAD[: len(PAYLOAD) // 2]

    full = download(tmp_path, cfg)  # the next run's full body is a new version, not the short one reused
    assert full.version != short.version and not full.reused
    assert archive(tmp_path, full, "data.xz") == PAYLOAD
    [record] = Store(tmp_path / "store").manifest("download", full.version)["metrics"]["sources"]
    assert record["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()

    again = download(tmp_path, cfg)
    assert again.version == full.version and again.reused
    assert len(Store(tmp_path / "store").versions("download")) == 2  # nothing published again
    assert len(behaviour.gets()) == 3  # one GET a run: the build took the body its identity was made from
    assert scratch_files(tmp_path) == []  # and no copy of the archive stays behind in scratch


# -- local sources: identified by their content, hashed again only when they may have changed ----------------


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """Every path the download stage hashes, in order."""
    calls: list[Path] = []
    real = download_module.sha256_file

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(download_module, "sha256_file", counting)
    return calls


def test_touching_a_local_source_keeps_its_version_and_an_unchanged_one_is_not_hashed_again(tmp_path, hashed):
    source = tmp_path / "in" / "openwebtext.tar.xz"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    source = source.resolve()
    cfg = config(str(source))
    first = download(tmp_path, cfg)
    assert hashed.count(source) == 1

    again = download(tmp_path, cfg)
    assert again.version == first.version and again.reused
    assert hashed.count(source) == 1  # nothing changed: the hash kept in the store is used

    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 3_600 * 10**9))  # touch
    touched = download(tmp_path, cfg)
    assert touched.version == first.version and touched.reused
    assert hashed.count(source) == 2  # the mtime moved, so the file was hashed again: same bytes


def test_a_local_source_rebuilt_with_the_same_bytes_keeps_its_version_and_new_bytes_make_a_new_one(tmp_path):
    source = tmp_path / "openwebtext.tar.xz"
    source.write_bytes(PAYLOAD)
    cfg = config(str(source))
    first = download(tmp_path, cfg)

    rebuilt = tmp_path / "openwebtext.tar.xz.new"  # rebuilt later, and swapped in: a new inode and mtime
    rebuilt.write_bytes(PAYLOAD)
    stat = source.stat()
    os.utime(rebuilt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 3_600 * 10**9))
    os.replace(rebuilt, source)
    again = download(tmp_path, cfg)
    assert again.version == first.version and again.reused

    # New bytes of the same size, with the mtime put back: only the ctime (which cannot be set) moves.
    stat = source.stat()
    time.sleep(0.05)  # file times come from a clock that ticks every few milliseconds
    changed = bytearray(PAYLOAD)
    changed[1000] ^= 0xFF
    source.write_bytes(changed)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (source.stat().st_size, source.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    new = download(tmp_path, cfg)
    assert new.version != first.version and not new.reused
    assert archive(tmp_path, new, "openwebtext.tar.xz") == changed


def test_a_stale_cached_hash_is_caught_by_the_copy_and_the_retry_hashes_the_file_again(tmp_path):
    source = tmp_path / "openwebtext.tar.xz"
    source.write_bytes(PAYLOAD)
    cfg = config(str(source))
    first = download(tmp_path, cfg)
    # What a rewrite within one tick of the file clock (same size, mtime and ctime) would leave behind.
    [cache] = (tmp_path / "store" / "download" / ".identity").glob("*.json")
    entry = json.loads(cache.read_text())
    entry["sha256"] = "0" * 64
    cache.write_text(json.dumps(entry))
    with pytest.raises(TransientError, match="changed since its identity was taken") as caught:
        download(tmp_path, cfg)
    assert str(source) in str(caught.value)
    retried = download(tmp_path, cfg)  # what Prefect's task retry would run
    assert retried.version == first.version and retried.reused


def test_a_local_file_that_changes_while_copied_fails_as_transient(tmp_path, disk):
    source = tmp_path / "openwebtext.tar.xz"
    source.write_bytes(PAYLOAD)
    cfg = config(str(source))
    disk.before_first_write = lambda: source.write_bytes(PAYLOAD + b"appended")
    with pytest.raises(TransientError, match="changed while being copied"):
        download(tmp_path, cfg)
    assert nothing_published(tmp_path)
    ref = download(tmp_path, cfg)  # the retry sees the new content, under its own identity
    assert archive(tmp_path, ref, "openwebtext.tar.xz") == PAYLOAD + b"appended"


# -- network faults and disk faults ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EPIPE, errno.ECONNRESET, errno.ETIMEDOUT],
    ids=errno.errorcode.get,
)
def test_a_network_fault_mid_body_resumes_with_a_range_request(tmp_path, server, monkeypatch, code):
    base, behaviour = server
    real_read = http.client.HTTPResponse.read
    delivered: list[int] = []

    def read(self, amt=None):
        if len(delivered) == 1:  # the second read of the body: the network goes away
            delivered.append(0)
            raise OSError(code, os.strerror(code))
        data = real_read(self, amt)
        if not delivered:
            delivered.append(len(data))
        return data

    monkeypatch.setattr(http.client.HTTPResponse, "read", read)
    ref = download(tmp_path, config(f"{base}/data.xz"))
    assert archive(tmp_path, ref, "data.xz") == PAYLOAD
    first, second = behaviour.gets()
    assert "Range" not in first and second["Range"] == f"bytes={delivered[0]}-"
    assert Store(tmp_path / "store").manifest("download", ref.version)["metrics"]["sources"][0]["resumes"] == 1


@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES, errno.ETIMEDOUT], ids=errno.errorcode.get)
def test_a_disk_error_writing_the_partial_file_is_not_retried_as_a_network_fault(tmp_path, server, disk, code):
    base, behaviour = server
    disk.error = code  # ETIMEDOUT too: a store on a network filesystem, which a retry of the GET cannot help
    with pytest.raises(GptflowError) as caught:
        download(tmp_path, config(f"{base}/data.xz"))
    message = str(caught.value)
    assert not is_transient(caught.value)
    assert "000-data.xz.partial" in message and os.strerror(code) in message and "\n" not in message
    assert len(behaviour.gets()) == 1


def test_too_little_free_space_fails_before_any_byte_is_written(tmp_path, server, monkeypatch):
    base, _ = server
    asked = free_space(monkeypatch, len(PAYLOAD) - 1)
    cfg = config(f"{base}/data.xz")
    with pytest.raises(DiskFullError) as caught:
        download(tmp_path, cfg)
    message = str(caught.value)
    assert re.match(r"\S+/download/\.work/[0-9a-f]{12}/000-data\.xz\.partial: ", message)
    assert f"needs {len(PAYLOAD)} more bytes, only {len(PAYLOAD) - 1} are free" in message
    assert "\n" not in message and not is_transient(caught.value)
    assert asked[-1] == Path(message.split(": ")[0]).parent  # the filesystem the partial file is on
    assert scratch_files(tmp_path, "*.partial") == [] and nothing_published(tmp_path)

    free_space(monkeypatch, len(PAYLOAD))  # exactly enough
    assert archive(tmp_path, download(tmp_path, cfg), "data.xz") == PAYLOAD


def test_the_free_space_needed_is_what_the_partial_file_still_lacks(tmp_path, server, monkeypatch):
    base, behaviour = server
    behaviour.drop_first_gets = 1
    cfg = config(f"{base}/data.xz", resume_attempts=0)
    with pytest.raises(TransientError):
        download(tmp_path, cfg)
    [partial] = scratch_files(tmp_path, "*.partial")
    kept = partial.stat().st_size
    missing = len(PAYLOAD) - kept
    free_space(monkeypatch, missing - 1)
    with pytest.raises(DiskFullError, match=f"needs {missing} more bytes, only {missing - 1} are free"):
        download(tmp_path, cfg)
    assert partial.stat().st_size == kept

    free_space(monkeypatch, missing)
    ref = download(tmp_path, cfg)
    assert archive(tmp_path, ref, "data.xz") == PAYLOAD
    assert behaviour.gets()[-1]["Range"] == f"bytes={kept}-"


def test_a_local_copy_checks_free_space_too(tmp_path, monkeypatch):
    source = tmp_path / "a.tar.xz"
    source.write_bytes(PAYLOAD)
    free_space(monkeypatch, len(PAYLOAD) - 1)
    with pytest.raises(DiskFullError, match=f"{re.escape(str(source))} needs {len(PAYLOAD)} more bytes"):
        download(tmp_path, config(str(source)))
    assert scratch_files(tmp_path, "*.partial") == []


def test_a_disk_that_fills_up_midway_fails_at_once_and_a_rerun_resumes_after_space_is_freed(tmp_path, server, disk):
    base, behaviour = server
    disk.room = 100_000
    cfg = config(f"{base}/data.xz")
    with pytest.raises(DiskFullError) as caught:
        download(tmp_path, cfg)
    [partial] = scratch_files(tmp_path, "*.partial")
    message = str(caught.value)
    assert str(partial) in message and "no space left on the device" in message
    assert "\n" not in message and not is_transient(caught.value)
    assert partial.stat().st_size == 100_000
    assert len(behaviour.gets()) == 1  # not retried: only freeing space helps

    disk.room = None  # space is freed
    ref = download(tmp_path, cfg)
    assert archive(tmp_path, ref, "data.xz") == PAYLOAD
    assert behaviour.gets()[1]["Range"] == "bytes=100000-"


# -- servers that refuse HEAD ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "honour_range"), [(403, True), (405, True), (501, True), (403, False)])
def test_a_server_that_refuses_head_is_asked_for_its_first_byte_alone(tmp_path, server, status, honour_range):
    base, behaviour = server
    behaviour.head_status = status  # 403: a URL signed for GET only
    behaviour.honour_range = honour_range
    cfg = config(f"{base}/data.xz")
    assert sources_identity(cfg, Store(tmp_path / "store")) == [
        {
            "url": f"{base}/data.xz",
            "etag": '"v1"',
            "last_modified": "Wed, 01 May 2024 00:00:00 GMT",
            "content_length": len(PAYLOAD),  # from Content-Range, or from Content-Length of a 200
        }
    ]
    ref = download(tmp_path, cfg)
    assert archive(tmp_path, ref, "data.xz") == PAYLOAD
    assert download(tmp_path, cfg).reused
    asked = [(method, headers.get("Range")) for method, _, headers in behaviour.requests]
    probe = [("HEAD", None), ("GET", "bytes=0-0")]
    assert asked == probe + probe + [("GET", None)] + probe

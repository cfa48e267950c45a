"""Stage `download` against a real HTTP server on loopback: exact bytes, resume after a dropped connection,
checksums, clear errors, and versions that follow the source's identity."""

import hashlib
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from storage.errors import ConfigError, DataIntegrityError, TransientError
from storage.store import Store
from tasks.download import STAGE, DownloadConfig, archive_names
from tasks.stage import is_transient

PAYLOAD = bytes(range(256)) * 4096 + b"the end"  # ~1 MiB, every byte value, not a multiple of any chunk


@dataclass
class Behaviour:
    """What the test server does; the handler reads it on every request."""

    body: bytes = PAYLOAD
    etag: str = '"v1"'
    last_modified: str = "Wed, 01 May 2024 00:00:00 GMT"
    status: int | None = None  # answer every request with this status instead
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
        self.send_header("ETag", self.behaviour.etag)
        self.send_header("Last-Modified", self.behaviour.last_modified)
        self.send_header("Accept-Ranges", "bytes")

    def do_HEAD(self) -> None:
        self._record()
        if self.behaviour.status:
            self.send_error(self.behaviour.status)
            return
        self.send_response(200)
        self._validators()
        self.send_header("Content-Length", str(len(self.behaviour.body)))
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
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        if match and b.honour_range and (if_range is None or if_range == b.etag):
            start = int(match[1])
        body = b.body[start:]
        self.send_response(206 if start else 200)
        self._validators()
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(b.body) - 1}/{len(b.body)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if b.drop_first_gets > 0:
            b.drop_first_gets -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    behaviour = Behaviour()
    handler = type("BoundHandler", (Handler,), {"behaviour": behaviour})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, behaviour
    httpd.shutdown()
    httpd.server_close()


def config(*sources, **overrides) -> DownloadConfig:
    fast = {"backoff_seconds": 0.0, "timeout_seconds": 10.0, "chunk_bytes": 64 * 1024}
    return DownloadConfig(sources=list(sources), **{**fast, **overrides})


def download(tmp_path: Path, cfg: DownloadConfig):
    return STAGE.run(tmp_path / "store", cfg)


def archive(tmp_path: Path, ref, name: str) -> bytes:
    return (Store(tmp_path / "store").path("download", ref.version) / "archives" / name).read_bytes()


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

"""Stage `download`: fetch the source archives, byte-exact, into `archives/`.

A source is an http(s) URL, a file:// URL or a local path, optionally with its SHA-256. The version id comes
from each source's identity (`source_identity`, the stage's identity hook), so that an unchanged source maps
to the stored version and is not fetched again, while a changed one makes a new version: that is how a
nightly run notices new data. The identity of a source is

- with a sha256 in the config: {url, sha256}; nothing is asked of the source until it is fetched;
- for a local file: {url, sha256 of its content}. The hash is kept in the store, in
  `download/.identity/<hash of the resolved path>.json` with the file's size, mtime, ctime and inode, and
  computed again only when one of those changed. Touching the file or rewriting it with the same bytes
  therefore keeps its version; new bytes make a new one, even with the size and mtime put back (the ctime,
  which cannot be set, still moves). A change that keeps all four is not seen;
- for an http(s) URL: {url, etag, last_modified, content_length} from a HEAD request or, where the server
  refuses HEAD (403, 405, 501: URLs signed for GET only, some CDNs), from a GET of its first byte alone
  (`Range: bytes=0-0`; the size comes from Content-Range), never the whole body;
- for an http(s) URL that reports none of those: {url, sha256 of its body}. Nothing else can tell a changed
  body, or one that ended early, so the body is fetched on every run, into the store's scratch
  (`download/.work/probe-<hash of the URL>/`), and the build uses that very file. A body that ended early
  is still published (nothing can tell), but the next run's full body makes a new version rather than
  the short one being reused forever.

HTTP downloads stream to a partial file in the version's scratch folder, which survives a failed attempt:
after a network fault (a reset, a timeout, an unreachable network or host, a broken pipe) the download
resumes with `Range: bytes=N-` (guarded by `If-Range`), first within the attempt a few times with backoff,
then across Prefect's task retries. `fetch_error` alone decides what a failure means; a failed write of the
partial file is the disk's fault and never passes for a network one. Before the first byte is written, the
free space where the partial file lies is checked against the announced length less the bytes already
there; a full disk, then or midway, fails with DiskFullError (not retried) and keeps the partial file, so
that a rerun after space is freed resumes where it stopped.
"""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import ssl
import time
from collections.abc import Callable
from http.client import HTTPException
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlsplit
from urllib.request import Request, url2pathname, urlopen

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from storage.errors import ConfigError, DataIntegrityError, DiskFullError, GptflowError, StoreError, TransientError
from storage.store import Store, atomic_write_json, sha256_file
from tasks.stage import Stage, StageConfig, StageContext, stage_task

NAME = "download"
ARCHIVES = "archives"
_HTTP_SCHEMES = ("http", "https")
_USER_AGENT = "gptflow-download/0.1"
# Statuses worth retrying although they are 4xx: request timeout, too early, rate limited (RFC 9110, 8470,
# 6585). Every other 4xx means the request itself is wrong and fails at once.
_RETRYABLE_4XX = frozenset({408, 425, 429})
# Answers to HEAD after which a ranged GET is asked instead: method not allowed or not implemented, and
# 403 from URLs whose signature covers GET only (S3 presigned URLs).
_HEAD_REFUSED = frozenset({403, 405, 501})
_MAX_BACKOFF_SECONDS = 30.0
_MAX_NAME_CHARS = 200
# Failures of the network path or of the peer, which a retry may find gone: the exception classes the
# standard library raises for them, and the errnos of a socket call for those it raises as a bare OSError.
_NETWORK_ERRORS = (URLError, HTTPException, ConnectionError, TimeoutError, ssl.SSLError)
_NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
        errno.ESHUTDOWN,
        errno.ETIMEDOUT,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENOTCONN,
    }
)
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_log = logging.getLogger("gptflow.download")


class Source(BaseModel):
    """One archive to fetch."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(min_length=1, description="http://, https:// or file:// URL, or a local path, of one archive.")
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="Expected SHA-256 of the file (hex). Checked after the download, and then the source's "
        "identity: the file is not fetched again while a version with this hash is stored.",
    )

    @field_validator("sha256")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        return value.lower() if value else value


def _plain_urls(value: Any) -> Any:
    if isinstance(value, list):
        return [{"url": item} if isinstance(item, str) else item for item in value]
    return value


# A list of sources in which a plain string stands for {"url": string}.
Sources = Annotated[list[Source], BeforeValidator(_plain_urls)]


class DownloadConfig(StageConfig):
    """Which archives to fetch, and how patiently."""

    RUNTIME_FIELDS = frozenset({"timeout_seconds", "chunk_bytes", "resume_attempts", "backoff_seconds"})

    sources: Sources = Field(description="The archives to fetch (a plain string is read as a URL).")
    timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Seconds to wait for a connection or for the next bytes of a response before it counts as dropped.",
    )
    chunk_bytes: int = Field(
        default=1 << 20,
        ge=4096,
        le=1 << 26,
        description="Bytes read and written per step while streaming (1 MiB keeps memory flat and syscalls few).",
    )
    resume_attempts: int = Field(
        default=5,
        ge=0,
        le=100,
        description="Retries within one task attempt after a network fault (a dropped or reset connection, a "
        "timeout, an unreachable network or host) or a 5xx, each resuming with a Range request; the count "
        "restarts whenever a try gains bytes. Past it the attempt fails as transient and the task's own "
        "retries take over, resuming from the same partial file.",
    )
    backoff_seconds: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="Pause before the first in-attempt retry; it doubles with each retry (at most 30 s).",
    )

    @model_validator(mode="after")
    def _check(self) -> "DownloadConfig":
        problems = []
        if not self.sources:
            problems.append("sources: give at least one archive URL or path")
        seen: set[str] = set()
        for source in self.sources:
            scheme = urlsplit(source.url).scheme.lower()
            if scheme not in ("", "file", *_HTTP_SCHEMES):
                problems.append(f"sources: {source.url!r} has unsupported scheme {scheme!r} (http, https, file)")
            if source.url in seen:
                problems.append(f"sources: {source.url!r} is listed twice")
            seen.add(source.url)
        if problems:
            raise ValueError("; ".join(problems))
        return self


# -- names and identities --------------------------------------------------------------------------------


def local_path(url: str) -> Path | None:
    """The file a file:// URL or a plain path names; None for http(s) URLs."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in _HTTP_SCHEMES:
        return None
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"{url}: file:// URLs on another host ({parts.netloc}) are not supported")
        return Path(url2pathname(parts.path))
    if scheme == "":
        return Path(url).expanduser()
    raise ConfigError(f"{url}: unsupported scheme {scheme!r} (http, https, file)")


def _safe_name(url: str) -> str:
    """The last path segment of the URL, reduced to characters that cannot leave `archives/`."""
    path = local_path(url)
    raw = path.name if path is not None else unquote(urlsplit(url).path)
    last = raw.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    # Only [A-Za-z0-9._-], and no leading dot: no separators, no "..", no hidden files beside the store's own.
    name = re.sub(r"[^A-Za-z0-9._-]", "_", last).lstrip(".")[:_MAX_NAME_CHARS]
    return name if name.strip("_") else "download"


def archive_names(urls: list[str]) -> list[str]:
    """One safe, distinct file name per URL, in order: `a.tar.xz`, `a-2.tar.xz`, ... for repeated names."""
    names: list[str] = []
    for url in urls:
        base = _safe_name(url)
        name, n = base, 2
        while name in names:
            stem, dot, rest = base.partition(".")
            name, n = f"{stem}-{n}{dot}{rest}", n + 1
        names.append(name)
    return names


# -- what a failure means ---------------------------------------------------------------------------------


def _http_error(url: str, code: int, reason: str) -> GptflowError:
    if code >= 500 or code in _RETRYABLE_4XX:
        return TransientError(f"{url}: HTTP {code} {reason}")
    return ConfigError(f"{url}: HTTP {code} {reason} (not retried: the request itself is refused)")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    reason = getattr(exc, "reason", None) or exc  # URLError wraps the socket error as its reason
    text = reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
    return " ".join(text.split())


def fetch_error(url: str, exc: BaseException) -> GptflowError | None:
    """What a failure while talking to `url` means; the one place that decides what is retried.

    TransientError: a 5xx or 408/425/429, and network faults (a reset, a timeout, an unreachable network or
    host, a broken pipe, a TLS or protocol error). ConfigError: any other HTTP status, and a certificate that
    does not verify (retrying cannot help). None: not a network fault, which the caller raises as it is.
    """
    if isinstance(exc, HTTPError):
        return _http_error(url, exc.code, exc.reason)
    reason = exc.reason if isinstance(exc, URLError) and isinstance(exc.reason, BaseException) else exc
    if isinstance(reason, ssl.SSLCertVerificationError):
        return ConfigError(f"{url}: {_describe(exc)}")
    if isinstance(exc, _NETWORK_ERRORS) or getattr(reason, "errno", None) in _NETWORK_ERRNOS:
        return TransientError(f"{url}: {_describe(exc)}")
    return None


def _raise_fetch_error(url: str, exc: BaseException) -> NoReturn:
    error = fetch_error(url, exc)
    if error is None:
        raise exc
    raise error from exc


def _disk_error(path: Path, exc: OSError, what: str) -> GptflowError:
    """A failed open or write of `path` (a partial file) is the local disk's fault: never retried."""
    exc.filename = str(path)  # a failed write() names no file; whoever reads the cause learns which
    kept = path.stat().st_size if path.exists() else 0
    if exc.errno in _DISK_FULL_ERRNOS:
        return DiskFullError(
            f"{path}: no space left on the device after {kept} bytes of {what}; "
            "the file is kept: free some space and rerun"
        )
    return StoreError(f"{path}: cannot write {what}: {exc.strerror or exc}")


def _check_space(partial: Path, needed: int, what: str) -> None:
    """Fail before the first byte is written when the `needed` bytes cannot fit where `partial` lies."""
    free = shutil.disk_usage(partial.parent).free
    if needed > free:
        raise DiskFullError(f"{partial}: {what} needs {needed} more bytes, only {free} are free there")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _stream(read: Callable[[int], bytes], partial: Path, append: bool, chunk_bytes: int, what: str) -> None:
    """Write what `read` returns into `partial` until it returns nothing.

    An error of `read` leaves as it is (the caller knows what it reads from); an error opening or writing
    `partial` leaves as a disk error naming it. Unbuffered writes: whatever reached the file when a write
    fails is a prefix of the body, which a later try extends.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(partial, flags, 0o666)
    except OSError as exc:
        raise _disk_error(partial, exc, what) from exc
    try:
        while chunk := read(chunk_bytes):
            try:
                _write_all(fd, chunk)
            except OSError as exc:
                raise _disk_error(partial, exc, what) from exc
    finally:
        os.close(fd)


# -- identities -------------------------------------------------------------------------------------------


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _length(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _content_range(value: str | None) -> tuple[int, int | None]:
    """(first byte, total size or None) of a `Content-Range: bytes a-b/total` header."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if match is None:
        return -1, None
    return int(match[1]), None if match[2] == "*" else int(match[2])


def _validators(headers: Any, total: int | None) -> dict[str, Any]:
    return {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified"), "content_length": total}


def http_validators(url: str, timeout: float) -> dict[str, Any]:
    """ETag, Last-Modified and size of `url`: from a HEAD request, or where the server refuses HEAD, from a
    GET of the first byte alone (a server that ignores the range answers 200: its Content-Length is the size,
    and the body is never read)."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    try:
        with urlopen(Request(url, method="HEAD", headers=headers), timeout=timeout) as response:
            return _validators(response.headers, _length(response.headers.get("Content-Length")))
    except (OSError, HTTPException) as exc:
        if not (isinstance(exc, HTTPError) and exc.code in _HEAD_REFUSED):
            _raise_fetch_error(url, exc)
    try:
        with urlopen(Request(url, headers={**headers, "Range": "bytes=0-0"}), timeout=timeout) as response:
            if response.status == 206:
                total = _content_range(response.headers.get("Content-Range"))[1]
            else:
                total = _length(response.headers.get("Content-Length"))
            return _validators(response.headers, total)
    except (OSError, HTTPException) as exc:
        _raise_fetch_error(url, exc)


def _local_file(url: str, path: Path) -> Path:
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise ConfigError(f"source {url}: {path} {what}")
    return path.resolve()


def _change_signal(stat: os.stat_result) -> dict[str, int]:
    """What moves when a file's bytes may have changed. The ctime is in it because, unlike the mtime, no
    one can set it back; a hard link or a chmod moves it too, which costs one needless hash."""
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def _hash_cache(store: Store, path: Path) -> Path:
    key = hashlib.sha256(str(path).encode()).hexdigest()[:32]
    return store.stage_dir(NAME) / ".identity" / f"{key}.json"


def local_sha256(store: Store, path: Path) -> str:
    """The sha256 of the local file at the resolved `path`, from the store's cache while the file's size,
    mtime, ctime and inode are those the cached hash was taken with; else hashed, and cached."""
    cache = _hash_cache(store, path)
    signal = _change_signal(path.stat())
    cached = _read_meta(cache)
    if cached.get("path") == str(path) and all(cached.get(k) == v for k, v in signal.items()):
        if isinstance(digest := cached.get("sha256"), str):
            return digest
    digest = sha256_file(path)
    if _change_signal(path.stat()) != signal:
        raise TransientError(f"{path}: changed while being hashed")
    atomic_write_json(cache, {"path": str(path), **signal, "sha256": digest})
    return digest


def _probe_name(url: str) -> str:
    return "probe-" + hashlib.sha256(url.encode()).hexdigest()[:16]


def probe_body(url: str, store: Store, cfg: DownloadConfig) -> str:
    """Fetch the whole body of `url` into the store's scratch and return its sha256; the file stays there,
    named by that hash, for the build to take (`_take_probe`)."""
    name = _probe_name(url)
    with store.lock(NAME, name):  # two runs probing one URL would write into the same files
        folder = store.work_dir(NAME, name)
        # No validator can tie what an earlier probe left (a body, a partial) to the body served now.
        for stale in folder.iterdir():
            stale.unlink(missing_ok=True)
        partial = folder / "body.partial"
        fetch_http(url, partial, cfg, _log)
        digest = sha256_file(partial)
        os.replace(partial, folder / digest)
        partial.with_name(partial.name + ".json").unlink(missing_ok=True)
    return digest


def _take_probe(store: Store, url: str, digest: str, partial: Path) -> bool:
    """Move the body the identity of `url` was computed from to `partial`; False when it is gone (a
    `gc --scratch`, or another run of the same version took it)."""
    try:
        os.replace(store.work_dir(NAME, _probe_name(url)) / digest, partial)
    except FileNotFoundError:
        return False
    return True


def _probed(source: Source, identity: dict[str, Any]) -> bool:
    """Whether `identity` is the hash of a probed HTTP body (not a sha256 from the config, not a local file)."""
    return not source.sha256 and "sha256" in identity and local_path(source.url) is None


def source_identity(source: Source, store: Store, cfg: DownloadConfig) -> dict[str, Any]:
    """What decides whether `source` changed (see the module's docstring): the sha256 given in the config,
    else a local file's content hash, else the server's validators, else the hash of the body itself."""
    if source.sha256:
        return {"url": source.url, "sha256": source.sha256}
    path = local_path(source.url)
    if path is not None:
        return {"url": source.url, "sha256": local_sha256(store, _local_file(source.url, path))}
    validators = http_validators(source.url, cfg.timeout_seconds)
    if any(value is not None for value in validators.values()):
        return {"url": source.url, **validators}
    _log.warning(
        "%s: the server sends no ETag, Last-Modified or Content-Length, so the whole body is fetched on every "
        "run to see whether it changed; give the source's sha256 to avoid that",
        source.url,
    )
    return {"url": source.url, "sha256": probe_body(source.url, store, cfg)}


def sources_identity(cfg: DownloadConfig, store: Store) -> list[dict[str, Any]]:
    """The `identity=` hook of the stage: one identity per source, in order."""
    identities = [source_identity(source, store, cfg) for source in cfg.sources]
    if any(_probed(s, i) for s, i in zip(cfg.sources, identities, strict=True)):
        # The run will reuse the stored version: the probed bodies are not needed, and a copy of each
        # archive would otherwise stay in scratch until the next probe.
        if store.has(NAME, STAGE.version(cfg, {}, identities)):
            for source, identity in zip(cfg.sources, identities, strict=True):
                if _probed(source, identity):
                    (store.work_dir(NAME, _probe_name(source.url)) / identity["sha256"]).unlink(missing_ok=True)
    return identities


# -- fetching ---------------------------------------------------------------------------------------------


def _resume_validator(meta: dict[str, Any]) -> str | None:
    """If-Range takes a strong ETag or a date (RFC 9110 13.1.5): weak ETags cannot guard a range."""
    etag = meta.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return meta.get("last_modified")


class _RangeMismatch(Exception):
    """The server answered 206 for another range than asked: the partial file cannot be extended."""


def fetch_http(
    url: str,
    partial: Path,
    cfg: DownloadConfig,
    log: Any,
    expected_etag: str | None = None,
) -> dict[str, Any]:
    """Stream `url` into `partial`, resuming what an earlier try left there. Returns the response's
    etag, last_modified and how many times it resumed.

    Raises TransientError when retries within this attempt are used up (the partial file stays for the
    next attempt), ConfigError for a 4xx, DataIntegrityError when the server sends more than it announced,
    DiskFullError when the rest cannot fit or the disk fills up (the partial file stays for a rerun).
    """
    meta_path = partial.with_name(partial.name + ".json")
    failures = resumes = 0
    while True:
        have = partial.stat().st_size if partial.exists() else 0
        meta = _read_meta(meta_path) if have else {}
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
            if validator := _resume_validator(meta):
                headers["If-Range"] = validator
        total: int | None = None
        try:
            with urlopen(Request(url, headers=headers), timeout=cfg.timeout_seconds) as response:
                etag = response.headers.get("ETag")
                if expected_etag and etag and etag != expected_etag:
                    raise TransientError(f"{url}: changed while being fetched (ETag {expected_etag} -> {etag})")
                append = response.status == 206
                if append:
                    start, total = _content_range(response.headers.get("Content-Range"))
                    if start != have:
                        raise _RangeMismatch(f"asked for bytes from {have}, got a range from {start}")
                else:
                    total = _length(response.headers.get("Content-Length"))
                if total is not None:
                    # Also right for a restart from byte 0: truncating the partial file frees its `have` bytes.
                    _check_space(partial, total - have, url)
                if append:
                    resumes += 1
                    log.info("%s: resuming at byte %d", url, have)
                else:
                    if have:
                        log.info("%s: the server sent the whole file instead of a range: starting over", url)
                    meta = {"url": url, "etag": etag, "last_modified": response.headers.get("Last-Modified")}
                    atomic_write_json(meta_path, meta)
                _stream(response.read, partial, append, cfg.chunk_bytes, url)
        except _RangeMismatch as exc:
            partial.unlink(missing_ok=True)
            reason = str(exc)
        except (OSError, HTTPException) as exc:
            if isinstance(exc, HTTPError) and exc.code == 416 and have:  # our partial no longer fits the file
                partial.unlink(missing_ok=True)
                reason = "HTTP 416 for the resumed range"
            else:
                error = fetch_error(url, exc)
                if error is None:
                    raise
                if not isinstance(error, TransientError):
                    raise error from exc
                reason = _describe(exc)
        else:
            size = partial.stat().st_size
            if total is None or size == total:
                return {"etag": meta.get("etag"), "last_modified": meta.get("last_modified"), "resumes": resumes}
            if size > total:
                partial.unlink()
                raise DataIntegrityError(f"{url}: received {size} bytes, more than the {total} announced")
            reason = f"connection closed after {size} of {total} bytes"
        size = partial.stat().st_size if partial.exists() else 0
        failures = 1 if size > have else failures + 1  # consecutive failures; progress starts a new run
        if failures > cfg.resume_attempts:
            raise TransientError(
                f"{url}: {reason}; gave up after {failures} failed tries in this attempt ({size} bytes kept to resume)"
            )
        delay = min(cfg.backoff_seconds * 2 ** (failures - 1), _MAX_BACKOFF_SECONDS)
        log.warning("%s: %s; retrying in %.1f s", url, reason, delay)
        time.sleep(delay)


def copy_local(path: Path, partial: Path, chunk_bytes: int) -> None:
    """Copy a local file into `partial` in chunks (never whole into memory).

    A file rewritten during the copy fails the attempt as transient: the retry sees its new identity.
    """
    before = path.stat()
    have = partial.stat().st_size if partial.exists() else 0
    _check_space(partial, before.st_size - have, str(path))  # the copy starts over: `have` is freed first
    with open(path, "rb") as src:
        _stream(src.read, partial, False, chunk_bytes, str(path))
    if _change_signal(path.stat()) != _change_signal(before):
        raise TransientError(f"{path}: changed while being copied")


def _stored_copy(
    store: Store, url: str, sha256: str | None, identity: dict[str, Any]
) -> tuple[Path, dict[str, Any]] | None:
    """An archive of a stored download version that is the file `url` names now, with its source record: the
    same sha256 when that is known (given, or a local file's content hash), else the same URL with the same
    strong ETag. The stored file must still hash to its recorded sha256 (a damaged copy is not reused)."""
    etag = identity.get("etag")
    if sha256 is None and (not etag or etag.startswith("W/")):
        return None
    for manifest in reversed(store.versions(NAME)):
        for record in manifest.get("metrics", {}).get("sources", []):
            same = record.get("sha256") == sha256 if sha256 else (record.get("url"), record.get("etag")) == (url, etag)
            path = store.path(NAME, manifest["version"]) / ARCHIVES / str(record.get("file"))
            if same and path.is_file() and path.stat().st_size == record.get("bytes"):
                if sha256_file(path) == record.get("sha256"):
                    return path, record
    return None


def _link_or_copy(source: Path, dest: Path) -> None:
    dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
    except OSError:  # another filesystem, or links refused
        shutil.copyfile(source, dest)


def fetch_source(
    source: Source,
    dest: Path,
    cfg: DownloadConfig,
    log: Any,
    store: Store,
    identity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fetch one source into `dest` (via `dest.partial`) and check it; returns its metrics record (url,
    bytes, sha256, etag, last_modified, resumes). `identity` is what the version id was made from: the file
    must be the one it describes (the same ETag; the same sha256, given or computed).

    A `dest` already complete from an earlier attempt of this version is kept as it is.
    """
    done_path = dest.with_name(dest.name + ".done.json")
    if dest.is_file() and (done := _read_meta(done_path)).get("bytes") == dest.stat().st_size:
        log.info("%s: already fetched by an earlier attempt", source.url)
        return done
    identity = identity or {}
    expected = source.sha256 or identity.get("sha256")
    partial = dest.with_name(dest.name + ".partial")
    path = local_path(source.url)
    started = time.monotonic()
    got = {"etag": None, "last_modified": None, "resumes": 0}
    stored = _stored_copy(store, source.url, expected, identity)
    if stored is not None:
        # A stored version already holds this very file (same sha256, or the same URL and strong ETag):
        # linked, not fetched again, so a nightly run with one new source fetches one file. Linked straight
        # to `dest`, never to the partial file, which writers append to or truncate.
        copy, record = stored
        _link_or_copy(copy, dest)
        record = {"url": source.url, "bytes": record["bytes"], "sha256": record["sha256"], "resumes": 0}
        record |= {key: identity.get(key) for key in ("etag", "last_modified")}
        atomic_write_json(done_path, record)
        log.info("%s: the same file as %s, linked", source.url, copy.relative_to(store.root))
        return record
    if path is not None:
        path = _local_file(source.url, path)
        copy_local(path, partial, cfg.chunk_bytes)
    elif _probed(source, identity) and _take_probe(store, source.url, identity["sha256"], partial):
        log.info("%s: using the body fetched to take its identity", source.url)
    else:
        # The version id was made from the ETag the identity's request saw; the GET must fetch that same file.
        got = fetch_http(source.url, partial, cfg, log, expected_etag=identity.get("etag"))
    digest = sha256_file(partial)
    if expected and digest != expected:
        partial.unlink()
        if source.sha256:
            raise DataIntegrityError(f"{source.url}: sha256 mismatch: expected {source.sha256}, got {digest}")
        if path is not None:  # the cached hash may be what is stale: the retry hashes the file again
            _hash_cache(store, path).unlink(missing_ok=True)
        raise TransientError(f"{source.url}: changed since its identity was taken (sha256 {expected} -> {digest})")
    os.replace(partial, dest)
    record = {"url": source.url, "bytes": dest.stat().st_size, "sha256": digest, **got}
    atomic_write_json(done_path, record)
    log.info("%s: %d bytes in %.1f s", source.url, record["bytes"], time.monotonic() - started)
    return record


def build(ctx: StageContext, cfg: DownloadConfig) -> dict[str, Any]:
    # Every source is fetched into the scratch folder first, so that a failure on the third source keeps
    # the first two for the next attempt; only complete, checked files move into the version.
    # Scratch names carry the source's index, so no source's file can be taken for another's partial.
    names = archive_names([source.url for source in cfg.sources])
    scratch = [ctx.work / f"{i:03d}-{name}" for i, name in enumerate(names)]
    identities = ctx.identity or [None] * len(cfg.sources)
    fetched = [
        fetch_source(source, path, cfg, ctx.log, ctx.store, identity)
        for source, path, identity in zip(cfg.sources, scratch, identities, strict=True)
    ]
    archives = ctx.out / ARCHIVES
    archives.mkdir()
    for record, path, name in zip(fetched, scratch, names, strict=True):
        os.replace(path, archives / name)
        record["file"] = name
        ctx.log.info("%s -> %s/%s", record["url"], ARCHIVES, name)
    return {"sources": fetched, "files": len(fetched), "bytes": sum(record["bytes"] for record in fetched)}


STAGE = Stage(name=NAME, module=__name__, config=DownloadConfig, build=build, inputs=(), identity=sources_identity)
download_task = stage_task(STAGE, cache=False, retries=5, backoff_seconds=2)

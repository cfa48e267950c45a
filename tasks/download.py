"""Stage `download`: fetch the source archives, byte-exact, into `archives/`.

A source is an http(s) URL, a file:// URL or a local path, optionally with its SHA-256. The version id
comes from each source's identity (the `identity=` hook): the URL plus its sha256 when given, else the
ETag / Last-Modified / Content-Length a HEAD request reports, else (local files) the resolved path, size
and mtime. An unchanged source therefore maps to the stored version and is not fetched again; a changed one
(a new ETag, a rewritten file) makes a new version. That is how a nightly run notices new data.

HTTP downloads stream to a partial file in the version's scratch folder, which survives a failed attempt:
after a dropped connection the download resumes with `Range: bytes=N-` (guarded by `If-Range`), first
within the attempt a few times with backoff, then across Prefect's task retries.
"""

import json
import logging
import os
import re
import ssl
import time
from http.client import HTTPException
from pathlib import Path
from typing import Annotated, Any
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlsplit
from urllib.request import Request, url2pathname, urlopen

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from storage.errors import ConfigError, DataIntegrityError, GptflowError, TransientError
from storage.store import Store, atomic_write_json, sha256_file
from tasks.stage import Stage, StageConfig, StageContext, stage_task

ARCHIVES = "archives"
_HTTP_SCHEMES = ("http", "https")
_USER_AGENT = "gptflow-download/0.1"
# Statuses worth retrying although they are 4xx: request timeout, too early, rate limited (RFC 9110, 8470,
# 6585). Every other 4xx means the request itself is wrong and fails at once.
_RETRYABLE_4XX = frozenset({408, 425, 429})
_MAX_BACKOFF_SECONDS = 30.0
_MAX_NAME_CHARS = 200
_NETWORK_ERRORS = (URLError, HTTPException, ConnectionError, TimeoutError, ssl.SSLError)


class Source(BaseModel):
    """One archive to fetch."""

    model_config = ConfigDict(extra="forbid")

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
        description="Retries within one task attempt after a dropped connection or a 5xx, each resuming with a "
        "Range request; the count restarts whenever a try gains bytes. Past it the attempt fails as "
        "transient and the task's own retries take over, resuming from the same partial file.",
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


def _http_error(url: str, code: int, reason: str) -> GptflowError:
    if code >= 500 or code in _RETRYABLE_4XX:
        return TransientError(f"{url}: HTTP {code} {reason}")
    return ConfigError(f"{url}: HTTP {code} {reason} (not retried: the request itself is refused)")


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc  # URLError wraps the socket error as its reason
    text = reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
    return " ".join(text.split())


def _network_error(url: str, exc: BaseException) -> GptflowError:
    """A failed connection is transient, except a certificate that does not verify (retrying cannot help)."""
    if isinstance(getattr(exc, "reason", exc), ssl.SSLCertVerificationError):
        return ConfigError(f"{url}: {_describe(exc)}")
    return TransientError(f"{url}: {_describe(exc)}")


def http_head(url: str, timeout: float) -> dict[str, Any]:
    """ETag, Last-Modified and Content-Length of `url`, from a HEAD request (a GET's headers where the
    server refuses HEAD)."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    for method in ("HEAD", "GET"):
        try:
            with urlopen(Request(url, method=method, headers=headers), timeout=timeout) as response:
                found = response.headers
                break
        except HTTPError as exc:
            if method == "HEAD" and exc.code in (405, 501):
                continue
            raise _http_error(url, exc.code, exc.reason) from None
        except _NETWORK_ERRORS as exc:
            raise _network_error(url, exc) from exc
    length = found.get("Content-Length")
    validators = {
        "etag": found.get("ETag"),
        "last_modified": found.get("Last-Modified"),
        "content_length": int(length) if length and length.isdigit() else None,
    }
    if not any(validators.values()):
        logging.getLogger("gptflow.download").warning(
            "%s: the server sends no ETag, Last-Modified or Content-Length, so a change cannot be noticed; "
            "give the source's sha256",
            url,
        )
    return validators


def _local_file(url: str, path: Path) -> Path:
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise ConfigError(f"source {url}: {path} {what}")
    return path.resolve()


def source_identity(source: Source, timeout: float = 60.0) -> dict[str, Any]:
    """What decides whether `source` changed: its sha256 if given, else its HTTP validators or file stat."""
    if source.sha256:
        return {"url": source.url, "sha256": source.sha256}
    path = local_path(source.url)
    if path is None:
        return {"url": source.url, **http_head(source.url, timeout)}
    resolved = _local_file(source.url, path)
    stat = resolved.stat()
    return {"url": source.url, "path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def sources_identity(cfg: DownloadConfig, store: Store | None = None) -> list[dict[str, Any]]:
    """The `identity=` hook of the stage: one identity per source, in order."""
    return [source_identity(source, cfg.timeout_seconds) for source in cfg.sources]


# -- fetching --------------------------------------------------------------------------------------------


def _content_range(value: str | None) -> tuple[int, int | None]:
    """(first byte, total size or None) of a `Content-Range: bytes a-b/total` header."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if match is None:
        return -1, None
    return int(match[1]), None if match[2] == "*" else int(match[2])


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


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
    next attempt), ConfigError for a 4xx, DataIntegrityError when the server sends more than it announced.
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
                if response.status == 206:
                    start, total = _content_range(response.headers.get("Content-Range"))
                    if start != have:
                        raise _RangeMismatch(f"asked for bytes from {have}, got a range from {start}")
                    mode = "ab"
                    resumes += 1
                    log.info("%s: resuming at byte %d", url, have)
                else:
                    if have:
                        log.info("%s: the server sent the whole file instead of a range: starting over", url)
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    mode = "wb"
                    meta = {"url": url, "etag": etag, "last_modified": response.headers.get("Last-Modified")}
                    atomic_write_json(meta_path, meta)
                with open(partial, mode) as out:
                    while chunk := response.read(cfg.chunk_bytes):
                        out.write(chunk)
        except _RangeMismatch as exc:
            partial.unlink(missing_ok=True)
            reason = str(exc)
        except HTTPError as exc:
            if exc.code == 416 and have:  # our partial no longer fits the file: start over
                partial.unlink(missing_ok=True)
                reason = "HTTP 416 for the resumed range"
            else:
                error = _http_error(url, exc.code, exc.reason)
                if not isinstance(error, TransientError):
                    raise error from None
                reason = str(error)
        except _NETWORK_ERRORS as exc:
            error = _network_error(url, exc)
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
    with open(path, "rb") as src, open(partial, "wb") as dst:
        while chunk := src.read(chunk_bytes):
            dst.write(chunk)
    after = path.stat()
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise TransientError(f"{path}: changed while being copied")


def fetch_source(
    source: Source, dest: Path, cfg: DownloadConfig, log: Any, identity: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fetch one source into `dest` (via `dest.partial`) and check it; returns its metrics record (url,
    bytes, sha256, etag, last_modified, resumes). `identity` is what the version id was made from: an HTTP
    fetch must get the file with that ETag.

    A `dest` already complete from an earlier attempt of this version is kept as it is.
    """
    done_path = dest.with_name(dest.name + ".done.json")
    if dest.is_file() and (done := _read_meta(done_path)).get("bytes") == dest.stat().st_size:
        log.info("%s: already fetched by an earlier attempt", source.url)
        return done
    partial = dest.with_name(dest.name + ".partial")
    path = local_path(source.url)
    started = time.monotonic()
    if path is None:
        # The version id was made from the ETag the identity's HEAD saw; the GET must fetch that same file.
        expected = (identity or {}).get("etag")
        got = fetch_http(source.url, partial, cfg, log, expected_etag=expected)
    else:
        copy_local(_local_file(source.url, path), partial, cfg.chunk_bytes)
        got = {"etag": None, "last_modified": None, "resumes": 0}
    digest = sha256_file(partial)
    if source.sha256 and digest != source.sha256:
        partial.unlink()
        raise DataIntegrityError(f"{source.url}: sha256 mismatch: expected {source.sha256}, got {digest}")
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
        fetch_source(source, path, cfg, ctx.log, identity)
        for source, path, identity in zip(cfg.sources, scratch, identities, strict=True)
    ]
    archives = ctx.out / ARCHIVES
    archives.mkdir()
    for record, path, name in zip(fetched, scratch, names, strict=True):
        os.replace(path, archives / name)
        record["file"] = name
        ctx.log.info("%s -> %s/%s", record["url"], ARCHIVES, name)
    return {"sources": fetched, "files": len(fetched), "bytes": sum(record["bytes"] for record in fetched)}


STAGE = Stage(
    name="download", module=__name__, config=DownloadConfig, build=build, inputs=(), identity=sources_identity
)
download_task = stage_task(STAGE, cache=False, retries=5, backoff_seconds=2)

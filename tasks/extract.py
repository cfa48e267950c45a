"""Stage `extract`: the downloaded archives -> documents in Parquet shards.

Reads the real OpenWebText layout and its simpler relatives, recognised by magic bytes, never by name:

    openwebtext.tar.xz  or  urlsf_subsetNN.tar      (outer tar, compressed or plain)
      openwebtext/urlsf_subsetNN-M_data.xz           (inner tar, compressed)
        NNNNNNN-<md5>.txt                            (one document per regular-file member)

an inner `*_data.xz` given directly, or a plain tar of .txt files. Compression: xz, gzip, bzip2, zstd.
Everything streams (tar "r|" mode over nested decompressors), so no archive is ever held in memory, and
members are never written to disk: a hostile name such as `../../etc/passwd` is only data.

Output: `docs/shard-00000.parquet`, ... (zstd) with columns doc_id, text, source, member, n_bytes.
"""

import bz2
import gzip
import logging
import lzma
import re
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from pydantic import Field

from storage.errors import DataIntegrityError
from tasks.download import ARCHIVES
from tasks.stage import Stage, StageConfig, StageContext, stage_task

DOCS = "docs"
SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("member", pa.string()),
        ("n_bytes", pa.int64()),
    ]
)

XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BZIP2_MAGIC = re.compile(rb"BZh[1-9]")
_TAR_MAGIC_OFFSET = 257  # POSIX ustar (and GNU "ustar  ") headers carry "ustar" here
_BLOCK = tarfile.BLOCKSIZE
# outer tar -> inner tar is depth 1; a little slack for a tar of such outer tars, and no more: an archive
# nested deeper than this is far more likely a decompression bomb than a corpus.
MAX_NESTING = 3
# Rows per Parquet row group: a few MB of web text, so a reader can stream a shard in small pieces.
_ROW_GROUP_DOCS = 1024
# How many hostile member names the metrics list verbatim (all are counted).
_MAX_LISTED_NAMES = 20
_ARCHIVE_SUFFIXES = (".tar", ".xz", ".txz", ".tgz", ".gz", ".bz2", ".zst", ".zstd")
# Damage that surfaces while decompressing or walking a tar stream.
_CORRUPTION = (
    EOFError,
    lzma.LZMAError,
    zlib.error,
    gzip.BadGzipFile,
    tarfile.TarError,
    zstandard.ZstdError,
)


class ExtractConfig(StageConfig):
    """How documents are cut into shards, and what to do with damaged archives."""

    shard_docs: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="Documents per Parquet shard: ~50 MB of OpenWebText text (~5 KB a document), a unit of "
        "work that the later stages process one at a time in parallel.",
    )
    max_docs: int | None = Field(
        default=None,
        ge=1,
        description="Stop after this many documents (quick runs); none reads every archive to the end.",
    )
    skip_corrupt: bool = Field(
        default=False,
        description="Skip a truncated or corrupt inner archive, listing it under `skipped` in the metrics, "
        "instead of failing the stage. Its documents are dropped whole.",
    )


# -- format detection ------------------------------------------------------------------------------------


class _Corrupt(Exception):
    """A stream that decompresses but does not hold what it should (a tar)."""


class _Peekable:
    """A read-only stream whose first bytes can be looked at without consuming them (for magic bytes)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._head = b""

    def peek(self, n: int) -> bytes:
        while len(self._head) < n:
            chunk = self._raw.read(n - len(self._head))
            if not chunk:
                break
            self._head += chunk
        return self._head[:n]

    def read(self, n: int | None = -1) -> bytes:
        if not self._head:
            return self._raw.read(n)
        if n is None or n < 0:
            data, self._head = self._head + self._raw.read(), b""
            return data
        data, self._head = self._head[:n], self._head[n:]
        return data


class _ZstdReader:
    """Streaming zstd that, unlike zstandard's stream_reader, reports a truncated frame (EOFError)."""

    def __init__(self, raw: Any, chunk: int = 1 << 16) -> None:
        self._raw = raw
        self._chunk = chunk
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._out = b""
        self._ended = False

    def __enter__(self) -> "_ZstdReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._out = b""

    def read(self, n: int | None = -1) -> bytes:
        while not self._ended and (n is None or n < 0 or len(self._out) < n):
            data = self._raw.read(self._chunk)
            if not data:
                if not self._frame.eof:
                    raise EOFError("zstd stream ended inside a frame")
                self._ended = True
                break
            while data:
                if self._frame.eof:  # concatenated frames: start the next one
                    self._frame = self._decompressor.decompressobj()
                self._out += self._frame.decompress(data)
                data = self._frame.unused_data if self._frame.eof else b""
        if n is None or n < 0:
            out, self._out = self._out, b""
        else:
            out, self._out = self._out[:n], self._out[n:]
        return out


def compression_of(head: bytes) -> str | None:
    """ "xz", "gzip", "bzip2" or "zstd" from a stream's first bytes; None when it is not compressed."""
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if BZIP2_MAGIC.match(head):
        return "bzip2"
    return None


def is_tar(head: bytes) -> bool:
    """A ustar header, or the all-zero block that ends (here: is all of) an empty tar."""
    return head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar" or (
        len(head) >= _BLOCK and not head[:_BLOCK].strip(b"\0")
    )


def _decompressor(kind: str, stream: Any) -> Any:
    if kind == "xz":
        return lzma.LZMAFile(stream)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if kind == "bzip2":
        return bz2.BZ2File(stream)
    return _ZstdReader(stream)


class _CheckedTarInfo(tarfile.TarInfo):
    """Remembers why a tar stream ended: tarfile treats a truncated or garbled header after the first
    member as a normal end of archive, which would drop the rest of a damaged archive silently."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            tar.bad_end = exc  # type: ignore[attr-defined]
            raise


# -- documents -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    source: str
    member: str
    n_bytes: int
    invalid_utf8: bool


@dataclass
class ExtractStats:
    """Counts gathered while walking archives (documents themselves are counted when written)."""

    inner_archives: int = 0
    empty_members: int = 0
    non_file_members: int = 0
    unsafe_members: int = 0
    unsafe_member_names: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    containers: set[str] = field(default_factory=set)  # doc_id prefixes in use, kept unique


def _printable(name: str) -> str:
    """Tar names are decoded with surrogateescape; make invalid bytes U+FFFD so Parquet can hold them."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def archive_stem(name: str) -> str:
    """`urlsf_subset00-1_data.xz` -> `urlsf_subset00-1_data`; `docs.tar.gz` -> `docs`."""
    stem = PurePosixPath(name).name
    while (lower := stem.lower()).endswith(_ARCHIVE_SUFFIXES):
        stem = stem[: len(stem) - len(next(s for s in _ARCHIVE_SUFFIXES if lower.endswith(s)))]
    return stem or "archive"


def _member_key(name: str) -> str:
    """A member's part of its doc_id: its path without `.`/`..`/empty parts and without `.txt`."""
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".", "..")]
    key = "/".join(parts)
    if key.lower().endswith(".txt") and len(parts[-1]) > len(".txt"):
        key = key[: -len(".txt")]
    return key or "member"


def _unique(key: str, used: set[str]) -> str:
    candidate, n = key, 2
    while candidate in used:
        candidate, n = f"{key}~{n}", n + 1
    used.add(candidate)
    return candidate


def decode_text(data: bytes) -> tuple[str, bool]:
    """(text, False) for valid UTF-8; otherwise the text with U+FFFD for bad bytes, and True."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


class _Walker:
    """Walks one downloaded archive and yields its documents, an inner archive at a time.

    The documents of a tar are held back until the tar has been read to its end intact, so that with
    `skip_corrupt` a damaged inner archive is dropped whole; past `hold_docs` documents they are let go
    early (bounded memory), and a later fault can then drop only the rest.
    """

    def __init__(self, path: Path, stats: ExtractStats, skip_corrupt: bool, hold_docs: int, log: Any) -> None:
        self.path = path
        self.source = path.name
        self.stats = stats
        self.skip_corrupt = skip_corrupt
        self.hold_docs = hold_docs
        self.log = log

    def documents(self) -> Iterator[Document]:
        if self.path.stat().st_size == 0:
            raise DataIntegrityError(f"{self.source}: empty file, not an archive")
        with open(self.path, "rb") as raw:
            stream = _Peekable(raw)
            head = stream.peek(_BLOCK)
            if compression_of(head) is None and not is_tar(head):
                raise DataIntegrityError(
                    f"{self.source}: unknown archive format (first bytes {head[:8].hex()}); "
                    "expected xz, gzip, bzip2, zstd or tar"
                )
            yield from self._tar(stream, member="", stem=archive_stem(self.source), depth=0)

    def _tar(self, stream: _Peekable, member: str, stem: str, depth: int) -> Iterator[Document]:
        where = f"{self.source}: {member}" if member else self.source
        container = _unique(stem, self.stats.containers)
        used: set[str] = set()
        held: list[Document] = []
        released = 0
        try:
            with ExitStack() as stack:
                kind = compression_of(stream.peek(_BLOCK))
                if kind is not None:
                    stream = _Peekable(stack.enter_context(_decompressor(kind, stream)))
                if not is_tar(stream.peek(_BLOCK)):
                    raise _Corrupt(f"the {kind or 'plain'} stream does not hold a tar archive")
                tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|", tarinfo=_CheckedTarInfo))
                for info in tar:
                    name = _printable(info.name)
                    if not info.isreg():
                        self.stats.non_file_members += 1
                        continue
                    self._note_unsafe(name)
                    body = _Peekable(tar.extractfile(info))
                    head = body.peek(_BLOCK)
                    if compression_of(head) is not None or is_tar(head):
                        if depth + 1 > MAX_NESTING:
                            raise _Corrupt(f"{name} nests archives more than {MAX_NESTING} deep")
                        self.stats.inner_archives += 1
                        label = f"{member} > {name}" if member else name
                        yield from self._tar(body, label, archive_stem(name), depth + 1)
                        continue
                    data = body.read()
                    if not data:
                        self.stats.empty_members += 1
                        continue
                    text, invalid = decode_text(data)
                    n_bytes = len(text.encode("utf-8")) if invalid else len(data)
                    doc_id = f"{container}/{_unique(_member_key(name), used)}"
                    held.append(Document(doc_id, text, self.source, name, n_bytes, invalid))
                    if len(held) >= self.hold_docs:
                        released += len(held)
                        yield from held
                        held.clear()
                if (bad_end := getattr(tar, "bad_end", None)) is not None:
                    raise _Corrupt(f"archive ends without its end-of-archive blocks ({bad_end})")
                # Read past the tar's end to the end of the stream, so that the decompressor checks the
                # stream's own end marker and checksum: a cut in the trailing padding is damage too.
                while stream.read(1 << 16):
                    pass
            yield from held
        except (*_CORRUPTION, _Corrupt) as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            if not self.skip_corrupt:
                raise DataIntegrityError(f"{where}: truncated or corrupt archive ({reason})") from exc
            skipped = {"archive": self.source, "member": member, "error": reason}
            self.stats.skipped.append({**skipped, "docs_dropped": len(held), "docs_kept": released})
            self.log.warning("%s: skipped, truncated or corrupt (%s); %d documents dropped", where, reason, len(held))

    def _note_unsafe(self, name: str) -> None:
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts:
            self.stats.unsafe_members += 1
            if len(self.stats.unsafe_member_names) < _MAX_LISTED_NAMES:
                self.stats.unsafe_member_names.append(name)


def iter_archive_documents(
    path: Path,
    *,
    skip_corrupt: bool = False,
    hold_docs: int = 10_000,
    stats: ExtractStats | None = None,
    log: Any = None,
) -> Iterator[Document]:
    """Every document in the archive at `path`, streaming; see `_Walker` for `hold_docs`."""
    walker = _Walker(
        Path(path), stats or ExtractStats(), skip_corrupt, hold_docs, log or logging.getLogger("gptflow.extract")
    )
    return walker.documents()


# -- shards ----------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes documents to `shard-00000.parquet`, ... with at most `shard_docs` rows each; holds one row
    group at most in memory."""

    def __init__(self, folder: Path, shard_docs: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_docs = shard_docs
        self.shards = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._rows: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}

    def add(self, doc: Document) -> None:
        for name in SCHEMA.names:
            self._rows[name].append(getattr(doc, name))
        self._in_shard += 1
        if len(self._rows["doc_id"]) >= _ROW_GROUP_DOCS or self._in_shard >= self.shard_docs:
            self._flush()
        if self._in_shard >= self.shard_docs:
            self._close_shard()

    def _flush(self) -> None:
        if not self._rows["doc_id"]:
            return
        if self._writer is None:
            path = self.folder / f"shard-{self.shards:05d}.parquet"
            self._writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")
            self.shards += 1
        self._writer.write_table(pa.Table.from_pydict(self._rows, schema=SCHEMA))
        self._rows = {name: [] for name in SCHEMA.names}

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._in_shard = 0

    def close(self) -> int:
        """Write what is left; returns the number of shards."""
        self._flush()
        self._close_shard()
        return self.shards


# -- the stage -------------------------------------------------------------------------------------------


def build(ctx: StageContext, cfg: ExtractConfig) -> dict[str, Any]:
    folder = ctx.input_path("download") / ARCHIVES
    archives = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if not archives:
        raise DataIntegrityError(f"{folder}: no archives to extract")
    stats = ExtractStats()
    writer = ShardWriter(ctx.out / DOCS, cfg.shard_docs)
    docs = n_bytes = invalid_utf8 = 0
    reached_max = False
    for path in archives:
        found = 0
        skipped_before = len(stats.skipped)
        documents = iter_archive_documents(
            path, skip_corrupt=cfg.skip_corrupt, hold_docs=cfg.shard_docs, stats=stats, log=ctx.log
        )
        with closing(documents):
            for doc in documents:
                writer.add(doc)
                found += 1
                n_bytes += doc.n_bytes
                invalid_utf8 += doc.invalid_utf8
                if cfg.max_docs is not None and docs + found >= cfg.max_docs:
                    reached_max = True
                    break
        docs += found
        ctx.log.info("%s: %d documents", path.name, found)
        if reached_max:
            ctx.log.info("stopped at max_docs=%d", cfg.max_docs)
            break
        if found == 0 and len(stats.skipped) == skipped_before:
            raise DataIntegrityError(f"{path.name}: the archive holds no documents")
    shards = writer.close()
    if docs == 0:
        raise DataIntegrityError(f"{folder}: no documents in {', '.join(p.name for p in archives)}")
    return {
        "docs": docs,
        "shards": shards,
        "bytes": n_bytes,
        "archives": len(archives),
        "inner_archives": stats.inner_archives,
        "invalid_utf8_docs": invalid_utf8,
        "skipped": stats.skipped,
        "empty_members": stats.empty_members,
        "non_file_members": stats.non_file_members,
        "unsafe_members": stats.unsafe_members,
        "unsafe_member_names": stats.unsafe_member_names,
        "max_docs_reached": reached_max,
    }


STAGE = Stage(name="extract", module=__name__, config=ExtractConfig, build=build, inputs=("download",))
extract_task = stage_task(STAGE)

"""The checked streaming tar walker: one tar (compressed or not) read as it streams, member by member.

Members are never written to disk as files: a hostile name such as `../../etc/passwd` is only data (counted
as unsafe), and links, folders and devices are counted and skipped. A member larger than the documents'
limit is skipped unread (the tar stream skips its data block by block). Damage is `Damage` with a reason:
truncated, corrupt_stream, not_a_tar, corrupt_tar; tarfile's habit of taking a truncated or garbled header
after the first member for a normal end of archive is caught, so a damaged tar never passes for a short one.
"""

import tarfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import PurePosixPath
from typing import NamedTuple

from tasks.readers.streams import (
    BLOCK,
    Budget,
    Damage,
    Decoded,
    Peekable,
    archive_suffix,
    compression_of,
    is_tar,
    looks_like_archive,
    unreadable,
)

# outer tar -> inner tar is depth 1; a little slack for a tar of such outer tars, and no more: an archive
# nested deeper than this is far more likely a decompression bomb than a corpus.
MAX_NESTING = 3


class Note(NamedTuple):
    """A member the metrics count: `kind` is non_file, unsafe, empty or oversized."""

    kind: str
    name: str


class Doc(NamedTuple):
    """A regular member read as a document: its name and its bytes."""

    name: str
    data: bytes


class Archive(NamedTuple):
    """A member read as an archive (see `looks_like_archive`). Its `body` must be read, if at all, before
    the walk goes on: the tar is a stream."""

    name: str
    size: int
    body: Peekable


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


def walk_tar(stream: Peekable, name: str, budget: Budget, max_doc_bytes: int) -> Iterator[Note | Doc | Archive]:
    """The members of the tar (or compressed tar) `name` read from `stream`, in order, then a check that it
    ended intact: its end-of-archive blocks, and the compressed stream's own end marker and checksum.
    Decompressed bytes are charged to `budget`. Raises `Damage` or tarfile.TarError (see `as_damage`)."""
    with ExitStack() as stack:
        head = stream.peek(BLOCK)
        if (damage := unreadable(name, head)) is not None:
            raise damage
        kind = compression_of(head)
        if kind is not None:
            stream = Peekable(stack.enter_context(Decoded(kind, stream, budget)))
            head = stream.peek(BLOCK)
        if not is_tar(head):
            what = f"the {kind} stream holds no tar archive" if kind else "not a tar archive"
            raise Damage("not_a_tar", f"{what}; it starts with {head[:8].hex() or 'nothing'}")
        tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|", tarinfo=_CheckedTarInfo))
        while (info := tar.next()) is not None:
            tar.members.clear()  # stream mode would keep every header read: memory growing per member
            member = printable(info.name)
            if not info.isreg():
                yield Note("non_file", member)
                continue
            if is_unsafe(member):
                yield Note("unsafe", member)
            body = Peekable(tar.extractfile(info))
            if looks_like_archive(member, body.peek(BLOCK)):
                yield Archive(member, info.size, body)
                continue
            # Judged by the header's size, before reading: the tar stream skips an unread member's data
            # block by block, so a huge member never has to fit in memory.
            if info.size > max_doc_bytes:
                yield Note("oversized", member)
                continue
            data = body.read()
            if not data:
                yield Note("empty", member)
                continue
            yield Doc(member, data)
        if (bad_end := getattr(tar, "bad_end", None)) is not None:
            reason = "corrupt_tar" if isinstance(bad_end, tarfile.InvalidHeaderError) else "truncated"
            raise Damage(reason, f"the tar ends without its end-of-archive blocks ({bad_end})")
        # Read past the tar's end to the end of the stream, so that the decompressor checks the stream's
        # own end marker and checksum: a cut in the trailing padding is damage too.
        while stream.read(1 << 16):
            pass


def as_damage(exc: BaseException) -> Damage:
    """A tar reader's error as damage: its messages are the only way to tell a cut from a garbled header."""
    if isinstance(exc, Damage):
        return exc
    text = str(exc)
    cut = any(words in text for words in ("unexpected end of data", "empty file", "truncated header"))
    return Damage("truncated" if cut else "corrupt_tar", f"tar: {type(exc).__name__}: {text}")


def printable(name: str) -> str:
    """Tar names are decoded with surrogateescape; make invalid bytes U+FFFD so Parquet can hold them."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def archive_stem(name: str) -> str:
    """`urlsf_subset00-1_data.xz` -> `urlsf_subset00-1_data`; `docs.tar.gz` -> `docs`."""
    stem = PurePosixPath(name).name
    while (suffix := archive_suffix(stem)) is not None:
        stem = stem[: len(stem) - len(suffix)]
    return stem or "archive"


def member_key(name: str) -> str:
    """A member's part of its doc_id: its path without `.`/`..`/empty parts and without `.txt`."""
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".", "..")]
    key = "/".join(parts)
    if key.lower().endswith(".txt") and len(parts[-1]) > len(".txt"):
        key = key[: -len(".txt")]
    return key or "member"


def is_unsafe(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts


def unique(key: str, used: set[str]) -> str:
    """`key`, or `key~2`, `key~3`, ... the first not in `used`; taken into `used`."""
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

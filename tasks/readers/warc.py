"""Common Crawl's files: WET (the text Common Crawl extracted, one `conversion` record per page) and WARC
(the pages as fetched: the main text of each HTML `response` record is extracted here).

Records are parsed by FastWARC and the page text extracted by trafilatura (an optional extra: only WARC
files need it), both chosen by measurement (benchmarks/html_bench.py): FastWARC reads these files faster
than warcio, and trafilatura was the one extractor that kept every sentence of the article while leaving out
all of the navigation, footer, cookie-banner, share-button, newsletter and comment boilerplate around it, in
English, French and German alike. resiliparse's main-content mode is ~8 times faster but kept the share
buttons, newsletter boxes and comments; jusText needs each page's language beforehand.

The file is decompressed by documents.open_decompressed, not by FastWARC, which ends a truncated gzip file
silently (as warcio does): here it is a DataIntegrityError naming the file. A record cut short in an
uncompressed file is one too. Records that hold no document are counted in `skipped`: `too_large` (its
payload over max_doc_bytes: WET text, or the HTML of a WARC page), `not_html` (another content type),
`http_status` (not a 2xx response: redirects, errors), `no_text` (no main text found in the page).
"""

import codecs
import functools
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from fastwarc.warc import ArchiveIterator, WarcRecordType

from storage.errors import ConfigError, DataIntegrityError
from tasks.readers.documents import FileDocument, decode_text, open_decompressed

_WARC_TYPE = re.compile(rb"^WARC-Type:[ \t]*([A-Za-z-]+)", re.IGNORECASE | re.MULTILINE)
_WET_FILENAME = re.compile(rb"^WARC-Filename:[^\r\n]*\.wet\b", re.IGNORECASE | re.MULTILINE)
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
# A page's <meta charset> is looked for in its first bytes only, as browsers do (HTML's prescan: 1024).
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_:.-]+)""", re.IGNORECASE)
_PRESCAN_BYTES = 1024
# Labels that HTML decodes as windows-1252 (WHATWG Encoding Standard), a superset of what they name.
_AS_WINDOWS_1252 = frozenset({"latin_1", "ascii", "iso8859-1"})


def warc_kind(data: bytes, name: str) -> str:
    """ "wet" or "warc" for a (decompressed) WARC file that starts with `data`: by its records' types, and
    when the first records are only `warcinfo`, by the file name that record or `name` gives."""
    types = {match.lower() for match in _WARC_TYPE.findall(data)}
    if b"conversion" in types:
        return "wet"
    if types - {b"warcinfo"}:
        return "warc"
    return "wet" if _WET_FILENAME.search(data) or ".wet" in name.lower() else "warc"


@functools.cache
def _html_extractor() -> Callable[[str], str]:
    try:
        import trafilatura
    except ImportError as exc:
        raise ConfigError(
            "reading HTML from WARC files needs trafilatura: pip install 'gptflow[html]' (WET files do not)"
        ) from exc

    # Comments are readers' text, not the page's; favor_precision leaves out doubtful blocks, as FineWeb
    # does (datatrove's Trafilatura extractor).
    def extract(html: str) -> str:
        return trafilatura.extract(html, include_comments=False, favor_precision=True) or ""

    return extract


def extract_main_text(html: str) -> str:
    """The main text of an HTML page: the article, without navigation, footer and other boilerplate."""
    return _html_extractor()(html)


def _codec(label: str | None) -> str | None:
    if not label:
        return None
    try:
        name = codecs.lookup(label).name
    except LookupError:
        return None
    return "cp1252" if name in _AS_WINDOWS_1252 else name


def decode_html(data: bytes, http_charset: str | None) -> tuple[str, bool]:
    """The page as text, by the charset its HTTP headers or its <meta> give, else UTF-8; and whether bytes
    that charset cannot decode were replaced."""
    meta = _META_CHARSET.search(data[:_PRESCAN_BYTES])
    codec = _codec(http_charset) or _codec(meta.group(1).decode("ascii") if meta else None) or "utf-8"
    if codec == "utf-8":
        return decode_text(data)
    try:
        return data.decode(codec), False
    except UnicodeDecodeError:
        return data.decode(codec, errors="replace"), True


def _key(record_id: str | None, uri: str, index: int) -> str:
    if record_id:
        return record_id.strip("<>")
    return uri or str(index)


def iter_warc_documents(path: Path, fmt: str, max_doc_bytes: int, skipped: Counter[str]) -> Iterator[FileDocument]:
    """The documents of a WET file (`fmt` "wet") or of a WARC file's HTML pages ("warc"), in file order."""
    wet = fmt == "wet"
    if not wet:
        _html_extractor()  # fails before reading when the extractor is missing
    with open_decompressed(path) as stream:
        records = ArchiveIterator(
            stream,
            record_types=WarcRecordType.conversion if wet else WarcRecordType.response,
            parse_http=not wet,
            auto_decode="all",  # undo the HTTP transfer and content encodings a page was fetched with
            stream_detect=False,  # already decompressed
        )
        index = 0
        try:
            for index, record in enumerate(records):
                uri = record.headers.get("WARC-Target-URI") or ""
                key = _key(record.record_id, uri, index)
                if not wet:
                    status = record.http_headers.status_code if record.http_headers else 0
                    if status // 100 != 2:
                        skipped["http_status"] += 1
                        continue
                    if (record.http_content_type or "").lower() not in _HTML_TYPES:
                        skipped["not_html"] += 1
                        continue
                expected = record.content_length
                if expected > max_doc_bytes:
                    skipped["too_large"] += 1
                    continue
                data = record.reader.read()
                encoded = not wet and any(
                    record.http_headers.get(name) for name in ("Content-Encoding", "Transfer-Encoding")
                )
                # Decoding changes a payload's length, so only a payload stored as is can be judged by it.
                if len(data) < expected and not encoded:
                    raise DataIntegrityError(
                        f"{path}: record {key} is cut short ({len(data):,} of {expected:,} bytes):"
                        " the file is truncated"
                    )
                if wet:
                    text, invalid = decode_text(data)
                else:
                    html, invalid = decode_html(data, record.http_charset)
                    text = extract_main_text(html)
                    if not text.strip():
                        skipped["no_text"] += 1
                        continue
                n_bytes = len(text.encode("utf-8"))
                if n_bytes > max_doc_bytes:
                    skipped["too_large"] += 1
                    continue
                yield FileDocument(key, text, uri or path.name, n_bytes, invalid)
        except OSError as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataIntegrityError(f"{path}: unreadable WARC data after record {index} ({detail})") from exc

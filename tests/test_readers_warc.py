"""Common Crawl's WET and WARC files, built here record by record as Common Crawl writes them."""

import gzip
from collections import Counter
from pathlib import Path

import pytest

from storage.errors import DataIntegrityError
from tasks.readers.documents import HEAD_BYTES, detect_document_format, iter_file_documents

ARTICLE = [
    "The river rose during the night and flooded the lower streets of the old town.",
    "By morning the volunteers had filled more than two thousand sandbags near the bridge.",
    "The mayor said that the school would stay closed until the water went down again.",
]
BOILERPLATE = ["Home page link", "Subscribe to our newsletter today", "Copyright 2024 Example Media Group"]
TEXTS = {
    "https://example.com/en": "The committee met on Tuesday.\nIt approved the budget.",
    "https://exemple.fr/article": "Le comité s'est réuni mardi à Genève.\nIl a approuvé le budget de l'été.",
    "https://beispiel.de/artikel": "Der Ausschuss tagte am Dienstag in Köln.\nEr billigte den Haushalt für Straßen.",
}


def record(warc_type: str, uri: str, payload: bytes, content_type: str, n: int) -> bytes:
    head = (
        f"WARC/1.0\r\nWARC-Type: {warc_type}\r\nWARC-Target-URI: {uri}\r\nWARC-Date: 2024-03-01T10:00:00Z\r\n"
        f"WARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-{n:012d}>\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    return head + payload + b"\r\n\r\n"


def warcinfo(filename: str) -> bytes:
    payload = b"software: test\r\nformat: WARC File Format 1.0\r\n"
    info = record("warcinfo", "", payload, "application/warc-fields", 0)
    return info.replace(b"WARC-Target-URI: \r\n", f"WARC-Filename: {filename}\r\n".encode())


def http_response(uri: str, body: bytes, n: int, status: str = "200 OK", headers: str = "") -> bytes:
    http = f"HTTP/1.1 {status}\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body
    return record("response", uri, http, "application/http; msgtype=response", n)


def write_gz(path: Path, records: list[bytes]) -> Path:
    path.write_bytes(b"".join(gzip.compress(r) for r in records))  # one gzip member per record
    return path


def wet_records(texts: dict[str, str | bytes]) -> list[bytes]:
    records = [warcinfo("CC-MAIN-20240301-00000.warc.wet.gz")]
    for n, (uri, text) in enumerate(texts.items(), start=1):
        payload = text.encode() if isinstance(text, str) else text
        records.append(record("conversion", uri, payload, "text/plain", n))
    return records


def detect(path: Path) -> str | None:
    with open(path, "rb") as f:
        return detect_document_format(f.read(HEAD_BYTES), path.name)


def page(title: str, paragraphs: list[str], charset: str = "utf-8") -> str:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return (
        f'<html><head><meta charset="{charset}"><title>{title}</title></head><body>'
        f'<header><nav><ul><li><a href="/">{BOILERPLATE[0]}</a></li><li><a href="/n">News</a></li></ul></nav>'
        f"</header><main><article><h1>{title}</h1>{body}</article></main>"
        f'<div class="newsletter"><p>{BOILERPLATE[1]}</p></div><footer><p>{BOILERPLATE[2]}</p></footer>'
        "</body></html>"
    )


def test_wet_records_are_documents_with_their_urls_in_every_language(tmp_path):
    path = write_gz(tmp_path / "CC-MAIN-20240301-00000.warc.wet.gz", wet_records(TEXTS))
    assert detect(path) == "wet"
    docs = list(iter_file_documents(path, "wet", 1 << 20))
    # the reader keeps French and German: the language filter downstream decides
    assert [(d.source, d.text) for d in docs] == list(TEXTS.items())
    assert [d.key for d in docs] == [f"urn:uuid:00000000-0000-0000-0000-{n:012d}" for n in (1, 2, 3)]
    assert [d.n_bytes for d in docs] == [len(t.encode()) for t in TEXTS.values()]
    assert not any(d.invalid_utf8 for d in docs)


def test_wet_and_warc_are_told_by_their_records_not_their_names(tmp_path):
    wet = write_gz(tmp_path / "crawl.dat", wet_records(TEXTS))
    assert detect(wet) == "wet"
    plain = tmp_path / "crawl.bin"
    plain.write_bytes(b"".join(wet_records(TEXTS)))
    assert detect(plain) == "wet"
    warc = write_gz(tmp_path / "pages.dat", [warcinfo("x.warc.gz"), http_response("https://a/", b"<p>hi</p>", 1)])
    assert detect(warc) == "warc"
    # a head that holds only the warcinfo record: its file name decides
    assert detect_document_format(gzip.compress(warcinfo("CC-MAIN-1.warc.wet.gz")), "a") == "wet"
    assert detect_document_format(gzip.compress(warcinfo("CC-MAIN-1.warc.gz")), "a") == "warc"


def test_warc_html_yields_the_main_text_of_each_page(tmp_path):
    french = ["Le comité s'est réuni mardi soir à Genève pour discuter du budget de la ville pour l'été prochain."] * 3
    records = [
        warcinfo("CC-MAIN-20240301-00000.warc.gz"),
        http_response("https://news.example/flood", page("Flood", ARTICLE).encode(), 1, headers=_html()),
        # a charset given only by the page's <meta>, in bytes that are not UTF-8
        http_response(
            "https://exemple.fr/", page("Budget", french, "windows-1252").encode("cp1252"), 2, headers=_html(None)
        ),
        http_response("https://news.example/logo.png", b"\x89PNG\r\n\x1a\n", 3, headers="Content-Type: image/png\r\n"),
        http_response("https://news.example/old", b"", 4, status="301 Moved Permanently", headers=_html()),
        http_response("https://news.example/gone", page("Gone", ARTICLE).encode(), 5, "404 Not Found", _html()),
        http_response("https://news.example/empty", b"<html><body></body></html>", 6, headers=_html()),
        http_response(
            "https://news.example/zipped",
            gzip.compress(page("Zipped", ARTICLE).encode()),
            7,
            headers=_html() + "Content-Encoding: gzip\r\n",
        ),
    ]
    path = write_gz(tmp_path / "CC-MAIN-20240301-00000.warc.gz", records)
    assert detect(path) == "warc"
    skipped: Counter = Counter()
    docs = list(iter_file_documents(path, "warc", 1 << 20, skipped))
    assert [d.source for d in docs] == [
        "https://news.example/flood",
        "https://exemple.fr/",
        "https://news.example/zipped",
    ]
    for doc in (docs[0], docs[2]):
        assert all(sentence in doc.text for sentence in ARTICLE)
        assert not any(bp in doc.text for bp in BOILERPLATE)
    assert french[0] in docs[1].text and not docs[1].invalid_utf8
    assert skipped == {"not_html": 1, "http_status": 2, "no_text": 1}
    assert docs[0].key == "urn:uuid:00000000-0000-0000-0000-000000000001"
    assert docs[0].n_bytes == len(docs[0].text.encode())


def _html(charset: str | None = "utf-8") -> str:
    return f"Content-Type: text/html{f'; charset={charset}' if charset else ''}\r\n"


def test_a_truncated_wet_file_is_a_one_line_error_naming_it(tmp_path):
    path = tmp_path / "CC-MAIN-cut.warc.wet.gz"
    data = write_gz(path, wet_records(TEXTS)).read_bytes()
    path.write_bytes(data[:-30])  # inside the last record's gzip member
    with pytest.raises(DataIntegrityError) as exc:
        list(iter_file_documents(path, "wet", 1 << 20))
    assert str(path) in str(exc.value) and "truncated gzip" in str(exc.value) and "\n" not in str(exc.value)


def test_a_truncated_uncompressed_warc_is_an_error(tmp_path):
    path = tmp_path / "cut.warc"
    data = b"".join(wet_records(TEXTS))
    path.write_bytes(data[:-40])  # inside the German record's text
    with pytest.raises(DataIntegrityError) as exc:
        list(iter_file_documents(path, "wet", 1 << 20))
    message = str(exc.value)
    assert str(path) in message and "cut short" in message and "000000000003" in message and "\n" not in message


def test_large_records_are_skipped_and_bytes_not_utf8_flagged(tmp_path):
    texts: dict[str, str | bytes] = {
        "https://a/": "small",
        "https://b/": "x" * 2000,
        "https://c/": "Gen\xe8ve".encode("latin-1"),
    }
    path = write_gz(tmp_path / "x.warc.wet.gz", wet_records(texts))
    skipped: Counter = Counter()
    docs = list(iter_file_documents(path, "wet", 1000, skipped))
    assert [(d.source, d.text, d.invalid_utf8) for d in docs] == [
        ("https://a/", "small", False),
        ("https://c/", "Gen\ufffdve", True),
    ]
    assert skipped == {"too_large": 1}

"""Users' document files: plain text, JSON Lines (plain, gzip, zstd), Parquet; told by content."""

import gzip
import io
import json
import lzma
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from storage.errors import ConfigError, DataIntegrityError
from tasks.readers.documents import HEAD_BYTES, FileDocument, detect_document_format, iter_file_documents

MAX = 1 << 20


def detect(path: Path) -> str | None:
    with open(path, "rb") as f:
        return detect_document_format(f.read(HEAD_BYTES), path.name)


def read(path: Path, max_doc_bytes: int = MAX, skipped: Counter | None = None) -> list[FileDocument]:
    return list(iter_file_documents(path, detect(path), max_doc_bytes, skipped))


def jsonl(*records: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def one_line_error(exc: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message


def test_a_text_file_is_one_document(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("A first line.\n\nA second paragraph, café.\n", encoding="utf-8")
    assert detect(path) == "text"
    assert read(path) == [FileDocument("0", "A first line.\n\nA second paragraph, café.\n", "notes.txt", 42, False)]


@pytest.mark.parametrize("compress", [lambda b: b, gzip.compress, zstandard.ZstdCompressor().compress, lzma.compress])
def test_jsonl_is_told_by_content_whatever_its_name_and_compression(tmp_path, compress):
    path = tmp_path / "corpus.dat"
    data = jsonl({"id": "doc-a", "text": "Bonjour à tous."}, {"text": "No id here.", "meta": 3}) + b"\n"
    path.write_bytes(compress(data + jsonl({"id": 17, "text": "Integer id."})))
    assert detect(path) == "jsonl"
    docs = read(path)
    # a record without `id` is named by its line number (1-based, counting the blank line)
    assert [(d.key, d.text) for d in docs] == [
        ("doc-a", "Bonjour à tous."),
        ("2", "No id here."),
        ("17", "Integer id."),
    ]
    assert docs[0].n_bytes == len("Bonjour à tous.".encode())
    assert {d.source for d in docs} == {"corpus.dat"}


def test_concatenated_gzip_members_and_zstd_frames_are_read_to_the_end(tmp_path):
    parts = [jsonl(*({"text": f"part {p} doc {i} " * 50} for i in range(2000))) for p in range(3)]
    expected = [json.loads(line)["text"] for part in parts for line in part.splitlines()]
    for name, compress in [("a.jsonl.gz", gzip.compress), ("a.jsonl.zst", zstandard.ZstdCompressor().compress)]:
        path = tmp_path / name
        path.write_bytes(b"".join(compress(part) for part in parts))
        assert [d.text for d in read(path)] == expected, name


def test_jsonl_whose_first_record_is_longer_than_the_head(tmp_path):
    path = tmp_path / "long.data"
    path.write_bytes(jsonl({"text": "word " * HEAD_BYTES}, {"text": "short"}))
    assert detect(path) == "jsonl"
    assert [d.text for d in read(path)][1:] == ["short"]


def test_a_text_is_not_taken_for_jsonl(tmp_path):
    notes = ['{"quoted": braces} open this note.\nmore\n', '{"quoted": braces}, one line', "{'a': 1}\n", "[1]\nx"]
    for i, text in enumerate(notes):
        path = tmp_path / f"note{i}.jsonl"
        path.write_text(text)
        assert detect(path) == "text", text
        assert [d.text for d in read(path)] == [text]


def test_archives_and_binary_data_are_not_documents(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        member = tarfile.TarInfo("a.txt")
        member.size = 3
        tar.addfile(member, io.BytesIO(b"abc"))
    assert detect_document_format(buffer.getvalue(), "a.tar") is None
    assert detect_document_format(gzip.compress(buffer.getvalue()), "a.tgz") is None
    assert detect_document_format(bytes(range(256)) * 8, "blob.txt") is None


def test_parquet_with_and_without_id_in_several_batches(tmp_path):
    texts = [f"document {i} " * (i % 5 + 1) for i in range(2500)]
    with_id = tmp_path / "with_id.bin"
    pq.write_table(pa.table({"id": [f"x{i}" for i in range(2500)], "text": texts}), with_id, row_group_size=700)
    without_id = tmp_path / "without_id.parquet"
    pq.write_table(pa.table({"text": texts, "url": ["u"] * 2500}), without_id, row_group_size=700)
    assert detect(with_id) == detect(without_id) == "parquet"
    docs = read(with_id)
    assert [d.text for d in docs] == texts
    assert [d.key for d in docs[:2]] == ["x0", "x1"]
    assert [d.key for d in read(without_id)][-2:] == ["2498", "2499"]  # row numbers, from 0


def test_parquet_errors_name_the_file(tmp_path):
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"body": ["a"]}), no_text)
    with pytest.raises(DataIntegrityError) as exc:
        read(no_text)
    one_line_error(exc, no_text, "no `text` column", "body")

    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    with pytest.raises(DataIntegrityError) as exc:
        read(numbers)
    one_line_error(exc, numbers, "int64, not a string")

    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), nulls)
    with pytest.raises(DataIntegrityError) as exc:
        read(nulls)
    one_line_error(exc, nulls, "row 1", "null")

    cut = tmp_path / "cut.parquet"
    cut.write_bytes(numbers.read_bytes()[:-10])
    with pytest.raises(DataIntegrityError) as exc:
        read(cut)
    one_line_error(exc, cut, "Parquet")


def test_invalid_json_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl(*({"text": f"t{i}"} for i in range(6))) + b'{"text": "unterminated\n')
    with pytest.raises(DataIntegrityError) as exc:
        read(path)
    one_line_error(exc, path, "line 7", "invalid JSON")


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({"body": "x"}, ("line 2", "no `text` field")),
        ({"text": 5}, ("line 2", "`text` is int, not a string")),
        ({"text": None}, ("line 2", "`text` is null")),
        (["text"], ("line 2", "expected a JSON object, got list")),
        ({"text": "x", "id": [1]}, ("line 2", "`id` is a list")),
    ],
)
def test_a_record_without_a_string_text_is_an_error(tmp_path, record, words):
    path = tmp_path / "records.jsonl"
    path.write_bytes(jsonl({"text": "fine"}, record))
    with pytest.raises(DataIntegrityError) as exc:
        read(path)
    one_line_error(exc, path, *words)


def test_bytes_that_are_not_utf8_are_replaced_and_flagged(tmp_path):
    path = tmp_path / "mixed.jsonl"
    # line 2 is Latin-1 ("é" as one byte); line 3 holds a lone surrogate, which JSON allows and UTF-8 not
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "half \\udc80 pair"}\n')
    docs = read(path)
    assert [(d.text, d.invalid_utf8) for d in docs] == [("ok", False), ("caf\ufffd", True), ("half ? pair", True)]
    assert [d.n_bytes for d in docs] == [2, 6, 11]

    text = tmp_path / "latin1.txt"
    text.write_bytes("Une journée d'été à Genève.\n".encode("latin-1"))
    assert detect(text) == "text"
    [doc] = read(text)
    assert doc.text == "Une journ\ufffde d'\ufffdt\ufffd \ufffd Gen\ufffdve.\n" and doc.invalid_utf8
    assert doc.n_bytes == len(doc.text.encode())  # each U+FFFD is 3 bytes, where 1 was


@pytest.mark.parametrize(
    ("suffix", "compress"),
    [
        (".gz", gzip.compress),
        (".zst", zstandard.ZstdCompressor().compress),
        (".xz", lzma.compress),
    ],
)
def test_a_truncated_compressed_file_is_a_one_line_error(tmp_path, suffix, compress):
    path = tmp_path / f"corpus.jsonl{suffix}"
    # several compressed blocks (zstd's are up to 128 KiB of input), so that the start still decodes
    data = compress(jsonl(*({"text": f"document number {i} " * 20} for i in range(3000))))
    path.write_bytes(data[: len(data) * 2 // 3])
    assert detect(path) == "jsonl"
    with pytest.raises(DataIntegrityError) as exc:
        read(path)
    one_line_error(exc, path, "truncated")


def test_a_corrupt_gzip_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "corpus.jsonl.gz"
    data = bytearray(gzip.compress(jsonl(*({"text": f"document {i}"} for i in range(3000)))))
    data[-8:-4] = bytes(a ^ 0xFF for a in data[-8:-4])  # the CRC-32 of the member's data
    path.write_bytes(bytes(data))
    with pytest.raises(DataIntegrityError) as exc:
        read(path)
    one_line_error(exc, path, "corrupt gzip stream")


def test_documents_over_the_limit_are_skipped_and_counted(tmp_path):
    path = tmp_path / "big.jsonl"
    # a line over 3 x max_doc_bytes + 1 MiB is skipped unread; a text over max_doc_bytes after parsing too
    path.write_bytes(jsonl({"text": "before"}, {"text": "x" * (3 << 20)}, {"text": "y" * 1001}, {"text": "after"}))
    skipped: Counter = Counter()
    docs = read(path, max_doc_bytes=1000, skipped=skipped)
    assert [(d.key, d.text) for d in docs] == [("1", "before"), ("4", "after")]
    assert skipped == {"too_large": 2}

    text = tmp_path / "big.txt"
    text.write_text("z" * 1001)
    assert read(text, max_doc_bytes=1000, skipped=skipped) == []
    assert skipped == {"too_large": 3}


def test_an_unknown_format_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="csv"):
        iter_file_documents(tmp_path / "x", "csv", MAX)

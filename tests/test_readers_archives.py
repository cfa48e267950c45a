"""Extract unit by unit: each inner archive (or run of a file's own documents) is one cached unit, so a
version built from cached units is byte-identical to one built from scratch, a source that gained an
archive parses only that one, damage stays quarantined from the cache, and a changed parameter recomputes."""

import hashlib
import io
import json
import lzma
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import DataIntegrityError
from storage.store import Store
from tasks.extract import STAGE, ExtractConfig


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def inner_xz(texts: list[str]) -> bytes:
    members = [(f"{i:07d}-{hashlib.md5(t.encode()).hexdigest()}.txt", t.encode()) for i, t in enumerate(texts)]
    return lzma.compress(tar_bytes(members), preset=0)


def subset(n: int, inners: int = 2, docs: int = 3, damaged: int | None = None) -> bytes:
    """`urlsf_subsetNN.tar`: `inners` inner archives of `docs` documents; the one at `damaged` cut short."""
    members = []
    for m in range(inners):
        data = inner_xz([f"subset {n} archive {m} document {d}: some words." for d in range(docs)])
        members.append((f"openwebtext/urlsf_subset{n:02d}-{m}_data.xz", data[:-40] if m == damaged else data))
    return tar_bytes(members)


A, B, C = (f"urlsf_subset{n:02d}.tar" for n in range(3))
ARCHIVES = {A: subset(0), B: subset(1, inners=3), C: subset(2)}


def publish_download(store: Store, files: dict[str, bytes], tag: str = "") -> str:
    def build(out: Path) -> dict:
        (out / "archives").mkdir()
        for name, data in files.items():
            (out / "archives" / name).write_bytes(data)
        return {}

    version = "dl-" + hashlib.sha256((tag + repr(sorted(files.items()))).encode()).hexdigest()[:8]
    store.publish("download", version, build, params={}, inputs={}, code_version="test")
    return version


def extract(root: Path, files: dict[str, bytes], tag: str = "", **cfg) -> dict:
    """Publish `files` as a download version in the store at `root` and extract it: the extract manifest."""
    store = Store(root)
    ref = STAGE.run(root, ExtractConfig(**cfg), {"download": publish_download(store, files, tag)})
    return store.manifest("extract", ref.version)


def output(manifest: dict) -> tuple[dict, dict]:
    """What a user sees of a version: every file's size and sha256, and the metrics."""
    return manifest["files"], manifest["metrics"]


def unit_entries(root: Path) -> set[Path]:
    """The units in the extract stage's shard cache."""
    return {p for p in (root / "extract" / ".shards" / "units").glob("*/*") if p.is_dir()}


def texts_of(root: Path, manifest: dict) -> list[str]:
    folder = Store(root).path("extract", manifest["version"]) / "docs"
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]).column("text").to_pylist()


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The downloaded files that extract reads (decompresses), in order."""
    from tasks.readers.units import DownloadReader

    seen: list[str] = []
    real = DownloadReader.read

    def read(self):
        seen.append(self.name)
        return real(self)

    monkeypatch.setattr(DownloadReader, "read", read)
    return seen


@pytest.mark.slow  # worker processes: seconds to spawn
def test_the_same_archives_give_the_same_bytes_with_any_worker_count(tmp_path):
    one = extract(tmp_path / "one", ARCHIVES, shard_docs=2)
    two = extract(tmp_path / "two", ARCHIVES, shard_docs=2, workers=2)
    assert output(two) == output(one)
    # a second download of the same bytes (another version) into the first store: every unit from the cache
    before = unit_entries(tmp_path / "one")
    again = extract(tmp_path / "one", ARCHIVES, tag="again", shard_docs=2, workers=2)
    assert again["inputs"] != one["inputs"] and output(again) == output(one)
    assert unit_entries(tmp_path / "one") == before
    names = sorted(name for name in one["files"] if name.startswith("docs/"))
    # 7 inner archives of 3 documents, 2 a shard: names by download, unit in it and part, in corpus order
    assert names[:2] == ["docs/urlsf_subset00-00000-000.parquet", "docs/urlsf_subset00-00000-001.parquet"]
    assert len(names) == 14 and one["metrics"]["docs"] == 21


def test_a_source_that_gained_an_archive_parses_only_the_new_one(tmp_path, reads):
    root = tmp_path / "nightly"
    extract(root, {A: ARCHIVES[A], B: ARCHIVES[B]})
    first = unit_entries(root)
    assert len(first) == 5  # the inner archives of A and B
    reads.clear()
    grown = extract(root, ARCHIVES)
    assert reads == [C]  # A and B are not even decompressed: their units were all in the cache
    assert len(unit_entries(root) - first) == 2 and first <= unit_entries(root)  # C's two inner archives
    scratch = extract(tmp_path / "fresh", ARCHIVES)
    assert output(grown) == output(scratch)
    assert grown["metrics"]["docs"] == 21


def test_a_file_with_one_unit_gone_from_the_cache_is_read_again_and_only_that_unit_parsed(tmp_path, reads):
    root = tmp_path / "store"
    whole = extract(root, ARCHIVES)
    units = sorted(unit_entries(root))
    gone = next(entry for entry in units if b"urlsf_subset01-00001-000" in (entry / "result.json").read_bytes())
    for path in sorted(gone.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    gone.rmdir()
    reads.clear()
    again = extract(root, ARCHIVES, tag="again")
    assert reads == [B]
    assert unit_entries(root) == set(units)  # the one unit recomputed, to the same entry
    assert output(again) == output(whole)


def test_a_damaged_unit_is_quarantined_and_cached_as_such(tmp_path, reads):
    root = tmp_path / "store"
    files = {A: ARCHIVES[A], B: subset(1, inners=3, damaged=1)}
    first = extract(root, files, max_corrupt_fraction=0.5)
    [entry] = first["metrics"]["quarantined"]
    assert (entry["archive"], entry["member"], entry["reason"]) == (
        B,
        "openwebtext/urlsf_subset01-1_data.xz",
        "truncated",
    )
    assert first["metrics"]["docs"] == 12
    cached = unit_entries(tmp_path / "store")
    quarantined = [e for e in cached if json.loads((e / "result.json").read_text())["result"]["quarantine"]]
    assert len(quarantined) == 1 and not list((quarantined[0] / "files").rglob("*.parquet"))
    reads.clear()
    grown = extract(root, {**files, C: ARCHIVES[C]}, max_corrupt_fraction=0.5)
    assert reads == [C]
    assert grown["metrics"]["quarantined"] == first["metrics"]["quarantined"]
    # strict fails on it from the cache as it would from scratch
    with pytest.raises(DataIntegrityError, match=f"^{B}: openwebtext/urlsf_subset01-1_data.xz: truncated or corrupt"):
        extract(root, files, strict=True)
    assert reads == [C]


def test_a_changed_parameter_recomputes_the_units_it_shapes(tmp_path, reads):
    root = tmp_path / "store"
    files = {A: ARCHIVES[A], B: tar_bytes([("openwebtext/urlsf_subset01-0_data.xz", inner_xz(["short", "x" * 100]))])}
    wide = extract(root, files)
    assert wide["metrics"]["docs"] == 8
    reads.clear()
    narrow = extract(root, files, max_doc_bytes=50)
    assert sorted(reads) == [A, B]  # every unit recomputed
    assert (narrow["metrics"]["docs"], narrow["metrics"]["oversized_member_names"]) == (
        7,
        ["0000001-" + hashlib.md5(b"x" * 100).hexdigest() + ".txt"],
    )
    assert output(narrow) == output(extract(tmp_path / "fresh", files, max_doc_bytes=50))


def test_max_docs_keeps_the_first_documents_in_corpus_order_from_cached_units(tmp_path, reads):
    root = tmp_path / "store"
    extract(root, ARCHIVES, shard_docs=2)
    reads.clear()
    capped = extract(root, ARCHIVES, shard_docs=2, max_docs=9)
    assert reads == []  # max_docs shapes no unit: all from the cache
    everything = texts_of(root, extract(root, ARCHIVES, shard_docs=2))
    assert texts_of(root, capped) == everything[:9]
    assert (capped["metrics"]["docs"], capped["metrics"]["max_docs_reached"], capped["metrics"]["shards"]) == (
        9,
        True,
        6,
    )
    assert output(capped) == output(extract(tmp_path / "fresh", ARCHIVES, shard_docs=2, max_docs=9))


def test_doc_ids_stay_unique_across_files_whose_archives_share_names(tmp_path):
    inner = tar_bytes([("a.txt", b"one"), ("a.txt", b"two")])
    files = {"x.tar": tar_bytes([("p/data.tar", inner), ("q/data.tar", inner)]), "data.tar": inner}
    manifest = extract(tmp_path / "store", files)
    folder = Store(tmp_path / "store").path("extract", manifest["version"]) / "docs"
    ids = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]).column("doc_id").to_pylist()
    assert ids == ["data/a", "data/a~2", "data~2/a", "data~2/a~2", "data~3/a", "data~3/a~2"]
    assert sorted(folder.iterdir()) == [
        folder / n for n in ("data-00000-000.parquet", "x-00000-000.parquet", "x-00001-000.parquet")
    ]


def test_a_jsonl_file_becomes_units_of_shard_docs_documents(tmp_path, reads):
    records = [{"id": f"r{i}", "text": f"record {i} text"} for i in range(5)]
    jsonl = "".join(json.dumps(r) + "\n" for r in records).encode()
    root = tmp_path / "store"
    files = {"corpus.jsonl": jsonl, A: ARCHIVES[A]}
    manifest = extract(root, files, shard_docs=2)
    folder = Store(root).path("extract", manifest["version"]) / "docs"
    names = sorted(p.name for p in folder.iterdir())
    assert names[:3] == ["corpus-00000-000.parquet", "corpus-00001-000.parquet", "corpus-00002-000.parquet"]
    table = pq.read_table(folder / "corpus-00001-000.parquet")
    assert table.column("doc_id").to_pylist() == ["corpus/r2", "corpus/r3"]
    assert texts_of(root, manifest)[:5] == [r["text"] for r in records]
    reads.clear()
    assert output(extract(root, files, tag="again", shard_docs=2)) == output(manifest)
    assert reads == []


def test_every_document_format_a_user_brings_goes_through_the_extract_stage(tmp_path):
    import gzip

    import zstandard
    from test_readers_warc import TEXTS, http_response, page, warcinfo, wet_records

    table = pa.table({"id": ["p0", "p1"], "text": ["parquet row zero", "parquet row one"]})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    article = ["The committee met on Tuesday and approved the budget for the new library."] * 3
    html = page("Budget", article).encode()
    files = {
        "CC-MAIN-00000.warc.wet.gz": b"".join(gzip.compress(r) for r in wet_records(TEXTS)),
        "CC-MAIN-00000.warc.gz": b"".join(
            gzip.compress(r)
            for r in (
                warcinfo("CC-MAIN-00000.warc.gz"),
                http_response("https://news.example/budget", html, 1, headers="Content-Type: text/html\r\n"),
            )
        ),
        "rows.parquet": buffer.getvalue().to_pybytes(),
        "notes.txt": b"A plain text file is one document.\n",
        "records.dat": zstandard.ZstdCompressor().compress(b'{"text": "zstd json line"}\n'),
    }
    root = tmp_path / "store"
    manifest = extract(root, files)
    folder = Store(root).path("extract", manifest["version"]) / "docs"
    docs = pa.concat_tables(pq.read_table(p) for p in sorted(folder.iterdir())).to_pylist()
    by_source = {}
    for doc in docs:
        by_source.setdefault(doc["source"], []).append(doc["text"])
    for url, text in TEXTS.items():  # WET: one document per record, the record's URL as its source
        assert by_source[url] == [text]
    (budget,) = by_source["https://news.example/budget"]  # WARC: the page's main text only
    assert article[0] in budget and "newsletter" not in budget.lower()
    assert sorted(by_source["rows.parquet"]) == ["parquet row one", "parquet row zero"]
    assert by_source["notes.txt"] == ["A plain text file is one document.\n"]
    assert by_source["records.dat"] == ["zstd json line"]  # JSON Lines by content, zstd by magic
    assert {d["doc_id"] for d in docs if d["source"] == "rows.parquet"} == {"rows/p0", "rows/p1"}
    assert manifest["metrics"]["docs"] == len(docs) == len(TEXTS) + 5

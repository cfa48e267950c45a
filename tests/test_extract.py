"""Stage `extract`: the OpenWebText layout and its relatives, found by magic bytes, streamed into exact
Parquet shards; damaged, empty, unknown and hostile archives fail clearly or are handled."""

import bz2
import gzip
import hashlib
import io
import lzma
import tarfile
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import tasks.extract
from storage.errors import DataIntegrityError
from storage.store import Store
from tasks.extract import STAGE, ExtractConfig, archive_stem, compression_of
from tasks.sample_data import write_openwebtext_archive


def texts(n: int, prefix: str = "doc") -> list[str]:
    return [
        f"{prefix} {i}: Some English text, with ünïcödé and a newline.\nLine two of {prefix} {i}." for i in range(n)
    ]


def tar_bytes(members: list[tuple[str, bytes]] | list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for item in members:
            if isinstance(item, tarfile.TarInfo):
                tar.addfile(item)
                continue
            name, data = item
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def inner_xz(documents: list[str], first: int = 0) -> bytes:
    """One `urlsf_subsetNN-M_data.xz` as the real corpus has it."""
    members = []
    for i, text in enumerate(documents, start=first):
        data = text.encode("utf-8")
        members.append((f"{i:07d}-{hashlib.md5(data).hexdigest()}.txt", data))
    return lzma.compress(tar_bytes(members))


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def run_extract(tmp_path: Path, files: dict[str, bytes], **cfg):
    """Publish `files` as a download version, then extract it."""
    store = Store(tmp_path / "store")

    def build(out: Path) -> dict:
        (out / "archives").mkdir()
        for name, data in files.items():
            (out / "archives" / name).write_bytes(data)
        return {}

    version = "dl-" + hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:8]
    store.publish("download", version, build, params={}, inputs={}, code_version="test")
    return STAGE.run(store.root, ExtractConfig(**cfg), {"download": version})


def read_docs(tmp_path: Path, ref) -> pa.Table:
    folder = Store(tmp_path / "store").path("extract", ref.version) / "docs"
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))])


def metrics(tmp_path: Path, ref) -> dict:
    return Store(tmp_path / "store").manifest("extract", ref.version)["metrics"]


def nothing_published(tmp_path: Path) -> bool:
    return Store(tmp_path / "store").latest("extract") is None


def test_real_openwebtext_layout_round_trips_exactly_into_shards(tmp_path):
    documents = [(f"d{i}", text) for i, text in enumerate(texts(25))]
    archive = write_openwebtext_archive(documents, tmp_path / "openwebtext.tar.xz", docs_per_subset=10)
    ref = run_extract(tmp_path, {"openwebtext.tar.xz": archive.read_bytes()}, shard_docs=10)
    table = read_docs(tmp_path, ref)
    assert table.schema.names == ["doc_id", "text", "source", "member", "n_bytes"]
    assert [table.schema.field(n).type for n in table.schema.names] == [pa.string()] * 4 + [pa.int64()]
    assert table.column("text").to_pylist() == [text for _, text in documents]
    assert table.column("n_bytes").to_pylist() == [len(text.encode("utf-8")) for _, text in documents]
    ids = table.column("doc_id").to_pylist()
    assert len(set(ids)) == len(ids) == 25
    first = hashlib.md5(documents[0][1].encode("utf-8")).hexdigest()
    assert ids[0] == f"urlsf_subset00-1_data/0000000-{first}"
    assert table.column("member").to_pylist()[0] == f"0000000-{first}.txt"
    assert set(table.column("source").to_pylist()) == {"openwebtext.tar.xz"}
    shards = sorted((Store(tmp_path / "store").path("extract", ref.version) / "docs").iterdir())
    assert [p.name for p in shards] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert [pq.read_metadata(p).num_rows for p in shards] == [10, 10, 5]
    assert pq.read_metadata(shards[0]).row_group(0).column(1).compression == "ZSTD"
    m = metrics(tmp_path, ref)
    assert (m["docs"], m["shards"], m["inner_archives"], m["skipped"]) == (25, 3, 3, [])
    assert m["bytes"] == sum(len(text.encode("utf-8")) for _, text in documents)


def test_plain_outer_tar_of_inner_archives(tmp_path):
    outer = tar_bytes(
        [
            ("openwebtext/urlsf_subset00-1_data.xz", inner_xz(texts(3, "a"))),
            ("openwebtext/urlsf_subset00-2_data.xz", inner_xz(texts(2, "b"), first=3)),
        ]
    )
    ref = run_extract(tmp_path, {"urlsf_subset00.tar": outer})
    table = read_docs(tmp_path, ref)
    assert table.column("text").to_pylist() == texts(3, "a") + texts(2, "b")
    assert {i.split("/")[0] for i in table.column("doc_id").to_pylist()} == {
        "urlsf_subset00-1_data",
        "urlsf_subset00-2_data",
    }
    assert metrics(tmp_path, ref)["inner_archives"] == 2


@pytest.mark.parametrize(
    "name, pack",
    [
        ("urlsf_subset03-7_data.xz", lzma.compress),
        ("docs.tar", lambda data: data),
        ("docs.tar.gz", gzip.compress),
        ("docs.tar.bz2", bz2.compress),
        ("docs.tar.zst", lambda data: zstandard.ZstdCompressor().compress(data)),
        # zstd frames one after another, each ending inside a piece of input the reader feeds on
        ("frames.tar.zst", lambda data: b"".join(zstd(data[i : i + 700]) for i in range(0, len(data), 700))),
    ],
)
def test_a_single_tar_of_documents_in_every_supported_compression(tmp_path, name, pack):
    archive = pack(tar_bytes([(f"{i}.txt", t.encode()) for i, t in enumerate(texts(4))]))
    ref = run_extract(tmp_path, {name: archive})
    table = read_docs(tmp_path, ref)
    assert table.column("text").to_pylist() == texts(4)
    assert table.column("doc_id").to_pylist() == [f"{archive_stem(name)}/{i}" for i in range(4)]
    assert metrics(tmp_path, ref)["inner_archives"] == 0


def test_formats_are_found_by_magic_bytes_not_names(tmp_path):
    # an inner archive called .txt, inside a download called .txt that is really an xz-compressed tar
    outer = lzma.compress(tar_bytes([("notes.txt", inner_xz(texts(2)))]))
    ref = run_extract(tmp_path, {"readme.txt": outer})
    assert read_docs(tmp_path, ref).column("text").to_pylist() == texts(2)
    assert metrics(tmp_path, ref)["inner_archives"] == 1
    assert compression_of(b"\xfd7zXZ\x00rest") == "xz" and compression_of(b"plain text") is None


@pytest.mark.parametrize(
    "name, pack",
    [
        ("cut.tar.gz", gzip.compress),
        ("cut.tar.bz2", bz2.compress),
        ("cut.tar.zst", lambda data: zstandard.ZstdCompressor().compress(data)),
    ],
)
def test_truncated_compressed_streams_are_errors(tmp_path, name, pack):
    whole = pack(tar_bytes([(f"{i}.txt", t.encode()) for i, t in enumerate(texts(200))]))
    with pytest.raises(DataIntegrityError, match=f"{name}: truncated or corrupt"):
        run_extract(tmp_path, {name: whole[: len(whole) - 30]})
    assert nothing_published(tmp_path)


def test_truncated_outer_xz_names_the_archive_and_publishes_nothing(tmp_path):
    archive = write_openwebtext_archive([("a", t) for t in texts(50)], tmp_path / "o.tar.xz", docs_per_subset=10)
    data = archive.read_bytes()
    with pytest.raises(DataIntegrityError, match=r"openwebtext\.tar\.xz.*truncated or corrupt") as caught:
        run_extract(tmp_path, {"openwebtext.tar.xz": data[: len(data) // 2]})
    assert "\n" not in str(caught.value)
    assert nothing_published(tmp_path)


def damaged_outer() -> bytes:
    good = inner_xz(texts(3, "good"))
    bad = inner_xz(texts(3, "bad"), first=3)
    return tar_bytes(
        [
            ("openwebtext/urlsf_subset00-1_data.xz", good),
            ("openwebtext/urlsf_subset00-2_data.xz", bad[: len(bad) - 40]),  # truncated inner xz
            ("openwebtext/urlsf_subset00-3_data.xz", inner_xz(texts(2, "also good"), first=6)),
        ]
    )


def test_truncated_inner_xz_names_archive_and_member(tmp_path):
    with pytest.raises(DataIntegrityError) as caught:
        run_extract(tmp_path, {"urlsf_subset00.tar": damaged_outer()})
    assert "urlsf_subset00.tar: openwebtext/urlsf_subset00-2_data.xz: truncated or corrupt" in str(caught.value)
    assert nothing_published(tmp_path)


def test_skip_corrupt_keeps_the_good_inner_archives(tmp_path):
    ref = run_extract(tmp_path, {"urlsf_subset00.tar": damaged_outer()}, skip_corrupt=True)
    assert read_docs(tmp_path, ref).column("text").to_pylist() == texts(3, "good") + texts(2, "also good")
    [skipped] = metrics(tmp_path, ref)["skipped"]
    assert skipped["archive"] == "urlsf_subset00.tar"
    assert skipped["member"] == "openwebtext/urlsf_subset00-2_data.xz"
    assert skipped["docs_dropped"] + skipped["docs_kept"] <= 3 and skipped["error"]


def test_a_tar_cut_at_a_member_boundary_is_not_taken_for_complete(tmp_path):
    whole = tar_bytes([(f"{i}.txt", t.encode()) for i, t in enumerate(texts(3))])
    for cut in (2 * 512, 2 * 512 + 300):  # after the first member's data; inside the second header
        with pytest.raises(DataIntegrityError, match="docs.tar: truncated or corrupt.*end-of-archive"):
            run_extract(tmp_path / str(cut), {"docs.tar": whole[:cut]})


def test_non_utf8_document_survives_with_replacement_characters_and_is_counted(tmp_path):
    bad = b"caf\xe9 au lait \xff"  # Latin-1 bytes, not UTF-8
    ref = run_extract(tmp_path, {"docs.tar": tar_bytes([("good.txt", b"fine text"), ("bad.txt", bad)])})
    table = read_docs(tmp_path, ref)
    assert table.column("text").to_pylist() == ["fine text", "caf\ufffd au lait \ufffd"]
    assert table.column("n_bytes").to_pylist() == [9, len("caf\ufffd au lait \ufffd".encode("utf-8"))]
    assert metrics(tmp_path, ref)["invalid_utf8_docs"] == 1


def test_empty_and_unknown_archives_are_clear_errors(tmp_path):
    cases = {
        "empty.tar": (tar_bytes([]), "empty.tar: the archive holds no documents"),
        "zero.xz": (b"", "zero.xz: empty file"),
        "notes.xz": (b"just some text, not an archive" * 20, "notes.xz: unknown archive format"),
        "blank.tar": (tar_bytes([("a.txt", b""), ("b.txt", b"")]), "blank.tar: the archive holds no documents"),
        "notar.xz": (lzma.compress(b"compressed, but not a tar" * 50), "notar.xz: truncated or corrupt"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(DataIntegrityError, match=message):
            run_extract(tmp_path / name, {name: data})
        assert nothing_published(tmp_path / name)


def test_hostile_and_odd_members_are_data_only(tmp_path):
    link = tarfile.TarInfo("link.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    folder = tarfile.TarInfo("dir")
    folder.type = tarfile.DIRTYPE
    device = tarfile.TarInfo("dev.txt")
    device.type = tarfile.CHRTYPE
    members = [
        ("../../etc/passwd", b"root:x:0:0"),
        ("/abs/path.txt", b"absolute"),
        folder,
        link,
        device,
        ("dir/../same.txt", b"first same"),
        ("same.txt", b"second same"),
        ("empty.txt", b""),
    ]
    ref = run_extract(tmp_path, {"docs.tar": tar_bytes(members)})
    table = read_docs(tmp_path, ref)
    assert table.column("member").to_pylist() == ["../../etc/passwd", "/abs/path.txt", "dir/../same.txt", "same.txt"]
    ids = table.column("doc_id").to_pylist()
    assert ids == ["docs/etc/passwd", "docs/abs/path", "docs/dir/same", "docs/same"]
    m = metrics(tmp_path, ref)
    assert m["unsafe_members"] == 3
    assert m["unsafe_member_names"] == ["../../etc/passwd", "/abs/path.txt", "dir/../same.txt"]
    assert (m["non_file_members"], m["empty_members"]) == (3, 1)
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert written == {"store"}  # nothing was extracted anywhere


def test_doc_ids_stay_unique_when_names_repeat(tmp_path):
    inner = tar_bytes([("a.txt", b"one"), ("a.txt", b"two"), ("./a.txt", b"three")])
    outer = tar_bytes([("x/data.tar", inner), ("y/data.tar", inner)])
    ref = run_extract(tmp_path, {"outer.tar": outer, "data.tar": inner})
    ids = read_docs(tmp_path, ref).column("doc_id").to_pylist()
    assert ids == ["data/a", "data/a~2", "data/a~3", "data~2/a", "data~2/a~2", "data~2/a~3"] + [
        "data~3/a",
        "data~3/a~2",
        "data~3/a~3",
    ]


def test_max_docs_stops_early(tmp_path):
    archive = write_openwebtext_archive([("a", t) for t in texts(30)], tmp_path / "o.tar.xz", docs_per_subset=7)
    ref = run_extract(tmp_path, {"openwebtext.tar.xz": archive.read_bytes()}, max_docs=12, shard_docs=5)
    assert read_docs(tmp_path, ref).column("text").to_pylist() == texts(12)
    assert (metrics(tmp_path, ref)["docs"], metrics(tmp_path, ref)["max_docs_reached"]) == (12, True)


def test_same_input_reuses_the_version(tmp_path):
    files = {"docs.tar": tar_bytes([("a.txt", b"text")])}
    first = run_extract(tmp_path, files)
    again = run_extract(tmp_path, files)
    assert again.version == first.version and again.reused


def test_config_bounds():
    with pytest.raises(ValueError, match="shard_docs"):
        ExtractConfig(shard_docs=0)
    with pytest.raises(ValueError, match="max_docs"):
        ExtractConfig(max_docs=0)
    with pytest.raises(ValueError, match="workers"):
        ExtractConfig(workers=0)
    with pytest.raises(ValueError, match="max_doc_bytes"):
        ExtractConfig(max_doc_bytes=0)


# -- oversized members --------------------------------------------------------------------------------


def test_oversized_member_is_skipped_unread_and_counted(tmp_path):
    huge = 32 << 20  # "x" repeated: compresses to almost nothing, so only reading it could cost memory
    # gzip, whose 32 KB window is all its decoder holds (xz's 8 MiB dictionary would hide what is measured)
    archive = gzip.compress(tar_bytes([("a.txt", b"small"), ("huge.txt", b"x" * huge), ("b.txt", b"also small")]))
    tracemalloc.start()
    try:
        ref = run_extract(tmp_path, {"docs.tar.gz": archive}, max_doc_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert read_docs(tmp_path, ref).column("text").to_pylist() == ["small", "also small"]
    m = metrics(tmp_path, ref)
    assert (m["docs"], m["oversized_members"], m["oversized_member_names"]) == (2, 1, ["huge.txt"])
    assert peak < huge // 8


def test_a_member_of_exactly_max_doc_bytes_is_kept(tmp_path):
    ref = run_extract(tmp_path, {"docs.tar": tar_bytes([("a.txt", b"12345"), ("b.txt", b"123456")])}, max_doc_bytes=5)
    assert read_docs(tmp_path, ref).column("text").to_pylist() == ["12345"]
    assert metrics(tmp_path, ref)["oversized_member_names"] == ["b.txt"]


def traced_peak(run):
    """(what `run()` returns, the peak of Python's traced memory while it ran)."""
    tracemalloc.start()
    try:
        result = run()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_zstd_bomb_is_read_in_bounded_memory(tmp_path):
    huge = 64 << 20  # zeros: zstd packs them ~32,000:1, into a few KB
    bomb = zstd(b"\0" * huge)  # a member holding only zeros reads as an empty tar, to be read to its end
    skipped = zstd(tar_bytes([("a.txt", b"small"), ("huge.txt", b"x" * huge), ("b.txt", b"also small")]))
    files = {
        "bomb.tar": tar_bytes([("x.txt", b"before"), ("bomb.zst", bomb), ("y.txt", b"after")]),
        "docs.tar.zst": skipped,
    }
    ref, peak = traced_peak(lambda: run_extract(tmp_path, files, max_doc_bytes=1 << 20))
    assert read_docs(tmp_path, ref).column("text").to_pylist() == ["before", "after", "small", "also small"]
    m = metrics(tmp_path, ref)
    assert (m["inner_archives"], m["oversized_member_names"]) == (1, ["huge.txt"])
    assert peak < huge // 4


def test_a_large_compressible_tar_zst_streams_as_xz_does(tmp_path):
    # ~20 MB of text that zstd packs ~1000:1: one 64 KB piece of input would be the whole archive
    whole = tar_bytes([(f"{i}.txt", f"Document {i} says the same again. ".encode() * 1500) for i in range(400)])
    packed = zstd(whole)
    zst, peak = traced_peak(lambda: run_extract(tmp_path / "zst", {"docs.tar.zst": packed}, shard_docs=20))
    xz = run_extract(tmp_path / "xz", {"docs.tar.xz": lzma.compress(whole, preset=1)}, shard_docs=20)
    assert read_docs(tmp_path / "zst", zst).column("text") == read_docs(tmp_path / "xz", xz).column("text")
    assert metrics(tmp_path / "zst", zst)["docs"] == 400
    assert peak < len(whole) // 4


# -- damage and look-alikes ---------------------------------------------------------------------------


def damaged_bzip2(documents: list[str]) -> bytes:
    """A bzip2 tar whose stream checksum, in its last bytes, is wrong: everything decompresses, and bz2 then
    reports the damage as a bare OSError("Invalid data stream")."""
    packed = bytearray(bz2.compress(tar_bytes([(f"{i}.txt", text.encode()) for i, text in enumerate(documents)])))
    packed[-2] ^= 0xFF
    return bytes(packed)


def test_a_damaged_bzip2_download_is_a_one_line_error_naming_it(tmp_path):
    with pytest.raises(DataIntegrityError) as caught:
        run_extract(tmp_path, {"docs.tar.bz2": damaged_bzip2(texts(3))})
    message = str(caught.value)
    assert message.startswith("docs.tar.bz2: truncated or corrupt archive (bzip2 data: OSError: Invalid data stream)")
    assert "\n" not in message
    assert nothing_published(tmp_path)


def outer_with_damaged_bzip2() -> bytes:
    return tar_bytes(
        [
            ("openwebtext/urlsf_subset00-1_data.xz", inner_xz(texts(3, "good"))),
            ("openwebtext/urlsf_subset00-2_data.bz2", damaged_bzip2(texts(3, "bad"))),
            ("openwebtext/urlsf_subset00-3_data.xz", inner_xz(texts(2, "also good"), first=6)),
        ]
    )


def test_a_damaged_inner_bzip2_archive_is_named_and_skipped_with_any_worker_count(tmp_path):
    files = {"urlsf_subset00.tar": outer_with_damaged_bzip2()}
    messages = {}
    for workers in (1, 2):
        with pytest.raises(DataIntegrityError) as caught:
            run_extract(tmp_path / f"fail{workers}", files, workers=workers)
        messages[workers] = str(caught.value)
    assert messages[2] == messages[1]
    assert messages[1].startswith(
        "urlsf_subset00.tar: openwebtext/urlsf_subset00-2_data.bz2: truncated or corrupt archive (bzip2 data: OSError"
    )
    one = outputs(tmp_path / "one", files, skip_corrupt=True)
    two = outputs(tmp_path / "two", files, skip_corrupt=True, workers=2)
    assert two == one
    assert column(two[1], "text") == texts(3, "good") + texts(2, "also good")
    [skipped] = two[2]["skipped"]
    assert (skipped["member"], skipped["error"]) == (
        "openwebtext/urlsf_subset00-2_data.bz2",
        "bzip2 data: OSError: Invalid data stream",
    )


LOOKALIKES = [
    ("bzip2.txt", b"BZh9 is the header that starts every bzip2 file."),
    ("gzip.txt", b"\x1f\x8b starts every gzip file, then a method byte."),
    ("xz.txt", b"\xfd7zXZ\x00 starts every xz file."),
    ("zstd.txt", b"(\xb5/\xfd starts every zstd frame, then a header."),
    ("ustar.txt", b"A text about tar. " * 14 + b"Then ustar at byte 257, where a tar header says it."),
    ("notes.txt.gz", gzip.compress(b"compressed, but a text and not a tar")),
]


@pytest.mark.parametrize("workers", [1, 2])
def test_texts_that_start_like_an_archive_are_documents(tmp_path, workers):
    assert LOOKALIKES[4][1][257:262] == b"ustar"
    inner = lzma.compress(tar_bytes([("first.txt", b"first"), *LOOKALIKES]))
    outer = tar_bytes(
        [("openwebtext/urlsf_subset00-1_data.xz", inner), ("openwebtext/urlsf_subset00-2_data.xz", inner_xz(["last"]))]
    )
    files = {"urlsf_subset00.tar": outer, "plain.tar": tar_bytes(LOOKALIKES)}
    _, shards, m = outputs(tmp_path, files, workers=workers)
    expected = [data.decode("utf-8", "replace") for _, data in LOOKALIKES]
    assert column(shards, "text") == expected + ["first", *expected, "last"]
    assert column(shards, "member")[: len(LOOKALIKES)] == [name for name, _ in LOOKALIKES]
    assert (m["inner_archives"], m["skipped"], m["invalid_utf8_docs"]) == (2, [], 8)


@pytest.mark.parametrize("pack", [lzma.compress, gzip.compress, bz2.compress, zstd])
def test_an_inner_archive_cut_short_is_corrupt_not_a_text(tmp_path, monkeypatch, pack):
    packed = pack(tar_bytes([(f"{i}.txt", t.encode()) for i, t in enumerate(texts(20))]))
    # half of it: bzip2, whose first block is then incomplete, has not yet given out a single byte
    outer = tar_bytes([("a/whole_data", packed), ("a/cut_data", packed[: len(packed) // 2])])
    with pytest.raises(DataIntegrityError, match="urlsf_subset00.tar: a/cut_data: truncated or corrupt"):
        run_extract(tmp_path / "fail", {"urlsf_subset00.tar": outer})
    for ship_up_to in (tasks.extract.MAX_SHIPPED_ARCHIVE_BYTES, 0):  # read whole, then streamed
        monkeypatch.setattr(tasks.extract, "MAX_SHIPPED_ARCHIVE_BYTES", ship_up_to)
        ref = run_extract(tmp_path / str(ship_up_to), {"urlsf_subset00.tar": outer}, skip_corrupt=True)
        assert read_docs(tmp_path / str(ship_up_to), ref).column("text").to_pylist() == texts(20)
        assert [s["member"] for s in metrics(tmp_path / str(ship_up_to), ref)["skipped"]] == ["a/cut_data"]


# -- workers ------------------------------------------------------------------------------------------


def outputs(folder: Path, files: dict[str, bytes], **cfg) -> tuple[str, dict[str, bytes], dict]:
    """(version id, {shard name: bytes}, metrics) of one extract run into its own store under `folder`."""
    ref = run_extract(folder, files, **cfg)
    docs = Store(folder / "store").path("extract", ref.version) / "docs"
    return ref.version, {p.name: p.read_bytes() for p in sorted(docs.iterdir())}, metrics(folder, ref)


def column(shards: dict[str, bytes], name: str) -> list:
    return pa.concat_tables([pq.read_table(pa.BufferReader(data)) for data in shards.values()]).column(name).to_pylist()


def busy_openwebtext() -> bytes:
    """An openwebtext.tar.xz of nine inner archives; one holds every kind of member the metrics count, and a
    nested tar whose name a later inner archive repeats (container names must stay unique across processes)."""
    odd = lzma.compress(
        tar_bytes(
            [
                ("0000100-a.txt", b"first"),
                ("0000100-a.txt", b"same name again"),
                ("../escape.txt", b"unsafe name"),
                ("empty.txt", b""),
                ("big.txt", b"y" * 5000),
                ("latin1.txt", b"caf\xe9"),
                ("urlsf_subset00-5_data.tar", tar_bytes([("n.txt", b"nested")])),
            ]
        )
    )
    folder = tarfile.TarInfo("openwebtext")
    folder.type = tarfile.DIRTYPE
    inner = [(f"openwebtext/urlsf_subset00-{i}_data.xz", inner_xz(texts(9, f"s{i}"), first=9 * i)) for i in range(8)]
    inner.insert(3, ("openwebtext/urlsf_subset00-odd_data.xz", odd))
    return lzma.compress(tar_bytes([folder, *inner]))


def test_workers_give_byte_identical_shards_and_metrics(tmp_path):
    files = {"openwebtext.tar.xz": busy_openwebtext()}
    one = outputs(tmp_path / "one", files, shard_docs=10, max_doc_bytes=4096)
    two = outputs(tmp_path / "two", files, shard_docs=10, max_doc_bytes=4096, workers=2)
    assert two[0] == one[0]  # the same version id: workers change how, not what
    assert list(two[1]) == [f"shard-{i:05d}.parquet" for i in range(8)]
    assert two[1] == one[1]
    assert two[2] == one[2]
    m = two[2]
    assert (m["docs"], m["inner_archives"], m["oversized_member_names"]) == (77, 10, ["big.txt"])
    assert (m["unsafe_member_names"], m["empty_members"], m["invalid_utf8_docs"]) == (["../escape.txt"], 1, 1)
    ids = column(two[1], "doc_id")
    assert len(set(ids)) == len(ids)
    assert "urlsf_subset00-5_data/n" in ids  # the tar nested in the odd inner archive
    assert [i.split("/")[0] for i in ids if "/0000045-" in i] == ["urlsf_subset00-5_data~2"]  # the later one


@pytest.mark.parametrize("limit", ["MAX_SHIPPED_TEXT_CHARS", "MAX_SHIPPED_ARCHIVE_BYTES"])
def test_archives_too_big_to_hand_to_a_worker_give_the_same_output(tmp_path, monkeypatch, limit):
    files = {"openwebtext.tar.xz": busy_openwebtext()}
    expected = outputs(tmp_path / "one", files, shard_docs=10, max_doc_bytes=4096)
    monkeypatch.setattr(tasks.extract, limit, 0)  # every inner archive is then parsed by the stage's process
    assert outputs(tmp_path / "two", files, shard_docs=10, max_doc_bytes=4096, workers=2) == expected


def outer_with_damage(corrupt: tuple[int, ...], count: int = 8) -> bytes:
    """A plain outer tar of `count` inner archives, those at the `corrupt` positions truncated."""
    members = []
    for i in range(count):
        data = inner_xz(texts(5, f"s{i}"), first=5 * i)
        members.append((f"openwebtext/urlsf_subset00-{i}_data.xz", data[:-40] if i in corrupt else data))
    return tar_bytes(members)


def test_a_truncated_inner_archive_fails_the_same_with_workers(tmp_path):
    messages = {}
    for workers in (1, 2):
        with pytest.raises(DataIntegrityError) as caught:
            run_extract(tmp_path / str(workers), {"urlsf_subset00.tar": outer_with_damage((2, 5))}, workers=workers)
        messages[workers] = str(caught.value)
        assert nothing_published(tmp_path / str(workers))
    assert messages[2] == messages[1]
    assert messages[2].startswith("urlsf_subset00.tar: openwebtext/urlsf_subset00-2_data.xz: truncated or corrupt")
    assert "\n" not in messages[2]


def test_a_damaged_inner_archive_is_reported_before_a_later_cut_in_the_download(tmp_path):
    whole = outer_with_damage((1,))
    cut = tarfile.open(fileobj=io.BytesIO(whole)).getmembers()[3].offset_data + 100  # inside the fourth
    messages = {}
    for workers in (1, 2):
        with pytest.raises(DataIntegrityError) as caught:
            run_extract(tmp_path / str(workers), {"urlsf_subset00.tar": whole[:cut]}, workers=workers)
        messages[workers] = str(caught.value)
    assert messages[2] == messages[1]
    assert "openwebtext/urlsf_subset00-1_data.xz: truncated or corrupt" in messages[2]


def test_skip_corrupt_with_workers_keeps_the_good_inner_archives(tmp_path):
    files = {"urlsf_subset00.tar": damaged_outer()}
    one = outputs(tmp_path / "one", files, skip_corrupt=True)
    two = outputs(tmp_path / "two", files, skip_corrupt=True, workers=2)
    assert two == one
    assert column(two[1], "text") == texts(3, "good") + texts(2, "also good")
    assert [s["member"] for s in two[2]["skipped"]] == ["openwebtext/urlsf_subset00-2_data.xz"]


def test_workers_do_not_change_the_version_but_max_doc_bytes_does():
    inputs = {"download": "dl-0123"}
    default = STAGE.version(ExtractConfig(), inputs)
    assert STAGE.version(ExtractConfig(workers=8), inputs) == default
    assert STAGE.version(ExtractConfig(max_doc_bytes=1024), inputs) != default

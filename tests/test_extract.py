"""Stage `extract`: the OpenWebText layout and its relatives, found by magic bytes, streamed into exact
Parquet shards; damaged inner archives and bombs quarantined; a damaged download, empty, unknown and hostile
archives fail clearly or are handled; memory bounded by bytes."""

import bz2
import functools
import gzip
import hashlib
import io
import lzma
import random
import tarfile
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import tasks.readers.shards
import tasks.shards
from storage.errors import DataIntegrityError
from storage.store import Store
from tasks.extract import STAGE, ExtractConfig
from tasks.readers.streams import compression_of
from tasks.readers.tar import archive_stem
from tasks.sample_data import write_openwebtext_archive
from tasks.shards import read_batches


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


def inner_xz(documents: list[str], first: int = 0, preset: int = 6) -> bytes:
    """One `urlsf_subsetNN-M_data.xz` as the real corpus has it."""
    members = []
    for i, text in enumerate(documents, start=first):
        data = text.encode("utf-8")
        members.append((f"{i:07d}-{hashlib.md5(data).hexdigest()}.txt", data))
    return lzma.compress(tar_bytes(members), preset=preset)


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def publish_download(tmp_path: Path, files: dict[str, bytes]) -> str:
    """Publish `files` as a download version; its id."""
    store = Store(tmp_path / "store")

    def build(out: Path) -> dict:
        (out / "archives").mkdir()
        for name, data in files.items():
            (out / "archives" / name).write_bytes(data)
        return {}

    version = "dl-" + hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:8]
    store.publish("download", version, build, params={}, inputs={}, code_version="test")
    return version


def run_extract(tmp_path: Path, files: dict[str, bytes], **cfg):
    """Publish `files` as a download version, then extract it."""
    version = publish_download(tmp_path, files)
    return STAGE.run(tmp_path / "store", ExtractConfig(**cfg), {"download": version})


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
    # one inner archive a unit, its shards named by the download and its place in it
    assert [p.name for p in shards] == [f"openwebtext-{i:05d}-000.parquet" for i in range(3)]
    assert [pq.read_metadata(p).num_rows for p in shards] == [10, 10, 5]
    assert pq.read_metadata(shards[0]).row_group(0).column(1).compression == "ZSTD"
    m = metrics(tmp_path, ref)
    assert (m["docs"], m["shards"], m["inner_archives"], m["quarantined"]) == (25, 3, 3, [])
    assert (m["quarantined_archives"], m["corrupt_fraction"]) == (0, 0.0)
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


def download_version(tmp_path: Path) -> str:
    return Store(tmp_path / "store").latest("download")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_damaged_download_fails_naming_it_its_version_and_the_fix(tmp_path, workers):
    archive = write_openwebtext_archive([("a", t) for t in texts(50)], tmp_path / "o.tar.xz", docs_per_subset=10)
    data = archive.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    for name, damaged in {"cut": data[: len(data) // 2], "flipped": bytes(flipped), "tiny": data[:3]}.items():
        folder = tmp_path / name
        with pytest.raises(DataIntegrityError) as caught:
            run_extract(folder, {"openwebtext.tar.xz": damaged}, workers=workers)
        message = str(caught.value)
        assert message.startswith("openwebtext.tar.xz: "), message
        assert f"download version {download_version(folder)}" in message
        assert message.endswith("`gptflow run --force download`") and "\n" not in message
        assert "quarantine" not in message  # the download itself is never quarantined
        assert nothing_published(folder)


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


def test_a_download_cut_inside_an_inner_archive_fails_as_the_download(tmp_path):
    noise = random.Random(0)  # text that packs little, so that the cut falls inside an inner archive's data
    documents = [("a", noise.randbytes(4000).hex()) for _ in range(50)]
    archive = write_openwebtext_archive(documents, tmp_path / "o.tar.xz", docs_per_subset=25)
    data = archive.read_bytes()
    with pytest.raises(DataIntegrityError) as caught:  # strict: a quarantined inner archive would fail first
        run_extract(tmp_path, {"openwebtext.tar.xz": data[: len(data) // 2]}, strict=True)
    assert str(caught.value).startswith("openwebtext.tar.xz: truncated or corrupt archive (xz data: EOFError")


def test_strict_fails_on_the_first_corrupt_inner_archive_naming_archive_and_member(tmp_path):
    with pytest.raises(DataIntegrityError) as caught:
        run_extract(tmp_path, {"urlsf_subset00.tar": damaged_outer()}, strict=True, max_corrupt_fraction=1.0)
    message = str(caught.value)
    assert message.startswith("urlsf_subset00.tar: openwebtext/urlsf_subset00-2_data.xz: truncated or corrupt")
    assert "\n" not in message
    assert nothing_published(tmp_path)


def test_past_max_corrupt_fraction_the_stage_fails_saying_how_many_and_which(tmp_path):
    with pytest.raises(DataIntegrityError) as caught:
        run_extract(tmp_path, {"urlsf_subset00.tar": damaged_outer()})  # 1 of 3, far past the default 1%
    message = str(caught.value)
    assert message.startswith(
        "1 of 3 inner archives were corrupt or refused (33.3%, more than max_corrupt_fraction=0.01)"
    )
    assert "the first: urlsf_subset00.tar: openwebtext/urlsf_subset00-2_data.xz: truncated or corrupt" in message
    assert "\n" not in message
    assert nothing_published(tmp_path)


def test_a_corrupt_inner_archive_is_quarantined_and_the_rest_kept(tmp_path):
    damaged = damaged_outer()
    ref = run_extract(tmp_path, {"urlsf_subset00.tar": damaged}, max_corrupt_fraction=0.5)
    assert read_docs(tmp_path, ref).column("text").to_pylist() == texts(3, "good") + texts(2, "also good")
    m = metrics(tmp_path, ref)
    [entry] = m["quarantined"]
    size = tarfile.open(fileobj=io.BytesIO(damaged)).getmember("openwebtext/urlsf_subset00-2_data.xz").size
    assert entry == {
        "archive": "urlsf_subset00.tar",
        "member": "openwebtext/urlsf_subset00-2_data.xz",
        "reason": "truncated",
        "detail": "xz data: EOFError: Compressed file ended before the end-of-stream marker was reached",
        "bytes": size,
    }
    assert (m["quarantined_archives"], m["corrupt_fraction"], m["inner_archives"], m["docs"]) == (1, 1 / 3, 3, 5)


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
        "zero.xz": (b"", "zero.xz: empty file, not an archive; it came from download version"),
        "notes.xz": (b"just some text, not an archive" * 20, "notes.xz: unknown archive format"),
        "blank.tar": (tar_bytes([("a.txt", b""), ("b.txt", b"")]), "blank.tar: the archive holds no documents"),
        "notar.tar.xz": (lzma.compress(b"compressed, but not a tar" * 50), "notar.tar.xz: truncated or corrupt"),
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
    with pytest.raises(ValueError, match="max_corrupt_fraction"):
        ExtractConfig(max_corrupt_fraction=1.5)
    with pytest.raises(ValueError, match="max_archive_bytes"):
        ExtractConfig(max_archive_bytes=1000)
    with pytest.raises(ValueError, match="max_expansion_ratio"):
        ExtractConfig(max_expansion_ratio=0.5)
    with pytest.raises(ValueError, match="skip_corrupt"):  # replaced by max_corrupt_fraction and strict
        ExtractConfig(skip_corrupt=True)


# -- oversized members --------------------------------------------------------------------------------


def test_oversized_member_is_skipped_unread_and_counted(tmp_path):
    huge = 32 << 20  # "x" repeated: compresses to almost nothing, so only reading it could cost memory
    # gzip, whose 32 KB window is all its decoder holds (xz's 8 MiB dictionary would hide what is measured)
    archive = gzip.compress(tar_bytes([("a.txt", b"small"), ("huge.txt", b"x" * huge), ("b.txt", b"also small")]))
    tracemalloc.start()
    try:
        # 32 MiB of "x" packs ~1000x, past the default max_expansion_ratio (itself tested below)
        ref = run_extract(tmp_path, {"docs.tar.gz": archive}, max_doc_bytes=1 << 20, max_expansion_ratio=5000)
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


def test_a_zstd_stream_with_a_huge_member_is_read_in_bounded_memory(tmp_path):
    huge = 64 << 20  # "x": zstd packs it ~32,000:1, into a few KB
    skipped = zstd(tar_bytes([("a.txt", b"small"), ("huge.txt", b"x" * huge), ("b.txt", b"also small")]))
    files = {"docs.tar.zst": skipped}
    cfg = {"max_doc_bytes": 1 << 20, "max_expansion_ratio": 1e6}
    ref, peak = traced_peak(lambda: run_extract(tmp_path, files, **cfg))
    assert read_docs(tmp_path, ref).column("text").to_pylist() == ["small", "also small"]
    assert metrics(tmp_path, ref)["oversized_member_names"] == ["huge.txt"]
    assert peak < huge // 4


def test_a_large_compressible_tar_zst_streams_as_xz_does(tmp_path):
    # ~20 MB of text that zstd packs ~1000:1: one 64 KB piece of input would be the whole archive
    whole = tar_bytes([(f"{i}.txt", f"Document {i} says the same again. ".encode() * 1500) for i in range(400)])
    packed = zstd(whole)
    cfg = {"shard_docs": 20, "max_expansion_ratio": 1e4}  # it packs past the default ratio
    zst, peak = traced_peak(lambda: run_extract(tmp_path / "zst", {"docs.tar.zst": packed}, **cfg))
    xz = run_extract(tmp_path / "xz", {"docs.tar.xz": lzma.compress(whole, preset=1)}, **cfg)
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


@pytest.mark.slow  # worker processes: seconds to spawn
def test_a_damaged_inner_bzip2_archive_is_named_and_quarantined_with_any_worker_count(tmp_path):
    files = {"urlsf_subset00.tar": outer_with_damaged_bzip2()}
    messages = {}
    for workers in (1, 2):
        with pytest.raises(DataIntegrityError) as caught:
            run_extract(tmp_path / f"fail{workers}", files, workers=workers, strict=True)
        messages[workers] = str(caught.value)
    assert messages[2] == messages[1]
    assert messages[1].startswith(
        "urlsf_subset00.tar: openwebtext/urlsf_subset00-2_data.bz2: truncated or corrupt archive (bzip2 data: OSError"
    )
    one = outputs(tmp_path / "one", files, max_corrupt_fraction=0.5)
    two = outputs(tmp_path / "two", files, max_corrupt_fraction=0.5, workers=2)
    assert two == one
    assert column(two[1], "text") == texts(3, "good") + texts(2, "also good")
    [entry] = two[2]["quarantined"]
    assert (entry["member"], entry["reason"], entry["detail"]) == (
        "openwebtext/urlsf_subset00-2_data.bz2",
        "corrupt_stream",
        "bzip2 data: OSError: Invalid data stream",
    )


# Texts that start like an archive but are none: bzip2's magic and a block size are ASCII, and so may start
# a text; only its full stream signature (with the first block's magic) makes a bzip2 stream.
LOOKALIKES = [
    ("bzip2.txt", b"BZh9 is the header that starts every bzip2 file."),
    ("BZh", b"BZh"),
    ("ustar.txt", b"A text about tar. " * 14 + b"Then ustar at byte 257, where a tar header says it."),
    ("paren.txt", b"("),  # the first byte of zstd's magic, but a valid text
]
# Members that start with xz's, gzip's or zstd's binary magic (never valid UTF-8), or are named like an
# archive: archives, here corrupt ones, never documents.
NOT_TEXTS = [
    ("gzip.txt", b"\x1f\x8b starts every gzip file, then a method byte.", "corrupt_stream"),
    ("xz.txt", b"\xfd7zXZ\x00 starts every xz file.", "corrupt_stream"),
    ("zstd.txt", b"(\xb5/\xfd starts every zstd frame, then a header.", "corrupt_stream"),
    ("cut.bin", b"(\xb5/", "truncated"),
    ("notes.txt.gz", gzip.compress(b"compressed, but a text and not a tar"), "not_a_tar"),
    ("notes.bz2", b"BZh9 is a text named like a bzip2 file", "corrupt_stream"),
]


@pytest.mark.parametrize("workers", [1, 2])
def test_texts_that_start_like_an_archive_are_documents(tmp_path, workers):
    assert LOOKALIKES[2][1][257:262] == b"ustar"
    inner = lzma.compress(tar_bytes([("first.txt", b"first"), *LOOKALIKES]))
    outer = tar_bytes(
        [("openwebtext/urlsf_subset00-1_data.xz", inner), ("openwebtext/urlsf_subset00-2_data.xz", inner_xz(["last"]))]
    )
    files = {"urlsf_subset00.tar": outer, "plain.tar": tar_bytes(LOOKALIKES)}
    _, shards, m = outputs(tmp_path, files, workers=workers)
    expected = [data.decode("utf-8") for _, data in LOOKALIKES]
    assert column(shards, "text") == expected + ["first", *expected, "last"]
    assert column(shards, "member")[: len(LOOKALIKES)] == [name for name, _ in LOOKALIKES]
    assert (m["inner_archives"], m["quarantined"], m["invalid_utf8_docs"]) == (2, [], 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_members_with_a_binary_magic_or_an_archive_name_are_never_documents(tmp_path, workers):
    files = {
        "plain.tar": tar_bytes([("first.txt", b"first"), *((n, d) for n, d, _ in NOT_TEXTS), ("last.txt", b"last")])
    }
    # the same, one level down: then the inner archive that holds them is what is quarantined, whole
    inner = lzma.compress(tar_bytes([("kept.txt", b"dropped with its archive"), (NOT_TEXTS[0][0], NOT_TEXTS[0][1])]))
    files["urlsf_subset00.tar"] = tar_bytes([("openwebtext/urlsf_subset00-1_data.xz", inner)])
    _, shards, m = outputs(tmp_path, files, workers=workers, max_corrupt_fraction=1.0)
    assert column(shards, "text") == ["first", "last"]
    assert [(e["member"], e["reason"]) for e in m["quarantined"]] == [
        *((name, reason) for name, _, reason in NOT_TEXTS),
        ("openwebtext/urlsf_subset00-1_data.xz", "corrupt_stream"),
    ]
    assert m["quarantined"][-1]["detail"].startswith("gzip.txt: gzip data: ")
    assert (m["quarantined_archives"], m["inner_archives"], m["invalid_utf8_docs"]) == (7, 7, 0)


@pytest.mark.parametrize("pack", [lzma.compress, gzip.compress, bz2.compress, zstd])
def test_an_inner_archive_cut_short_is_corrupt_not_a_text(tmp_path, pack):
    packed = pack(tar_bytes([(f"{i}.txt", t.encode()) for i, t in enumerate(texts(20))]))
    # half of it: bzip2, whose first block is then incomplete, has not yet given out a single byte
    outer = tar_bytes([("a/whole_data", packed), ("a/cut_data", packed[: len(packed) // 2])])
    with pytest.raises(DataIntegrityError, match="urlsf_subset00.tar: a/cut_data: truncated or corrupt"):
        run_extract(tmp_path / "fail", {"urlsf_subset00.tar": outer}, strict=True)
    ref = run_extract(tmp_path / "kept", {"urlsf_subset00.tar": outer}, max_corrupt_fraction=0.5)
    assert read_docs(tmp_path / "kept", ref).column("text").to_pylist() == texts(20)
    entries = metrics(tmp_path / "kept", ref)["quarantined"]
    assert [(e["member"], e["reason"]) for e in entries] == [("a/cut_data", "truncated")]


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
    nested tar whose name a later inner archive repeats (doc_ids must stay unique across units)."""
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
    # a unit per inner archive (nine), shards of at most 10 documents each
    assert list(two[1]) == [f"openwebtext-{i:05d}-000.parquet" for i in range(9)]
    assert two[1] == one[1]
    assert two[2] == one[2]
    m = two[2]
    assert (m["docs"], m["inner_archives"], m["oversized_member_names"]) == (77, 10, ["big.txt"])
    assert (m["unsafe_member_names"], m["empty_members"], m["invalid_utf8_docs"]) == (["../escape.txt"], 1, 1)
    ids = column(two[1], "doc_id")
    assert len(set(ids)) == len(ids)
    # the tar nested in the odd inner archive: under that archive's name, so the later one keeps its own
    assert "urlsf_subset00-odd_data/urlsf_subset00-5_data/n" in ids
    assert [i.split("/")[0] for i in ids if "/0000045-" in i] == ["urlsf_subset00-5_data"]


def outer_with_damage(corrupt: tuple[int, ...], count: int = 8) -> bytes:
    """A plain outer tar of `count` inner archives, those at the `corrupt` positions truncated."""
    members = []
    for i in range(count):
        data = inner_xz(texts(5, f"s{i}"), first=5 * i)
        members.append((f"openwebtext/urlsf_subset00-{i}_data.xz", data[:-40] if i in corrupt else data))
    return tar_bytes(members)


@pytest.mark.slow  # worker processes: seconds to spawn
def test_a_truncated_inner_archive_fails_the_same_with_workers(tmp_path):
    messages = {}
    # the first corrupt one (strict), or the share of them past max_corrupt_fraction
    for strict, workers in ((True, 1), (True, 2), (False, 1), (False, 2)):
        folder = tmp_path / f"{strict}{workers}"
        with pytest.raises(DataIntegrityError) as caught:
            run_extract(folder, {"urlsf_subset00.tar": outer_with_damage((2, 5))}, workers=workers, strict=strict)
        messages[strict, workers] = str(caught.value)
        assert nothing_published(folder)
        assert "urlsf_subset00.tar: openwebtext/urlsf_subset00-2_data.xz: truncated or corrupt" in str(caught.value)
        assert "\n" not in messages[strict, workers]
    assert messages[True, 2] == messages[True, 1]
    assert messages[False, 2] == messages[False, 1]
    assert messages[True, 1].startswith("urlsf_subset00.tar: openwebtext/urlsf_subset00-2_data.xz")
    assert messages[False, 1].startswith("2 of 8 inner archives were corrupt or refused (25.0%")


@pytest.mark.slow  # worker processes: seconds to spawn
def test_a_damaged_inner_archive_is_reported_before_a_later_cut_in_the_download(tmp_path):
    whole = outer_with_damage((1,))
    cut = tarfile.open(fileobj=io.BytesIO(whole)).getmembers()[3].offset_data + 100  # inside the fourth
    messages = {}
    for workers in (1, 2):
        with pytest.raises(DataIntegrityError) as caught:
            run_extract(tmp_path / str(workers), {"urlsf_subset00.tar": whole[:cut]}, workers=workers, strict=True)
        messages[workers] = str(caught.value)
        # quarantined instead, the inner archive lets the stage go on, to the cut in the download
        with pytest.raises(DataIntegrityError) as caught:
            run_extract(tmp_path / f"q{workers}", {"urlsf_subset00.tar": whole[:cut]}, workers=workers)
        assert str(caught.value).startswith("urlsf_subset00.tar: truncated or corrupt archive (tar: ReadError")
    assert messages[2] == messages[1]
    assert "openwebtext/urlsf_subset00-1_data.xz: truncated or corrupt" in messages[2]


def test_quarantine_with_workers_keeps_the_good_inner_archives(tmp_path):
    files = {"urlsf_subset00.tar": damaged_outer()}
    one = outputs(tmp_path / "one", files, max_corrupt_fraction=0.5)
    two = outputs(tmp_path / "two", files, max_corrupt_fraction=0.5, workers=2)
    assert two == one
    assert column(two[1], "text") == texts(3, "good") + texts(2, "also good")
    assert [s["member"] for s in two[2]["quarantined"]] == ["openwebtext/urlsf_subset00-2_data.xz"]


def test_workers_do_not_change_the_version_but_max_doc_bytes_does():
    inputs = {"download": "dl-0123"}
    default = STAGE.version(ExtractConfig(), inputs)
    assert STAGE.version(ExtractConfig(workers=8), inputs) == default
    assert STAGE.version(ExtractConfig(max_doc_bytes=1024), inputs) != default


# -- damage kinds, one by one ---------------------------------------------------------------------------


@functools.cache
def good_inner_archives(count: int = 99) -> tuple[tuple[str, bytes], ...]:
    """`count` sound inner archives of one document each: with one damaged archive beside them, under 1% of
    the inner archives are corrupt, so the default max_corrupt_fraction lets the stage go on."""
    return tuple(
        (f"openwebtext/urlsf_subset01-{i}_data.xz", inner_xz([f"good document {i}"], first=i, preset=0))
        for i in range(count)
    )


def flipped(data: bytes, at: int) -> bytes:
    damaged = bytearray(data)
    damaged[at] ^= 0xFF
    return bytes(damaged)


def zeroed_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(256) + data[middle + 256 :]


DAMAGED_XZ = inner_xz(texts(40, "damaged"))
DAMAGE = {
    "flipped_magic_byte": (flipped(DAMAGED_XZ, 0), "corrupt_stream"),
    "flipped_stream_flags_byte": (flipped(DAMAGED_XZ, 7), "corrupt_stream"),
    "zeroed_block_in_the_middle": (zeroed_middle(DAMAGED_XZ), "corrupt_stream"),
    "cut_to_3_bytes": (DAMAGED_XZ[:3], "truncated"),
    "cut_mid_stream": (DAMAGED_XZ[: len(DAMAGED_XZ) // 2], "truncated"),
    "xz_of_a_text_not_a_tar": (lzma.compress(b"a text, not a tar. " * 200), "not_a_tar"),
}


# By name, or (the name telling nothing) by magic bytes: every damage but a flipped magic byte keeps those.
NAMED_DAMAGE = [("openwebtext/urlsf_subset00-2_data.xz", damage) for damage in DAMAGE] + [
    ("openwebtext/blob", damage) for damage in DAMAGE if damage != "flipped_magic_byte"
]


@pytest.mark.parametrize("name, damage", NAMED_DAMAGE)
def test_a_damaged_inner_xz_is_quarantined_never_a_document_nor_an_empty_tar(tmp_path, name, damage):
    data, reason = DAMAGE[damage]
    members = [*good_inner_archives(), (name, data)]
    ref = run_extract(tmp_path, {"urlsf_subset00.tar": tar_bytes(members)})
    m = metrics(tmp_path, ref)
    # nothing of the damaged archive, not even one junk "document"
    assert read_docs(tmp_path, ref).column("text").to_pylist() == [f"good document {i}" for i in range(99)]
    assert m["invalid_utf8_docs"] == 0
    [entry] = m["quarantined"]
    assert {key: entry[key] for key in ("archive", "member", "reason", "bytes")} == {
        "archive": "urlsf_subset00.tar",
        "member": name,
        "reason": reason,
        "bytes": len(data),
    }
    assert entry["detail"] and "\n" not in entry["detail"]
    assert (m["quarantined_archives"], m["inner_archives"], m["corrupt_fraction"]) == (1, 100, 0.01)


# -- decompression bombs ---------------------------------------------------------------------------------


class CountingLZMA:
    """lzma's decompressor, counting what it gives out (every instance in this process together)."""

    real = lzma.LZMADecompressor
    given_out = 0

    def __init__(self, **kwargs) -> None:
        self._decompressor = self.real(**kwargs)

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        out = self._decompressor.decompress(data, max_length)
        CountingLZMA.given_out += len(out)
        return out

    def __getattr__(self, name: str):
        return getattr(self._decompressor, name)


@pytest.fixture
def xz_output(monkeypatch):
    """How many bytes xz decompression has given out so far in this test."""
    monkeypatch.setattr(CountingLZMA, "given_out", 0)
    monkeypatch.setattr(lzma, "LZMADecompressor", CountingLZMA)
    return lambda: CountingLZMA.given_out


@functools.cache
def xz_of_zeros(gib: int = 1) -> bytes:
    """~`gib` GiB of zeros as one small xz file (xz streams one after another), ~40 KB a GiB."""
    return lzma.compress(bytes(16 << 20), preset=0) * (64 * gib)


def test_an_xz_bomb_inside_the_download_is_quarantined_after_a_bounded_read(tmp_path, xz_output):
    bomb = xz_of_zeros()  # reads as an empty tar followed by 1 GiB of padding
    assert len(bomb) < 200_000
    members = [*good_inner_archives(), ("openwebtext/urlsf_subset00-2_data.xz", bomb)]
    ref = run_extract(tmp_path, {"urlsf_subset00.tar": tar_bytes(members)})
    # 200x the bomb's size and one read past it, of the 1 GiB that it holds
    assert xz_output() < 200 * len(bomb) + (4 << 20)
    m = metrics(tmp_path, ref)
    [entry] = m["quarantined"]
    assert (entry["member"], entry["reason"], entry["bytes"]) == (
        "openwebtext/urlsf_subset00-2_data.xz",
        "expansion_ratio",
        len(bomb),
    )
    assert f"from {len(bomb):,}" in entry["detail"] and "max_expansion_ratio=200" in entry["detail"]
    assert read_docs(tmp_path, ref).column("text").to_pylist() == [f"good document {i}" for i in range(99)]


def test_an_inner_archive_past_max_archive_bytes_is_quarantined_as_too_large(tmp_path):
    big = inner_xz([f"document {i} " * 20_000 for i in range(12)])  # ~3 MB of text that packs ~1000x
    ref = run_extract(
        tmp_path,
        {"urlsf_subset00.tar": tar_bytes([*good_inner_archives(), ("openwebtext/urlsf_subset00-2_data.xz", big)])},
        max_archive_bytes=1 << 20,
    )
    [entry] = metrics(tmp_path, ref)["quarantined"]
    assert (entry["reason"], entry["detail"]) == ("too_large", "decompresses to more than max_archive_bytes=1,048,576")


def test_a_download_that_is_a_bomb_fails_naming_it(tmp_path, xz_output):
    bomb = xz_of_zeros()
    with pytest.raises(DataIntegrityError) as caught:
        run_extract(tmp_path, {"zeros.tar.xz": bomb})
    message = str(caught.value)
    assert message.startswith("zeros.tar.xz: refused as a decompression bomb (decompresses to more than")
    assert f"download version {download_version(tmp_path)}" in message and "max_expansion_ratio" in message
    assert xz_output() < 200 * len(bomb) + (4 << 20)
    assert nothing_published(tmp_path)


# -- memory bounded by bytes -----------------------------------------------------------------------------


def big_documents(count: int, size: int) -> list[tuple[str, bytes]]:
    """`count` distinct documents of `size` bytes each."""
    return [(f"{i:07d}.txt", (f"document {i} of many words " * (size // 20 + 1)).encode()[:size]) for i in range(count)]


def test_row_groups_and_read_batches_are_bounded_in_bytes_not_rows(tmp_path):
    docs = big_documents(8, 4 << 20)  # 32 MiB: 8 rows, far fewer than a row group's 1024
    ref = run_extract(tmp_path, {"docs.tar": tar_bytes(docs)}, shard_docs=50_000)
    [shard] = (Store(tmp_path / "store").path("extract", ref.version) / "docs").glob("*.parquet")
    meta = pq.read_metadata(shard)
    text_bytes = [meta.row_group(i).column(1).total_uncompressed_size for i in range(meta.num_row_groups)]
    assert meta.num_rows == 8 and meta.num_row_groups > 1
    assert max(text_bytes) <= tasks.readers.shards.ROW_GROUP_BYTES + (4 << 20) + 4096
    batches = [batch.column("text") for batch in read_batches(shard, ["text"])]
    assert [t.as_py() for batch in batches for t in batch] == [d.decode() for _, d in docs]
    assert max(batch.nbytes for batch in batches) <= tasks.shards.READ_BATCH_BYTES


def test_an_inner_archive_streams_into_its_shards_and_is_still_dropped_whole(tmp_path, monkeypatch):
    # an inner plain tar of 96 documents of 256 KiB: written to its shards as it is read, 1 MiB at a time
    monkeypatch.setattr(tasks.readers.shards, "ROW_GROUP_BYTES", 1 << 20)
    docs = big_documents(96, 256 << 10)
    inner = tar_bytes(docs)
    files = {"urlsf_subset00.tar": tar_bytes([("openwebtext/urlsf_subset00-1_data.tar", inner)])}
    version = publish_download(tmp_path / "whole", files)
    ref, peak = traced_peak(lambda: STAGE.run(tmp_path / "whole" / "store", ExtractConfig(), {"download": version}))
    assert read_docs(tmp_path / "whole", ref).column("text").to_pylist() == [d.decode() for _, d in docs]
    assert peak < len(inner) // 4  # 24 MiB of text went through; about 1 MiB waited at a time
    # cut inside its last document: the shards it had written are dropped whole
    cut = len(inner) - 10240 - 100_000
    damaged = tar_bytes([("openwebtext/urlsf_subset00-1_data.tar", inner[:cut]), ("b.txt", b"beside it")])
    ref = run_extract(tmp_path / "cut", {"urlsf_subset00.tar": damaged}, max_corrupt_fraction=1.0)
    assert read_docs(tmp_path / "cut", ref).column("text").to_pylist() == ["beside it"]
    assert metrics(tmp_path / "cut", ref)["quarantined"][0]["reason"] == "truncated"
    store = tmp_path / "cut" / "store"
    kept = ["urlsf_subset00-00001-000.parquet"]  # the documents beside it: unit 1 of the download
    assert [p.name for p in (store / "extract" / ref.version / "docs").iterdir()] == kept
    assert [p.name for p in (store / "extract" / ".shards").rglob("*.parquet")] == kept  # nothing of unit 0
    assert not [p for p in store.rglob("*.spool")]  # no spooled unit left behind


def test_a_tar_of_many_members_does_not_keep_their_headers(tmp_path):
    members = [(f"{i:07d}.txt", b"x") for i in range(5000)]
    version = publish_download(tmp_path, {"docs.tar": tar_bytes(members)})
    ref, peak = traced_peak(lambda: STAGE.run(tmp_path / "store", ExtractConfig(), {"download": version}))
    assert metrics(tmp_path, ref)["docs"] == 5000
    assert peak < 2 << 20  # a header kept per member would be ~5000 x 600 bytes

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import publish_docs

from storage.errors import DataIntegrityError
from storage.store import Store
from tasks.dedup import STAGE, DedupConfig, normalize_for_dedup, signature, signature_shard


def publish_clean(root, shards, version="clean-v1"):
    return publish_docs(root, "clean", shards, version, columns=("doc_id", "text", "n_bytes"))


def test_normalisation_ignores_case_width_whitespace_and_punctuation():
    assert normalize_for_dedup("Hello,  World!\n\tStraße ﬁle") == "hello world strasse file"
    assert normalize_for_dedup("ＡＢＣ") == "abc"  # full-width forms fold under NFKC
    assert normalize_for_dedup("Hello, world", strip_punctuation=False) == "hello, world"
    assert signature("The Same TEXT.") == signature("the same\n text")
    assert signature("the same text") != signature("another text")
    assert len(signature("x")) == 16


def test_duplicates_are_removed_clustered_and_the_first_is_kept(tmp_path):
    root = tmp_path / "store"
    clean = publish_clean(
        root,
        [
            [("a1", "The quick brown fox."), ("u1", "Something unique."), ("a2", "the QUICK  brown\nfox")],
            [("b1", "Lorem dolor sit."), ("a3", "The quick brown fox!"), ("b2", "LOREM DOLOR SIT")],
        ],
    )
    ref = STAGE.run(root, DedupConfig(), {"clean": clean})
    folder = Store(root).path("dedup", ref.version)

    kept = {
        name: pq.read_table(folder / "docs" / name).column("doc_id").to_pylist()
        for name in ("shard-00000.parquet", "shard-00001.parquet")
    }
    assert kept == {"shard-00000.parquet": ["a1", "u1"], "shard-00001.parquet": ["b1"]}
    assert pq.read_table(folder / "docs" / "shard-00000.parquet").column("text").to_pylist()[0] == (
        "The quick brown fox."
    )

    clusters = pq.read_table(folder / "clusters" / "clusters.parquet").to_pylist()
    assert [(c["cluster_id"], c["doc_id"], c["kept"], c["shard"], c["row"]) for c in clusters] == [
        (0, "a1", True, "shard-00000.parquet", 0),
        (0, "a2", False, "shard-00000.parquet", 2),
        (0, "a3", False, "shard-00001.parquet", 1),
        (1, "b1", True, "shard-00001.parquet", 0),
        (1, "b2", False, "shard-00001.parquet", 2),
    ]
    metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
    assert metrics == {"docs_in": 6, "kept": 3, "exact_duplicates": 3, "clusters": 2}


def test_punctuation_counts_when_asked_to(tmp_path):
    root = tmp_path / "store"
    clean = publish_clean(root, [[("a", "Hello, world"), ("b", "Hello world")]])
    strict = STAGE.run(root, DedupConfig(strip_punctuation=False), {"clean": clean})
    assert Store(root).manifest("dedup", strict.version)["metrics"]["exact_duplicates"] == 0
    loose = STAGE.run(root, DedupConfig(), {"clean": clean})
    assert Store(root).manifest("dedup", loose.version)["metrics"]["exact_duplicates"] == 1


def test_no_duplicates_still_writes_an_empty_cluster_file(tmp_path):
    root = tmp_path / "store"
    clean = publish_clean(root, [[("a", "one"), ("b", "two")]])
    folder = Store(root).path("dedup", STAGE.run(root, DedupConfig(), {"clean": clean}).version)
    assert pq.read_table(folder / "clusters" / "clusters.parquet").num_rows == 0
    assert pq.read_table(folder / "docs" / "shard-00000.parquet").num_rows == 2


def test_two_worker_processes_write_the_same_bytes_as_one(tmp_path):
    shards = [[(f"d{s}-{i}", f"text number {i % 7}") for i in range(40)] for s in range(3)]
    files = []
    for workers in (1, 2):
        root = tmp_path / f"store-{workers}"
        ref = STAGE.run(root, DedupConfig(workers=workers), {"clean": publish_clean(root, shards)})
        manifest = Store(root).manifest("dedup", ref.version)
        assert manifest["metrics"]["kept"] == 7
        files.append({name: info["sha256"] for name, info in manifest["files"].items()})
    assert files[0] == files[1]


def test_an_incomplete_signature_file_is_recomputed(tmp_path):
    shard = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"doc_id": ["a", "b"], "text": ["one", "two"]}), shard)
    dest = tmp_path / "shard.sig"
    dest.write_bytes(b"\0" * 20)  # a leftover that is not one signature per row
    assert signature_shard(shard, dest, strip_punctuation=True) == 2
    assert dest.read_bytes() == signature("one") + signature("two")


def test_zero_documents_is_a_data_error(tmp_path):
    root = tmp_path / "store"
    clean = publish_clean(root, [[], []])
    with pytest.raises(DataIntegrityError, match="no documents to deduplicate"):
        STAGE.run(root, DedupConfig(), {"clean": clean})
    assert Store(root).latest("dedup") is None


def test_only_exact_method_is_accepted():
    with pytest.raises(ValueError, match="method"):
        DedupConfig(method="minhash")

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import publish_docs

from storage.errors import DataIntegrityError
from storage.store import Store
from tasks.dedup import STAGE, DedupConfig, normalize_for_dedup, signature

EXACT = DedupConfig(method="exact")


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
    ref = STAGE.run(root, EXACT, {"clean": clean})
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
    assert [(c["cluster_id"], c["doc_id"], c["kept"], c["shard"], c["row"], c["kind"]) for c in clusters] == [
        (0, "a1", True, "shard-00000.parquet", 0, "kept"),
        (0, "a2", False, "shard-00000.parquet", 2, "exact"),
        (0, "a3", False, "shard-00001.parquet", 1, "exact"),
        (1, "b1", True, "shard-00001.parquet", 0, "kept"),
        (1, "b2", False, "shard-00001.parquet", 2, "exact"),
    ]
    assert {c["similarity"] for c in clusters} == {1.0}
    removed = pq.read_table(folder / "removed" / "shard-00001.parquet").to_pylist()
    assert removed == [
        {"doc_id": "a3", "row": 1, "reason": "exact_duplicate"},
        {"doc_id": "b2", "row": 2, "reason": "exact_duplicate"},
    ]
    metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
    assert metrics == {"docs_in": 6, "kept": 3, "exact_duplicates": 3, "near_duplicates": 0, "clusters": 2}


def test_punctuation_counts_when_asked_to(tmp_path):
    root = tmp_path / "store"
    clean = publish_clean(root, [[("a", "Hello, world"), ("b", "Hello world")]])
    strict = STAGE.run(root, DedupConfig(method="exact", strip_punctuation=False), {"clean": clean})
    assert Store(root).manifest("dedup", strict.version)["metrics"]["exact_duplicates"] == 0
    loose = STAGE.run(root, EXACT, {"clean": clean})
    assert Store(root).manifest("dedup", loose.version)["metrics"]["exact_duplicates"] == 1


def test_no_duplicates_still_writes_an_empty_cluster_file(tmp_path):
    root = tmp_path / "store"
    clean = publish_clean(root, [[("a", "one"), ("b", "two")]])
    folder = Store(root).path("dedup", STAGE.run(root, DedupConfig(), {"clean": clean}).version)
    assert pq.read_table(folder / "clusters" / "clusters.parquet").num_rows == 0
    assert pq.read_table(folder / "docs" / "shard-00000.parquet").num_rows == 2


def test_zero_documents_is_a_data_error(tmp_path):
    root = tmp_path / "store"
    clean = publish_clean(root, [[], []])
    with pytest.raises(DataIntegrityError, match="no documents to deduplicate"):
        STAGE.run(root, DedupConfig(), {"clean": clean})
    assert Store(root).latest("dedup") is None


# -- near-duplicates, determinism, caching, paragraphs --------------------------------------------------

PROSE = [
    "The committee met on Tuesday to discuss the budget for the coming year and agreed to postpone the vote "
    "until the auditors had finished their review of the accounts of every department in the city.",
    "Rain fell over the northern hills for three days, swelling the rivers and closing the mountain roads "
    "while farmers in the valley moved their animals to higher ground before the water arrived.",
    "A small bakery on the corner of the market square has sold the same rye bread for ninety years, and "
    "its owners say the recipe was brought by a great-grandmother who arrived with nothing but a sack of flour.",
    "Engineers tested the new bridge by driving twenty loaded trucks across it at once, measuring how far the "
    "deck bent under the weight and comparing the readings with the figures of their computer model.",
]


def _edit(text: str, word: int, new: str) -> str:
    words = text.split()
    words[word] = new
    return " ".join(words)


def _read_docs(folder):
    return {path.name: pq.read_table(path).column("doc_id").to_pylist() for path in sorted((folder / "docs").glob("*"))}


def test_near_duplicates_are_removed_and_the_first_is_kept_with_its_similarity(tmp_path):
    root = tmp_path / "store"
    story = " ".join(PROSE)
    near = _edit(story, 10, "agreed")  # one word of 137 changed: 5 of 133 shingles differ, similarity 0.93
    clean = publish_clean(
        root,
        [
            [("p0", story), ("p1", PROSE[1]), ("p0-exact", story.upper())],
            [("p2", PROSE[2]), ("p0-near", near), ("p3", PROSE[3]), ("p0-near-exact", near + "!")],
        ],
    )
    ref = STAGE.run(root, DedupConfig(), {"clean": clean})
    folder = Store(root).path("dedup", ref.version)
    assert _read_docs(folder) == {"shard-00000.parquet": ["p0", "p1"], "shard-00001.parquet": ["p2", "p3"]}
    clusters = pq.read_table(folder / "clusters" / "clusters.parquet").to_pylist()
    assert [(c["doc_id"], c["kind"], c["kept"]) for c in clusters] == [
        ("p0", "kept", True),
        ("p0-exact", "exact", False),
        ("p0-near", "near", False),
        ("p0-near-exact", "exact", False),
    ]
    similarity = [c["similarity"] for c in clusters]
    assert similarity[:2] == [1.0, 1.0] and 0.7 <= similarity[2] < 1.0 and similarity[3] == similarity[2]
    removed = pq.read_table(folder / "removed" / "shard-00001.parquet").to_pylist()
    assert [(r["doc_id"], r["reason"]) for r in removed] == [
        ("p0-near", "near_duplicate"),
        ("p0-near-exact", "exact_duplicate"),
    ]
    metrics = Store(root).manifest("dedup", ref.version)["metrics"]
    assert {k: metrics[k] for k in ("docs_in", "kept", "exact_duplicates", "near_duplicates", "clusters")} == {
        "docs_in": 7,
        "kept": 4,
        "exact_duplicates": 2,
        "near_duplicates": 1,
        "clusters": 1,
    }
    assert metrics["lsh_threshold"] == round((1 / 14) ** (1 / 8), 4)


def test_the_verification_threshold_decides_which_candidates_are_duplicates(tmp_path):
    root = tmp_path / "store"
    story = " ".join(PROSE)
    near = _edit(_edit(story, 5, "snow"), 60, "cattle")  # two words of 137 changed: similarity 0.86
    clean = publish_clean(root, [[("a", story), ("b", near)]])
    loose = STAGE.run(root, DedupConfig(threshold=0.3), {"clean": clean})
    similarity = pq.read_table(Store(root).path("dedup", loose.version) / "clusters" / "clusters.parquet")
    found = similarity.column("similarity").to_pylist()[1]
    strict = STAGE.run(root, DedupConfig(threshold=min(1.0, found + 0.01)), {"clean": clean})
    assert Store(root).manifest("dedup", loose.version)["metrics"]["near_duplicates"] == 1
    assert Store(root).manifest("dedup", strict.version)["metrics"]["near_duplicates"] == 0


def _corpus(n: int = 60) -> list[tuple[str, str]]:
    docs = []
    for i in range(n):
        base = PROSE[i % 4] + f" Report number {i // 4} of the series."
        docs.append((f"d{i:03d}", base if i % 3 else _edit(base, i % 30, f"word{i}")))
    return docs


@pytest.mark.slow
def test_two_worker_processes_write_the_same_bytes_as_one(tmp_path):
    docs = _corpus()
    shards = [docs[0:20], docs[20:40], docs[40:60]]
    files = []
    for workers in (1, 2):
        root = tmp_path / f"store-{workers}"
        ref = STAGE.run(root, DedupConfig(workers=workers, paragraphs=True), {"clean": publish_clean(root, shards)})
        manifest = Store(root).manifest("dedup", ref.version)
        assert manifest["metrics"]["near_duplicates"] > 0
        files.append({name: info["sha256"] for name, info in manifest["files"].items() if name != "manifest.json"})
    assert any(name.startswith("clusters/") for name in files[0]) and any(n.startswith("docs/") for n in files[0])
    assert files[0] == files[1]


def test_the_kept_set_does_not_depend_on_where_shards_are_split(tmp_path):
    docs = _corpus()
    kept = []
    for split in ([docs], [docs[:7], docs[7:31], docs[31:]]):
        root = tmp_path / f"store-{len(split)}"
        ref = STAGE.run(root, DedupConfig(), {"clean": publish_clean(root, split)})
        folder = Store(root).path("dedup", ref.version)
        kept.append(sorted(doc for ids in _read_docs(folder).values() for doc in ids))
        clusters = pq.read_table(folder / "clusters" / "clusters.parquet")
        assert sorted(clusters.column("doc_id").to_pylist()) != []
    assert kept[0] == kept[1] and len(kept[0]) < len(docs)


def test_a_nightly_run_rehashes_only_the_new_shard(tmp_path):
    root = tmp_path / "store"
    docs = _corpus()
    old = publish_clean(root, [docs[:20], docs[20:40]], version="clean-v1")
    STAGE.run(root, DedupConfig(), {"clean": old})
    entries = root / "dedup" / ".shards" / "signatures"
    before = {path.name for path in entries.glob("*/*")}
    new = publish_clean(root, [docs[:20], docs[20:40], docs[40:]], version="clean-v2")
    ref = STAGE.run(root, DedupConfig(), {"clean": new})
    after = {path.name for path in entries.glob("*/*")}
    assert len(before) == 2 and before < after and len(after) == 3
    fresh = STAGE.run(
        tmp_path / "fresh",
        DedupConfig(),
        {"clean": publish_clean(tmp_path / "fresh", [docs[:20], docs[20:40], docs[40:]], version="clean-v2")},
    )
    ours = Store(root).manifest("dedup", ref.version)["files"]
    theirs = Store(tmp_path / "fresh").manifest("dedup", fresh.version)["files"]
    assert ours == theirs  # built partly from cached shards, byte-identical to a build from scratch


def test_a_damaged_shard_is_one_line_naming_it(tmp_path):
    root = tmp_path / "store"
    clean = publish_clean(root, [[("a", "one")], [("b", "two")]])
    shard = Store(root).path("clean", clean) / "docs" / "shard-00001.parquet"
    shard.chmod(0o644)
    shard.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataIntegrityError) as error:
        STAGE.run(root, DedupConfig(), {"clean": clean})
    assert "shard-00001.parquet" in str(error.value) and "\n" not in str(error.value)


def test_a_text_column_that_is_not_text_is_a_data_error(tmp_path):
    root = tmp_path / "store"

    def build(out):
        (out / "docs").mkdir()
        pq.write_table(pa.table({"doc_id": ["a"], "text": [3]}), out / "docs" / "shard-00000.parquet")

    Store(root).publish("clean", "clean-bad", build, params={}, inputs={}, code_version="test")
    with pytest.raises(DataIntegrityError, match=r"shard-00000.parquet: column text is int64, not a string"):
        STAGE.run(root, DedupConfig(), {"clean": "clean-bad"})


LONG = [
    "This paragraph of the validation document is long enough to count as a paragraph for dedup.",
    "Another sentence of sixty characters or more, shared by the training and validation sets.",
    "A third line that only one document has, and that is also long enough to be a paragraph.",
]


def test_paragraphs_seen_before_are_removed_and_an_emptied_document_is_dropped(tmp_path):
    root = tmp_path / "store"
    clean = publish_clean(
        root,
        [
            [("val", f"Title\n{LONG[0]}\n\n{LONG[1]}")],
            [
                ("train", f"Intro\n{LONG[1].upper()}\n{LONG[2]}"),
                ("copy", f"{LONG[0]}\n  \n{LONG[1]}!"),
                ("twice", f"{LONG[2]} More words here to differ.\nshort\n{LONG[2]} More words here to differ."),
            ],
        ],
    )
    ref = STAGE.run(root, DedupConfig(method="exact", paragraphs=True), {"clean": clean})
    folder = Store(root).path("dedup", ref.version)
    train = pq.read_table(folder / "docs" / "shard-00001.parquet").to_pylist()
    assert [(d["doc_id"], d["text"]) for d in train] == [
        ("train", f"Intro\n{LONG[2]}"),
        ("twice", f"{LONG[2]} More words here to differ.\nshort"),
    ]
    assert train[0]["n_bytes"] == len(f"Intro\n{LONG[2]}".encode())
    removed = pq.read_table(folder / "removed" / "shard-00001.parquet").to_pylist()
    assert removed == [{"doc_id": "copy", "row": 1, "reason": "paragraphs"}]
    metrics = Store(root).manifest("dedup", ref.version)["metrics"]
    assert metrics["paragraphs_removed"] == 4 and metrics["paragraph_docs_dropped"] == 1 and metrics["kept"] == 3

    kept = [d["text"] for path in sorted((folder / "docs").glob("*")) for d in pq.read_table(path).to_pylist()]
    seen: dict[str, int] = {}
    for text in kept:
        for line in {normalize_for_dedup(line) for line in text.split("\n") if len(line.strip()) >= 60}:
            seen[line] = seen.get(line, 0) + 1
    assert seen and max(seen.values()) == 1  # no paragraph of 60+ characters is in two kept documents


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "fuzzy"}, "method"),
        ({"bands": 0}, "bands"),
        ({"rows_per_band": 65}, "rows_per_band"),
        ({"threshold": 1.5}, "threshold"),
        ({"ngram_size": 0}, "ngram_size"),
        ({"bands": 128, "rows_per_band": 9}, "at most 1024 hashes"),
    ],
)
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        DedupConfig(**changes)


def test_fast_punctuation_stripping_matches_the_unicode_categories():
    import unicodedata

    sample = "".join(chr(cp) for cp in range(0, 0x3000, 7)) + "¡Hola! «quote» — dash… 𝐀𝐁 ﬁ"
    slow = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", sample).casefold())
    slow = " ".join("".join(c for c in slow if not unicodedata.category(c).startswith("P")).split())
    assert normalize_for_dedup(sample) == slow

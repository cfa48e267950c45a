import hashlib
import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import publish_docs

from storage.errors import DataIntegrityError
from storage.store import Store
from tasks.dedup import (
    STAGE,
    DedupConfig,
    exact_groups,
    hash_shard,
    normalize_for_dedup,
    signature,
    write_exact_hashes,
)

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


# -- exact groups, one hash range at a time ------------------------------------------------------------------


def _brute_force_groups(shards: list[list[str]]) -> tuple[list[int], list[int]]:
    """(members, reps) by comparing normalised texts: every document whose text another shares, with the
    position of the first document of that text in (shard, row) order."""
    texts = [normalize_for_dedup(text) for shard in shards for text in shard]
    first = {}
    for position, text in enumerate(texts):
        first.setdefault(text, position)
    counts = {text: texts.count(text) for text in first}
    members = [position for position, text in enumerate(texts) if counts[text] > 1]
    return members, [first[texts[position]] for position in members]


def test_exact_groups_are_the_same_for_any_budget_and_match_the_texts(tmp_path):
    shards = [
        ["Alpha beta.", "unique one", "ALPHA  beta", "gamma delta", "Gamma, delta!", "epsilon"],
        ["gamma delta", "unique two", "zeta eta", "alpha beta", "ZETA ETA", "zeta\neta"],
        ["theta", "epsilon!", "unique three", "Theta"],
    ]
    stems = [f"shard-{index:05d}" for index in range(len(shards))]
    for stem, texts in zip(stems, shards, strict=True):
        write_exact_hashes(b"".join(signature(text) for text in texts), tmp_path, stem)
    expected = _brute_force_groups(shards)
    assert len(expected[0]) == 13 and len(set(expected[1])) == 5  # 5 groups, within and across shards
    for budget in (1, 1000, 1 << 28):  # 1,152 ranges (3 x 16 records x 24 bytes), 2, 1
        members, reps = exact_groups(tmp_path, stems, budget=budget)
        assert (members.tolist(), reps.tolist()) == expected, budget


def _planted_corpus(docs: int, shards: int, seed: int = 7) -> tuple[list[bytes], dict[int, int]]:
    """Random 128-bit digests of `docs` documents in `shards` shards (row order, 16 bytes each) with planted
    exact duplicates, within and across shards, at the two ends of the hash space, and documents that share
    only the high 64 bits of another's hash; and {member position: rep position} of the planted groups."""
    rng = np.random.default_rng(seed)
    halves = rng.integers(0, 2**64, size=(docs, 2), dtype=np.uint64, endpoint=False)
    chosen = rng.permutation(docs)[:2400]
    sizes = np.tile([2, 3, 4], 200)  # 600 groups of 1,800 documents
    groups = [np.sort(group) for group in np.split(chosen[:1800], np.cumsum(sizes)[:-1])]
    expected = {}
    for group in groups:
        halves[group] = halves[group[0]]
        expected.update({int(position): int(group[0]) for position in group})
    halves[groups[0], 0], halves[groups[1], 0] = 0, 2**64 - 1  # the first and the last range's edges
    halves[chosen[1800:2100]] = halves[chosen[2100:]] ^ np.array([0, 1], dtype=np.uint64)  # the low half differs
    bounds = np.linspace(0, docs, shards + 1).astype(int)
    data = halves.astype("<u8").tobytes()
    return [data[16 * bounds[k] : 16 * bounds[k + 1]] for k in range(shards)], expected


def test_exact_groups_hold_one_range_not_a_hash_per_document(tmp_path):
    docs = 300_000
    parts, expected = _planted_corpus(docs, shards=3)
    stems = [f"shard-{index:05d}" for index in range(len(parts))]
    for stem, part in zip(stems, parts, strict=True):
        write_exact_hashes(part, tmp_path, stem)
    tracemalloc.start()
    try:
        members, reps = exact_groups(tmp_path, stems, budget=256 << 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert dict(zip(members.tolist(), reps.tolist(), strict=True)) == expected
    assert members.tolist() == sorted(expected)
    assert peak < 16 * docs / 4, peak  # the old pass held 16 bytes and more per document


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
    assert normalize_for_dedup("«𠀀», 𝐀!") == "𠀀 a"  # past the first two planes, and within them
    slow = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", sample).casefold())
    slow = " ".join("".join(c for c in slow if not unicodedata.category(c).startswith("P")).split())
    assert normalize_for_dedup(sample) == slow


# -- the signature pass's output is pinned -----------------------------------------------------------------

# Words that normalisation must fold alike (case, width, ligatures, compatibility forms, combining marks),
# punctuation, odd whitespace and code points a fast path could mistake for a separator.
TRICKY = (
    ["Straße", "STRASSE", "ﬁle", "ＡＢＣ", "Σίσυφος", "ΣΊΣΥΦΟΣ", "naïve", "nai\u0308ve", "東京", "😀", "l'été"]
    + ["co-op", "U.S.A.", "e\u0301", "İstanbul", "ǅ", "½", "x²", "—", "...", "«", "»", "¿qué?", "\t", "\n"]
    + ["\u00a0", "\u3000", "\u2028", "\x00", "\uffff", "\U0010ffff", "\x1f", "\x85", "a\u200bb", "ﷺ"]
)
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "dze", "qua", "ber", "ost", "ing", "ul"]


def _stream(label: str):
    """Bytes that depend only on `label` (sha256 in counter mode): the same corpus on every platform."""
    counter = 0
    while True:
        yield from hashlib.sha256(f"{label}:{counter}".encode()).digest()
        counter += 1


def pinned_corpus(docs: int = 1100) -> list[tuple[str, str]]:
    """(doc_id, text) of a fixed corpus in two read batches: documents over 600 made-up words and TRICKY,
    empty and short ones, one longer than a hash chunk, exact copies (other case and spacing) and near copies
    (one word changed)."""
    rand = _stream("pinned-corpus")
    vocabulary = [
        "".join(SYLLABLES[next(rand) % len(SYLLABLES)] for _ in range(1 + next(rand) % 3)) for _ in range(600)
    ]
    vocabulary += TRICKY
    texts = []
    for i in range(docs):
        kind = next(rand) % 20
        if kind == 0 and texts:  # an exact copy: case and spacing differ
            texts.append("  " + texts[next(rand) % len(texts)].upper().replace(" ", "\n "))
            continue
        if kind == 1 and texts:  # a near copy: one word changed
            words = texts[next(rand) % len(texts)].split(" ")
            words[next(rand) % len(words)] = "changed"
            texts.append(" ".join(words))
            continue
        length = next(rand) % 5 if kind == 2 else 20 + next(rand) % 200 if i != 7 else 9000
        texts.append(" ".join(vocabulary[(next(rand) << 8 | next(rand)) % len(vocabulary)] for _ in range(length)))
    return [(f"doc{i:05d}", text) for i, text in enumerate(texts)]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# The sha256 of every file the signature pass writes for pinned_corpus() (one shard), with and without
# punctuation stripping. A change here changes every stored signature, band and cluster: make it on purpose.
PINNED_SIGNATURE_FILES = {
    True: {
        "minhash/shard-00000.bands.npy": "bc699b377ec443c608bc30777c5126df4092e22da9242505a801c7f3dd5e8d24",
        "minhash/shard-00000.rows.npy": "b064783e67828b9e2ecfa29cff7f782958bedc5bb0ac500e912b1ee3001070c3",
        "minhash/shard-00000.sig.npy": "903670c47eb126d65521449805d765b8077f98b20df401368fbf0255d005dde6",
        "signatures/shard-00000.hashes.npy": "53846593ee8b2d9d889a5b7a6e0b2d1a5a392214027dd924d8c0bb23dab3cab6",
        "signatures/shard-00000.rows.npy": "fab465b210820d1339405e28a304c2f614363b81c87119ca27333fc60e6254f8",
    },
    False: {
        "minhash/shard-00000.bands.npy": "c54e3fdf18f97aae481415d1bb1975952d332a744c9672d15f7e672aae49f68f",
        "minhash/shard-00000.rows.npy": "099abddb84d120c4ddfe97ff5c1b12793bd282a11f106c5ddc26304ff254ca33",
        "minhash/shard-00000.sig.npy": "bd84c706660181261c02c44853a03d406f692e3297007277adc8d004656ca1f2",
        "signatures/shard-00000.hashes.npy": "f6f2384c368cd3faf8667713ae3eaf3362248eb8320c9e94675ebe740936ceda",
        "signatures/shard-00000.rows.npy": "791166eda331c66e14491af28ab27bec3f956853b86e8789a7670de2b0708732",
    },
}
# The exact hashes are the 16-byte blake2b digests of the normalised texts; the signatures/ files hold them
# sorted by (hash, row), the first and last 8 bytes as the high and low uint64, with their rows. Put back in
# row order, their bytes are the digests one after another, and these are those bytes' sha256: a change of
# the files' layout re-pins the files above, while this pin holds the hashes themselves.
PINNED_DIGESTS = {
    True: "77c4bea397c5b1de6a7ebdbe5aea3e74650d080531b0ee288891f9aa42002934",
    False: "0750abf4cf511763ad9bf57f5142a39ab956d0141f94ceb3df0f19f7d4652051",
}


@pytest.mark.parametrize("strip_punctuation", [True, False])
def test_the_signature_pass_writes_the_pinned_bytes(tmp_path, strip_punctuation):
    docs = pinned_corpus()
    src = tmp_path / "shard-00000.parquet"
    pq.write_table(pa.table({"doc_id": [d for d, _ in docs], "text": [t for _, t in docs]}), src)
    assert hash_shard(src, tmp_path / "out", strip_punctuation, DedupConfig().minhash()) == len(docs)
    written = {str(p.relative_to(tmp_path / "out")): _sha256(p) for p in sorted((tmp_path / "out").rglob("*.*"))}
    assert written == PINNED_SIGNATURE_FILES[strip_punctuation]

    hashes = np.load(tmp_path / "out" / "signatures" / "shard-00000.hashes.npy")
    rows = np.load(tmp_path / "out" / "signatures" / "shard-00000.rows.npy")
    assert np.all(np.diff(np.lexsort((rows, hashes[1], hashes[0]))) == 1)  # sorted by (hash, row)
    digests = np.empty((len(docs), 2), dtype="<u8")
    digests[rows] = hashes.T
    assert digests[3].tobytes() == signature(docs[3][1], strip_punctuation)
    assert hashlib.sha256(digests.tobytes()).hexdigest() == PINNED_DIGESTS[strip_punctuation]


# What the stage keeps and clusters for pinned_corpus() in three shards: sha256 of the clusters' rows and of
# the kept doc_ids, as JSON.
PINNED_CLUSTERS = "f35b905791d8aeac4070d5d6a0d2b9345d2ab7950047c3bc13b10cf9e52d7aed"
PINNED_KEPT = "18fd5ba0800740fbfcb2ee2196bc600ee6ef22e074da26f80fe8b687fbb24be8"


def test_the_stage_keeps_and_clusters_the_pinned_documents(tmp_path):
    docs = pinned_corpus()
    root = tmp_path / "store"
    ref = STAGE.run(root, DedupConfig(), {"clean": publish_clean(root, [docs[i::3] for i in range(3)])})
    folder = Store(root).path("dedup", ref.version)
    clusters = pq.read_table(folder / "clusters" / "clusters.parquet").to_pylist()
    kept = _read_docs(folder)
    metrics = Store(root).manifest("dedup", ref.version)["metrics"]
    assert metrics["exact_duplicates"] > 40 and metrics["near_duplicates"] > 25  # the copies are found
    digest = {
        name: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
        for name, value in (("clusters", clusters), ("kept", kept))
    }
    assert digest == {"clusters": PINNED_CLUSTERS, "kept": PINNED_KEPT}

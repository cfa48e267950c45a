import hashlib
import re
from pydoc_data.topics import topics

import numpy as np
import pyarrow.parquet as pq
from builders import publish_docs

from storage.store import Store
from tasks.dedup import STAGE, DedupConfig, normalize_for_dedup
from tasks.minhash import (
    MinHashParams,
    bucket_pairs,
    connected_components,
    estimated_jaccard,
    hash_ranges,
    range_slice,
    shingles,
    signatures,
    word_hashes,
)

PARAMS = MinHashParams(ngram_size=5, bands=14, rows_per_band=8, seed=1)


def shingle_set(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = normalize_for_dedup(text).split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def real_documents(min_chars: int = 800) -> list[str]:
    """Python's own documentation topics, cut at blank lines into documents of about min_chars or more."""
    docs = []
    for _, text in sorted(topics.items()):
        current = ""
        for paragraph in re.split(r"\n\s*\n", text):
            current = f"{current}\n\n{paragraph}" if current else paragraph
            if len(current) >= min_chars:
                docs.append(current)
                current = ""
    return docs


def test_estimated_jaccard_follows_the_true_one():
    words = " ".join(real_documents()[:3]).split()
    rng = np.random.default_rng(0)
    for rate in (0.02, 0.1, 0.3):
        changed = [w if rng.random() > rate else f"x{i}" for i, w in enumerate(words)]
        true = jaccard(shingle_set(" ".join(words)), shingle_set(" ".join(changed)))
        sigs = signatures([normalize_for_dedup(" ".join(t)) for t in (words, changed)], PARAMS)
        estimate = float(estimated_jaccard(sigs[:1], sigs[1:])[0])
        assert abs(estimate - true) < 0.12, (rate, true, estimate)  # 112 hashes: standard error <= 0.05


def test_word_order_counts_and_short_documents_have_one_shingle():
    values, owner = shingles(["a b c", "", "a b c d e f"], PARAMS)
    assert owner.tolist() == [0, 2, 2]
    sigs = signatures(["a b c d e", "e d c b a", ""], PARAMS)
    assert estimated_jaccard(sigs[:1], sigs[1:2])[0] < 0.1
    assert (sigs[2] == np.iinfo(np.uint32).max).all()


def test_a_document_split_across_hash_chunks_gets_the_same_signature(monkeypatch):
    words = " ".join(real_documents()[:20]).split()
    whole = signatures([" ".join(words)], PARAMS)
    monkeypatch.setattr("tasks.minhash.CHUNK_SHINGLES", 100)
    assert np.array_equal(signatures([" ".join(words[:50]), " ".join(words)], PARAMS)[1], whole[0])


def test_words_are_hashed_with_blake2b_and_empty_words_are_none():
    hashes, lengths = word_hashes(["straße a  straße", "", "  ", " a "])
    blake2b = {
        w: int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") for w in ("straße", "a")
    }
    assert hashes.tolist() == [blake2b[w] for w in ("straße", "a", "straße", "a")]
    assert lengths.tolist() == [3, 0, 0, 1]
    assert np.array_equal(signatures(["  a b  c d e f "], PARAMS), signatures(["a b c d e f"], PARAMS))


def pinned_texts() -> list[str]:
    """Fixed texts of words (as normalisation leaves them): short ones, empty ones, non-ASCII words and one
    text of 20,000 words, longer than a hash chunk; the same on every platform (sha256 in counter mode)."""
    stream = (byte for counter in range(10**6) for byte in hashlib.sha256(f"texts:{counter}".encode()).digest())
    vocabulary = [f"w{i}" for i in range(300)] + ["straße", "東京", "😀", "naïve", "σίσυφος", "x²", "a\u0301"]
    sizes = [next(stream) % 4 if i % 9 == 0 else 5 + next(stream) for i in range(300)] + [20000]
    return [" ".join(vocabulary[(next(stream) << 8 | next(stream)) % len(vocabulary)] for _ in range(n)) for n in sizes]


# sha256 of signatures(pinned_texts()) (the bytes of the uint32 array) with the stage's defaults and with
# 3-grams, 4 bands of 2, seed 7; and of shingles' (values, owner). Changing one changes every stored
# signature: make it on purpose.
PINNED_SIGNATURES = "ab58555495beb9a9edc60246b7b07e6b5ea81a281bb35568fdfc5c16ce3327b1"
PINNED_SIGNATURES_3GRAMS = "48182e676acc2e1c2b007f1334466d6ea0baf12e3a5061c1ec2ceedd11a3063d"
PINNED_SHINGLES = "7e850c7c98a7919e0634aa519dbcc6d7a77df0110b7773384e39e1ea43ba4d4d"


def test_signatures_are_the_pinned_values():
    texts = pinned_texts()
    sigs = signatures(texts, PARAMS)
    assert sigs.shape == (301, 112) and sigs.dtype == np.uint32 and sigs.flags.c_contiguous
    assert hashlib.sha256(sigs.tobytes()).hexdigest() == PINNED_SIGNATURES
    other = signatures(texts, MinHashParams(ngram_size=3, bands=4, rows_per_band=2, seed=7))
    assert hashlib.sha256(other.tobytes()).hexdigest() == PINNED_SIGNATURES_3GRAMS
    values, owner = shingles(texts, PARAMS)
    assert hashlib.sha256(values.tobytes() + owner.tobytes()).hexdigest() == PINNED_SHINGLES


def test_bucket_pairs_link_each_member_to_the_first_and_the_previous():
    hashes = np.array([1, 1, 1, 2, 5, 5], dtype=np.uint64)
    positions = np.array([3, 7, 9, 4, 0, 8], dtype=np.int64)
    assert bucket_pairs(hashes, positions).tolist() == [[0, 8], [3, 7], [3, 9], [7, 9]]


def test_components_do_not_depend_on_the_order_of_pairs():
    pairs = np.array([[5, 9], [9, 12], [2, 3], [12, 40], [3, 7]], dtype=np.int64)
    nodes, roots = connected_components(pairs)
    assert dict(zip(nodes.tolist(), roots.tolist(), strict=True)) == {2: 2, 3: 2, 7: 2, 5: 5, 9: 5, 12: 5, 40: 5}
    shuffled = connected_components(pairs[::-1][:, ::-1].copy())
    assert np.array_equal(shuffled[1], roots)


def test_hash_ranges_cover_every_hash_once():
    values = np.sort(np.random.default_rng(0).integers(0, 2**64, 1000, dtype=np.uint64, endpoint=False))
    values[-1] = np.uint64(2**64 - 1)
    parts = [values[range_slice(values, low, high)] for low, high in hash_ranges(7)]
    assert np.array_equal(np.concatenate(parts), values) and all(len(p) for p in parts)


def plant_near_duplicates(docs: list[str], copies: int, seed: int = 0) -> list[tuple[str, str]]:
    """`docs` plus `copies` edited copies of some of them (1-3% of words replaced), shuffled."""
    rng = np.random.default_rng(seed)
    vocabulary = sorted({w for d in docs for w in d.split()})
    out = [(f"doc{i:04d}", d) for i, d in enumerate(docs)]
    for j, source in enumerate(rng.choice(len(docs), size=copies, replace=False)):
        words = docs[source].split()
        changes = max(1, round(len(words) * rng.uniform(0.01, 0.03)))
        for at in rng.choice(len(words), size=changes, replace=False):
            words[at] = vocabulary[rng.integers(len(vocabulary))]
        out.append((f"copy{j:04d}-of-{source:04d}", " ".join(words)))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def test_recall_and_precision_on_real_text_with_planted_near_duplicates(tmp_path):
    docs = plant_near_duplicates(real_documents(), copies=120)
    root = tmp_path / "store"
    clean = publish_docs(root, "clean", [docs[i::3] for i in range(3)], columns=("doc_id", "text", "n_bytes"))
    ref = STAGE.run(root, DedupConfig(), {"clean": clean})
    clusters = pq.read_table(Store(root).path("dedup", ref.version) / "clusters" / "clusters.parquet").to_pylist()
    cluster_of = {c["doc_id"]: c["cluster_id"] for c in clusters}
    kept_of = {c["cluster_id"]: c["doc_id"] for c in clusters if c["kept"]}

    sets = {doc_id: shingle_set(text) for doc_id, text in docs}
    index: dict[tuple[str, ...], list[str]] = {}
    for doc_id, shingle in ((d, s) for d, ss in sets.items() for s in ss):
        index.setdefault(shingle, []).append(doc_id)
    shared: dict[tuple[str, str], int] = {}
    for holders in index.values():
        for i, a in enumerate(holders):
            for b in holders[i + 1 :]:
                shared[tuple(sorted((a, b)))] = shared.get(tuple(sorted((a, b))), 0) + 1
    similar = [
        pair for pair, common in shared.items() if common / (len(sets[pair[0]]) + len(sets[pair[1]]) - common) >= 0.8
    ]
    found = [a in cluster_of and cluster_of.get(a) == cluster_of.get(b) for a, b in similar]
    assert len(similar) >= 120 and sum(found) >= 0.95 * len(similar), (sum(found), len(similar))

    removed = [c for c in clusters if not c["kept"]]
    close = [jaccard(sets[c["doc_id"]], sets[kept_of[c["cluster_id"]]]) >= 0.7 for c in removed]
    assert len(removed) >= 114 and sum(close) >= 0.95 * len(removed), (sum(close), len(removed))

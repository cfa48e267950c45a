"""Measure the dedup stage: MB/s and documents/s of each pass, and the recall and precision of its
near-duplicate removal on real-looking prose with planted near-duplicates.

    python benchmarks/dedup_bench.py                      # ~8 MB, 2 workers, the default DedupConfig
    python benchmarks/dedup_bench.py --mb 20 --workers 1 --paragraphs

The prose is the embedded default corpus (the standard library's docstrings and pydoc topics) and, past
its 1.5 MB, documents of 8-30 sentences drawn at random from it. A share of the documents (`--planted`)
get a copy with 1-3% of their words replaced. Recall: of the planted pairs whose true 5-gram Jaccard
similarity is >= 0.8, the share that end in one cluster. Precision: of the removed documents, the share whose
true similarity to the document kept in their cluster is >= 0.7. Both similarities are computed exactly.
The signatures pass's time includes starting the worker processes (spawning them, and each importing the
stage's modules, Prefect among them). So two more rows are measured apart: "pool start", the start of a pool
of as many spawned workers on its own before the run, and "hash_shard alone", the signature pass's per-shard
function run over every shard in this process after the run (one core, steady state: modules imported, tables
built). Prints, never asserts.
"""

import argparse
import logging
import multiprocessing
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from storage.store import Store  # noqa: E402
from tasks.dedup import STAGE, DedupConfig, hash_shard, normalize_for_dedup  # noqa: E402
from tasks.sample_data import default_corpus_documents  # noqa: E402


def corpus(megabytes: float, planted: float, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(doc_id, text) of the corpus, shuffled, and the (source, copy) doc_id pairs that were planted."""
    rng = np.random.default_rng(seed)
    docs = [text for _, text in default_corpus_documents()]
    sentences = [s for text in docs for s in re.split(r"(?<=[.!?])\s+", text) if len(s) > 30]
    chars = sum(map(len, docs))
    while chars < megabytes * 1e6:
        picked = rng.choice(len(sentences), size=rng.integers(8, 31))
        docs.append(" ".join(sentences[i] for i in picked))
        chars += len(docs[-1])
    vocabulary = sorted({w for s in sentences[:20000] for w in s.split()})
    named = [(f"doc{i:06d}", text) for i, text in enumerate(docs)]
    pairs = []
    for j, source in enumerate(rng.choice(len(docs), size=int(planted * len(docs)), replace=False)):
        words = docs[source].split()
        if len(words) < 20:
            continue
        for at in rng.choice(len(words), size=max(1, round(len(words) * rng.uniform(0.01, 0.03))), replace=False):
            words[at] = vocabulary[rng.integers(len(vocabulary))]
        named.append((f"copy{j:06d}", " ".join(words)))
        pairs.append((f"doc{source:06d}", f"copy{j:06d}"))
    return [named[i] for i in rng.permutation(len(named))], pairs


def shingle_set(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = normalize_for_dedup(text).split()
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _warm_worker(_: int) -> str:
    return normalize_for_dedup("Builds the punctuation table, as a worker's first shard does.")


def pool_start_seconds(workers: int) -> float:
    """Seconds to spawn `workers` processes as the stage's pool does and have each run a trivial job (what a
    spawned worker imports is this script's top level, the stage's modules included)."""
    if workers <= 1:  # the stage then runs shards in this process: nothing to start
        return 0.0
    began = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_warm_worker, range(workers)))
    return time.perf_counter() - began


class PassTimes(logging.Handler):
    """Collects the stage's per-pass durations from its log records."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "dedup_pass"):
            self.seconds[record.dedup_pass] = record.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size in MB of text")
    parser.add_argument("--planted", type=float, default=0.05, help="share of documents given a near copy")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--paragraphs", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from builders import publish_docs  # torch, through the tests' model builders: kept out of the workers

    docs, pairs = corpus(args.mb, args.planted, args.seed)
    text_bytes = sum(len(text.encode()) for _, text in docs)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        clean = publish_docs(
            root, "clean", [docs[i :: args.shards] for i in range(args.shards)], columns=("doc_id", "text")
        )
        log = logging.getLogger("dedup-bench")
        log.setLevel(logging.INFO)
        log.propagate = False
        times = PassTimes()
        log.addHandler(times)
        cfg = DedupConfig(workers=args.workers, threshold=args.threshold, paragraphs=args.paragraphs)
        start = pool_start_seconds(args.workers)
        began = time.perf_counter()
        ref = STAGE.run(root, cfg, {"clean": clean}, log=log)
        total = time.perf_counter() - began
        folder = Store(root).path("dedup", ref.version)
        metrics = Store(root).manifest("dedup", ref.version)["metrics"]
        clusters = pq.read_table(folder / "clusters" / "clusters.parquet").to_pylist()
        shards = sorted((Store(root).path("clean", clean) / "docs").glob("*.parquet"))
        began = time.perf_counter()
        for shard in shards:
            hash_shard(shard, Path(tmp) / "alone" / shard.stem, cfg.strip_punctuation, cfg.minhash())
        alone = time.perf_counter() - began

    texts = dict(docs)
    cluster_of = {c["doc_id"]: c["cluster_id"] for c in clusters}
    kept_of = {c["cluster_id"]: c["doc_id"] for c in clusters if c["kept"]}
    similar = [(a, b) for a, b in pairs if jaccard(shingle_set(texts[a]), shingle_set(texts[b])) >= 0.8]
    found = sum(1 for a, b in similar if a in cluster_of and cluster_of[a] == cluster_of.get(b))
    removed = [c for c in clusters if not c["kept"]]
    close = sum(
        1
        for c in removed
        if jaccard(shingle_set(texts[c["doc_id"]]), shingle_set(texts[kept_of[c["cluster_id"]]])) >= 0.7
    )

    print(f"corpus: {len(docs)} documents, {text_bytes / 1e6:.1f} MB, {len(pairs)} planted near copies")
    print(f"config: workers={args.workers} threshold={args.threshold} paragraphs={args.paragraphs}")
    print(f"{'pass':<20}{'seconds':>9}{'MB/s':>9}{'docs/s':>11}")
    for name, seconds in [*times.seconds.items(), ("total", total), ("hash_shard alone", alone)]:
        print(f"{name:<20}{seconds:>9.2f}{text_bytes / 1e6 / seconds:>9.1f}{len(docs) / seconds:>11.0f}")
    pool = f"{args.workers} spawned workers" if args.workers > 1 else "no pool: one worker runs shards in-process"
    print(f"{'pool start':<20}{start:>9.2f}  ({pool})")
    print(
        f"metrics: exact {metrics['exact_duplicates']}, near {metrics['near_duplicates']}, "
        f"candidate pairs {metrics.get('candidate_pairs', 0)}, lsh threshold {metrics.get('lsh_threshold')}"
    )
    print(
        f"recall (planted pairs of Jaccard >= 0.8 clustered): {found}/{len(similar)}"
        f" = {found / max(1, len(similar)):.3f}"
    )
    print(
        f"precision (removed with Jaccard >= 0.7 to the kept): {close}/{len(removed)}"
        f" = {close / max(1, len(removed)):.3f}"
    )


if __name__ == "__main__":
    main()

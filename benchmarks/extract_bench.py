"""Measure what worker processes buy the extract stage: documents per second with 1 and N workers on a
synthetic OpenWebText-layout archive, and the peak memory of the stage's own process; with --memory, that
peak for small documents and for large ones, at a small and a large shard_docs.

    python benchmarks/extract_bench.py                          # 40 inner archives x 500 documents of ~5 KB
    python benchmarks/extract_bench.py --archives 120 --workers 1 2 4
    python benchmarks/extract_bench.py --memory                 # 20 x 500 of ~5 KB vs 25 x 16 of ~4 MB

--memory runs one worker, so that the peak is the whole stage's, and shows that it does not grow with
`shard_docs` or the documents' size: the stage holds bytes, not counts.

Each measurement runs `extract`'s STAGE.run in a fresh process with a store of its own (so no unit comes
from the shard cache); its time includes starting the worker processes. On Linux a process's peak RSS
(getrusage) starts from that of the process that started it, so this script's own process stays small:
the corpus is built in a child process too.
The text is pseudo-random words drawn from a Zipf-like vocabulary, so that it compresses about as English
does under xz. "stage CPU" is the stage process's own work (reading the download once and spooling its
units; with one worker, parsing them and writing their shards too), which workers do not share: it bounds
the speedup.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will more can its who what said "
    "about people time year new after also two first over into only like just could them some other than then"
).split()
DOWNLOAD_VERSION = "bench"


def vocabulary(rng, size: int = 5000) -> list[str]:
    """The common English words first, then made-up words of 2-4 syllables."""
    syllables = [c + v for c in "bcdfghklmnprstvw" for v in ("a", "e", "i", "o", "u", "ou", "ea")]
    made_up = {"".join(rng.choice(syllables, size=rng.integers(2, 5))) for _ in range(size * 2)}
    return COMMON + sorted(made_up)[: size - len(COMMON)]


def documents(count: int, doc_bytes: int, seed: int) -> list[tuple[str, str]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array(vocabulary(rng))
    weights = 1.0 / (np.arange(len(words)) + 2.7)  # Zipf-Mandelbrot, as English word frequencies roughly are
    weights /= weights.sum()
    per_doc = doc_bytes // 6  # ~5 letters and a space a word
    docs = []
    for i in range(count):
        chosen = words[rng.choice(len(words), size=per_doc, p=weights)].tolist()
        for end in range(int(rng.integers(8, 20)), per_doc, 14):  # sentences of ~14 words
            chosen[end] += "."
        docs.append((f"doc{i}", " ".join(chosen).capitalize() + "."))
    return docs


def build_archive(dest: Path, archives: int, docs: int, doc_bytes: int, preset: int, seed: int) -> dict:
    from tasks.sample_data import write_openwebtext_archive

    corpus = documents(archives * docs, doc_bytes, seed)
    write_openwebtext_archive(corpus, dest, docs_per_subset=docs, preset=preset)
    return {"text_bytes": sum(len(text) for _, text in corpus), "archive_bytes": dest.stat().st_size}


def measure(archive: Path, workers: int, shard_docs: int) -> dict:
    """One extract run, in this (fresh) process; its numbers as a dict."""
    import resource

    from storage.store import Store
    from tasks.download import ARCHIVES
    from tasks.extract import STAGE, ExtractConfig

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")

        def place(out: Path) -> dict:
            (out / ARCHIVES).mkdir()
            os.link(archive, out / ARCHIVES / archive.name)
            return {}

        store.publish("download", DOWNLOAD_VERSION, place, params={}, inputs={}, code_version="bench")
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        cfg = ExtractConfig(workers=workers, shard_docs=shard_docs)
        ref = STAGE.run(store.root, cfg, {"download": DOWNLOAD_VERSION})
        seconds = time.perf_counter() - start
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        manifest = store.manifest("extract", ref.version)
    return {
        "workers": workers,
        "shard_docs": shard_docs,
        "seconds": seconds,
        "docs": manifest["metrics"]["docs"],
        "bytes": manifest["metrics"]["bytes"],
        "files": {name: entry["sha256"] for name, entry in manifest["files"].items()},
        "peak_rss_mib": own.ru_maxrss / 1024,  # Linux reports KiB
        "stage_cpu_s": own.ru_utime + own.ru_stime - before.ru_utime - before.ru_stime,
        "worker_cpu_s": children.ru_utime + children.ru_stime,
    }


def child(*args: str) -> dict:
    """Run this script with `args` in a fresh process; the JSON line it prints last."""
    run = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        sys.exit(f"{' '.join(args)}: failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archives", type=int, default=40, help="inner urlsf_subsetNN-M_data.xz archives")
    parser.add_argument("--docs", type=int, default=500, help="documents per inner archive")
    parser.add_argument("--doc-bytes", type=int, default=5000, help="about this many bytes a document")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--preset", type=int, default=0, help="xz preset: 0 builds fastest; decoding differs little")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory", action="store_true", help="peak RSS: small vs large documents, by shard_docs")
    parser.add_argument("--shard-docs", type=int, nargs="+", default=[10, 50_000], help="with --memory")
    parser.add_argument("--build", metavar="ARCHIVE", help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=3, metavar=("ARCHIVE", "WORKERS", "SHARD_DOCS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        built = build_archive(Path(args.build), args.archives, args.docs, args.doc_bytes, args.preset, args.seed)
        print(json.dumps(built))
        return
    if args.measure:
        archive, workers, shard_docs = args.measure
        print(json.dumps(measure(Path(archive), int(workers), int(shard_docs))))
        return
    if args.memory:
        memory(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "openwebtext.tar.xz"
        build(archive, args.archives, args.docs, args.doc_bytes, args)
        results = [child("--measure", str(archive), str(workers), "10000") for workers in args.workers]

    base = results[0]
    print(f"  {'workers':>7} {'seconds':>8} {'docs/s':>8} {'MB/s':>6} {'speedup':>8} {'peak RSS':>9}", end="")
    print(f" {'stage CPU':>10} {'worker CPU':>11}")
    for r in results:
        print(
            f"  {r['workers']:>7} {r['seconds']:>8.2f} {r['docs'] / r['seconds']:>8.0f} "
            f"{r['bytes'] / r['seconds'] / 1e6:>6.1f} {base['seconds'] / r['seconds']:>7.2f}x "
            f"{r['peak_rss_mib']:>5.0f} MiB {r['stage_cpu_s']:>9.1f}s {r['worker_cpu_s']:>10.1f}s"
        )
    same = all(r["files"] == base["files"] and r["docs"] == base["docs"] for r in results)
    print(f"  identical output for every worker count: {'yes' if same else 'NO'}")


def build(archive: Path, archives: int, docs: int, doc_bytes: int, args: argparse.Namespace) -> dict:
    """Build the corpus in a child process; prints what it is."""
    start = time.perf_counter()
    shape = ["--archives", str(archives), "--docs", str(docs), "--doc-bytes", str(doc_bytes)]
    built = child("--build", str(archive), *shape, "--preset", str(args.preset), "--seed", str(args.seed))
    print(
        f"archive: {archives} inner archives x {docs} docs of ~{doc_bytes:,} bytes, {built['text_bytes'] / 1e6:.0f} "
        f"MB of text, {built['archive_bytes'] / 1e6:.1f} MB as xz (built in {time.perf_counter() - start:.0f} s); "
        f"{os.cpu_count()} CPU(s)"
    )
    return built


def memory(args: argparse.Namespace) -> None:
    """Peak RSS of one-worker extract runs: many small documents vs 400 of ~4 MB, at each shard_docs."""
    corpora = {"small docs": (20, 500, 5000), "400 x 4 MB docs": (25, 16, 4_000_000)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (archives, docs, doc_bytes) in corpora.items():
            archive = Path(tmp) / label.replace(" ", "_") / "openwebtext.tar.xz"
            archive.parent.mkdir()
            build(archive, archives, docs, doc_bytes, args)
            for shard_docs in args.shard_docs:
                rows.append((label, child("--measure", str(archive), "1", str(shard_docs))))
            archive.unlink()
    print(f"  {'corpus':<16} {'shard_docs':>10} {'docs':>7} {'MB of text':>10} {'seconds':>8} {'peak RSS':>9}")
    for label, r in rows:
        print(
            f"  {label:<16} {r['shard_docs']:>10} {r['docs']:>7} {r['bytes'] / 1e6:>10.0f} {r['seconds']:>8.1f} "
            f"{r['peak_rss_mib']:>5.0f} MiB"
        )


if __name__ == "__main__":
    main()

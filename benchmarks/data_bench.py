"""Measure the data stages (download -> extract -> clean -> dedup -> tokenizer -> tokens) on a web-like corpus
in the real OpenWebText layout, against the work no implementation can skip, and project all of OpenWebText.

    python benchmarks/data_bench.py                         # 100 and 200 MB of text, 10 archives
    python benchmarks/data_bench.py --sizes 5 --archives 4  # a quick look
    python benchmarks/data_bench.py --json figures.json

For each size, `benchmarks/web_corpus.py` writes the corpus (prose, planted exact and near duplicates,
non-English and junk documents), and each stage runs through its public API (`STAGE.run(storage, cfg,
inputs)`) on the `tiny` preset's settings with every worker count set to `--workers` (the cores) and
`extract.shard_docs` to `--shard-docs`. Per stage: seconds, MB/s of the text it reads, documents/s, and the
peak RSS of this process and its worker processes together (sampled from /proc), of the stage's process
alone (and of its anonymous memory: its RSS less the pages of files it maps), and of the largest worker.

The irreducible work, measured in the same run on the same data: raw xz decompression of the same inner
archives (lzma alone, in `--workers` processes), training the same tokenizer with the `tokenizers` library
alone on the same kept training text, and encoding the kept text with it. The tokens stage encodes with
tiktoken's core wherever that gives the same ids (model/fast_bpe.py), which is faster than the library's own
encoder, so the same encoding with tiktoken alone is measured too, as a second, stricter reference. Ratios:
- data flow / irreducible: the six stages' seconds over those three (target <= 1.5), and over the stricter
  three;
- near-duplicate share: the near-duplicate pass's seconds over the data flow's (target < 30%), when dedup
  offers a method beyond exact matching (the pass's cost is dedup with it less dedup with exact only);
- incremental: on a fresh store, the flow on all archives but the last, then on all of them with
  `tokenizer.reuse: latest` where TokenizerConfig has that field; the second run's seconds over a full run
  from scratch on all archives (target <= 25%), and a fully cached rerun's seconds.

Then a projection for all of OpenWebText (8.0M documents, 38 GB of text) on 2, 16 and 64 cores and on a Dask
cluster: hours per stage, peak memory per worker, disk. Each stage's time is fitted as fixed + per-MB from
the sizes measured (proportional with one size) and split into a parallel part (the CPU time of worker
processes, or of the tokenizer library's threads for `tokens`), which is divided among the cores, and a
serial part (the rest of the stage's wall time: reading the download in order, writing shards, clustering,
BPE merges, copying the download), which is not.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import typing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # web_corpus, beside this file, when run as a script

import web_corpus  # noqa: E402

DATA_STAGES = ("download", "extract", "clean", "dedup", "tokenizer", "tokens")
MB = 1_000_000
# All of OpenWebText (Gokaslan & Cohen 2019): ~8.0M documents, ~38 GB of text in ~12 GB of xz archives.
OWT_DOCS = 8_013_769
OWT_TEXT_MB = 38_000
OWT_ARCHIVE_MB = 12_000
PROJECTED_CORES = (2, 16, 64)
# Stages whose every part runs in one process, one core: their time does not fall with more cores.
SERIAL_STAGES = ("download", "tokenizer")
SAMPLE_SECONDS = 0.05


# -- measuring ------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found.extend(children)
            stack.extend(children)
    return found


def _rss_bytes(pid: int, anonymous: bool = False) -> int:
    """Resident bytes of `pid`; `anonymous`: less its file-backed pages (statm's shared), i.e. the memory
    it holds itself. Pages of a memory-mapped file (dedup's signatures) count in its RSS but are the kernel's
    page cache, given back under pressure."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            fields = f.read().split()
        pages = int(fields[1]) - (int(fields[2]) if anonymous else 0)
        return pages * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return 0  # the process ended between listing and reading


class TreeMemory:
    """Samples the RSS of this process and every descendant (worker processes) in a thread: the peak of
    their sum, of this process alone (and of its anonymous memory), and of the largest descendant, since the
    last `reset`."""

    def __init__(self) -> None:
        self.tree = 0
        self.main = 0
        self.main_anonymous = 0
        self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self.sample()
        self.tree, self.main, self.main_anonymous, self.worker = 0, 0, 0, 0
        self.sample()

    def sample(self) -> None:
        me = os.getpid()
        workers = [_rss_bytes(pid) for pid in _descendants(me)]
        main = _rss_bytes(me)
        self.main = max(self.main, main)
        self.main_anonymous = max(self.main_anonymous, _rss_bytes(me, anonymous=True))
        self.tree = max(self.tree, main + sum(workers))
        self.worker = max([self.worker, *workers])

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _timed(memory: TreeMemory, fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """fn() with its wall seconds, CPU seconds of this process and of the worker processes it reaped, and
    the memory peaks while it ran."""
    memory.reset()
    self_cpu, child_cpu = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    memory.sample()
    return value, {
        "seconds": seconds,
        "self_cpu_s": _cpu(resource.RUSAGE_SELF) - self_cpu,
        "worker_cpu_s": _cpu(resource.RUSAGE_CHILDREN) - child_cpu,
        "peak_tree_mb": memory.tree / MB,
        "peak_worker_mb": memory.worker / MB,
        # Sampled, not getrusage's ru_maxrss: on Linux that starts from the peak of the process that started
        # this one.
        "peak_main_mb": memory.main / MB,
        "peak_main_anonymous_mb": memory.main_anonymous / MB,
    }


# -- the stages -----------------------------------------------------------------------------------------


def pipeline_config(workers: int, shard_docs: int, overrides: dict[str, Any] | None = None) -> Any:
    from flows.config import deep_merge, preset_config

    settings = {
        "extract": {"workers": workers, "shard_docs": shard_docs},
        "clean": {"workers": workers},
        "dedup": {"workers": workers},
    }
    return preset_config("tiny", deep_merge(settings, overrides or {}))


def near_duplicate_method() -> str | None:
    """The first dedup method other than exact matching that DedupConfig offers, if any."""
    from tasks.dedup import DedupConfig

    field = DedupConfig.model_fields.get("method")
    choices = typing.get_args(field.annotation) if field is not None else ()
    return next((choice for choice in choices if isinstance(choice, str) and choice != "exact"), None)


def tokenizer_reuse_supported() -> bool:
    from tasks.tokenizer import TokenizerConfig

    return "reuse" in TokenizerConfig.model_fields


def run_flow(store: Path, archives: list[Path], cfg: Any) -> dict[str, dict[str, Any]]:
    """Every data stage in order on `archives`, each in a fresh process (so that its peak memory is its own);
    per stage its version, metrics and measurements."""
    full = cfg.with_sources([str(path) for path in archives])
    versions: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}
    for name in DATA_STAGES:
        stage_cfg = full.stage_config(name)
        job = {"do": "stage", "store": str(store), "stage": name, "cfg": stage_cfg.model_dump_json()}
        measured = _child(job | {"inputs": {i: versions[i] for i in _stage(name).inputs}})
        versions[name] = measured["version"]
        manifest = _manifest(store, name, measured["version"])
        measured["store_bytes"] = sum(entry["bytes"] for entry in manifest["files"].values())
        results[name] = {**measured, "metrics": manifest["metrics"]}
    return results


def _stage(name: str) -> Any:
    import importlib

    return importlib.import_module(f"tasks.{name}").STAGE


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Run `job` in a fresh process of this script; what it printed last, as JSON."""
    run = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True, check=False
    )
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{job['do']} {job.get('stage', '')} failed: {last}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _run_child(job: dict[str, Any]) -> dict[str, Any]:
    """The child side of `_child`: one stage run, or the irreducible work, measured in this process."""
    with TreeMemory() as memory:
        if job["do"] == "stage":
            stage = _stage(job["stage"])
            cfg = stage.config.model_validate_json(job["cfg"])
            ref, measured = _timed(memory, lambda: stage.run(job["store"], cfg, job["inputs"]))
            return {**measured, "version": ref.version, "reused": ref.reused}
        from tasks.tokenizer import TokenizerConfig

        archives = [Path(p) for p in job["archives"]]
        irreducible = {"xz": xz_alone(archives, job["workers"], memory)}
        cfg = TokenizerConfig.model_validate_json(job["tokenizer"])
        texts, train = kept_texts(Path(job["store"]), job["dedup_version"], cfg.split)
        return irreducible | tokenizer_alone(texts, train, cfg, job["batch"], job["workers"], memory)


def _manifest(store: Path, stage: str, version: str) -> dict[str, Any]:
    from storage.store import Store

    return Store(store).manifest(stage, version)


def stage_volume(results: dict[str, dict[str, Any]], corpus: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(text bytes read, documents read) of each stage, from the corpus and the stages' metrics."""
    m = {name: results[name]["metrics"] for name in DATA_STAGES}
    kept_bytes = m["tokens"].get("train_bytes", 0) + m["tokens"].get("val_bytes", 0)
    kept_docs = m["tokens"].get("train_docs", 0) + m["tokens"].get("val_docs", 0)
    return {
        "download": (corpus["text_bytes"], corpus["docs"]),
        "extract": (corpus["text_bytes"], corpus["docs"]),
        "clean": (m["clean"].get("bytes_in", m["extract"].get("bytes", 0)), m["clean"].get("docs_in", 0)),
        "dedup": (m["clean"].get("bytes_out", 0), m["dedup"].get("docs_in", 0)),
        "tokenizer": (m["tokenizer"].get("train_chars", 0), m["tokenizer"].get("train_docs", 0)),
        "tokens": (kept_bytes, kept_docs),
    }


# -- the irreducible work -------------------------------------------------------------------------------


def _decompress(jobs: list[tuple[str, int, int]]) -> int:
    import lzma

    out = 0
    for path, offset, size in jobs:
        with open(path, "rb") as f:
            f.seek(offset)
            out += len(lzma.decompress(f.read(size)))
    return out


def inner_archives(archives: list[Path]) -> list[tuple[str, int, int]]:
    """(file, offset, size) of every inner archive in the outer plain tars."""
    import tarfile

    found = []
    for path in archives:
        with tarfile.open(path, "r:") as tar:
            found += [(str(path), m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]
    return found


def xz_alone(archives: list[Path], workers: int, memory: TreeMemory) -> dict[str, Any]:
    import multiprocessing

    members = inner_archives(archives)
    shares = [members[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_noop_many, range(workers)))  # the processes exist before the clock starts
        decompressed, measured = _timed(memory, lambda: sum(pool.map(_decompress, shares)))
    return {**measured, "decompressed_bytes": decompressed, "inner_archives": len(members)}


def _noop_many(_: int) -> None:
    time.sleep(0.2)  # long enough that every worker process takes one


def kept_texts(store: Path, dedup_version: str, split: Any) -> tuple[list[str], list[str]]:
    """(all kept texts, the training ones) of a dedup version, in shard then row order."""
    from storage.store import Store
    from tasks.shards import input_shards, read_batches
    from tasks.split import is_val

    texts, train = [], []
    for shard in input_shards(Store(store).path("dedup", dedup_version)):
        for batch in read_batches(shard, ["doc_id", "text"]):
            for doc_id, text in zip(batch.column("doc_id").to_pylist(), batch.column("text").to_pylist(), strict=True):
                texts.append(text or "")
                if not is_val(doc_id, split.seed, split.val_fraction):
                    train.append(text or "")
    return texts, train


def tokenizer_alone(texts: list[str], train: list[str], cfg: Any, batch: int, workers: int, memory: TreeMemory) -> dict:
    """Train the same byte-level BPE with `tokenizers` alone, then encode every kept text with it (and with
    tiktoken's core, where it gives the same ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if cfg.max_train_docs is not None:
        train = train[: cfg.max_train_docs]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    _, trained = _timed(memory, lambda: backend.train_from_iterator(train, trainer=trainer))

    def encode() -> int:
        return sum(
            len(enc.ids)
            for start in range(0, len(texts), batch)
            for enc in backend.encode_batch(texts[start : start + batch], add_special_tokens=False)
        )

    n_tokens, encoded = _timed(memory, encode)
    result = {"train": trained, "encode": {**encoded, "tokens": n_tokens}}
    # The encoder the tokens stage uses where it gives the same ids (model/fast_bpe.py): tiktoken's core
    # alone on the same vocabulary, on `workers` threads; a second reference, faster than the first.
    from model.fast_bpe import fast_encoder

    fast = fast_encoder(json.loads(backend.to_str()))
    if fast is not None:

        def encode_fast() -> int:
            return sum(
                len(ids)
                for start in range(0, len(texts), batch)
                for ids in fast.encode_ordinary_batch(texts[start : start + batch], num_threads=workers)
            )

        n_fast, encoded_fast = _timed(memory, encode_fast)
        result["encode_fast"] = {**encoded_fast, "tokens": n_fast}
    return result


# -- one size -------------------------------------------------------------------------------------------


def measure_size(mb: float, args: argparse.Namespace, work: Path, near: str | None) -> dict[str, Any]:
    folder = work / f"corpus-{mb:g}"
    spec = web_corpus.CorpusSpec(mb=mb, archives=args.archives, seed=args.seed, preset=args.preset)
    corpus = web_corpus.generate(folder, spec, jobs=args.workers)
    archives = [folder / f["file"] for f in corpus["files"]]
    cfg = pipeline_config(args.workers, args.shard_docs, {"dedup": {"method": near}} if near else None)
    store = work / f"store-{mb:g}"
    stages = run_flow(store, archives, cfg)
    exact_dedup = None
    if near is not None:  # the same clean version deduplicated by exact matching only: the near pass's cost
        exact_cfg = cfg.dedup.model_copy(update={"method": "exact"})
        job = {"do": "stage", "store": str(store), "stage": "dedup", "cfg": exact_cfg.model_dump_json()}
        exact_dedup = _child(job | {"inputs": {"clean": stages["clean"]["version"]}})
    irreducible = _child(
        {
            "do": "irreducible",
            "store": str(store),
            "archives": [str(p) for p in archives],
            "workers": args.workers,
            "dedup_version": stages["dedup"]["version"],
            "tokenizer": cfg.tokenizer.model_dump_json(),
            "batch": cfg.tokens.batch_docs,
        }
    )
    volume = stage_volume(stages, corpus)
    for name in DATA_STAGES:
        stages[name]["text_bytes"], stages[name]["docs"] = volume[name]
    corpus_info = {k: corpus[k] for k in ("docs", "text_bytes", "archive_bytes", "kinds", "seconds")}
    corpus_info["planted_exact"] = sum(1 for p in corpus["planted"] if p["kind"] == "exact")
    corpus_info["planted_near"] = sum(1 for p in corpus["planted"] if p["kind"] == "near")
    return {
        "mb": mb,
        "corpus": corpus_info,
        "stages": stages,
        "exact_dedup": exact_dedup,
        "irreducible": irreducible,
        "archives": [str(p) for p in archives],
    }


def flow_seconds(stages: dict[str, dict[str, Any]]) -> float:
    return sum(stages[name]["seconds"] for name in DATA_STAGES)


def irreducible_seconds(irreducible: dict[str, Any]) -> float:
    return irreducible["xz"]["seconds"] + irreducible["train"]["seconds"] + irreducible["encode"]["seconds"]


def incremental(run: dict[str, Any], args: argparse.Namespace, work: Path) -> dict:
    """A fresh store: all archives but the last, then all (tokenizer reused where supported), then again."""
    archives = [Path(p) for p in run["archives"]]
    near = near_duplicate_method()
    overrides: dict[str, Any] = {"dedup": {"method": near}} if near else {}
    cfg = pipeline_config(args.workers, args.shard_docs, overrides)
    reuse = tokenizer_reuse_supported()
    second_cfg = (
        pipeline_config(args.workers, args.shard_docs, {**overrides, "tokenizer": {"reuse": "latest"}})
        if reuse
        else cfg
    )
    store = work / "store-incremental"
    first = run_flow(store, archives[:-1], cfg)
    second = run_flow(store, archives, second_cfg)
    cached = run_flow(store, archives, second_cfg)
    full = flow_seconds(run["stages"])
    return {
        "tokenizer_reuse": reuse,
        "first_archives": len(archives) - 1,
        "first_seconds": flow_seconds(first),
        "second_seconds": flow_seconds(second),
        "second_stages": {name: second[name]["seconds"] for name in DATA_STAGES},
        "second_reused": [name for name in DATA_STAGES if second[name]["reused"]],
        "full_seconds": full,
        "second_fraction": flow_seconds(second) / full,
        "cached_seconds": flow_seconds(cached),
        "cached_reused": [name for name in DATA_STAGES if cached[name]["reused"]],
        # A rerun gets other version ids only when the code changed meanwhile (its fingerprint is in the id).
        "cached_new_versions": [name for name in DATA_STAGES if cached[name]["version"] != second[name]["version"]],
    }


# -- projection -----------------------------------------------------------------------------------------


def _fit(points: list[tuple[float, float]], flat_when_not_growing: bool = False) -> tuple[float, float]:
    """(fixed, per MB) through the measured (MB, value) points: a line through the two largest, or, with one
    point or where the line would fall with size, through the origin (times) or flat (memory: a peak that did
    not grow with the corpus is bounded by the batch, not by the corpus)."""
    points = sorted(points)
    (x1, y1), (x2, y2) = (points[-2], points[-1]) if len(points) > 1 else ((0.0, 0.0), points[-1])
    slope = (y2 - y1) / (x2 - x1) if x2 > x1 else 0.0
    if slope <= 0 or (flat_when_not_growing and y2 <= 1.05 * y1):
        return (y2, 0.0) if flat_when_not_growing else (0.0, y2 / x2 if x2 else 0.0)
    return max(0.0, y2 - slope * x2), slope


def parallel_share(name: str, stage: dict[str, Any], cores: int) -> float:
    """The share of a stage's wall time that more cores would shorten (see the module's docstring)."""
    if name in SERIAL_STAGES or stage["seconds"] <= 0:
        return 0.0
    return min(1.0, stage["worker_cpu_s"] / cores / stage["seconds"])


def project(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    largest = max(runs, key=lambda r: r["mb"])
    text_mb = largest["corpus"]["text_bytes"] / MB
    scale = OWT_TEXT_MB / text_mb
    rows: dict[str, Any] = {}
    for name in DATA_STAGES:
        fixed, per_mb = _fit([(r["corpus"]["text_bytes"] / MB, r["stages"][name]["seconds"]) for r in runs])
        seconds = fixed + per_mb * OWT_TEXT_MB
        share = parallel_share(name, largest["stages"][name], args.workers)
        serial, parallel_on_one = seconds * (1 - share), seconds * share * args.workers
        hours = {str(c): (serial + parallel_on_one / c) / 3600 for c in PROJECTED_CORES}
        moved = largest["stages"][name]["store_bytes"] * scale * 2  # read the input, write the output
        dask = serial + parallel_on_one / args.dask_cores + moved / (args.dask_gbs * 1e9)
        hours["dask"] = dask / 3600
        m_fixed, m_per_mb = _fit(
            [(r["corpus"]["text_bytes"] / MB, r["stages"][name]["peak_main_anonymous_mb"]) for r in runs], True
        )
        worker_mb = largest["stages"][name]["peak_worker_mb"]
        rows[name] = {
            "hours": hours,
            "parallel_share": share,
            # Workers hold one shard's batches (bounded by bytes), so their peak does not grow with the corpus;
            # the stage's own process (its anonymous memory: mapped files are page cache) is fitted like the time.
            "worker_gb": worker_mb / 1000,
            "main_gb": (m_fixed + m_per_mb * OWT_TEXT_MB) / 1000,
            "disk_gb": largest["stages"][name]["store_bytes"] * scale / 1e9,
        }
    total = {key: sum(row["hours"][key] for row in rows.values()) for key in rows["download"]["hours"]}
    return {
        "scale": scale,
        "from_mb": text_mb,
        "stages": rows,
        "total_hours": total,
        "disk_gb": sum(row["disk_gb"] for row in rows.values()),
    }


# -- output ---------------------------------------------------------------------------------------------


def print_tables(runs: list[dict[str, Any]], inc: dict[str, Any] | None, proj: dict[str, Any], near: str | None):
    for run in runs:
        c = run["corpus"]
        print(
            f"\n== {run['mb']:g} MB: {c['docs']:,} documents, {c['text_bytes'] / MB:.1f} MB of text in "
            f"{c['archive_bytes'] / MB:.1f} MB of archives (generated in {c['seconds']:.1f} s); planted "
            f"{c['planted_exact']} exact and {c['planted_near']} near duplicates, {c['kinds']['foreign']} "
            f"non-English, {c['kinds']['junk']} junk"
        )
        print(
            f"{'stage':<10} {'s':>8} {'MB/s':>8} {'docs/s':>9} {'tree MB':>8} {'main MB':>8} {'anon MB':>8} "
            f"{'worker MB':>9}  notes"
        )
        for name in DATA_STAGES:
            s = run["stages"][name]
            rate = s["text_bytes"] / MB / s["seconds"] if s["seconds"] else 0.0
            docs = s["docs"] / s["seconds"] if s["seconds"] else 0.0
            print(
                f"{name:<10} {s['seconds']:8.2f} {rate:8.2f} {docs:9.0f} {s['peak_tree_mb']:8.0f} "
                f"{s['peak_main_mb']:8.0f} {s['peak_main_anonymous_mb']:8.0f} {s['peak_worker_mb']:9.0f}  "
                f"{_note(name, s['metrics'])}"
            )
        irr = run["irreducible"]
        xz_rate = irr["xz"]["decompressed_bytes"] / MB / irr["xz"]["seconds"]
        n_inner = irr["xz"]["inner_archives"]
        print(f"{'xz alone':<10} {irr['xz']['seconds']:8.2f} {xz_rate:8.2f}  ({n_inner} inner archives)")
        print(f"{'bpe train':<10} {irr['train']['seconds']:8.2f}  (tokenizers alone, same settings and text)")
        print(f"{'encode':<10} {irr['encode']['seconds']:8.2f}  ({irr['encode']['tokens']:,} tokens, tokenizers alone)")
        flow, floor = flow_seconds(run["stages"]), irreducible_seconds(irr)
        print(f"data flow / irreducible: {flow:.2f} s / {floor:.2f} s = {flow / floor:.2f} (target <= 1.5)")
        if "encode_fast" in irr:
            fast = irr["encode_fast"]
            print(f"{'encode':<10} {fast['seconds']:8.2f}  ({fast['tokens']:,} tokens, tiktoken's core alone)")
            floor_fast = floor - irr["encode"]["seconds"] + fast["seconds"]
            ratio = flow / floor_fast
            print(f"data flow / irreducible, with that encoder: {flow:.2f} s / {floor_fast:.2f} s = {ratio:.2f}")
        if near is None:
            print("near-duplicate share: n/a: DedupConfig.method offers only exact matching")
        else:
            near_s = max(0.0, run["stages"]["dedup"]["seconds"] - run["exact_dedup"]["seconds"])
            print(f"near-duplicate share ({near}): {near_s:.2f} s / {flow:.2f} s = {near_s / flow:.1%} (target < 30%)")
    if inc is not None:
        reuse = "with tokenizer.reuse: latest" if inc["tokenizer_reuse"] else "TokenizerConfig has no `reuse` field yet"
        print(
            f"\nincremental ({inc['first_archives']} then {inc['first_archives'] + 1} archives, {reuse}): second run "
            f"{inc['second_seconds']:.2f} s / full run {inc['full_seconds']:.2f} s = {inc['second_fraction']:.1%} "
            f"(target <= 25%); reused: {', '.join(inc['second_reused']) or 'none'}"
        )
        print("  per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in inc["second_stages"].items()))
        print(
            f"  fully cached rerun: {inc['cached_seconds']:.2f} s (reused: {', '.join(inc['cached_reused']) or 'none'})"
        )
    cols = [str(c) for c in PROJECTED_CORES] + ["dask"]
    print(
        f"\n== projection to OpenWebText ({OWT_DOCS:,} documents, {OWT_TEXT_MB / 1000:.0f} GB of text), scaled "
        f"{proj['scale']:.0f}x from {proj['from_mb']:.0f} MB"
    )
    head = " ".join(f"{(c + ' cores') if c != 'dask' else 'dask':>9}" for c in cols)
    print(f"{'stage':<10} {head} {'par.':>5} {'worker GB':>9} {'main GB':>8} {'disk GB':>8}")
    for name, row in proj["stages"].items():
        hours = " ".join(f"{row['hours'][c]:8.2f}h" for c in cols)
        print(
            f"{name:<10} {hours} {row['parallel_share']:5.0%} {row['worker_gb']:9.2f} {row['main_gb']:8.2f} "
            f"{row['disk_gb']:8.1f}"
        )
    total = " ".join(f"{proj['total_hours'][c]:8.2f}h" for c in cols)
    print(f"{'total':<10} {total} {'':5} {'':9} {'':8} {proj['disk_gb']:8.1f}")


def _note(name: str, metrics: dict[str, Any]) -> str:
    if name == "clean":
        return f"removed {metrics.get('removed', '?')}: {metrics.get('removed_by_reason', {})}"
    if name == "dedup":
        near = {k: v for k, v in metrics.items() if "near" in k and isinstance(v, int | float)}
        return f"exact {metrics.get('exact_duplicates', '?')}" + (f", {near}" if near else "")
    if name == "tokens":
        return f"{metrics.get('train_tokens', 0) + metrics.get('val_tokens', 0):,} tokens"
    return ""


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_run_child(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,200", help="MB of text, comma-separated")
    parser.add_argument("--archives", type=int, default=10, help="source files per corpus")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes per stage")
    parser.add_argument("--shard-docs", type=int, default=2000, help="extract.shard_docs (~10 MB of text a shard)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", type=int, default=6, help="xz preset of the generated inner archives")
    parser.add_argument("--dask-cores", type=int, default=256, help="cores of the projected Dask cluster")
    parser.add_argument("--dask-gbs", type=float, default=1.0, help="GB/s of the cluster's shared filesystem")
    parser.add_argument("--no-incremental", action="store_true", help="skip the incremental scenario")
    parser.add_argument("--work", type=Path, help="keep corpora and stores here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    try:
        sizes = sorted(float(s) for s in args.sizes.split(","))
    except ValueError:
        parser.error(f"--sizes must be numbers separated by commas, got {args.sizes!r}")
    if args.archives < 2 and not args.no_incremental:
        parser.error("the incremental scenario needs --archives 2 or more (or --no-incremental)")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    work = args.work or Path(tempfile.mkdtemp(prefix="data-bench-"))
    near = near_duplicate_method()
    try:
        runs = [measure_size(mb, args, work, near) for mb in sizes]
        inc = None if args.no_incremental else incremental(runs[-1], args, work)
        proj = project(runs, args)
        print_tables(runs, inc, proj, near)
        if args.json:
            figures = {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "incremental": inc}
            args.json.write_text(json.dumps({**figures, "projection": proj}, indent=1) + "\n", encoding="utf-8")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

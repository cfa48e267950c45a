"""The data benchmark's corpus generator writes what it claims, and the benchmark runs end to end."""

import difflib
import hashlib
import importlib.util
import io
import json
import lzma
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MEMBER = re.compile(r"(\d{7})-([0-9a-f]{32})\.txt")
INNER = re.compile(r"openwebtext/urlsf_subset(\d{2})-(\d+)_data\.xz")


def load_web_corpus():
    spec = importlib.util.spec_from_file_location("web_corpus", BENCHMARKS / "web_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_corpus(folder: Path) -> dict[int, str]:
    """Document number -> text, read through the two tar layers as the extract stage's docstring lays out."""
    texts: dict[int, str] = {}
    for outer in sorted(folder.glob("urlsf_subset*.tar")):
        with tarfile.open(outer, "r:") as tar:
            for inner in tar.getmembers():
                if inner.isdir():
                    continue
                match = INNER.fullmatch(inner.name)
                assert match and int(match.group(1)) == int(outer.name[12:14]), inner.name
                payload = lzma.decompress(tar.extractfile(inner).read())
                with tarfile.open(fileobj=io.BytesIO(payload), mode="r:") as docs:
                    for member in docs.getmembers():
                        number, md5 = MEMBER.fullmatch(member.name).groups()
                        data = docs.extractfile(member).read()
                        assert hashlib.md5(data).hexdigest() == md5, member.name
                        texts[int(number)] = data.decode("utf-8")
    return texts


def test_generator_writes_the_requested_size_with_the_planted_duplicates(tmp_path):
    web_corpus = load_web_corpus()
    pool = web_corpus.SentencePool.default()
    spec = web_corpus.CorpusSpec(mb=0.4, archives=2, seed=3, exact=0.1, near=0.1, foreign=0.05, junk=0.05, preset=0)
    corpus = web_corpus.generate(tmp_path / "a", spec, pool=pool)

    texts = read_corpus(tmp_path / "a")
    assert sorted(texts) == list(range(corpus["docs"]))  # numbered over the whole corpus, none missing
    text_bytes = sum(len(t.encode()) for t in texts.values())
    assert text_bytes == corpus["text_bytes"]
    assert abs(text_bytes - 400_000) < 0.05 * 400_000
    exact = [p for p in corpus["planted"] if p["kind"] == "exact"]
    near = [p for p in corpus["planted"] if p["kind"] == "near"]
    assert exact and near and corpus["kinds"]["foreign"] and corpus["kinds"]["junk"]
    for plant in exact:
        assert texts[plant["doc"]] == texts[plant["of"]] and plant["of"] < plant["doc"]
    for plant in near:
        original, copy = texts[plant["of"]].split(), texts[plant["doc"]].split()
        matcher = difflib.SequenceMatcher(None, original, copy, autojunk=False)
        changed = max(len(original), len(copy)) - sum(block.size for block in matcher.get_matching_blocks())
        # 1-3% of the words (at least one), and the texts differ by about that many word edits.
        assert 0.005 * len(original) <= plant["changed"] <= 0.03 * len(original) + 1, plant
        assert 1 <= changed <= 2 * plant["changed"], plant
    # The same seed gives the same bytes.
    web_corpus.generate(tmp_path / "b", spec, pool=pool)
    for archive in sorted((tmp_path / "a").glob("*.tar")):
        assert archive.read_bytes() == (tmp_path / "b" / archive.name).read_bytes()


@pytest.mark.slow
def test_data_bench_prints_every_stage_the_ratios_and_the_projection(tmp_path):
    figures = tmp_path / "figures.json"
    command = [sys.executable, str(BENCHMARKS / "data_bench.py"), "--sizes", "0.3", "--archives", "2"]
    command += ["--workers", "1", "--preset", "0", "--json", str(figures), "--work", str(tmp_path / "work")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "data flow / irreducible" in run.stdout and "projection to OpenWebText" in run.stdout
    data = json.loads(figures.read_text())
    (measured,) = data["runs"]
    assert set(measured["stages"]) == {"download", "extract", "clean", "dedup", "tokenizer", "tokens"}
    assert all(stage["seconds"] > 0 and not stage["reused"] for stage in measured["stages"].values())
    assert measured["stages"]["clean"]["metrics"]["removed"] > 0  # the planted junk gave clean work
    assert measured["irreducible"]["encode"]["tokens"] > 0
    # A rerun on the same store reuses every stage (but those whose code was edited while it ran).
    incremental = data["incremental"]
    assert set(incremental["cached_reused"]) | set(incremental["cached_new_versions"]) == set(measured["stages"])
    assert all(hours > 0 for hours in data["projection"]["total_hours"].values())

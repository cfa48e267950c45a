"""Write a web-like corpus of a requested size in the real OpenWebText layout, for the data benchmarks.

    python benchmarks/web_corpus.py DIR --mb 200 --archives 10 --seed 0

writes DIR/urlsf_subset00.tar ... urlsf_subset09.tar (plain outer tars, as OpenWebText is distributed; with
`--layout single`, one DIR/openwebtext.tar.xz instead), each holding `openwebtext/urlsf_subsetNN-M_data.xz`
inner archives: xz-compressed tars of `NNNNNNN-<md5 of the text>.txt` documents, NNNNNNN numbering the
documents over the whole corpus. Beside them, DIR/corpus.json says what was planted.

The prose is English that every Python installation carries (the interpreter's documentation topics and
the standard library's docstrings, collected by `tasks.sample_data`), cut into sentences and recombined:
a document is a run of paragraphs, each a few consecutive sentences of one source document, so that it
reads like prose and compresses about as English does. Its length in bytes is drawn from a log-normal
around OpenWebText's mean (38 GB over 8M documents: ~4.7 KB).

Planted, so that clean and dedup have work (shares of the documents, `--exact` etc.):
- exact duplicates: the very text of an earlier prose document (of this archive or an earlier one);
- near duplicates: an earlier prose document with 1-3% of its words substituted, deleted or inserted;
- non-English documents: prose written in Cyrillic or Greek letters, or in a made-up vocabulary;
- junk: navigation and cookie boilerplate, lists of short link lines, fragments too short to keep, and
  lorem ipsum.

Everything is a function of (seed, document number): archive k is the same bytes whether 9 or 10 archives
are written, provided the size per archive is the same (`--mb` scales with `--archives`: 9 archives of a
10-archive corpus are `--mb 180 --archives 9` of `--mb 200 --archives 10`; or write 10 and pass 9 of them).
Archives are written in parallel processes (`--jobs`).
"""

import argparse
import hashlib
import io
import json
import lzma
import math
import multiprocessing
import os
import random
import re
import string
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tasks.sample_data import XZ_CHECK, inner_archive, tar_member

T = TypeVar("T")

MB = 1_000_000
# OpenWebText: ~38 GB of text in ~8.0M documents, ~20,600 inner archives of ~390 documents.
MEAN_DOC_BYTES = 4_750
DOCS_PER_INNER = 390
# A document's length is log-normal: sigma 0.9 gives a median of ~3 KB for this mean, and a long tail, as
# web pages have.
LENGTH_SIGMA = 0.9
MIN_DOC_BYTES = 400
MAX_DOC_BYTES = 200_000
CORPUS_FILE = "corpus.json"
KINDS = ("prose", "exact", "near", "foreign", "junk")

_START = "\x02"  # the chain's state before a sentence's first word
_BACKOFF = 0.25
_MAX_SENTENCE_WORDS = 80
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Code, markup and reST that would make a sentence look like source rather than prose (curly brackets also
# make the clean stage drop a whole document).
_NOT_PROSE = re.compile(r"[{}<>|\\`@#$~^]|>>>|::")


@dataclass(frozen=True)
class CorpusSpec:
    """What to write. Shares are of all documents; the rest is prose."""

    mb: float = 200.0
    archives: int = 10
    seed: int = 0
    exact: float = 0.03
    near: float = 0.02
    foreign: float = 0.01
    junk: float = 0.02
    docs_per_inner: int = DOCS_PER_INNER
    preset: int = 6
    layout: str = "subsets"

    def problems(self) -> list[str]:
        found = []
        if not self.mb > 0:
            found.append(f"mb must be positive, got {self.mb}")
        if self.archives < 1:
            found.append(f"archives must be at least 1, got {self.archives}")
        shares = (self.exact, self.near, self.foreign, self.junk)
        if any(s < 0 for s in shares) or sum(shares) >= 1:
            found.append(f"the planted shares must be >= 0 and sum below 1, got {shares}")
        if self.docs_per_inner < 1:
            found.append(f"docs_per_inner must be at least 1, got {self.docs_per_inner}")
        if not 0 <= self.preset <= 9:
            found.append(f"preset must be an xz preset 0-9, got {self.preset}")
        if self.layout not in ("subsets", "single"):
            found.append(f"layout must be 'subsets' or 'single', got {self.layout!r}")
        return found


# -- the English the documents are made of ------------------------------------------------------------


@dataclass
class SentencePool:
    """Prose sentences of the source text, and the words they use."""

    sentences: list[str]
    words: list[str] = field(default_factory=list)

    @classmethod
    def from_documents(cls, documents: list[tuple[str, str]]) -> "SentencePool":
        sentences: list[str] = []
        for _, text in documents:
            for paragraph in re.split(r"\n\s*\n", text):
                lines = paragraph.splitlines()
                if not lines or any(line[:1].isspace() for line in lines):
                    continue  # indented: code, a table, a signature
                for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
                    letters = sum(ch.isalpha() or ch == " " for ch in sentence)
                    if (
                        40 <= len(sentence) <= 400
                        and sentence[0].isupper()
                        and sentence[-1] in ".!?"
                        and letters >= 0.85 * len(sentence)
                        and not _NOT_PROSE.search(sentence)
                    ):
                        sentences.append(sentence)
        words = sorted({w.strip(string.punctuation).lower() for s in sentences for w in s.split()} - {""})
        return cls(sentences, words)

    @classmethod
    def default(cls) -> "SentencePool":
        from tasks.sample_data import default_corpus_documents

        return cls.from_documents(default_corpus_documents())


# -- documents ----------------------------------------------------------------------------------------

_BOILERPLATE = (
    "Home | News | Sport | Business | Culture | Contact us",
    "We use cookies to improve your experience. Accept all cookies",
    "Copyright 2019 All rights reserved",
    "Sign in | Register | Subscribe",
    "Share on Facebook | Share on Twitter | Email",
    "Privacy policy | Terms of use | Site map",
    "Advertisement",
    "Related articles",
    "Skip to main content",
)
_LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip "
    "ex ea commodo consequat."
)
_CYRILLIC = str.maketrans(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "абцдефгхийклмнопярстуввхызАБЦДЕФГХИЙКЛМНОПЯРСТУВВХЫЗ"
)
_GREEK = str.maketrans(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "αβψδεφγηιξκλμνοπρρστθωωχυζΑΒΨΔΕΦΓΗΙΞΚΛΜΝΟΠΡΡΣΤΘΩΩΧΥΖ"
)
_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "ae", "ou"))


def _made_up_word(word: str) -> str:
    """The same English word always becomes the same word of a made-up language, of similar length."""
    digest = hashlib.blake2b(word.lower().encode(), digest_size=8).digest()
    count = max(1, min(4, (len(word) + 1) // 3))
    made = "".join(_SYLLABLES[b % len(_SYLLABLES)] for b in digest[:count])
    return made.capitalize() if word[:1].isupper() else made


class CorpusGenerator:
    """Document number -> (kind, text, what it copies), the same for a seed in any process."""

    def __init__(self, spec: CorpusSpec, pool: SentencePool) -> None:
        if not pool.sentences:
            raise ValueError("the sentence pool is empty: no prose to build documents from")
        self.spec = spec
        self.pool = pool
        # The word chain: each state's successors with repetition, so that a uniform pick follows their
        # frequencies; None ends a sentence.
        self._order2: dict[tuple[str, str], list[str | None]] = {}
        self._order1: dict[str, list[str | None]] = {}
        for sentence in pool.sentences:
            first, second = _START, _START
            for word in [*sentence.split(), None]:
                self._order2.setdefault((first, second), []).append(word)
                self._order1.setdefault(second, []).append(word)
                if word is None:
                    break
                first, second = second, word
        self._mu = math.log(MEAN_DOC_BYTES) - LENGTH_SIGMA**2 / 2  # so that the mean is MEAN_DOC_BYTES
        bounds = [spec.exact, spec.near, spec.foreign, spec.junk]
        self._cumulative = [sum(bounds[: i + 1]) for i in range(len(bounds))]

    def _rng(self, number: int) -> random.Random:
        return random.Random(f"{self.spec.seed}:{number}")

    def _draw(self, number: int) -> tuple[str, random.Random]:
        """The document's kind and the random stream its content continues from."""
        rng = self._rng(number)
        u = rng.random()
        kind = next((k for k, edge in zip(KINDS[1:], self._cumulative, strict=True) if u < edge), "prose")
        return kind, rng

    def _prose_length(self, rng: random.Random) -> int:
        return int(min(MAX_DOC_BYTES, max(MIN_DOC_BYTES, rng.lognormvariate(self._mu, LENGTH_SIGMA))))

    def kind(self, number: int) -> str:
        return self._draw(number)[0]

    def _original(self, number: int, rng: random.Random, min_bytes: int) -> int | None:
        """An earlier prose document (of at least `min_bytes`) to copy, or None when none is found quickly."""
        for _ in range(32):
            if number == 0:
                return None
            candidate = rng.randrange(number)
            kind, crng = self._draw(candidate)
            if kind == "prose" and self._prose_length(crng) >= min_bytes:
                return candidate
        return None

    def _sentence(self, rng: random.Random) -> str:
        """One sentence of the word chain: order 2, backing off to order 1 a quarter of the time, which breaks
        the long verbatim runs that a small source text would otherwise give (and xz would find)."""
        first, second = _START, _START
        words: list[str] = []
        while len(words) < _MAX_SENTENCE_WORDS:
            if second is not _START and rng.random() < _BACKOFF:
                choices = self._order1[second]
            else:
                choices = self._order2[(first, second)]
            word = choices[int(rng.random() * len(choices))]
            if word is None:
                break
            words.append(word)
            first, second = second, word
        sentence = " ".join(words)
        return sentence if sentence[-1:] in (".", "!", "?", "") else sentence + "."

    def _prose(self, rng: random.Random, target: int) -> str:
        """Paragraphs of 1-8 sentences, sentence by sentence until `target` bytes (within one sentence)."""
        paragraphs: list[str] = []
        sentences: list[str] = []
        left = rng.randint(1, 8)
        size = 0
        while size < target:
            sentence = self._sentence(rng)
            if not sentence:
                continue
            sentences.append(sentence)
            size += len(sentence.encode()) + 1
            left -= 1
            if left == 0:
                paragraphs.append(" ".join(sentences))
                sentences, left = [], rng.randint(1, 8)
                size += 1  # the blank line's second newline
        if sentences:
            paragraphs.append(" ".join(sentences))
        return "\n\n".join(paragraphs)

    def _prose_of(self, number: int) -> str:
        kind, rng = self._draw(number)
        return self._prose(rng, self._prose_length(rng))

    def _near(self, text: str, rng: random.Random) -> tuple[str, int, int]:
        """`text` with 1-3% of its words substituted, deleted or inserted: (text, words changed, words)."""
        parts = re.split(r"(\s+)", text)  # words at even positions, the whitespace between at odd ones
        positions = list(range(0, len(parts), 2))
        changes = max(1, round(rng.uniform(0.01, 0.03) * len(positions)))
        for position in sorted(rng.sample(positions, changes), reverse=True):
            action = rng.random()
            if action < 0.5:
                parts[position] = rng.choice(self.pool.words)
            elif action < 0.75 and len(positions) > changes:
                parts[position] = ""
                if position + 1 < len(parts):
                    parts[position + 1] = ""  # and the space after it, so no double space is left
            else:
                parts[position] = f"{parts[position]} {rng.choice(self.pool.words)}"
        return "".join(parts).strip(), changes, len(positions)

    def _foreign(self, rng: random.Random) -> str:
        text = self._prose(rng, self._prose_length(rng))
        style = rng.choice(("cyrillic", "greek", "made_up"))
        if style == "cyrillic":
            return text.translate(_CYRILLIC)
        if style == "greek":
            return text.translate(_GREEK)
        return re.sub(r"[A-Za-z]+", lambda m: _made_up_word(m.group()), text)

    def _junk(self, rng: random.Random) -> str:
        style = rng.choice(("boilerplate", "link_list", "too_short", "lorem"))
        if style == "boilerplate":
            lines = [rng.choice(_BOILERPLATE) for _ in range(rng.randint(20, 60))]
            lines.insert(rng.randrange(len(lines)), rng.choice(self.pool.sentences))
            return "\n".join(lines)
        if style == "link_list":
            lines = [
                " ".join(rng.choice(self.pool.words).capitalize() for _ in range(rng.randint(1, 4)))
                for _ in range(rng.randint(30, 80))
            ]
            return "\n".join(lines)
        if style == "too_short":
            return " ".join(rng.choice(self.pool.sentences).split()[: rng.randint(3, 12)])
        return "\n\n".join([_LOREM] * rng.randint(1, 5))

    def document(self, number: int) -> tuple[str, str, dict[str, Any] | None]:
        """(kind, text, planted) where planted says which document an exact or near duplicate copies."""
        kind, rng = self._draw(number)
        if kind in ("exact", "near"):
            original = self._original(number, rng, min_bytes=1_000 if kind == "near" else 0)
            if original is None:
                return "prose", self._prose(rng, self._prose_length(rng)), None
            text = self._prose_of(original)
            if kind == "exact":
                return kind, text, {"doc": number, "kind": kind, "of": original}
            text, changed, words = self._near(text, rng)
            return kind, text, {"doc": number, "kind": kind, "of": original, "changed": changed, "words": words}
        if kind == "foreign":
            return kind, self._foreign(rng), None
        if kind == "junk":
            return kind, self._junk(rng), None
        return kind, self._prose(rng, self._prose_length(rng)), None

    def planned_bytes(self, number: int) -> int:
        """About the document's UTF-8 size, cheaply (no text is made for prose and duplicates)."""
        kind, rng = self._draw(number)
        if kind in ("exact", "near"):
            original = self._original(number, rng, min_bytes=1_000 if kind == "near" else 0)
            if original is not None:
                return self._prose_length(self._draw(original)[1])
            return self._prose_length(rng)
        if kind == "prose":
            return self._prose_length(rng)
        return len(self.document(number)[1].encode())

    def boundaries(self) -> list[int]:
        """The first document number of each archive, and the total at the end: archive k holds about
        mb / archives of text, wherever it stops."""
        per_archive = self.spec.mb * MB / self.spec.archives
        edges = [0]
        total = 0
        number = 0
        while len(edges) <= self.spec.archives:
            total += self.planned_bytes(number)
            number += 1
            if total >= per_archive * len(edges):
                edges.append(number)
        return edges


# -- archives -----------------------------------------------------------------------------------------


@dataclass
class SubsetResult:
    subset: int
    inner: list[tuple[str, bytes]]
    docs: int
    text_bytes: int
    kinds: dict[str, int]
    planted: list[dict[str, Any]]


def _make_subset(spec: CorpusSpec, pool: SentencePool, subset: int, first: int, end: int) -> SubsetResult:
    generator = CorpusGenerator(spec, pool)
    inner: list[tuple[str, bytes]] = []
    kinds = dict.fromkeys(KINDS, 0)
    planted: list[dict[str, Any]] = []
    text_bytes = 0
    for index, start in enumerate(range(first, end, spec.docs_per_inner)):
        chunk = []
        for number in range(start, min(end, start + spec.docs_per_inner)):
            kind, text, plant = generator.document(number)
            kinds[kind] += 1
            text_bytes += len(text.encode("utf-8"))
            if plant is not None:
                planted.append(plant)
            chunk.append((number, text))
        inner.append((f"openwebtext/urlsf_subset{subset:02d}-{index + 1}_data.xz", inner_archive(chunk, spec.preset)))
    return SubsetResult(subset, inner, end - first, text_bytes, kinds, planted)


def _write_tar(dest: Path, members: Iterator[tuple[str, bytes]], preset: int | None) -> None:
    """An outer tar at `dest` (xz-compressed when `preset` is given), by one atomic rename."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw:
            packed = lzma.open(raw, "wb", format=lzma.FORMAT_XZ, check=XZ_CHECK, preset=preset) if preset else raw
            with tarfile.open(fileobj=packed, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                tar.addfile(tar_member("openwebtext", 0, directory=True))
                for name, data in members:
                    tar.addfile(tar_member(name, len(data)), io.BytesIO(data))
            if packed is not raw:
                packed.close()
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _subset_file(spec: CorpusSpec, pool: SentencePool, folder: str, subset: int, first: int, end: int) -> dict:
    result = _make_subset(spec, pool, subset, first, end)
    dest = Path(folder) / f"urlsf_subset{subset:02d}.tar"
    _write_tar(dest, iter(result.inner), preset=None)
    summary = asdict(result)
    del summary["inner"]
    return {**summary, "file": dest.name, "file_bytes": dest.stat().st_size, "inner_archives": len(result.inner)}


def generate(folder: Path, spec: CorpusSpec, jobs: int = 1, pool: SentencePool | None = None) -> dict[str, Any]:
    """Write the corpus into `folder`; returns (and writes as corpus.json) what it holds and what was planted."""
    problems = spec.problems()
    if problems:
        raise ValueError("; ".join(problems))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pool = pool or SentencePool.default()
    edges = CorpusGenerator(spec, pool).boundaries()
    ranges = list(zip(edges[:-1], edges[1:], strict=True))
    files: list[dict[str, Any]] = []
    with ExitStack() as stack:
        # One process writes inline (a test's small corpus); more share the archives between them, spawned
        # so that no thread of a caller that imported pyarrow or tokenizers is inherited half-held.
        executor = (
            stack.enter_context(
                ProcessPoolExecutor(min(jobs, spec.archives), mp_context=multiprocessing.get_context("spawn"))
            )
            if jobs > 1
            else None
        )

        def run(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
            if executor is None:
                value = fn(*args)
                return lambda: value
            return executor.submit(fn, *args).result

        if spec.layout == "subsets":
            pending = [
                run(_subset_file, spec, pool, str(folder), k, first, end) for k, (first, end) in enumerate(ranges)
            ]
            files = [result() for result in pending]
        else:
            pending_subsets = [run(_make_subset, spec, pool, k, first, end) for k, (first, end) in enumerate(ranges)]
            results = [result() for result in pending_subsets]
            dest = folder / "openwebtext.tar.xz"
            _write_tar(dest, (m for r in results for m in r.inner), preset=spec.preset)
            for r in results:
                summary = {key: value for key, value in asdict(r).items() if key not in ("inner",)}
                files.append({**summary, "file": dest.name, "inner_archives": len(r.inner)})
    kinds = {kind: sum(f["kinds"][kind] for f in files) for kind in KINDS}
    planted = [p for f in files for p in f.pop("planted")]
    corpus = {
        "spec": asdict(spec),
        "docs": sum(f["docs"] for f in files),
        "text_bytes": sum(f["text_bytes"] for f in files),
        "archive_bytes": sum((folder / name).stat().st_size for name in sorted({f["file"] for f in files})),
        "kinds": kinds,
        "files": files,
        "planted": planted,
        "seconds": time.perf_counter() - started,
    }
    (folder / CORPUS_FILE).write_text(json.dumps(corpus, indent=1) + "\n", encoding="utf-8")
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--mb", type=float, default=200.0, help="MB (10^6 bytes) of UTF-8 text in all")
    parser.add_argument("--archives", type=int, default=10, help="source files (urlsf_subsetNN.tar)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact", type=float, default=0.03, help="share of exact duplicates")
    parser.add_argument("--near", type=float, default=0.02, help="share of near duplicates (1-3%% of words changed)")
    parser.add_argument("--foreign", type=float, default=0.01, help="share of non-English documents")
    parser.add_argument("--junk", type=float, default=0.02, help="share of boilerplate, link lists, fragments")
    parser.add_argument("--docs-per-inner", type=int, default=DOCS_PER_INNER, help="documents per inner archive")
    parser.add_argument("--preset", type=int, default=6, help="xz preset of the inner archives (xz's default: 6)")
    parser.add_argument("--layout", choices=("subsets", "single"), default="subsets")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes writing archives")
    args = parser.parse_args()
    spec = CorpusSpec(
        mb=args.mb,
        archives=args.archives,
        seed=args.seed,
        exact=args.exact,
        near=args.near,
        foreign=args.foreign,
        junk=args.junk,
        docs_per_inner=args.docs_per_inner,
        preset=args.preset,
        layout=args.layout,
    )
    problems = spec.problems()
    if problems:
        parser.error("; ".join(problems))
    corpus = generate(args.folder, spec, jobs=args.jobs)
    print(
        f"{args.folder}: {corpus['docs']:,} documents, {corpus['text_bytes'] / MB:.1f} MB of text in "
        f"{corpus['archive_bytes'] / MB:.1f} MB of archives, {corpus['seconds']:.1f} s; kinds {corpus['kinds']}"
    )


if __name__ == "__main__":
    main()

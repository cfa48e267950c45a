"""Blocking data checks on the outputs of clean, dedup and tokens: a corpus that came out empty, lost most
of its documents, holds too few tokens to train on, or does not survive its tokenizer stops the run there,
before pretraining starts, in one line that names the stage, the version, the value and the bound.

A check only reads a stored version (its manifest's metrics, and for tokens a sample of its documents), so
it is cheap, and it runs on every run, cached or not: a pass is a statement about a version *and* the check
settings and code of that run, and caching it would let a tightened bound or a fixed check pass on an old
answer for the price of a few milliseconds saved. A failed check leaves the stage's version in the store,
so a rerun after the settings are fixed reuses it.

In the Prefect UI each checked version is its own task run, `check clean 1a2b3c4d5e6f`, with a table
artifact (`check-clean`) of its checks: result, value, bound, the setting that holds the bound, and what it
measures. A check listed in `checks.warn` logs a warning and lets the run go on; its task run then ends in a
Completed state named `Warned`.

Like the stage modules, this one imports Prefect only where its task is first used.
"""

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from model.tokenizer import FILENAME, UNKNOWN_CHAR, CharTokenizer, Tokenizer
from storage.errors import DataIntegrityError, QualityError
from storage.store import Store
from storage.tokens import open_tokens
from tasks.shards import DOCS, input_shards
from tasks.stage import LazyTask
from tasks.tokens import INDEX

CheckName = Literal[
    "clean.not_empty",
    "clean.drop_rate",
    "dedup.not_empty",
    "dedup.duplicate_rate",
    "tokens.train_tokens",
    "tokens.val_tokens",
    "tokens.block_size",
    "tokens.round_trip",
    "tokens.unknown_chars",
]
CHECKED_STAGES = ("clean", "dedup", "tokens")


class CleanChecks(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    min_kept_docs: int = Field(
        default=1,
        ge=1,
        le=10**12,
        description="clean.not_empty: at least this many documents survive cleaning. 1: an empty corpus "
        "always stops the run; raise it for a corpus whose size you know.",
    )
    max_drop_rate: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="clean.drop_rate: at most this share of documents is removed. 0.9: the filters remove "
        "14% of the embedded corpus (223 of 1,570 documents) and 22-38% of the tests' 40-80 document corpora; "
        "a corpus that lost 95% (a wrong language setting, a wrong reader, a threshold typo) is stopped.",
    )


class DedupChecks(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    min_kept_docs: int = Field(
        default=1,
        ge=1,
        le=10**12,
        description="dedup.not_empty: at least this many documents survive deduplication.",
    )
    max_duplicate_rate: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="dedup.duplicate_rate: at most this share of documents is removed as exact or near "
        "duplicates (or emptied by paragraph removal). 0.5: a source given twice alone removes half; the "
        "embedded corpus loses 1.3% (18 of 1,347 documents), and OpenWebText is itself deduplicated by URL. "
        "Raise it for raw web crawls, where repeated pages are common.",
    )


class TokensChecks(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    min_train_tokens: int = Field(
        default=10_000,
        ge=1,
        le=10**15,
        description="tokens.train_tokens: the training split holds at least this many tokens. 10,000: a floor "
        "that stops a corpus shrunk to a few documents; the tiny preset makes 411,832 of the embedded corpus, "
        "and the smallest test corpus (40 documents, BPE 300) gives 15,152.",
    )
    min_val_tokens: int = Field(
        default=1_000,
        ge=1,
        le=10**15,
        description="tokens.val_tokens: the validation split holds at least this many tokens (at least 1: "
        "it is never empty). 1,000: fewer than eight windows of the tiny preset's 128 tokens make a noisy "
        "validation loss; the embedded corpus gives 60,883, the smallest test corpus 11,500.",
    )
    sample_docs: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="tokens.round_trip: how many documents, spread evenly over the corpus, are decoded back "
        "from the token files and compared with their text.",
    )
    max_unknown_char_frac: float = Field(
        default=0.001,
        ge=0.0,
        le=1.0,
        description="tokens.unknown_chars (char tokenizer only; byte-level BPE has no unknown characters): "
        "at most this share of the characters in the token files is outside the vocabulary. A char "
        "tokenizer trained on the training split meets validation characters it never saw; 0.001 (one "
        "in a thousand) allows a few rare symbols and catches text in another script or alphabet.",
    )


class ChecksConfig(BaseModel):
    """The data checks after clean, dedup and tokens: each fails the run before pretraining unless it is
    listed in `warn`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    clean: CleanChecks = Field(default_factory=CleanChecks, description="Bounds on the cleaned corpus.")
    dedup: DedupChecks = Field(default_factory=DedupChecks, description="Bounds on the deduplicated corpus.")
    tokens: TokensChecks = Field(default_factory=TokensChecks, description="Bounds on the token files.")
    warn: list[CheckName] = Field(
        default_factory=list,
        description="Checks that log a warning instead of failing the run (e.g. clean.drop_rate).",
    )


@dataclass(frozen=True)
class CheckResult:
    name: CheckName
    passed: bool
    value: float | int
    bound: str  # as a reader compares it: ">= 1", "<= 0.9"
    setting: str  # where the bound is set: "checks.clean.max_drop_rate"
    description: str
    detail: str = ""  # what failed, when a value alone does not say it (the first document that differs)

    def outcome(self, warn: list[str]) -> Literal["pass", "warn", "fail"]:
        if self.passed:
            return "pass"
        return "warn" if self.name in warn else "fail"

    def row(self, warn: list[str]) -> dict[str, str]:
        return {
            "check": self.name,
            "result": self.outcome(warn),
            "value": shown(self.value),
            "bound": self.bound,
            "setting": self.setting,
            "what": self.description + (f" ({self.detail})" if self.detail else ""),
        }

    def line(self) -> str:
        detail = f"; {self.detail}" if self.detail else ""
        return f"{self.name} is {shown(self.value)}, the bound is {self.bound} ({self.setting}{detail})"


def shown(value: float | int) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _metrics(store: Store, stage: str, version: str, keys: tuple[str, ...]) -> dict[str, Any]:
    metrics = store.manifest(stage, version).get("metrics")
    missing = [key for key in keys if not isinstance(metrics, dict) or not isinstance(metrics.get(key), int)]
    if missing:
        raise DataIntegrityError(f"{stage}/{version}: its manifest.json has no counts {', '.join(missing)}")
    return metrics


def clean_checks(store: Store, version: str, cfg: CleanChecks) -> list[CheckResult]:
    metrics = _metrics(store, "clean", version, ("docs_in", "kept", "removed"))
    drop_rate = metrics["removed"] / metrics["docs_in"] if metrics["docs_in"] else 1.0
    return [
        CheckResult(
            "clean.not_empty",
            metrics["kept"] >= cfg.min_kept_docs,
            metrics["kept"],
            f">= {cfg.min_kept_docs:,}",
            "checks.clean.min_kept_docs",
            f"documents kept of {metrics['docs_in']:,}",
        ),
        CheckResult(
            "clean.drop_rate",
            drop_rate <= cfg.max_drop_rate,
            drop_rate,
            f"<= {cfg.max_drop_rate:g}",
            "checks.clean.max_drop_rate",
            f"share of documents removed, by reason {metrics.get('removed_by_reason', {})}",
        ),
    ]


def dedup_checks(store: Store, version: str, cfg: DedupChecks) -> list[CheckResult]:
    metrics = _metrics(store, "dedup", version, ("docs_in", "kept"))
    rate = (metrics["docs_in"] - metrics["kept"]) / metrics["docs_in"] if metrics["docs_in"] else 1.0
    counts = {key: metrics.get(key) for key in ("exact_duplicates", "near_duplicates", "paragraph_docs_dropped")}
    return [
        CheckResult(
            "dedup.not_empty",
            metrics["kept"] >= cfg.min_kept_docs,
            metrics["kept"],
            f">= {cfg.min_kept_docs:,}",
            "checks.dedup.min_kept_docs",
            f"documents kept of {metrics['docs_in']:,}",
        ),
        CheckResult(
            "dedup.duplicate_rate",
            rate <= cfg.max_duplicate_rate,
            rate,
            f"<= {cfg.max_duplicate_rate:g}",
            "checks.dedup.max_duplicate_rate",
            "share of documents removed: "
            + ", ".join(f"{key} {value:,}" for key, value in counts.items() if value is not None),
        ),
    ]


def tokens_checks(store: Store, version: str, cfg: TokensChecks, block_size: int) -> list[CheckResult]:
    metrics = _metrics(store, "tokens", version, ("train_tokens", "val_tokens", "train_docs", "val_docs"))
    train, val = metrics["train_tokens"], metrics["val_tokens"]
    window = block_size + 1  # a window's inputs and its targets shifted by one (model/data.py)
    return [
        CheckResult(
            "tokens.train_tokens",
            train >= cfg.min_train_tokens,
            train,
            f">= {cfg.min_train_tokens:,}",
            "checks.tokens.min_train_tokens",
            f"training tokens, in {metrics['train_docs']:,} documents",
        ),
        CheckResult(
            "tokens.val_tokens",
            val >= cfg.min_val_tokens,
            val,
            f">= {cfg.min_val_tokens:,}",
            "checks.tokens.min_val_tokens",
            f"validation tokens, in {metrics['val_docs']:,} documents",
        ),
        CheckResult(
            "tokens.block_size",
            min(train, val) >= window,
            min(train, val),
            f">= {window:,}",
            "pretrain.block_size + 1",
            "tokens in the smaller split: pretraining draws windows of block_size + 1 tokens from each",
        ),
        *round_trip_checks(store, version, cfg, metrics),
    ]


def sample_positions(count: int, wanted: int) -> list[int]:
    """`wanted` positions among `count`, spread evenly from the first to the last (every shard is met)."""
    if count == 0:
        return []
    return sorted(set(np.linspace(0, count - 1, min(wanted, count)).round().astype(np.int64).tolist()))


def take_rows(files: list[Path], positions: list[int], columns: list[str]) -> list[dict[str, Any]]:
    """The rows at `positions` (sorted) of the Parquet files read one after the other, reading only the
    row groups that hold them."""
    rows: list[dict[str, Any]] = []
    start = 0
    for path in files:
        shard = pq.ParquetFile(path)
        for group in range(shard.metadata.num_row_groups):
            size = shard.metadata.row_group(group).num_rows
            first, last = bisect.bisect_left(positions, start), bisect.bisect_left(positions, start + size)
            if first < last:
                table = shard.read_row_group(group, columns=columns)
                rows += table.take([p - start for p in positions[first:last]]).to_pylist()
            start += size
    return rows


def _row_count(files: list[Path]) -> int:
    return sum(pq.ParquetFile(path).metadata.num_rows for path in files)


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _count(tokens: np.ndarray, value: int, block: int = 1 << 24) -> int:
    """Occurrences of `value` in a (memory-mapped) token array, a block at a time: memory stays flat."""
    return sum(int(np.count_nonzero(tokens[i : i + block] == value)) for i in range(0, len(tokens), block))


def round_trip_checks(store: Store, version: str, cfg: TokensChecks, metrics: dict[str, Any]) -> list[CheckResult]:
    """Sampled documents of the tokens version's dedup input against the token files: the ids stored for each
    must be its encoding, and decoding them must give its text back. Byte-level BPE encodes every string
    losslessly, so the text must come back exactly; the char tokenizer maps characters it never saw to one
    unknown id, so for it the text must come back with exactly those characters shown as U+FFFD, and their
    share is bounded on its own (tokens.unknown_chars, counted over the whole token files)."""
    folder = store.path("tokens", version)
    dedup = store.manifest("tokens", version).get("inputs", {}).get("dedup")
    if dedup is None or not store.has("dedup", dedup):
        raise DataIntegrityError(f"tokens/{version}: its input dedup/{dedup} is not in the store to compare with")
    tokenizer = Tokenizer.load(folder / FILENAME)
    shards = input_shards(store.path("dedup", dedup))
    indexed, held = _row_count([folder / INDEX]), _row_count(shards)
    positions = sample_positions(min(indexed, held), cfg.sample_docs)
    entries = take_rows([folder / INDEX], positions, ["doc_id", "split", "offset", "n_tokens"])
    docs = take_rows(shards, positions, ["doc_id", "text"])
    arrays = {split: open_tokens(folder, split) for split in ("train", "val")}
    vocabulary = set(tokenizer.chars) if isinstance(tokenizer, CharTokenizer) else None
    failures = [] if indexed == held else [f"{INDEX} lists {indexed:,} documents, dedup/{dedup}/{DOCS} holds {held:,}"]
    for entry, doc in zip(entries, docs, strict=True):
        if entry["doc_id"] != doc["doc_id"]:
            failures.append(f"{INDEX} names {entry['doc_id']} where dedup/{dedup} holds {doc['doc_id']}")
            continue
        text = doc["text"] or ""  # as the tokens stage encodes a null text
        ids = tokenizer.encode(text)
        start = entry["offset"]
        if arrays[entry["split"]][start : start + entry["n_tokens"]].tolist() != ids:
            failures.append(f"document {doc['doc_id']}: {entry['split']}.bin holds other ids than its encoding")
            continue
        expected = text if vocabulary is None else "".join(c if c in vocabulary else UNKNOWN_CHAR for c in text)
        decoded = tokenizer.decode(ids)
        if decoded != expected:
            at = _first_difference(decoded, expected)
            failures.append(f"document {doc['doc_id']} decodes to other text from character {at:,}")
    kept = "its text" if vocabulary is None else "its text, unknown characters as U+FFFD"
    results = [
        CheckResult(
            "tokens.round_trip",
            not failures,
            len(failures),
            "= 0",
            f"checks.tokens.sample_docs ({len(positions)} sampled)",
            f"sampled documents whose stored ids are not their encoding or do not decode to {kept}",
            detail=f"first: {failures[0]}" if failures else "",
        )
    ]
    if isinstance(tokenizer, CharTokenizer):
        unknown = sum(_count(tokens, tokenizer.unk_id) for tokens in arrays.values())
        # Every document's ids are followed by one <|endoftext|>, which is no character of its text.
        chars = metrics["train_tokens"] + metrics["val_tokens"] - metrics["train_docs"] - metrics["val_docs"]
        share = unknown / chars if chars > 0 else 0.0
        results.append(
            CheckResult(
                "tokens.unknown_chars",
                share <= cfg.max_unknown_char_frac,
                share,
                f"<= {cfg.max_unknown_char_frac:g}",
                "checks.tokens.max_unknown_char_frac",
                f"share of characters outside the char tokenizer's vocabulary ({unknown:,} of {chars:,})",
            )
        )
    return results


def run_checks(
    storage: str | Path, stage: str, version: str, checks: ChecksConfig, block_size: int
) -> list[CheckResult]:
    """The checks of `stage/version`: every one, whatever the others found."""
    store = Store(storage)
    if stage == "clean":
        return clean_checks(store, version, checks.clean)
    if stage == "dedup":
        return dedup_checks(store, version, checks.dedup)
    if stage == "tokens":
        return tokens_checks(store, version, checks.tokens, block_size)
    raise ValueError(f"stage {stage!r} has no data checks; those that do: {', '.join(CHECKED_STAGES)}")


def failure_line(stage: str, version: str, failed: list[CheckResult]) -> str:
    """The one line a failed check ends the run with."""
    found = "; ".join(result.line() for result in failed)
    return (
        f"check {stage}/{version} failed: {found}. Fix the data or the bound, or list the check in checks.warn "
        "to go on; the stage's version stays in the store"
    )


# -- Prefect ------------------------------------------------------------------------------------------


def _check_run_name(parameters: dict[str, Any]) -> str:
    """A check's task run in the UI: `check dedup 1a2b3c4d5e6f`, its stage and the version it checks."""
    return f"check {parameters['stage']} {parameters['version']}"


def _make_check_task() -> Any:
    from prefect import get_run_logger, task
    from prefect.artifacts import create_table_artifact
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Completed

    def check(storage: str, stage: str, version: str, checks: ChecksConfig, block_size: int) -> Any:
        log = get_run_logger()
        results = run_checks(storage, stage, version, checks, block_size)
        outcomes = [result.outcome(checks.warn) for result in results]
        tally = ", ".join(f"{outcomes.count(o)} {word}" for o, word in _WORDS if o in outcomes)
        try:
            create_table_artifact(
                table=[result.row(checks.warn) for result in results],
                key=f"check-{stage}",
                description=f"**check {stage}/{version}**: {tally}",
            )
        except Exception as exc:  # the UI is a view: the checks decide, whether or not it shows them
            log.warning("artifact check-%s not created: %s", stage, exc)
        warned = [result for result, outcome in zip(results, outcomes, strict=True) if outcome == "warn"]
        for result in warned:
            log.warning("check %s/%s: %s (listed in checks.warn: the run goes on)", stage, version, result.line())
        failed = [result for result, outcome in zip(results, outcomes, strict=True) if outcome == "fail"]
        if failed:
            raise QualityError(failure_line(stage, version, failed))
        log.info("check %s/%s: %s", stage, version, tally)
        rows = [result.row(checks.warn) for result in results]
        if warned:  # the task run's state says so in the UI's list of runs, without opening it
            lines = "; ".join(result.line() for result in warned)
            return Completed(name="Warned", message=f"check {stage}/{version}: {tally}: {lines}", data=rows)
        return rows

    return task(
        name="check",
        task_run_name=_check_run_name,
        retries=0,  # a failed bound stays failed: QualityError is never transient
        cache_policy=NO_CACHE,
        persist_result=False,
    )(check)


_WORDS = (("pass", "passed"), ("warn", "warned"), ("fail", "failed"))

# check_task(storage, stage, version, checks, block_size): the data checks of one stage version as one task
# run; raises QualityError when a check not listed in checks.warn fails.
check_task = LazyTask(_make_check_task)

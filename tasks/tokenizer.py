"""Stage tokenizer: train the tokenizer on the training documents only, or keep a stored one.

Validation documents (chosen by `tasks.split.is_val`, the same rule the tokens stage applies) never shape
the vocabulary, so validation loss is measured on text the tokenizer has not seen. Text streams from the
shards a batch at a time.

With `reuse` ("latest" or a tokenizer version id) a nightly retraining keeps its tokenizer, so that its
models stay comparable and the tokens stage can take unchanged shards' encodings from its shard cache. The
new version's input is still the current dedup version (the tokens stage checks that lineage), its files are
byte-identical copies of the reused version's, and its metrics carry the reused tokenizer's split: a
document's side depends on its id and the split only, so no validation document of the new corpus shaped
the kept vocabulary. The version id is made from the reused files' sha256 and that split (the stage's
identity hook), never from the name it was found by, so the same tokenizer gives the same version.

Every version's metrics record what the tokens stage and a later reuse need: `kind`, `vocab_size` (its ids),
`max_vocab_size` (bpe: the setting it was trained with), `split_seed` and `val_fraction`, the training
counts, and `reused_from` (the version its files were copied from) for a kept one.
"""

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from model.tokenizer import FILENAME, Tokenizer, train_bpe, train_char
from storage.errors import ConfigError, DataIntegrityError, TransientError
from storage.store import Store, sha256_file
from tasks.shards import DOCS, input_shards, read_batches
from tasks.split import SplitConfig, is_val
from tasks.stage import Stage, StageConfig, StageContext, stage_task

NAME = "tokenizer"
LATEST = "latest"


class TokenizerConfig(StageConfig):
    kind: Literal["bpe", "char"] = Field(
        default="bpe",
        description="bpe: byte-level BPE as GPT-2 uses; char: one id per character, as the tutorials do.",
    )
    vocab_size: int = Field(
        default=4096,
        ge=257,
        le=2**32,
        description="BPE only: the most ids, 256 bytes and <|endoftext|> included (GPT-2: 50,257). Small by "
        "default so that the embedding table of a tiny model stays small. Ignored by the char kind.",
    )
    min_frequency: int = Field(
        default=2,
        ge=0,
        le=1_000_000,
        description="BPE only: a pair must occur at least this often to be merged (2 drops one-off merges).",
    )
    split: SplitConfig = Field(
        default_factory=SplitConfig,
        description="Which documents are held out for validation; the tokens stage uses the same split.",
    )
    max_train_docs: int | None = Field(
        default=None,
        ge=1,
        le=10**12,
        description="Train on at most this many training documents (the first in shard order); all if unset.",
    )
    reuse: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description='Unset (the default): train a tokenizer. "latest": keep the store\'s latest tokenizer '
        "(train one when there is none yet); else the id of a tokenizer version to keep. A kept tokenizer is "
        "copied byte for byte with its split; kind, vocab_size and split given with it must match it.",
    )

    def identity_params(self) -> dict[str, Any]:
        # What `reuse` resolves to is in the version id (the identity hook: the reused files' content), not
        # the name it was found by, so "latest" and the version id it points at give the same version.
        return {name: value for name, value in super().identity_params().items() if name != "reuse"}


class TrainingText:
    """The training documents' text, streamed shard by shard; counts what it has yielded."""

    def __init__(self, shards: list[Path], split: SplitConfig, max_docs: int | None) -> None:
        self.shards = shards
        self.split = split
        self.max_docs = max_docs
        self.docs = 0
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        for shard in self.shards:
            for batch in read_batches(shard, ["doc_id", "text"]):
                doc_ids, texts = batch.column("doc_id").to_pylist(), batch.column("text").to_pylist()
                for doc_id, text in zip(doc_ids, texts, strict=True):
                    if is_val(doc_id, self.split.seed, self.split.val_fraction):
                        continue
                    if self.max_docs is not None and self.docs >= self.max_docs:
                        return
                    text = text or ""
                    self.docs += 1
                    self.chars += len(text)
                    yield text


def reused_version(cfg: TokenizerConfig, store: Store) -> str | None:
    """The tokenizer version `cfg.reuse` names; None when there is none to reuse (reuse unset, or "latest"
    in a store that holds no tokenizer yet). A version id that is not stored is a ConfigError."""
    if cfg.reuse is None:
        return None
    if cfg.reuse == LATEST:
        return store.latest(NAME)
    if not store.has(NAME, cfg.reuse):
        raise ConfigError(f"tokenizer.reuse: no tokenizer version {cfg.reuse!r} in the store at {store.root}")
    return cfg.reuse


def recorded_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a stored tokenizer version is, from its manifest: kind, vocab_size, max_vocab_size (bpe), split,
    train_docs, train_chars. Its metrics say it; a version whose metrics do not record the split or the
    vocabulary setting (one trained before they were recorded) was trained, so its params hold them."""
    where = f"{NAME}/{manifest.get('version', '?')}"
    metrics = manifest.get("metrics")
    params = manifest.get("params")
    metrics = metrics if isinstance(metrics, dict) else {}
    params = params if isinstance(params, dict) else {}
    if "split_seed" in metrics and "val_fraction" in metrics:
        split = {"seed": metrics["split_seed"], "val_fraction": metrics["val_fraction"]}
    else:
        split = params.get("split")
    try:
        settings = {
            "kind": metrics["kind"],
            "vocab_size": metrics["vocab_size"],
            "split": SplitConfig.model_validate(split),
            "train_docs": metrics.get("train_docs"),
            "train_chars": metrics.get("train_chars"),
        }
    except (KeyError, ValidationError) as exc:
        raise DataIntegrityError(f"{where}: its manifest records no valid kind, vocab_size and split") from exc
    if settings["kind"] == "bpe":
        settings["max_vocab_size"] = metrics.get("max_vocab_size", params.get("vocab_size", settings["vocab_size"]))
    return settings


def check_reuse(cfg: TokenizerConfig, version: str, settings: dict[str, Any]) -> None:
    """The settings given together with `reuse` must describe the tokenizer reused: one ConfigError lists
    every one that does not (fields left unset take the reused tokenizer's values)."""
    given = cfg.model_fields_set
    problems = []
    if "kind" in given and cfg.kind != settings["kind"]:
        problems.append(f"kind {cfg.kind!r} (it is {settings['kind']!r})")
    if (
        "vocab_size" in given
        and settings["kind"] == "bpe"
        and cfg.vocab_size not in (settings["vocab_size"], settings["max_vocab_size"])
    ):
        problems.append(
            f"vocab_size {cfg.vocab_size} (it has {settings['vocab_size']} ids, trained with vocab_size "
            f"{settings['max_vocab_size']})"
        )
    split = settings["split"]
    if "split" in given and cfg.split != split:
        problems.append(
            f"split seed={cfg.split.seed}, val_fraction={cfg.split.val_fraction} (it was trained with "
            f"seed={split.seed}, val_fraction={split.val_fraction})"
        )
    if problems:
        raise ConfigError(
            f"tokenizer.reuse {cfg.reuse!r}: {NAME}/{version} does not match the settings given with it: "
            + "; ".join(problems)
        )


def reuse_identity(cfg: TokenizerConfig, store: Store) -> dict[str, Any] | None:
    """The stage's identity hook: for a reused tokenizer, the sha256 of each of its files and its split (what
    the new version holds and hands to the tokens stage); None when a tokenizer is trained."""
    version = reused_version(cfg, store)
    if version is None:
        return None
    manifest = store.manifest(NAME, version)
    settings = recorded_settings(manifest)
    check_reuse(cfg, version, settings)
    try:
        files = {name: info["sha256"] for name, info in sorted(manifest["files"].items())}
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataIntegrityError(f"{NAME}/{version}: its manifest lists no files with their sha256") from exc
    return {"reused": {"files": files, "split": settings["split"].model_dump(mode="json")}}


def copy_reused(ctx: StageContext, cfg: TokenizerConfig) -> dict[str, Any]:
    """Copy the reused tokenizer's files, checked against the sha256 the version id was made from."""
    files = ctx.identity["reused"]["files"]
    version = reused_version(cfg, ctx.store)
    manifest = ctx.store.manifest(NAME, version) if version is not None else {}
    listed = {name: info.get("sha256") for name, info in sorted(manifest.get("files", {}).items())}
    if listed != files:  # "latest" moved since the version id was made: a retry makes the id again
        raise TransientError(f"tokenizer.reuse {cfg.reuse!r} names another tokenizer than when this stage started")
    source = ctx.store.path(NAME, version)
    damage = ctx.store.damage(NAME, version)  # sizes; the copies' sha256 are checked below
    if damage is None:
        for name, sha256 in files.items():
            (ctx.out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, ctx.out / name)
            if sha256_file(ctx.out / name) != sha256:
                damage = f"{name} does not match its sha256"
                break
    if damage is not None:
        raise DataIntegrityError(f"{source}: the tokenizer to reuse is damaged ({damage}): reuse another or train one")
    tokenizer = Tokenizer.load(ctx.out / FILENAME)
    settings = recorded_settings(manifest)
    split = settings["split"]
    ctx.log.info(
        "reusing %s/%s: a %s tokenizer of %d ids, split seed %d, val_fraction %s",
        NAME,
        version,
        tokenizer.kind,
        tokenizer.vocab_size,
        split.seed,
        split.val_fraction,
    )
    metrics = {
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "train_docs": settings["train_docs"],
        "train_chars": settings["train_chars"],
        "split_seed": split.seed,
        "val_fraction": split.val_fraction,
        "reused_from": version,
    }
    if "max_vocab_size" in settings:
        metrics["max_vocab_size"] = settings["max_vocab_size"]
    return metrics


def build(ctx: StageContext, cfg: TokenizerConfig) -> dict[str, Any]:
    if ctx.identity is not None:
        return copy_reused(ctx, cfg)
    if cfg.reuse == LATEST:
        ctx.log.info("tokenizer.reuse is %r but the store holds no tokenizer yet: training one", LATEST)
    source = ctx.input_path("dedup")
    texts = TrainingText(input_shards(source), cfg.split, cfg.max_train_docs)
    ctx.log.info("training a %s tokenizer on the training documents of %s", cfg.kind, source / DOCS)
    if cfg.kind == "bpe":
        tokenizer = train_bpe(texts, cfg.vocab_size, cfg.min_frequency)
    else:
        tokenizer = train_char(texts)
    if texts.chars == 0:
        raise DataIntegrityError(
            f"{source / DOCS}: no training text ({texts.docs} training documents, {texts.chars} characters, "
            f"val_fraction {cfg.split.val_fraction})"
        )
    tokenizer.save(ctx.out / FILENAME)
    ctx.log.info("%s tokenizer: %d ids from %d documents", cfg.kind, tokenizer.vocab_size, texts.docs)
    metrics = {
        "kind": cfg.kind,
        "vocab_size": tokenizer.vocab_size,
        "train_docs": texts.docs,
        "train_chars": texts.chars,
        "split_seed": cfg.split.seed,
        "val_fraction": cfg.split.val_fraction,
    }
    if cfg.kind == "bpe":
        metrics["max_vocab_size"] = cfg.vocab_size
    return metrics


STAGE = Stage(
    name=NAME,
    module=__name__,
    config=TokenizerConfig,
    build=build,
    inputs=("dedup",),
    identity=reuse_identity,
    libraries=("tokenizers", "pyarrow"),
)
tokenizer_task = stage_task(STAGE)

"""Stage tokenizer: train the tokenizer on the training documents only.

Validation documents (chosen by `tasks.split.is_val`, the same rule the tokens stage applies) never shape
the vocabulary, so validation loss is measured on text the tokenizer has not seen. Text streams from the
shards a batch at a time.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from model.tokenizer import FILENAME, train_bpe, train_char
from storage.errors import DataIntegrityError
from tasks.shards import DOCS, input_shards, read_batches
from tasks.split import SplitConfig, is_val
from tasks.stage import Stage, StageConfig, StageContext, stage_task


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


def build(ctx: StageContext, cfg: TokenizerConfig) -> dict[str, Any]:
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
    return {"kind": cfg.kind, "vocab_size": tokenizer.vocab_size, "train_docs": texts.docs, "train_chars": texts.chars}


STAGE = Stage(
    name="tokenizer",
    module=__name__,
    config=TokenizerConfig,
    build=build,
    inputs=("dedup",),
    libraries=("tokenizers", "pyarrow"),
)
tokenizer_task = stage_task(STAGE)

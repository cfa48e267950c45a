"""Inputs that stage tests publish into a store of their own: document shards, token files, and a tiny GPT
trained on a learnable sequence (quantization and evaluation must be judged on a model that learned
something: an untrained one predicts nearly uniformly, so even zeroed weights keep its loss)."""

import hashlib
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model.gpt import GPT, GPTConfig
from model.tokenizer import FILENAME, Tokenizer
from storage.store import Store
from storage.tokens import TokenFileWriter

# GPT-2's BPE averages about 4 bytes of English text per token; a count of one byte per token would let
# a test miss tokens and bytes swapped in a bits-per-byte conversion.
BYTES_PER_TOKEN = 4.0

DOC_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("member", pa.string()),
        ("n_bytes", pa.int64()),
    ]
)


def publish_docs(root, stage: str, shards, version: str | None = None, columns: Sequence[str] = DOC_SCHEMA.names):
    """A fake version of a document stage (extract, clean, dedup): one Parquet shard per list of
    (doc_id, text), with the given columns of the documents' schema."""
    version = version or f"{stage}-v1"

    def build(out):
        (out / "docs").mkdir()
        for i, rows in enumerate(shards):
            table = pa.table(
                {
                    "doc_id": [doc_id for doc_id, _ in rows],
                    "text": [text for _, text in rows],
                    "source": ["sample.tar.xz"] * len(rows),
                    "member": [f"{doc_id}.txt" for doc_id, _ in rows],
                    "n_bytes": [len(text.encode()) for _, text in rows],
                },
                schema=DOC_SCHEMA,
            ).select(list(columns))
            pq.write_table(table, out / "docs" / f"shard-{i:05d}.parquet", compression="zstd")

    Store(root).publish(stage, version, build, params={}, inputs={}, code_version="test")
    return version


def publish_dedup(root, shards, version="dedup-v1"):
    return publish_docs(root, "dedup", shards, version, columns=("doc_id", "text"))


def publish_tokens(
    root,
    train,
    val,
    *,
    vocab_size: int,
    eot_token: int = 0,
    version: str | None = None,
    tokenizer_version: str = "faketokenizer",
    inputs: dict[str, str] | None = None,
    tokenizer: Tokenizer | None = None,
    bytes_per_token: float = BYTES_PER_TOKEN,
    **meta_changes,
) -> str:
    """A fake tokens version: uint16 train.bin / val.bin and a meta.json with every contract field,
    `meta_changes` laid over it. The version id defaults to a hash of it all.

    Byte counts, like the tokens stage's, leave out the end-of-text tokens: with `tokenizer`, the UTF-8
    bytes the other ids decode to (and the tokenizer is copied in as `tokenizer.json`, as the stage does);
    without, `bytes_per_token` per id."""
    train, val = np.asarray(train, dtype=np.uint16), np.asarray(val, dtype=np.uint16)

    def n_bytes(ids: np.ndarray) -> int:
        text_ids = ids[ids != eot_token]
        if tokenizer is None:
            return round(len(text_ids) * bytes_per_token)
        return len(tokenizer.decode(text_ids.tolist()).encode("utf-8", errors="surrogatepass"))

    meta = {
        "dtype": "uint16",
        "vocab_size": vocab_size,
        "eot_token": eot_token,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "train_docs": 1,
        "val_docs": 1,
        "train_bytes": n_bytes(train),
        "val_bytes": n_bytes(val),
        "tokenizer_version": tokenizer_version,
        **({} if tokenizer is None else {"tokenizer_kind": tokenizer.kind, "tokenizer_file": FILENAME}),
        **meta_changes,
    }
    digest = hashlib.sha256(train.tobytes() + b"|" + val.tobytes() + json.dumps(meta, sort_keys=True).encode())
    version = version or f"tokens-{digest.hexdigest()[:10]}"

    def build(out) -> dict:
        for name, ids in (("train", train), ("val", val)):
            with TokenFileWriter(out / f"{name}.bin", np.dtype(np.uint16)) as writer:
                writer.write(ids)
        (out / "meta.json").write_text(json.dumps(meta))
        if tokenizer is not None:
            tokenizer.save(out / FILENAME)
        return {}

    Store(root).publish("tokens", version, build, params={}, inputs=inputs or {}, code_version="test")
    return version


def markov_tokens(n: int, vocab_size: int = 16, seed: int = 0) -> np.ndarray:
    """`n` ids of a first-order Markov chain in which each id is followed by one of two others, 4 times in 5
    the first: learnable in a hundred steps, and with an entropy floor of 0.50 nats per token (uniform:
    ln 16 = 2.77), so that a model's probabilities, not only its top choice, decide its loss."""
    rng = np.random.default_rng(seed)
    successors = np.array([rng.permutation(vocab_size)[:2] for _ in range(vocab_size)])  # (vocab, 2)
    ids = np.empty(n, dtype=np.uint16)
    ids[0] = 0
    second = rng.random(n) >= 0.8
    for i in range(1, n):
        ids[i] = successors[ids[i - 1], int(second[i])]
    return ids


def train_gpt(
    tokens: np.ndarray,
    vocab_size: int,
    *,
    steps: int,
    block_size: int = 16,
    batch_size: int = 16,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> GPT:
    """A GPT of 2 layers, 2 heads, 32 wide (no dropout) trained on random windows of `tokens` with AdamW;
    seeded, so the same arguments give the same model. Returned in eval mode."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    data = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block_size - 1, (batch_size,))
        x = torch.stack([data[s : s + block_size] for s in starts])  # (B, T)
        y = torch.stack([data[s + 1 : s + block_size + 1] for s in starts])  # (B, T)
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()

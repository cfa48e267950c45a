"""Deterministic evaluation numbers: next-token loss, perplexity, bits per byte, a unigram baseline.

Every number here is a function of the model, the token files and the tokenizer alone (no sampling), so
two evaluations of the same model on the same tokens agree to the last digit on the same device.

What is scored: the first `max_tokens` tokens of a split are read, and every one of them but the first is a
target (`scored_targets`). Losses are means over those targets; bits per byte divides their summed loss by
the UTF-8 bytes those very targets decode to (`target_bytes`).
"""

import json
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import pre_tokenizers

from model.tokenizer import Tokenizer
from storage.errors import DataIntegrityError

_COUNT_CHUNK = 1 << 24  # tokens per bincount call: bounded memory however large train.bin is
# Byte-level BPE (GPT-2's scheme) writes each byte of a token as one of these 256 characters.
_BYTE_LEVEL_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())


def eval_windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """(start, length) of non-overlapping input windows covering tokens[0 : n_tokens - 1].

    Window w predicts tokens[start + 1 : start + length + 1], so every token but the first is a target
    exactly once; the last window is shorter when block_size does not divide n_tokens - 1.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    targets = n_tokens - 1
    return [(start, min(block_size, targets - start)) for start in range(0, max(targets, 0), block_size)]


def tokens_read(tokens: np.ndarray, max_tokens: int | None) -> int:
    """How many tokens an evaluation of `max_tokens` (all when None) reads: the first ones of the split."""
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if n < 2:
        raise DataIntegrityError(f"evaluation needs at least 2 tokens, got {n}")
    return n


def scored_targets(tokens: np.ndarray, max_tokens: int | None) -> np.ndarray:
    """The tokens whose prediction is scored: all that are read but the first (nothing predicts it)."""
    return tokens[1 : tokens_read(tokens, max_tokens)]


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    tokens: np.ndarray,
    block_size: int,
    batch_size: int,
    max_tokens: int | None,
    device: str | torch.device = "cpu",
) -> float:
    """Mean next-token cross-entropy (nats) over `scored_targets(tokens, max_tokens)`: the first
    `max_tokens` tokens (all when None) are read, and the n - 1 after the first are predicted.

    The tokens are cut into fixed non-overlapping windows of `block_size`; the mean is over tokens, not
    windows, so a short last window weighs what its tokens weigh.
    """
    n = tokens_read(tokens, max_tokens)
    total = 0.0
    for logits, y in window_logits(model, tokens, block_size, batch_size, n, device):
        total += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),  # (B*T, vocab)
            y.reshape(-1),  # (B*T,)
            reduction="sum",
        ).item()
    return total / (n - 1)


@torch.no_grad()
def window_logits(
    model: nn.Module,
    tokens: np.ndarray,
    block_size: int,
    batch_size: int,
    n: int,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, targets) of the first `n` tokens' evaluation windows (`eval_windows`), batch by batch, with
    the model in eval mode meanwhile: what every per-target measure over those windows reads."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = torch.from_numpy(np.asarray(tokens[:n], dtype=np.int64))  # (n,)
    windows = eval_windows(n, block_size)
    was_training = model.training
    model.eval()
    try:
        # Windows of one length are batched together; only the last one can be shorter.
        for length in sorted({length for _, length in windows}, reverse=True):
            starts = [start for start, w_len in windows if w_len == length]
            for i in range(0, len(starts), batch_size):
                batch = starts[i : i + batch_size]
                x = torch.stack([data[s : s + length] for s in batch]).to(device)  # (B, T)
                y = torch.stack([data[s + 1 : s + length + 1] for s in batch]).to(device)  # (B, T)
                logits, _ = model(x, y)  # (B, T, vocab)
                yield logits, y
    finally:
        model.train(was_training)


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged model reports inf instead of raising OverflowError."""
    return math.exp(loss) if loss < 700 else math.inf


def bits_per_byte(loss: float, n_tokens: int, n_bytes: int) -> float:
    """Convert a mean per-token loss in nats over `n_tokens` scored targets to bits per byte of the UTF-8
    text those very targets decode to (`n_bytes`, from `target_bytes`).

    A loss per token depends on the tokenizer (a BPE token covers several bytes, a character one or a few),
    so it cannot compare models with different vocabularies; the text's information does not: the summed
    loss, loss * n_tokens nats, is loss * n_tokens / ln 2 bits, spread over n_bytes bytes. Both counts must
    describe the same tokens: a split-wide bytes-per-token ratio applied to a prefix of the split, or one
    that counts end-of-text tokens on one side only, gives another number.
    """
    if n_tokens <= 0 or n_bytes <= 0:
        raise DataIntegrityError(f"bits per byte needs positive token and byte counts, got {n_tokens} and {n_bytes}")
    return loss * n_tokens / math.log(2) / n_bytes


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id decodes to (int64, length vocab_size); <|endoftext|> decodes to 0 bytes.

    End-of-text is a separator the token files insert after each document, not text: it counts 0 bytes, as
    in meta.json's byte counts, while its prediction (where a document ends) still counts in the loss.
    Byte-level BPE: a token's vocabulary string has one character per byte, so its length is its bytes;
    a token that ends inside a multi-byte character still counts the bytes it holds. Char tokenizer: each
    character's UTF-8 length; the unknown id counts the 3 bytes of the U+FFFD it decodes to, which the
    character it replaced may not have had.
    """
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    if tokenizer.kind == "char":
        for i in range(tokenizer.vocab_size):
            # surrogatepass: a lone surrogate in the training text is a character of the vocabulary too
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8", errors="surrogatepass"))
    elif tokenizer.kind == "bpe":
        data = json.loads(tokenizer.to_json())
        decoder = (data.get("decoder") or {}).get("type")
        if decoder != "ByteLevel":
            raise DataIntegrityError(f"BPE tokenizer: decoder {decoder!r} is not ByteLevel, so its bytes are unknown")
        for token, i in data["model"]["vocab"].items():
            if not set(token) <= _BYTE_LEVEL_ALPHABET:
                raise DataIntegrityError(f"BPE tokenizer: token {token!r} (id {i}) is not byte-level")
            lengths[i] = len(token)
        for added in data.get("added_tokens", []):
            # Special tokens (end-of-text) are not text; other added tokens decode to their content as is.
            lengths[added["id"]] = 0 if added.get("special") else len(added["content"].encode("utf-8"))
    else:
        raise DataIntegrityError(f"no byte lengths for a {tokenizer.kind!r} tokenizer")
    lengths[tokenizer.eot_id] = 0
    return lengths


def target_bytes(tokens: np.ndarray, max_tokens: int | None, byte_lengths: np.ndarray) -> int:
    """UTF-8 bytes of the targets `eval_loss` scores on the first `max_tokens` tokens (`token_byte_lengths`)."""
    counts = token_counts(scored_targets(tokens, max_tokens), len(byte_lengths))
    return int(counts @ byte_lengths)


def token_counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """How often each id occurs in `tokens` (int64, length vocab_size), counted in bounded chunks."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), _COUNT_CHUNK):
        chunk = np.asarray(tokens[start : start + _COUNT_CHUNK])
        if chunk.size and int(chunk.max()) >= vocab_size:
            raise DataIntegrityError(f"token id {int(chunk.max())} is outside the vocabulary of {vocab_size}")
        counts += np.bincount(chunk, minlength=vocab_size)
    return counts


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int, max_tokens: int | None) -> float:
    """Cross-entropy (nats) of add-one-smoothed train token frequencies on the targets `eval_loss` scores.

    The baseline a language model must beat clearly: it knows how common each token is and nothing of
    context. Add-one (Laplace) smoothing gives ids unseen in training a finite loss.
    """
    # The same targets as eval_loss: every evaluated token but the first.
    targets = token_counts(scored_targets(val_tokens, max_tokens), vocab_size)
    counts = token_counts(train_tokens, vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts) - np.log(counts.sum())  # (vocab,)
    return float(-(targets * log_probs).sum() / targets.sum())

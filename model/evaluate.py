"""Deterministic evaluation numbers: next-token loss, perplexity, bits per byte, a unigram baseline.

Every number here is a function of the model and the token files alone (no sampling), so two evaluations
of the same model on the same tokens agree to the last digit on the same device.
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from storage.errors import DataIntegrityError

_COUNT_CHUNK = 1 << 24  # tokens per bincount call: bounded memory however large train.bin is


def eval_windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """(start, length) of non-overlapping input windows covering tokens[0 : n_tokens - 1].

    Window w predicts tokens[start + 1 : start + length + 1], so every token but the first is a target
    exactly once; the last window is shorter when block_size does not divide n_tokens - 1.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    targets = n_tokens - 1
    return [(start, min(block_size, targets - start)) for start in range(0, max(targets, 0), block_size)]


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    tokens: np.ndarray,
    block_size: int,
    batch_size: int,
    max_tokens: int | None,
    device: str | torch.device = "cpu",
) -> float:
    """Mean next-token cross-entropy (nats) over the first `max_tokens` tokens (all when None).

    The tokens are cut into fixed non-overlapping windows of `block_size`; the mean is over tokens, not
    windows, so a short last window weighs what its tokens weigh.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if n < 2:
        raise DataIntegrityError(f"evaluation needs at least 2 tokens, got {n}")
    data = torch.from_numpy(np.asarray(tokens[:n], dtype=np.int64))  # (n,)
    was_training = model.training
    model.eval()
    total = 0.0
    windows = eval_windows(n, block_size)
    try:
        # Windows of one length are batched together; only the last one can be shorter.
        for length in sorted({length for _, length in windows}, reverse=True):
            starts = [start for start, w_len in windows if w_len == length]
            for i in range(0, len(starts), batch_size):
                batch = starts[i : i + batch_size]
                x = torch.stack([data[s : s + length] for s in batch]).to(device)  # (B, T)
                y = torch.stack([data[s + 1 : s + length + 1] for s in batch]).to(device)  # (B, T)
                logits, _ = model(x, y)  # (B, T, vocab)
                total += F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)).float(),  # (B*T, vocab)
                    y.reshape(-1),  # (B*T,)
                    reduction="sum",
                ).item()
    finally:
        model.train(was_training)
    return total / (n - 1)


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged model reports inf instead of raising OverflowError."""
    return math.exp(loss) if loss < 700 else math.inf


def bits_per_byte(loss: float, n_tokens: int, n_bytes: int) -> float:
    """Convert a per-token loss in nats to bits per byte of the original UTF-8 text.

    A loss per token depends on the tokenizer (a BPE token covers several bytes, a character one or a few),
    so it cannot compare models with different vocabularies. The text's information is the same whatever
    the tokenizer: total bits = loss / ln 2 per token * number of tokens, and dividing by the number of
    bytes those tokens encode gives bits per byte. Multiplying by tokens/bytes turns "per token" into
    "per byte"; with the corpus' counts, it uses the average bytes per token of that split.
    """
    if n_tokens <= 0 or n_bytes <= 0:
        raise DataIntegrityError(f"bits per byte needs positive token and byte counts, got {n_tokens} and {n_bytes}")
    return loss / math.log(2) * (n_tokens / n_bytes)


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
    n = len(val_tokens) if max_tokens is None else min(len(val_tokens), max_tokens)
    if n < 2:
        raise DataIntegrityError(f"evaluation needs at least 2 tokens, got {n}")
    counts = token_counts(train_tokens, vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts) - np.log(counts.sum())  # (vocab,)
    # The same targets as eval_loss: every evaluated token but the first.
    targets = token_counts(val_tokens[1:n], vocab_size)
    return float(-(targets * log_probs).sum() / (n - 1))

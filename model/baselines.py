"""Count baselines a language model must beat: unigram and bigram next-token losses, in nats and bits per byte.

Both score exactly the targets `model.evaluate.eval_loss` scores (`scored_targets`: the first `max_tokens`
tokens of the split are read and every one but the first is predicted), and their bits per byte divide by
the same bytes (`target_bytes`), so a baseline's numbers sit in one table with a model's.

The bigram (`fit_bigram`) interpolates the maximum-likelihood bigram with the add-one unigram of
`model.evaluate.unigram_loss` (Jelinek-Mercer smoothing; Chen & Goodman 1998, "An Empirical Study of
Smoothing Techniques for Language Modeling", section 2.3):

    P(next | prev) = lam(prev) * c(prev, next) / c(prev) + (1 - lam(prev)) * P_add1(next)

Why this smoothing:
- Every probability stays positive (the unigram part is add-one), and a context never seen in training backs
  off to exactly the unigram baseline (lam = 0), so the bigram can only gain on the unigram where its
  training counts say something.
- Add-k on the bigram counts themselves would give each context's unseen successors k / (c(prev) + k V) of
  the mass: with V = 50K most of a rare context's probability goes to successors never seen (Gale & Church
  1994 show add-one is poor for bigrams), and k would have to be tuned on something anyway.
- lam is fitted on a held-out slice of the training split (the last `heldout_fraction` of its tokens),
  never on validation: fitted on the counts' own text it would be 1 (the maximum-likelihood bigram always
  fits the text it was counted on best); fitted on validation the baseline would have seen the answers.
  The weights maximise the held-out slice's likelihood (the log-likelihood is concave in lam: bisection on
  its slope finds the maximum exactly), and the counts are then re-taken over the whole training split.
- lam depends on how often the context was seen, in powers-of-two buckets of c(prev), each bucket fitted
  on its own (Chen & Goodman's bucketing of the Jelinek-Mercer weights): a context seen twice deserves
  less trust than one seen a million times. On tokens that carry no information about the next one the
  fitted weights come out near 0 and the bigram scores as the unigram does, not better.

Memory: the counts are sparse (the distinct pairs as sorted int64 keys prev * vocab_size + next, counted
with np.unique in bounded chunks), never a vocab x vocab matrix: for a 50K vocabulary the dense one would
hold 2.5G counts.
"""

from dataclasses import dataclass

import numpy as np

from model.evaluate import bits_per_byte, perplexity, scored_targets, target_bytes, token_counts, tokens_read
from model.evaluate import unigram_loss as _unigram_loss
from storage.errors import DataIntegrityError

_CHUNK = 1 << 24  # tokens per np.unique call: bounded memory however large train.bin is
_BISECTION_STEPS = 60  # halves [0, 1] down to 1e-18: the fitted weight is exact in float64
# A weight of 1 would give a pair never seen in training probability 0 (infinite loss); the largest weight
# kept leaves it at least a millionth of its unigram probability.
_MAX_WEIGHT = 1.0 - 1e-6
DEFAULT_HELDOUT_FRACTION = 0.1  # a tenth of the training tokens fits the weights, the counts keep the rest
# Held-out targets a count bucket needs for a weight of its own: a weight fitted on a handful of pairs that
# all happen to be seen in training would trust the counts almost fully and cost an unseen pair dearly.
MIN_BUCKET_TARGETS = 100


@dataclass(frozen=True)
class BaselineScore:
    """A baseline's numbers on the evaluation's targets, in the units of the evaluate report."""

    name: str
    loss: float  # mean nats per scored target
    perplexity: float
    bits_per_byte: float
    scored_tokens: int  # targets scored: tokens read - 1
    scored_bytes: int  # UTF-8 bytes those targets decode to (end-of-text: 0)


def count_pairs(tokens: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (prev, next) pairs of consecutive tokens as sorted int64 keys prev * vocab_size + next,
    and how often each occurs (int64). Counted chunk by chunk, so memory follows the distinct pairs."""
    keys: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    held = 0
    for start in range(0, max(len(tokens) - 1, 0), _CHUNK):
        # One token of overlap: the pair across two chunks' edge is counted once, in the first.
        chunk = _checked_ids(tokens[start : start + _CHUNK + 1], vocab_size)
        chunk_keys, chunk_counts = np.unique(chunk[:-1] * vocab_size + chunk[1:], return_counts=True)
        keys.append(chunk_keys)
        counts.append(chunk_counts.astype(np.int64))
        held += len(chunk_keys)
        if held > 4 * _CHUNK:  # fold the chunks' tables together before they outgrow the tokens
            merged_keys, merged_counts = merge_pair_counts(keys, counts)
            keys, counts, held = [merged_keys], [merged_counts], len(merged_keys)
    return merge_pair_counts(keys, counts)


def merge_pair_counts(keys: list[np.ndarray], counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sum several (sorted keys, counts) tables into one; integer sums, exact."""
    all_keys = np.concatenate([np.zeros(0, dtype=np.int64), *keys])
    all_counts = np.concatenate([np.zeros(0, dtype=np.int64), *counts])
    if not all_keys.size:
        return all_keys, all_counts
    order = np.argsort(all_keys, kind="stable")
    all_keys, all_counts = all_keys[order], all_counts[order]
    starts = np.flatnonzero(np.r_[True, all_keys[1:] != all_keys[:-1]])
    return all_keys[starts], np.add.reduceat(all_counts, starts)


def lookup_pair_counts(keys: np.ndarray, counts: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The count of each query key in the sorted table (keys, counts); 0 for a key not in it."""
    if not len(keys):
        return np.zeros(len(query), dtype=np.int64)
    position = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[position] == query, counts[position], 0)


def _checked_ids(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    ids = np.asarray(tokens).astype(np.int64)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise DataIntegrityError(f"token id {bad} is outside the vocabulary of {vocab_size}")
    return ids


def _add_one_log_probs(counts: np.ndarray) -> np.ndarray:
    # The same arithmetic as model.evaluate.unigram_loss, so that lam = 0 gives its numbers exactly.
    smoothed = counts.astype(np.float64) + 1.0
    return np.log(smoothed) - np.log(smoothed.sum())  # (vocab,)


def count_buckets(context_counts: np.ndarray, n_buckets: int) -> np.ndarray:
    """Bucket of each context count: 0 for a context never seen, else 1 + floor(log2(count)), the last
    bucket also holding every larger count."""
    counts = np.asarray(context_counts, dtype=np.float64)
    buckets = 1 + np.floor(np.log2(np.maximum(counts, 1.0))).astype(np.int64)
    return np.where(counts > 0, np.clip(buckets, 1, n_buckets - 1), 0)


def fit_weight(ml: np.ndarray, unigram: np.ndarray, weights: np.ndarray) -> float:
    """The lam in [0, _MAX_WEIGHT] that maximises sum(weights * log(lam * ml + (1 - lam) * unigram)).

    The sum is concave in lam, so its slope falls monotonically: 0 when the slope at 0 is not positive (the
    bigram estimates do not help), else the zero of the slope, found by bisection."""
    diff = ml - unigram

    def slope(lam: float) -> float:
        return float(np.sum(weights * diff / (unigram + lam * diff)))

    if not len(diff) or slope(0.0) <= 0.0:
        return 0.0
    if slope(_MAX_WEIGHT) >= 0.0:
        return _MAX_WEIGHT
    low, high = 0.0, _MAX_WEIGHT
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if slope(middle) > 0.0 else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class BigramModel:
    """Interpolated bigram probabilities from sparse counts (module docstring); `fit_bigram` makes one."""

    vocab_size: int
    keys: np.ndarray  # sorted distinct prev * vocab_size + next (int64)
    pair_counts: np.ndarray  # how often each key's pair occurs in training (int64)
    context_counts: np.ndarray  # (vocab,) training pairs that start with each id (int64)
    unigram_log_probs: np.ndarray  # (vocab,) add-one unigram of the training tokens
    weights: np.ndarray  # (n_buckets,) lam per context-count bucket (count_buckets); weights[0] = 0
    # Context counts are bucketed as the fitting slice would have seen them (count * this share), since
    # that is the count each bucket's weight was fitted for.
    count_scale: float = 1.0

    def log_probs(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """log P(nxt | prev) for aligned arrays of ids (float64)."""
        prev = _checked_ids(prev, self.vocab_size)
        nxt = _checked_ids(nxt, self.vocab_size)
        pair = lookup_pair_counts(self.keys, self.pair_counts, prev * self.vocab_size + nxt)
        context = self.context_counts[prev]
        lam = self.weights[count_buckets(context * self.count_scale, len(self.weights))]
        ml = pair / np.maximum(context, 1)
        return np.log(lam * ml + (1.0 - lam) * np.exp(self.unigram_log_probs[nxt]))

    def loss(self, tokens: np.ndarray, max_tokens: int | None) -> float:
        """Mean cross-entropy (nats) on `scored_targets(tokens, max_tokens)`, each predicted from the token
        before it, as `eval_loss` scores a model."""
        n = tokens_read(tokens, max_tokens)
        total = 0.0
        for start in range(0, n - 1, _CHUNK):
            chunk = np.asarray(tokens[start : min(start + _CHUNK + 1, n)])
            total -= float(self.log_probs(chunk[:-1], chunk[1:]).sum())
        return total / (n - 1)


def fit_bigram(
    train_tokens: np.ndarray, vocab_size: int, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
) -> BigramModel:
    """Fit the interpolated bigram on the training split alone: the weights on its last `heldout_fraction`
    of tokens from the counts of the rest, then the counts over all of it (module docstring)."""
    if not 0.0 < heldout_fraction <= 0.5:
        raise ValueError(f"heldout_fraction must be in (0, 0.5], got {heldout_fraction}")
    n = len(train_tokens)
    # The pairs whose target lies in the last `held` tokens fit the weights; the pairs before them count.
    held = max(1, round(n * heldout_fraction))
    cut = n - held
    if cut < 2:
        raise DataIntegrityError(f"a bigram needs at least 3 training tokens to count and to fit on, got {n}")
    fit_keys, fit_counts = count_pairs(train_tokens[:cut], vocab_size)
    held_keys, held_counts = count_pairs(train_tokens[cut - 1 :], vocab_size)
    fit_context = token_counts(train_tokens[: cut - 1], vocab_size)
    fit_unigram = _add_one_log_probs(token_counts(train_tokens[:cut], vocab_size))

    prev, nxt = held_keys // vocab_size, held_keys % vocab_size
    context = fit_context[prev]
    # Buckets 0 (unseen) to 1 + floor(log2(the largest context count)).
    n_buckets = 2 + int(np.log2(max(int(fit_context.max()), 1)))
    bucket = count_buckets(context, n_buckets)
    ml = lookup_pair_counts(fit_keys, fit_counts, held_keys) / np.maximum(context, 1)
    unigram = np.exp(fit_unigram[nxt])
    seen = bucket > 0
    # A bucket with too few held-out targets for a weight of its own takes the one fitted on every seen
    # context together.
    pooled = fit_weight(ml[seen], unigram[seen], held_counts[seen])
    weights = np.full(n_buckets, pooled)
    weights[0] = 0.0  # a context never seen: the unigram alone
    for b in np.unique(bucket[seen]):
        member = bucket == b
        if held_counts[member].sum() >= MIN_BUCKET_TARGETS:
            weights[b] = fit_weight(ml[member], unigram[member], held_counts[member])

    keys, counts = merge_pair_counts([fit_keys, held_keys], [fit_counts, held_counts])
    return BigramModel(
        vocab_size,
        keys,
        counts,
        token_counts(train_tokens[:-1], vocab_size),
        _add_one_log_probs(token_counts(train_tokens, vocab_size)),
        weights,
        count_scale=(cut - 1) / (n - 1),
    )


def _score(
    name: str, loss: float, val_tokens: np.ndarray, max_tokens: int | None, byte_lengths: np.ndarray
) -> BaselineScore:
    n_targets = len(scored_targets(val_tokens, max_tokens))
    n_bytes = target_bytes(val_tokens, max_tokens, byte_lengths)
    return BaselineScore(name, loss, perplexity(loss), bits_per_byte(loss, n_targets, n_bytes), n_targets, n_bytes)


def unigram_baseline(
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    vocab_size: int,
    max_tokens: int | None,
    byte_lengths: np.ndarray,
) -> BaselineScore:
    """`model.evaluate.unigram_loss` with its perplexity and bits per byte (`token_byte_lengths`)."""
    loss = _unigram_loss(train_tokens, val_tokens, vocab_size, max_tokens)
    return _score("unigram", loss, val_tokens, max_tokens, byte_lengths)


def bigram_baseline(
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    vocab_size: int,
    max_tokens: int | None,
    byte_lengths: np.ndarray,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> BaselineScore:
    """The interpolated bigram fitted on `train_tokens` (`fit_bigram`), scored on the targets `eval_loss`
    scores in `val_tokens`: loss per token, perplexity, and bits per byte (`token_byte_lengths`)."""
    model = fit_bigram(train_tokens, vocab_size, heldout_fraction)
    return _score("bigram", model.loss(val_tokens, max_tokens), val_tokens, max_tokens, byte_lengths)

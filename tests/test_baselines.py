"""Count baselines: the bigram on a made-up stream, on i.i.d. tokens, by hand, and in sparse memory."""

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest

import model.baselines as baselines
from model.baselines import bigram_baseline, count_pairs, fit_bigram, fit_weight, unigram_baseline
from model.evaluate import bits_per_byte, target_bytes, unigram_loss
from storage.errors import DataIntegrityError


def function_stream(n: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """Tokens in which the next one is a fixed function of the previous one: one random cycle through every
    id, so each is as frequent as any other."""
    order = np.random.default_rng(seed).permutation(vocab_size)
    successor = np.empty(vocab_size, dtype=np.int64)
    successor[order] = np.roll(order, -1)
    ids = np.empty(n, dtype=np.uint16)
    ids[0] = 0
    for i in range(1, n):
        ids[i] = successor[ids[i - 1]]
    return ids


def test_bigram_loss_is_far_below_unigram_when_the_next_token_is_a_function_of_the_previous() -> None:
    tokens = function_stream(6_000, 40)
    train, val = tokens[:5_000], tokens[5_000:]
    bigram = fit_bigram(train, 40).loss(val, None)
    unigram = unigram_loss(train, val, 40, None)
    assert unigram == pytest.approx(math.log(40), abs=0.01)  # the unigram knows nothing of context
    assert bigram < 0.01  # the previous token tells the next one


def test_bigram_is_no_better_than_unigram_on_iid_tokens() -> None:
    # Nothing in the previous token tells the next: a bigram that beat the unigram here would be scoring
    # noise in its counts as knowledge. The weights fitted on held-out training tokens say so.
    rng = np.random.default_rng(1)
    train = rng.integers(0, 30, 40_000).astype(np.uint16)
    val = rng.integers(0, 30, 10_000).astype(np.uint16)
    model = fit_bigram(train, 30)
    bigram = model.loss(val, None)
    unigram = unigram_loss(train, val, 30, None)
    assert unigram - 0.005 <= bigram <= unigram + 0.01
    assert model.weights.max() < 0.2


def test_bigram_equals_a_hand_computation() -> None:
    # train = 0 1 0 1 | 0 2: the last third (targets 0, 2) fits the weight, from the counts of 0 1 0 1:
    #   pair (1, 0): ML 1/1, add-one unigram P(0) = 3/8;  pair (0, 2): ML 0/2, P(2) = 1/8
    #   d/dlam [log(3/8 + 5/8 lam) + log(1/8 (1 - lam))] = 5 / (3 + 5 lam) - 1 / (1 - lam) = 0  =>  lam = 1/5
    # Counts over all of train: c(0,1) = 2, c(1,0) = 2, c(0,2) = 1; c(0) = 3, c(1) = 2; unigram 4,3,2,1 / 10.
    train = np.array([0, 1, 0, 1, 0, 2], dtype=np.uint16)
    model = fit_bigram(train, 4, heldout_fraction=1 / 3)
    assert model.weights[0] == 0.0  # a context never seen: the unigram alone
    assert model.weights[1:] == pytest.approx(0.2, abs=1e-12)
    val = np.array([1, 0, 3, 0], dtype=np.uint16)
    p_0_after_1 = 0.2 * 2 / 2 + 0.8 * 4 / 10
    p_3_after_0 = 0.2 * 0 / 3 + 0.8 * 1 / 10
    p_0_after_3 = 4 / 10  # 3 never starts a training pair
    expected = -(math.log(p_0_after_1) + math.log(p_3_after_0) + math.log(p_0_after_3)) / 3
    assert model.loss(val, None) == pytest.approx(expected, rel=1e-12)
    assert model.loss(val, 3) == pytest.approx(-(math.log(p_0_after_1) + math.log(p_3_after_0)) / 2, rel=1e-12)


def test_fitted_weight_is_the_likelihood_maximum() -> None:
    # log(lam + (1 - lam) / 4) + log((1 - lam) / 4) peaks where 0.75 (1 - lam) = 0.25 + 0.75 lam: lam = 1/3.
    assert fit_weight(np.array([1.0, 0.0]), np.array([0.25, 0.25]), np.array([1, 1])) == pytest.approx(1 / 3)
    # Estimates worse than the unigram everywhere: no weight at all.
    assert fit_weight(np.array([0.0, 0.1]), np.array([0.25, 0.25]), np.array([3, 1])) == 0.0


def test_bigram_with_no_weight_scores_exactly_the_unigrams_targets() -> None:
    # Weights of 0 make the bigram the add-one unigram: the same targets (every read token but the first,
    # max_tokens honoured) give the very number model.evaluate.unigram_loss reports.
    rng = np.random.default_rng(2)
    train = rng.integers(0, 17, 3_000).astype(np.uint16)
    val = rng.integers(0, 17, 900).astype(np.uint16)
    model = fit_bigram(train, 17)
    unigram_only = dataclasses.replace(model, weights=np.zeros_like(model.weights))
    for max_tokens in (None, 2, 500):
        assert unigram_only.loss(val, max_tokens) == pytest.approx(unigram_loss(train, val, 17, max_tokens), rel=1e-12)


def test_baseline_scores_count_the_bytes_of_the_scored_targets() -> None:
    tokens = function_stream(3_000, 12)
    train, val = tokens[:2_000], tokens[2_000:]
    byte_lengths = np.arange(12) % 3 + 1  # ids of 1, 2 and 3 bytes: a per-token ratio would be wrong
    byte_lengths[0] = 0  # the end-of-text id counts no bytes
    for score, loss in (
        (bigram_baseline(train, val, 12, 700, byte_lengths), fit_bigram(train, 12).loss(val, 700)),
        (unigram_baseline(train, val, 12, 700, byte_lengths), unigram_loss(train, val, 12, 700)),
    ):
        assert score.loss == loss
        assert (score.scored_tokens, score.scored_bytes) == (699, target_bytes(val, 700, byte_lengths))
        assert score.bits_per_byte == bits_per_byte(loss, 699, score.scored_bytes)
        assert score.perplexity == pytest.approx(math.exp(loss))
    assert bigram_baseline(train, val, 12, 700, byte_lengths).bits_per_byte < 0.01


def test_counts_are_sparse_for_a_50k_vocabulary() -> None:
    # A dense 50,257 x 50,257 table of int64 counts would take 20 GB; the sparse one holds the pairs seen.
    rng = np.random.default_rng(3)
    train = (rng.zipf(1.3, 200_000) % 50_257).astype(np.uint16)
    model = fit_bigram(train, 50_257)
    held = sum(a.nbytes for a in (model.keys, model.pair_counts, model.context_counts, model.unigram_log_probs))
    assert held < 8 * 1024 * 1024
    assert len(model.keys) <= len(train) - 1
    assert np.isfinite(model.loss(train[-1_000:], None))


def test_pairs_across_chunk_edges_are_counted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = np.random.default_rng(4).integers(0, 5, 100).astype(np.uint16)
    expected = Counter(zip(tokens[:-1].tolist(), tokens[1:].tolist(), strict=True))
    whole = fit_bigram(tokens, 5).loss(tokens, None)
    monkeypatch.setattr(baselines, "_CHUNK", 7)  # 100 tokens in chunks of 7: many edges
    keys, counts = count_pairs(tokens, 5)
    assert {(int(k) // 5, int(k) % 5): int(c) for k, c in zip(keys, counts, strict=True)} == expected
    assert fit_bigram(tokens, 5).loss(tokens, None) == pytest.approx(whole, rel=1e-12)


def test_bad_input_is_named() -> None:
    with pytest.raises(DataIntegrityError, match="token id 9 is outside the vocabulary of 5"):
        fit_bigram(np.array([0, 1, 9, 2, 3, 4], dtype=np.uint16), 5)
    with pytest.raises(DataIntegrityError, match="at least 3 training tokens"):
        fit_bigram(np.array([0, 1], dtype=np.uint16), 5)
    with pytest.raises(ValueError, match="heldout_fraction"):
        fit_bigram(np.arange(10, dtype=np.uint16), 10, heldout_fraction=0.9)

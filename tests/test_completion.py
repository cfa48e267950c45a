"""The completion suite, the continuation scoring under it, and next-token accuracy."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.completion import (
    CompletionSuiteConfig,
    build_completion_suite,
    documents_from_tokens,
    encode_request,
    evaluate_suite,
    next_token_accuracy,
    score_continuations,
    score_windows,
)
from model.evaluate import eval_loss
from model.gpt import GPT, GPTConfig
from model.tokenizer import Tokenizer, train_bpe, train_char
from storage.errors import DataIntegrityError

# Tiny models run faster on one thread than on two contending ones.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_SUITE = CompletionSuiteConfig(ending_words=4, min_prefix_words=2, max_items=100)


def chain_documents(n_docs: int = 40, n_words: int = 30, seed: int = 0) -> list[str]:
    """Documents of made-up words in which each word is always followed by the same next word (one cycle
    through them all); each document starts at a random word: six sentences of nine words. A model that
    learned the word order knows how any sentence ends; another document's ending starts elsewhere."""
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while len(words) < n_words:
        word = "".join(rng.choice(list("abcdefghijklmnoprstuvw"), rng.integers(3, 7)))
        if word not in words:
            words.append(word)
    successor = {words[i]: words[(i + 1) % n_words] for i in range(n_words)}
    documents = []
    for _ in range(n_docs):
        word, sentences = words[rng.integers(n_words)], []
        for _ in range(6):
            sentence = []
            for _ in range(9):
                sentence.append(word)
                word = successor[word]
            sentences.append(" ".join(sentence).capitalize() + ".")
        documents.append(" ".join(sentences))
    return documents


def token_stream(documents: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """The documents as the token files hold them: each one's ids, then end-of-text."""
    return np.array([i for doc in documents for i in [*tokenizer.encode(doc), tokenizer.eot_id]])


class CountBigram(nn.Module):
    """A model that knows the text: next-token log-probabilities from the bigram counts of a token stream."""

    def __init__(self, tokens: np.ndarray, vocab_size: int) -> None:
        super().__init__()
        counts = torch.full((vocab_size, vocab_size), 0.01)
        counts.index_put_((torch.as_tensor(tokens[:-1]), torch.as_tensor(tokens[1:])), torch.tensor(1.0), True)
        self.register_buffer("log_probs", counts.log() - counts.sum(1, keepdim=True).log())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return self.log_probs[idx], None  # (B, T, vocab)


def squeeze(text: str) -> str:
    return " ".join(text.split())


def random_gpt(vocab_size: int = 40, block_size: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32)).eval()


@torch.no_grad()
def direct_log_likelihood(model: GPT, context: list[int], continuation: list[int]) -> float:
    """One plain forward of the last block_size + 1 tokens, summing the continuation's log-probabilities."""
    sequence = (context + continuation)[-(model.config.block_size + 1) :]
    x = torch.tensor([sequence[:-1]])  # (1, T)
    logits, _ = model(x, x)  # (1, T, vocab)
    log_probs = F.log_softmax(logits[0].double(), dim=-1)  # (T, vocab)
    first = len(sequence) - 1 - len(continuation)  # position whose prediction is the first continuation token
    return float(sum(log_probs[first + i, t] for i, t in enumerate(continuation)))


# -- the suite --------------------------------------------------------------------------------------------


def test_the_suite_is_deterministic_for_a_seed() -> None:
    documents = chain_documents()
    first = build_completion_suite(documents, SMALL_SUITE)
    assert build_completion_suite(documents, SMALL_SUITE) == first
    other = build_completion_suite(documents, SMALL_SUITE.model_copy(update={"seed": 7}))
    assert other != first
    assert len(first.items) == 100 and first.n_choices == 4 and first.chance == 0.25
    # The true ending is not always in one place: a model cannot win by position.
    assert len({item.label for item in first.items}) == 4


def test_candidates_are_endings_of_other_documents_never_the_true_one() -> None:
    documents = chain_documents()
    suite = build_completion_suite(documents, SMALL_SUITE)
    for item in suite.items:
        true_ending = item.endings[item.label]
        # The true ending is the document's own text after the context.
        assert squeeze(item.context + true_ending) in squeeze(documents[item.document])
        distractors = [e for i, e in enumerate(item.endings) if i != item.label]
        assert true_ending not in distractors
        assert len(set(distractors)) == len(distractors) == 3
        for ending in item.endings:
            assert ending.startswith(" ") and len(ending.split()) == 4 and ending.endswith(".")
        for ending in distractors:
            assert any(squeeze(ending) in squeeze(doc) for d, doc in enumerate(documents) if d != item.document)


def test_distractors_are_of_similar_length() -> None:
    # Half the documents use one-letter words, half ten-letter ones: an ending's distractors come from its
    # own half, so that the summed log-likelihood cannot pick the true ending by its length.
    rng = np.random.default_rng(0)
    short = [" ".join(rng.choice(list("abcdefgh"), 8)) + "." for _ in range(10)]
    long = [" ".join("".join(rng.choice(list("abcdefgh"), 10)) for _ in range(8)) + "." for _ in range(10)]
    suite = build_completion_suite(short + long, CompletionSuiteConfig(n_choices=3, ending_words=4, min_prefix_words=2))
    assert len(suite.items) == 20
    for item in suite.items:
        lengths = [len(ending) for ending in item.endings]
        assert max(lengths) - min(lengths) <= 2, item


def test_a_model_that_knows_the_text_beats_chance_clearly() -> None:
    documents = chain_documents()
    tokenizer = train_bpe(documents, 600)  # each made-up word becomes one token
    suite = build_completion_suite(documents, SMALL_SUITE)
    knows = CountBigram(token_stream(documents, tokenizer), tokenizer.vocab_size)
    result = evaluate_suite(knows, tokenizer, suite, block_size=64, batch_size=16)
    assert (result.items, result.n_choices, result.chance) == (100, 4, 0.25)
    assert result.accuracy >= 0.9 and result.accuracy_norm >= 0.9
    # The same kind of model, counted on another text's word order, is no better than chance.
    other = chain_documents(seed=1)
    guesses = CountBigram(token_stream(other, tokenizer), tokenizer.vocab_size)
    assert evaluate_suite(guesses, tokenizer, suite, block_size=64, batch_size=16).accuracy < 0.45


def test_accuracies_follow_the_summed_and_the_per_character_scores() -> None:
    documents = chain_documents()
    tokenizer = train_char(documents)
    suite = build_completion_suite(documents, SMALL_SUITE.model_copy(update={"max_items": 30}))
    result = evaluate_suite(random_gpt(tokenizer.vocab_size, 32), tokenizer, suite, block_size=32, batch_size=8)
    lls = np.array(result.log_likelihoods)
    labels = [item.label for item in suite.items]
    chars = np.array([[len(e) for e in item.endings] for item in suite.items])
    assert result.accuracy == np.mean(lls.argmax(1) == labels)
    assert result.accuracy_norm == np.mean((lls / chars).argmax(1) == labels)
    request = encode_request(tokenizer, suite.items[0].context, suite.items[0].endings[1])
    assert lls[0, 1] == pytest.approx(direct_log_likelihood(random_gpt(tokenizer.vocab_size, 32), *request), abs=1e-4)


def test_too_little_text_is_named() -> None:
    with pytest.raises(DataIntegrityError, match="no sentence of 6\\+ words in the 1 documents"):
        build_completion_suite(["Too short."], SMALL_SUITE)
    # One document: no other document to take distractors from.
    with pytest.raises(DataIntegrityError, match="too few distinct sentence endings"):
        build_completion_suite(chain_documents(n_docs=1), SMALL_SUITE)


def test_documents_are_read_back_from_a_token_file() -> None:
    tokenizer = train_char(["the cat sat", "a dog ran"])
    eot = tokenizer.eot_id
    ids = [*tokenizer.encode("the cat"), eot, eot, *tokenizer.encode("a dog"), eot, *tokenizer.encode("sat")]
    assert documents_from_tokens(np.array(ids, dtype=np.uint16), tokenizer) == ["the cat", "a dog"]
    assert documents_from_tokens(np.array(ids, dtype=np.uint16), tokenizer, max_docs=1) == ["the cat"]


# -- scoring ----------------------------------------------------------------------------------------------


def test_requests_move_the_contexts_trailing_space_to_the_continuation() -> None:
    tokenizer = train_bpe(["the cat sat on the mat"] * 20, 300)
    assert encode_request(tokenizer, "the cat ", "sat") == (tokenizer.encode("the cat"), tokenizer.encode(" sat"))
    # An empty context is end-of-text, the token before every document.
    assert encode_request(tokenizer, "", "the") == ([tokenizer.eot_id], tokenizer.encode("the"))


def test_scores_equal_a_direct_forward_of_the_model() -> None:
    model = random_gpt()
    rng = np.random.default_rng(0)
    fits = (rng.integers(0, 40, 5).tolist(), rng.integers(0, 40, 3).tolist())
    too_long = (rng.integers(0, 40, 30).tolist(), rng.integers(0, 40, 4).tolist())  # cut from the left
    scores = score_continuations(model, [fits, too_long], block_size=16, batch_size=2)
    for score, (context, continuation) in zip(scores, [fits, too_long], strict=True):
        assert score.log_likelihood == pytest.approx(direct_log_likelihood(model, context, continuation), abs=1e-4)
        assert score.n_tokens == len(continuation)


def test_a_candidate_scores_the_same_alone_and_in_a_batch() -> None:
    model = random_gpt()
    rng = np.random.default_rng(1)
    requests = [
        (rng.integers(0, 40, int(n_context)).tolist(), rng.integers(0, 40, int(n_continuation)).tolist())
        for n_context, n_continuation in [(1, 1), (3, 7), (12, 2), (25, 5), (2, 40), (9, 9), (1, 16)]
    ]
    batched = score_continuations(model, requests, block_size=16, batch_size=7)
    for request, in_batch in zip(requests, batched, strict=True):
        (alone,) = score_continuations(model, [request], block_size=16, batch_size=1)
        assert alone.log_likelihood == pytest.approx(in_batch.log_likelihood, abs=1e-5)
        assert alone.greedy == in_batch.greedy


def test_a_continuation_longer_than_the_context_is_scored_once_per_token() -> None:
    # 48 tokens after end-of-text, context 16: three windows, which are eval_loss's windows over the same
    # 49 tokens, so the summed log-likelihood is minus its mean loss times the 48 targets.
    model = random_gpt()
    tokens = np.random.default_rng(2).integers(0, 39, 48).tolist()
    (score,) = score_continuations(model, [([39], tokens)], block_size=16, batch_size=2)
    expected = -eval_loss(model, np.array([39, *tokens]), 16, 4, None) * 48
    assert score.log_likelihood == pytest.approx(expected, rel=1e-5)


def test_windows_are_the_rolling_windows_of_lm_evaluation_harness() -> None:
    # Its documented example: tokens 0..9 after a prefix token, context 4: inputs (BOS 0 1 2), (3 4 5 6) and
    # (5 6 7 8), the last scoring only its predictions of 8 and 9. In sequence positions (BOS is 0):
    assert score_windows(1, 10, 4) == [(0, 4, 4), (4, 8, 4), (6, 10, 2)]
    assert score_windows(3, 2, 8) == [(0, 4, 2)]
    assert score_windows(30, 2, 8) == [(23, 31, 2)]  # a long context is cut from the left
    assert score_windows(3, 0, 8) == []


def test_greedy_says_whether_the_top_choice_is_the_continuation() -> None:
    tokens = np.array([0, 1, 2, 3] * 10)
    model = CountBigram(tokens, 4)  # 0 -> 1 -> 2 -> 3 -> 0
    predicted, other = score_continuations(model, [([0], [1, 2, 3]), ([0], [1, 3])], block_size=8, batch_size=2)
    assert predicted.greedy and not other.greedy
    assert predicted.log_likelihood > other.log_likelihood


def test_next_token_accuracy_equals_a_hand_count() -> None:
    tokens = np.random.default_rng(3).integers(0, 6, 101)
    tokens[50:] = np.array([0, 1, 2, 3, 4, 5] * 9)[:51]  # half the stream follows the counted order
    model = CountBigram(np.array([0, 1, 2, 3, 4, 5] * 5), 6)  # predicts id + 1 (mod 6)
    model.train()
    for max_tokens in (None, 60):
        n = len(tokens) if max_tokens is None else max_tokens
        expected = np.mean((tokens[: n - 1] + 1) % 6 == tokens[1:n])
        assert next_token_accuracy(model, tokens, 7, 3, max_tokens) == pytest.approx(expected)
    assert model.training  # evaluated in eval mode, handed back as it came

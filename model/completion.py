"""Evaluation beyond the loss: a HellaSwag-style completion suite built from held-out documents, the
log-likelihood scoring it (and the lm-evaluation-harness adapter) rests on, and next-token accuracy.

The completion suite (`build_completion_suite`, HellaSwag: Zellers et al. 2019): from each chosen sentence
of a held-out document, its last `ending_words` words are the true ending and the document's text before
them (at most `max_context_chars` characters) is the context. The other `n_choices - 1` candidates are
sentence endings of other documents, of as many words and similar lengths in characters (within 20%
where there are enough, so that length says little), drawn with a seeded generator: the same documents
and seed give the same suite. Every ending is its words joined by single spaces after one leading space;
no distractor equals the true ending.

A model picks the candidate it gives the highest log-likelihood given the context (`evaluate_suite`), as
lm-evaluation-harness scores multiple choice:
- `accuracy`: by the summed log-likelihood of the ending's tokens;
- `accuracy_norm`: by that sum divided by the ending's characters (its leading space included), which is
  lm-evaluation-harness's `acc_norm` for a task whose choices are these endings (target_delimiter "").
Chance is 1 / n_choices. Summed log-likelihoods favour short endings; the distractors' matched lengths and
the normalised accuracy are the two guards against that.

Scoring (`score_continuations`): the context and the continuation are tokenized separately
(`encode_request`: whitespace that ends the context moves to the continuation, as lm-evaluation-harness
asks, and an empty context is the end-of-text token that precedes every document in the token files), and
only the continuation's tokens are scored. A sequence longer than the model's context is cut from the
left; a continuation longer than the context is scored in windows (`score_windows`), each token predicted
once. Windows are batched with right padding: causal attention keeps padding from reaching any scored
position, so a candidate scores the same alone or in a batch, to float rounding.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from model.evaluate import tokens_read, window_logits
from model.tokenizer import Tokenizer
from storage.errors import DataIntegrityError

# A sentence ends at ., ! or ? followed by whitespace, or at a blank line (a heading, a list item).
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_WORD = re.compile(r"\S+")
_SPACE = re.compile(r"\s")
# Distractors are drawn among the 10 * (N - 1) endings closest in length that are within 20% of the true
# ending's characters (the N - 1 closest, however far, when there are not that many).
_NEAREST_PER_DISTRACTOR = 10
_LENGTH_TOLERANCE = 0.2
_SAME_DOCUMENT = np.iinfo(np.int64).max  # the distance that rules an ending out


class CompletionSuiteConfig(BaseModel):
    """How the completion suite is cut from held-out documents."""

    model_config = ConfigDict(extra="forbid")

    n_choices: int = Field(4, ge=2, le=64, description="Candidate endings per item (HellaSwag has 4); chance is 1/N.")
    ending_words: int = Field(
        6,
        ge=1,
        le=64,
        description="Words in each ending: a sentence's last words. Six (about 35 characters) leaves most of "
        "the tiny preset's 128-character context to the context itself.",
    )
    min_prefix_words: int = Field(
        4, ge=1, le=256, description="A sentence needs at least this many words before its ending to be an item."
    )
    max_items: int = Field(
        500,
        ge=1,
        le=1_000_000,
        description="At most this many items (sentences drawn with the seed); 500 x 4 candidates take seconds "
        "for the tiny preset on 2 CPU cores, and give accuracy a standard error of about 2 points.",
    )
    max_context_chars: int = Field(
        4096,
        ge=16,
        le=1_000_000,
        description="Characters of the document kept before the ending: about the gpt2 preset's 1024-token "
        "context at 4 characters per token; the model itself keeps the last block_size tokens.",
    )
    seed: int = Field(1337, ge=0, le=2**63 - 1, description="Seed of the item and distractor draws (nanoGPT's).")


@dataclass(frozen=True)
class CompletionItem:
    context: str  # the document before the ending, no trailing whitespace
    endings: tuple[str, ...]  # the candidates, each " " + words
    label: int  # index of the true ending in `endings`
    document: int  # index of the document the item was cut from


@dataclass(frozen=True)
class CompletionSuite:
    items: tuple[CompletionItem, ...]
    n_choices: int
    seed: int

    @property
    def chance(self) -> float:
        return 1.0 / self.n_choices

    def records(self) -> list[dict[str, object]]:
        """The items as JSON-ready rows {"context", "endings", "label"}: an lm-evaluation-harness dataset."""
        return [{"context": i.context, "endings": list(i.endings), "label": i.label} for i in self.items]


@dataclass(frozen=True)
class CompletionResult:
    items: int  # the suite's size
    n_choices: int
    chance: float  # 1 / n_choices
    accuracy: float  # the true ending has the highest summed log-likelihood
    accuracy_norm: float  # ... the highest log-likelihood per character
    log_likelihoods: tuple[tuple[float, ...], ...]  # per item, per candidate: summed log-likelihood (nats)


@dataclass(frozen=True)
class ContinuationScore:
    log_likelihood: float  # sum of log P(token | everything before it) over the continuation's tokens (nats)
    n_tokens: int
    greedy: bool  # every continuation token is the model's top-1 prediction


# -- the suite --------------------------------------------------------------------------------------------


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for match in _SENTENCE_BREAK.finditer(text):
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    return spans


def _candidates(documents: Sequence[str], cfg: CompletionSuiteConfig) -> list[tuple[int, int, str]]:
    """(document, character offset where the ending starts, ending) of every sentence long enough."""
    found = []
    for doc, text in enumerate(documents):
        for start, end in _sentence_spans(text):
            words = list(_WORD.finditer(text, start, end))
            if len(words) >= cfg.ending_words + cfg.min_prefix_words:
                ending = words[-cfg.ending_words :]
                found.append((doc, ending[0].start(), " " + " ".join(w.group() for w in ending)))
    return found


def _context(text: str, ending_start: int, max_chars: int) -> str:
    begin = max(0, ending_start - max_chars)
    if begin > 0:  # start at a word, not inside one
        space = _SPACE.search(text, begin, ending_start)
        begin = space.end() if space else begin
    return text[begin:ending_start].rstrip()


def build_completion_suite(documents: Sequence[str], cfg: CompletionSuiteConfig | None = None) -> CompletionSuite:
    """The completion suite of `documents` (held-out text: the validation split's documents), as the
    module docstring describes; deterministic for a seed."""
    cfg = cfg or CompletionSuiteConfig()
    candidates = _candidates(documents, cfg)
    if not candidates:
        raise DataIntegrityError(
            f"no sentence of {cfg.ending_words + cfg.min_prefix_words}+ words in the {len(documents)} documents: "
            "no completion item can be cut"
        )
    rng = np.random.default_rng(cfg.seed)
    picked = np.arange(len(candidates))
    if len(candidates) > cfg.max_items:
        picked = np.sort(rng.choice(len(candidates), cfg.max_items, replace=False))
    docs = np.array([doc for doc, _, _ in candidates])
    lengths = np.array([len(ending) for _, _, ending in candidates])
    endings = [ending for _, _, ending in candidates]
    need = cfg.n_choices - 1
    items = []
    for index in picked:
        doc, start, true_ending = candidates[index]
        # Other documents' endings, nearest in length first (ties: in document order).
        distance = np.where(docs != doc, np.abs(lengths - len(true_ending)), _SAME_DOCUMENT)
        nearest: list[str] = []
        for j in np.argsort(distance, kind="stable"):
            if distance[j] == _SAME_DOCUMENT:
                break
            if len(nearest) >= need and (
                len(nearest) == need * _NEAREST_PER_DISTRACTOR or distance[j] > _LENGTH_TOLERANCE * len(true_ending)
            ):
                break
            if endings[j] != true_ending and endings[j] not in nearest:
                nearest.append(endings[j])
        if len(nearest) < need:
            continue  # too few other documents' endings for this item's candidates
        chosen = [nearest[j] for j in rng.choice(len(nearest), need, replace=False)]
        label = int(rng.integers(cfg.n_choices))
        choices = tuple(chosen[:label] + [true_ending] + chosen[label:])
        items.append(CompletionItem(_context(documents[doc], start, cfg.max_context_chars), choices, label, doc))
    if not items:
        raise DataIntegrityError(
            f"the {len(documents)} documents have too few distinct sentence endings for {cfg.n_choices} "
            "candidates per item"
        )
    return CompletionSuite(tuple(items), cfg.n_choices, cfg.seed)


def documents_from_tokens(tokens: np.ndarray, tokenizer: Tokenizer, max_docs: int | None = None) -> list[str]:
    """The text of the complete documents in a token file's ids (each followed by end-of-text), in order;
    the first `max_docs` of them (all when None). Byte-level BPE decodes to the document's text exactly; the
    char tokenizer shows a character it never saw in training as U+FFFD."""
    ends = np.flatnonzero(np.asarray(tokens) == tokenizer.eot_id)
    documents, start = [], 0
    for end in ends:
        if end > start:
            documents.append(tokenizer.decode(np.asarray(tokens[start:end]).tolist()))
            if max_docs is not None and len(documents) == max_docs:
                break
        start = end + 1
    return documents


# -- scoring ----------------------------------------------------------------------------------------------


def encode_request(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), tokenized separately. Whitespace that ends the context moves to the
    continuation (lm-evaluation-harness: word-boundary spaces belong to the continuation, where a byte-level
    BPE joins them to the word after); an empty context is the end-of-text id, the token before every
    document in the token files."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    return tokenizer.encode(stripped) or [tokenizer.eot_id], tokenizer.encode(continuation)


def score_windows(n_context: int, n_continuation: int, block_size: int) -> list[tuple[int, int, int]]:
    """(input start, input end, scored) windows over sequence = context + continuation that predict each
    continuation token once: the window's input is sequence[start:end], and its last `scored` predictions
    are of continuation tokens. Each window takes as much context before its tokens as block_size allows:
    lm-evaluation-harness's rolling windows (`get_rolling_token_windows`) when the context is one token."""
    if n_context < 1:
        raise ValueError("a continuation needs at least one context token to be predicted from")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = n_context + n_continuation
    windows = []
    for first in range(n_context, n, block_size):
        last = min(first + block_size, n)  # predicts sequence[first:last]
        start = max(0, last - 1 - block_size)
        windows.append((start, last - 1, last - first))
    return windows


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    block_size: int,
    batch_size: int,
    device: str | torch.device = "cpu",
) -> list[ContinuationScore]:
    """Log-likelihood of each request's continuation ids given its context ids (module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Every window of every request: (request, input ids, the ids its last predictions are scored against).
    windows: list[tuple[int, list[int], list[int]]] = []
    for r, (context, continuation) in enumerate(requests):
        sequence = [*context, *continuation]
        for start, end, scored in score_windows(len(context), len(continuation), block_size):
            windows.append((r, sequence[start:end], sequence[end - scored + 1 : end + 1]))
    totals = [0.0] * len(requests)
    greedy = [True] * len(requests)
    # Longest first, so that a batch's windows have similar lengths and little padding.
    order = sorted(range(len(windows)), key=lambda w: -len(windows[w][1]))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(order), batch_size):
            batch = [windows[w] for w in order[i : i + batch_size]]
            width = len(batch[0][1])
            # Right padding (id 0): padded positions come after every scored one, which cannot attend to them.
            x = torch.tensor([ids + [0] * (width - len(ids)) for _, ids, _ in batch], device=device)  # (B, T)
            logits, _ = model(x, torch.zeros_like(x))  # (B, T, vocab): targets make the model return all positions
            for row, (r, ids, targets) in enumerate(batch):
                scored = logits[row, len(ids) - len(targets) : len(ids)].float()  # (scored, vocab)
                target = torch.tensor(targets, device=scored.device)  # (scored,)
                log_probs = F.log_softmax(scored, dim=-1).gather(1, target[:, None])[:, 0]  # (scored,)
                totals[r] += float(log_probs.double().sum())
                greedy[r] = greedy[r] and bool((scored.argmax(dim=-1) == target).all())
    finally:
        model.train(was_training)
    return [ContinuationScore(totals[r], len(continuation), greedy[r]) for r, (_, continuation) in enumerate(requests)]


def evaluate_suite(
    model: nn.Module,
    tokenizer: Tokenizer,
    suite: CompletionSuite,
    block_size: int,
    batch_size: int,
    device: str | torch.device = "cpu",
) -> CompletionResult:
    """Accuracy of `model` on the suite: by summed and by per-character log-likelihood (module docstring)."""
    requests = [encode_request(tokenizer, item.context, ending) for item in suite.items for ending in item.endings]
    scores = score_continuations(model, requests, block_size, batch_size, device)
    lls = np.array([s.log_likelihood for s in scores]).reshape(len(suite.items), suite.n_choices)
    chars = np.array([[len(ending) for ending in item.endings] for item in suite.items], dtype=np.float64)
    labels = np.array([item.label for item in suite.items])
    # np.argmax takes the first of equal scores, as lm-evaluation-harness does.
    return CompletionResult(
        items=len(suite.items),
        n_choices=suite.n_choices,
        chance=suite.chance,
        accuracy=float(np.mean(lls.argmax(axis=1) == labels)),
        accuracy_norm=float(np.mean((lls / chars).argmax(axis=1) == labels)),
        log_likelihoods=tuple(tuple(float(v) for v in row) for row in lls),
    )


@torch.no_grad()
def next_token_accuracy(
    model: nn.Module,
    tokens: np.ndarray,
    block_size: int,
    batch_size: int,
    max_tokens: int | None,
    device: str | torch.device = "cpu",
) -> float:
    """Fraction of `scored_targets(tokens, max_tokens)` that are the model's top-1 prediction, predicted in
    the windows `eval_loss` scores (`eval_windows`), so it describes the very targets of the reported loss.
    A tie goes to the lowest id (torch.argmax)."""
    n = tokens_read(tokens, max_tokens)
    correct = 0
    for logits, y in window_logits(model, tokens, block_size, batch_size, n, device):
        correct += int((logits.argmax(dim=-1) == y).sum())
    return correct / (n - 1)

"""A faster encoder for byte-level BPE tokenizers: the same ids as `tokenizers`, from tiktoken's BPE core.

`tokenizers` builds an `Encoding` per document (ids, token strings, offsets, masks) where the token files
need only the ids; tiktoken's encoder produces the ids alone and, measured on the benchmark corpus, 4-5x
faster on one core (`benchmarks/data_bench.py` prints both). It is used only where it provably gives the
same ids as the `tokenizers` library, and the tokenizer file stays the `tokenizers` one.

The two run BPE differently. `tokenizers` repeatedly merges the adjacent pair of tokens that comes first in
its merge list; tiktoken repeatedly merges the adjacent pair whose concatenation is the token of lowest rank
(ranks are ids), whichever two tokens it is made of. They agree when, for every token t made by merge (a, b):

1. ids grow with the merge order (the merge list's order is the ranks' order), and
2. tiktoken's own BPE on t's bytes, restricted to tokens ranked below t, ends in exactly the two parts (a, b).

Why that suffices: wherever t forms in a word, the merges inside its span are the ones BPE on t's bytes
alone makes (a merge across the span's edge would make t impossible there), in the same order, so by (2) t
is only ever made from (a, b), a pair of the merge list. tiktoken thus only merges listed pairs; the pair it
picks is then the lowest-ranked listed pair present, which by (1) is the one `tokenizers` picks (both take
the leftmost of equal ones). A piece that is itself a token (tiktoken looks it up whole) is, by the same
argument, what the merges end in.

The rest must be what GPT-2's scheme is, else `fast_encoder` gives None and `tokenizers` encodes: no
normalizer; the ByteLevel pre-tokenizer with GPT-2's regex and no prefix space; a plain BPE model (no
dropout, no subword prefix or suffix, no byte fallback, merges not ignored); added tokens all special
(with `encode_special_tokens` on, their text inside a document is ordinary text, which is what
`encode_ordinary` does); no truncation or padding, and a post-processor that adds no ids.
"""

import os
from collections.abc import Sequence
from functools import cache
from typing import Any

import tiktoken

# The pattern `tokenizers`' ByteLevel pre-tokenizer splits text with (use_regex: true), GPT-2's.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet read backwards: the character that stands for each byte -> the byte.
    Printable bytes stand for themselves; the others are moved to 256 and up, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {byte: byte for byte in printable}
    moved = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = 256 + moved
            moved += 1
    return {chr(char): byte for byte, char in chars.items()}


def _as_bytes(token: str) -> bytes | None:
    table = _byte_of_char()
    try:
        return bytes(table[char] for char in token)
    except KeyError:  # a character outside the byte-level alphabet: not a byte-level vocabulary
        return None


def _bpe_parts(piece: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's BPE on `piece` with only the tokens ranked below `below`: the parts it ends in."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, best_rank = -1, below
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], below)
            if rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def _shape_is_gpt2(spec: dict[str, Any]) -> bool:
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    post = spec.get("post_processor")
    return (
        spec.get("normalizer") is None
        and spec.get("truncation") is None
        and spec.get("padding") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True) is True
        and pre.get("add_prefix_space") is False
        and (post is None or post.get("type") == "ByteLevel")
        and model.get("type") == "BPE"
        and model.get("dropout") is None
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and not model.get("byte_fallback")
        and not model.get("ignore_merges")
        and all(token.get("special") for token in spec.get("added_tokens") or [])
    )


def fast_encoder(spec: dict[str, Any]) -> tiktoken.Encoding | None:
    """A tiktoken encoding giving the same ids as the `tokenizers` tokenizer whose `tokenizer.json` is
    `spec`, or None when that cannot be shown (see the module's docstring)."""
    if not _shape_is_gpt2(spec):
        return None
    added = {token["content"]: token["id"] for token in spec.get("added_tokens") or []}
    ranks: dict[bytes, int] = {}
    for token, token_id in spec["model"]["vocab"].items():
        if token in added:
            continue
        as_bytes = _as_bytes(token)
        if as_bytes is None or as_bytes in ranks:
            return None
        ranks[as_bytes] = token_id
    if len({piece for piece in ranks if len(piece) == 1}) != 256:
        return None  # some byte has no token: `tokenizers` would drop it, tiktoken would fail
    previous = -1
    for merge in spec["model"]["merges"]:
        left, right = (_as_bytes(part) for part in (merge.split(" ") if isinstance(merge, str) else merge))
        if left is None or right is None or left + right not in ranks:
            return None
        rank = ranks[left + right]
        if rank <= previous or _bpe_parts(left + right, ranks, rank) != [left, right]:
            return None
        previous = rank
    if len(spec["model"]["merges"]) != len(ranks) - 256:
        return None  # a token no merge makes: tiktoken could produce it, `tokenizers` never
    return tiktoken.Encoding("gptflow-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=added)


def encode_batch(encoding: tiktoken.Encoding, texts: Sequence[str]) -> list[list[int]]:
    """Encode `texts` on as many threads as the process is given (RAYON_NUM_THREADS, as `tokenizers` reads
    it; TOKENIZERS_PARALLELISM=false means one), else one per core."""
    threads = 1 if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() == "false" else None
    threads = threads or int(os.environ.get("RAYON_NUM_THREADS") or 0) or os.cpu_count() or 1
    if threads == 1 or len(texts) < 2:
        return [encoding.encode_ordinary(text) for text in texts]
    return encoding.encode_ordinary_batch(list(texts), num_threads=threads)

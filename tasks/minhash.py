"""MinHash near-duplicate detection on numpy arrays: shingles, signatures, LSH bands, candidate pairs and
their connected components. Pure functions; the dedup stage joins them into passes over files.

A document's shingles are its word n-grams. Each word is hashed (blake2b, each distinct word of a batch once),
an n-gram's hash is a mix of its words' hashes, and the signature holds, for each of `bands * rows_per_band`
hash functions, the minimum over the document's shingles. The hash functions are multiply-add-shift
(Dietzfelbinger 1996): h(x) = ((a*x + b) mod 2^64) >> 32 on 32-bit shingle values, strongly universal and
computed for every function at once without a division (a `mod prime` costs several times more in numpy).
The fraction of equal values in two signatures estimates the Jaccard similarity of their shingle sets.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

UINT32_MAX = np.uint32(0xFFFFFFFF)  # the signature value of a document without words
# Shingles hashed by all functions at once: (permutations, chunk) uint64 is 7 MiB at 112 functions.
CHUNK_SHINGLES = 8192

_M1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's finaliser (Steele et al. 2014)
_M2 = np.uint64(0x94D049BB133111EB)
_BAND_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, odd


@dataclass(frozen=True)
class MinHashParams:
    """The shape of the signatures: n-gram size, LSH bands and rows, and the seed of the hash functions."""

    ngram_size: int
    bands: int
    rows_per_band: int
    seed: int

    @property
    def permutations(self) -> int:
        return self.bands * self.rows_per_band

    @property
    def lsh_threshold(self) -> float:
        """The similarity at which a pair shares a band with probability about 1/2: (1/b)^(1/r)."""
        return (1.0 / self.bands) ** (1.0 / self.rows_per_band)

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) of each hash function, uint64; a is odd, as multiply-add-shift requires."""
        rng = np.random.default_rng(self.seed)
        a = rng.integers(0, 2**64, size=self.permutations, dtype=np.uint64, endpoint=False) | np.uint64(1)
        b = rng.integers(0, 2**64, size=self.permutations, dtype=np.uint64, endpoint=False)
        return a, b

    def ngram_multipliers(self) -> np.ndarray:
        """One odd multiplier per position in an n-gram, so that word order counts; fixed, not seeded."""
        rng = np.random.default_rng(0x5EED)
        return rng.integers(0, 2**64, size=self.ngram_size, dtype=np.uint64, endpoint=False) | np.uint64(1)


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise on uint64 (wrapping arithmetic): spreads every input bit."""
    z = values ^ (values >> np.uint64(30))
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """64 bits of blake2b of every word of every text (uint64, in order) and the number of words of each
    text (int64). Words are separated by spaces, as `normalize_for_dedup` leaves them.

    Arrow splits the batch and finds its distinct words in C++; only those (a few tens of thousands in a batch
    of prose, where the words number hundreds of thousands) are hashed in Python.
    """
    lists = pc.split_pattern(pa.array(texts, pa.large_string()), " ")
    words = lists.flatten()
    owner = pc.list_parent_indices(lists).to_numpy()
    if pc.any(pc.equal(words, "")).as_py():  # "" and runs of spaces give empty words: they are no words
        keep = pc.not_equal(words, "")
        words, owner = words.filter(keep), owner[keep.to_numpy(zero_copy_only=False)]
    encoded = words.dictionary_encode()
    distinct = encoded.dictionary.to_pylist()
    digests = b"".join([hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest() for word in distinct])
    hashes = np.frombuffer(digests, dtype="<u8").astype(np.uint64)  # little-endian on every platform
    lengths = np.bincount(owner, minlength=len(texts)).astype(np.int64)
    return hashes[encoded.indices.to_numpy()], lengths


def shingles(texts: Sequence[str], params: MinHashParams) -> tuple[np.ndarray, np.ndarray]:
    """The 32-bit hashes of every text's word n-grams (uint64 holding 32 bits) and, for each, the index of
    its text (non-decreasing). A text of fewer than n words (but at least one) is one shingle of all its
    words; a text of none has no shingle."""
    n = params.ngram_size
    words, lengths = word_hashes(texts)
    total = words.size
    starts = np.cumsum(lengths) - lengths
    multipliers = params.ngram_multipliers()
    padded = np.concatenate([words, np.zeros(n, dtype=np.uint64)])
    combined = padded[:total] * multipliers[0]
    for k in range(1, n):  # past a text's end these sums are wrong, but only its full n-grams are kept
        combined += padded[k : k + total] * multipliers[k]
    short = np.flatnonzero((lengths > 0) & (lengths < n))  # their only shingle stops at their last word
    if short.size:
        first = starts[short]
        partial = np.zeros(short.size, dtype=np.uint64)
        for k in range(n - 1):
            partial += np.where(k < lengths[short], padded[first + k] * multipliers[k], np.uint64(0))
        combined[first] = partial
    # Each full n-gram starts at most length - n words into its text; a short text's one shingle at 0.
    owner = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
    offset = np.arange(total, dtype=np.int64) - starts[owner]
    valid = offset <= np.maximum(lengths - n, 0)[owner]
    values = mix64(combined[valid]) >> np.uint64(32)
    return values, owner[valid]


def signatures(texts: Sequence[str], params: MinHashParams) -> np.ndarray:
    """The MinHash signature of each text (its words separated by spaces): (texts, permutations) uint32.

    The functions run along the rows of a (permutations, shingles) block, so that each numpy call streams
    over one contiguous row per function and the minima per text are one reduceat along it (about 5 times
    faster than shingles as rows). Shifting right by 32 is monotone, so it is applied to the minima only.
    Memory: the batch's shingles plus one block of CHUNK_SHINGLES x permutations uint64.
    """
    values, owner = shingles(texts, params)
    a, b = params.coefficients()
    a, b = a[:, None], b[:, None]
    result = np.full((params.permutations, len(texts)), UINT32_MAX, dtype=np.uint32)
    block = np.empty((params.permutations, min(CHUNK_SHINGLES, values.size)), dtype=np.uint64)
    for begin in range(0, values.size, CHUNK_SHINGLES):
        chunk = values[begin : begin + CHUNK_SHINGLES]
        chunk_owner = owner[begin : begin + CHUNK_SHINGLES]
        hashed = block[:, : chunk.size]
        np.multiply(a, chunk[None, :], out=hashed)  # (permutations, chunk)
        hashed += b
        segment = np.flatnonzero(np.r_[True, chunk_owner[1:] != chunk_owner[:-1]])
        minima = np.minimum.reduceat(hashed, segment, axis=1)  # (permutations, segments)
        minima >>= np.uint64(32)
        doc = chunk_owner[segment]  # distinct within a chunk: a text's shingles are consecutive
        result[:, doc] = np.minimum(result[:, doc], minima.astype(np.uint32))
    return np.ascontiguousarray(result.T)


def band_hashes(sigs: np.ndarray, params: MinHashParams) -> np.ndarray:
    """One 64-bit hash per band of each signature: (bands, docs) uint64. Equal bands give equal hashes;
    unequal ones collide with probability about 2^-64 (a collision only adds a candidate pair to verify)."""
    n = sigs.shape[0]
    values = sigs.reshape(n, params.bands, params.rows_per_band).astype(np.uint64)  # (docs, bands, rows)
    hashed = np.zeros((n, params.bands), dtype=np.uint64)
    for row in range(params.rows_per_band):
        hashed = mix64(hashed * _BAND_MULTIPLIER + values[:, :, row])
    return np.ascontiguousarray(hashed.T)


def estimated_jaccard(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The fraction of equal values in each pair of signature rows: (pairs,) float64."""
    if left.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    return np.count_nonzero(left == right, axis=1) / left.shape[1]


def bucket_pairs(hashes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Candidate pairs (lower position, higher position) among records sorted by (hash, position): each member
    of a bucket is paired with the bucket's first member and with the member before it. Pairing every two
    members would be quadratic in a large bucket (boilerplate); these 2k pairs still link the bucket when
    its members are similar, and the first member is the one a cluster would keep. (pairs, 2) int64."""
    if hashes.size < 2:
        return np.zeros((0, 2), dtype=np.int64)
    starts = np.r_[True, hashes[1:] != hashes[:-1]]
    group = np.cumsum(starts) - 1
    first = positions[starts][group]
    follower = np.flatnonzero(~starts)
    left = np.concatenate([first[follower], positions[follower - 1]])
    right = np.concatenate([positions[follower], positions[follower]])
    return np.unique(np.stack([left, right], axis=1), axis=0)


def connected_components(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The nodes named in `pairs` (sorted) and, for each, the smallest node of its connected component.

    Minimum-label propagation with pointer jumping: the result depends only on the set of pairs, never on
    their order, and the root of a component is its first document in the order of positions.
    """
    nodes, inverse = np.unique(pairs.reshape(-1), return_inverse=True)
    left, right = inverse.reshape(-1, 2).T
    label = np.arange(nodes.size, dtype=np.int64)
    while True:
        new = label.copy()
        np.minimum.at(new, left, label[right])
        np.minimum.at(new, right, label[left])
        new = new[new]  # pointer jumping: halves the distance to the root each round
        if np.array_equal(new, label):
            return nodes, nodes[label]
        label = new


def hash_ranges(parts: int) -> list[tuple[np.uint64, np.uint64 | None]]:
    """`parts` consecutive ranges [low, high) covering the uint64 hashes; the last range's high is None
    (2^64 does not fit). Sorting records one range at a time bounds the memory a global sort needs."""
    bounds = [np.uint64((k << 64) // parts) for k in range(parts)]
    return [(bounds[k], bounds[k + 1] if k + 1 < parts else None) for k in range(parts)]


def range_slice(sorted_hashes: np.ndarray, low: np.uint64, high: np.uint64 | None) -> slice:
    """The slice of a sorted uint64 array (a memory map: only the slice is read) that lies in [low, high)."""
    begin = int(np.searchsorted(sorted_hashes, low, side="left"))
    end = sorted_hashes.size if high is None else int(np.searchsorted(sorted_hashes, high, side="left"))
    return slice(begin, end)

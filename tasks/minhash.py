"""MinHash near-duplicate detection on numpy arrays: shingles, signatures, LSH bands, candidate pairs and
their connected components. Pure functions; the dedup stage joins them into passes over files.

A document's shingles are its word n-grams. Each word is hashed once (blake2b, cached per distinct word),
an n-gram's hash is a mix of its words' hashes, and the signature holds, for each of `bands * rows_per_band`
hash functions, the minimum over the document's shingles. The hash functions are multiply-add-shift
(Dietzfelbinger 1996): h(x) = ((a*x + b) mod 2^64) >> 32 on 32-bit shingle values, strongly universal and
computed for every function at once without a division (a `mod prime` costs several times more in numpy).
The fraction of equal values in two signatures estimates the Jaccard similarity of their shingle sets.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

UINT32_MAX = np.uint32(0xFFFFFFFF)  # the signature value of a document without words
# Shingles hashed by all functions at once: (chunk, permutations) uint64 is 8 MiB at 112 functions.
CHUNK_SHINGLES = 8192
# Distinct words whose hash is cached per process before the cache starts afresh (bounds its memory).
WORD_CACHE_LIMIT = 1 << 20

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


def word_hashes(words: Sequence[str], cache: dict[str, int]) -> np.ndarray:
    """64 bits of blake2b per word (uint64), each distinct word hashed once while it stays in `cache`."""
    if len(cache) > WORD_CACHE_LIMIT:
        cache.clear()
    for word in set(words).difference(cache):
        cache[word] = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
    return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))


def shingles(
    docs: Sequence[Sequence[str]], params: MinHashParams, cache: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The 32-bit hashes of every document's word n-grams (uint64 holding 32 bits) and, for each, the index
    of its document (non-decreasing). A document of fewer than n words (but at least one) is one shingle of
    all its words; a document of none has no shingle."""
    n = params.ngram_size
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    words = word_hashes(list(chain.from_iterable(docs)), cache)
    total = words.size
    owner = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)  # document of each word
    starts = np.cumsum(lengths) - lengths
    end = (starts + lengths)[owner]  # one past the last word of each word's document
    index = np.arange(total, dtype=np.int64)
    padded = np.concatenate([words, np.zeros(n, dtype=np.uint64)])
    combined = np.zeros(total, dtype=np.uint64)
    for k, multiplier in enumerate(params.ngram_multipliers()):
        part = padded[k : k + total] * multiplier
        part[index + k >= end] = 0  # past the document's end: a short document's only shingle stops there
        combined += part
    valid = (index + n <= end) | ((index == starts[owner]) & (lengths[owner] < n))
    values = mix64(combined[valid]) >> np.uint64(32)
    return values, owner[valid]


def signatures(docs: Sequence[Sequence[str]], params: MinHashParams, cache: dict[str, int]) -> np.ndarray:
    """The MinHash signature of each document (a list of its words): (docs, permutations) uint32.

    Memory: the batch's shingles plus one chunk of CHUNK_SHINGLES x permutations uint64, whatever the
    documents' sizes.
    """
    values, owner = shingles(docs, params, cache)
    a, b = params.coefficients()
    result = np.full((len(docs), params.permutations), UINT32_MAX, dtype=np.uint32)
    for begin in range(0, values.size, CHUNK_SHINGLES):
        chunk = values[begin : begin + CHUNK_SHINGLES]
        chunk_owner = owner[begin : begin + CHUNK_SHINGLES]
        hashed = chunk[:, None] * a[None, :]  # (chunk, permutations)
        hashed += b[None, :]
        hashed >>= np.uint64(32)
        segment = np.flatnonzero(np.r_[True, chunk_owner[1:] != chunk_owner[:-1]])
        minima = np.minimum.reduceat(hashed, segment, axis=0).astype(np.uint32)  # (segments, permutations)
        doc = chunk_owner[segment]  # distinct within a chunk: a document's shingles are consecutive
        result[doc] = np.minimum(result[doc], minima)
    return result


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

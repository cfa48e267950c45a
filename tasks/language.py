"""Language identification for the clean stage: which language a document is in, and how much of it.

The detector is Google's Compact Language Detector 2 (CLD2) through `pycld2`, whose tables are compiled
into the extension, so nothing is downloaded at run time. It was chosen over the other detectors that ship
their model, `py3langid` and `lingua-language-detector`, by measurement on this machine
(`python benchmarks/clean_bench.py --language`): on paragraphs of ~400 characters in French, German,
Spanish, Italian, Dutch and Portuguese, and on documents in one of them with a code example, all of them
name every language right; on the embedded English corpus CLD2 names 1,558 of 1,570 documents English,
py3langid 1,563 and lingua 1,544-1,554. But CLD2 reads 29 MB/s of that corpus, py3langid 2.3 MB/s and
lingua 0.4 MB/s: either of those would cost more than every other filter together. What CLD2 misses is
what no filter should lean on: one-line sentences (2 of 28 wrong, where py3langid and lingua's slow mode
get all) and API listings that are all identifiers (it answers "un", unknown; so they go, as not English).

The score is the share of the text that CLD2 gives to the language it names first (its `percent`, over
100): 1.0 for a document all in one language, lower for a mixed one. Of the corpus documents it names
English, all but four score 0.86 or more (the lowest 0.49); an English document with a French paragraph
of a tenth of its length scores 0.68 or more; one half English and half French about 0.5.

Only the first `sample_chars` characters are read: on 40 English documents of ~60 KB, the first 4,096 name
English for every one with scores from 0.97 (the whole text: 0.99) at 14 times the speed; 1,024 still name
them all, with scores from 0.90.

CLD2 is about two fifths of the clean stage's time with the default filters, and no way of calling it was
found cheaper: the sample given as str or as UTF-8 bytes, with or without `bestEffort`, reads at the same
speed (within a tenth, measured on the first 4,096 characters of each document of the embedded corpus).
"""

import re
from functools import lru_cache
from typing import NamedTuple

import pycld2

# CLD2's answer when the text holds too little of any language it knows.
UNKNOWN = "un"
REASON = "language"

# Code points CLD2 rejects as "invalid UTF-8" although they are valid: C0 controls but tab, newline, form
# feed and carriage return; DEL and the C1 controls; the noncharacters (U+FDD0..U+FDEF and the last two of
# every plane), found by trying every code point. And lone surrogates, which do not encode at all (a
# Parquet text never holds one; a str made in Python may).
_REJECTED = re.compile(
    "[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17))
    + "]"
)

# The ISO 639-1 codes that CLD2 can answer (it names a few languages by longer codes, such as "haw").
KNOWN_LANGUAGES: frozenset[str] = frozenset(
    code for _, code in pycld2.LANGUAGES if len(code) == 2 and code.isalpha() and code != UNKNOWN
)


class Detection(NamedTuple):
    language: str  # ISO 639-1 code, or "un" (unknown)
    score: float  # share of the text in that language, 0..1


@lru_cache(maxsize=1)
def detect_language(text: str, sample_chars: int) -> Detection:
    """The language of the first `sample_chars` characters of `text` (cached for the last text, so that the
    filter and the audit columns detect once)."""
    sample = text[:sample_chars]
    try:
        _, _, details = pycld2.detect(sample, isPlainText=True)
    except (pycld2.error, UnicodeEncodeError):  # rare (normalize_text removes controls): look only then
        _, _, details = pycld2.detect(_REJECTED.sub(" ", sample), isPlainText=True)
    _, code, percent, _ = details[0]
    return Detection(code, percent / 100)


class LanguageFilter:
    """Drops (language) a document whose language is not one of `languages`, or is in it with a share of
    the text below `min_score` (FineWeb's language filter, with CLD2's share for fastText's probability)."""

    reason = REASON

    def __init__(self, languages: frozenset[str], min_score: float, sample_chars: int) -> None:
        self.languages = languages
        self.min_score = min_score
        self.sample_chars = sample_chars

    def detect(self, text: str) -> Detection:
        return detect_language(text, self.sample_chars)

    def decide(self, text: str) -> str | None:
        found = self.detect(text)
        if found.language in self.languages and found.score >= self.min_score:
            return None
        return REASON

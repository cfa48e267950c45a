"""Measure the candidates for reading Common Crawl WARC files: WARC parsers (records/s, MB/s) and HTML
main-text extractors (pages/s, MB/s, how much of the article they recover and how much boilerplate leaks).

    python benchmarks/html_bench.py                    # 300 pages, every installed candidate
    python benchmarks/html_bench.py --pages 1000 --repeat 3

The pages are built here, so the right answer is known: an article (title and paragraphs of English,
French or German sentences made of each language's common words and made-up ones) inside the boilerplate
real sites wrap it in, in three layouts: semantic HTML5 (header/nav/main/article/aside/footer), nested divs
with class names only (no semantic tags), and a blog with a cookie banner, share buttons, a newsletter box
and reader comments. Every boilerplate string is distinct from the article's sentences.

Quality, per extractor, over all pages: "recall" is the fraction of article sentences found verbatim
(whitespace normalised) in the output; "leak" the fraction of boilerplate strings found there; "empty" the
pages with no output at all. Speed is one thread, extraction only (the HTML is already decoded to str,
as a WARC reader hands it over), best of --repeat runs.

The WARC parsers read one gzipped WARC file of those pages as HTTP `response` records (one gzip member per
record, as Common Crawl writes them) and read every payload: natively from the path, and, for FastWARC,
through tasks/readers/documents.py's open_decompressed, which decompresses the gzip members itself to
report a truncated file (both libraries end a truncated file silently), as tasks/readers/warc.py reads them.
The same for a WET file of the articles' text, and the whole WET reader (iter_file_documents).
"""

import argparse
import gzip
import random
import re
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tasks.readers.documents import iter_file_documents, open_decompressed

WORDS = {
    "en": "the of and to a in is that for it as was with be by on not this are or from at which but have an they "
    "you were one all we their has would when if so no will more can its who what about people time year",
    "fr": "le de la et les des un une en du que est pour qui dans par pas sur au plus ne se ce il avec son sont "
    "aux mais comme nous ou elle été leur tout fait sans même cette entre deux",
    "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden aus "
    "er hat dass sie nach wird bei einer um am sind noch wie einem über so zum",
}
STOPLISTS = {"en": "English", "fr": "French", "de": "German"}
# What a real page carries besides its text (a median page is tens of KB of HTML for a few KB of text):
# ~8 KB of CSS and ~24 KB of script, which the extractors must parse and skip.
STYLE = "".join(f".c{i} {{ margin: {i}px; padding: 0 {i % 7}px; color: #{i:06x}; }}\n" for i in range(160))
SCRIPT = "window.__DATA__ = [" + ",".join(f'{{"id": {i}, "slot": "ad-{i}", "w": 300}}' for i in range(600)) + "];"


def made_up_words(rng: random.Random, n: int) -> list[str]:
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in ("a", "e", "i", "o", "u", "ei", "au")]
    return ["".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(n)]


def sentence(rng: random.Random, lang: str, vocab: list[str]) -> str:
    common = WORDS[lang].split()
    # About half the words are the language's common words, as in running text (they carry jusText's
    # stop-word density test).
    words = [rng.choice(common) if rng.random() < 0.5 else rng.choice(vocab) for _ in range(rng.randint(10, 22))]
    return " ".join(words).capitalize() + "."


def boilerplate(rng: random.Random, vocab: list[str], page: int) -> dict[str, list[str]]:
    """Boilerplate strings by kind; each carries the page number so that no two pages share one exactly."""
    word = lambda: rng.choice(vocab).capitalize()  # noqa: E731 - a one-word label
    return {
        "nav": [f"{w} {page}" for w in ("Home", "News", "Sport", "Culture", "Contact us", "About")]
        + [f"{word()} {word()} {page}" for _ in range(40)],  # a site's mega-menu
        "related": [f"{word()} {word()} and the {word()} of {word()} ({page})" for _ in range(5)],
        "footer": [
            f"Copyright {2000 + page % 25} {word()} Media Group. All rights reserved.",
            f"Privacy policy {page}",
            f"Terms of use {page}",
            f"Follow {word()} on social media {page}",
        ],
        "cookie": [f"We use cookies to improve your experience on {word()} ({page}). Accept all cookies."],
        "share": [f"Share on {site} {page}" for site in ("Facebook", "Twitter", "Email")],
        "newsletter": [f"Subscribe to the {word()} newsletter and get the best stories every week ({page})."],
        "comments": [f"{word()} says: great read, thanks {word()}! ({page})" for _ in range(3)],
    }


def links(items: list[str]) -> str:
    return "".join(f'<li><a href="/{i}">{item}</a></li>' for i, item in enumerate(items))


def page_html(layout: int, lang: str, title: str, paragraphs: list[list[str]], bp: dict[str, list[str]]) -> str:
    body = "".join(f"<p>{' '.join(p)}</p>\n" for p in paragraphs)
    head = (
        f'<html lang="{lang}"><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style>'
        f"<script>{SCRIPT}</script></head>"
    )
    footer = "".join(f"<p>{f}</p>" for f in bp["footer"])
    if layout == 0:  # semantic HTML5
        return (
            f"{head}<body><header><nav><ul>{links(bp['nav'])}</ul></nav></header><main><article><h1>{title}</h1>"
            f"{body}</article><aside><h3>Related</h3><ul>{links(bp['related'])}</ul></aside></main>"
            f"<footer>{footer}</footer></body></html>"
        )
    if layout == 1:  # div soup: only class names tell the parts apart
        nav = " | ".join(f'<a href="/{i}">{n}</a>' for i, n in enumerate(bp["nav"]))
        return (
            f'{head}<body><div id="top"><div class="menu">{nav}</div></div><div class="wrapper">'
            f'<div class="left"><ul>{links(bp["related"])}</ul></div><div class="content"><h2>{title}</h2>'
            f'{body}</div></div><div class="bottom">{footer}</div></body></html>'
        )
    comments = "".join(f'<div class="comment"><p>{c}</p></div>' for c in bp["comments"])
    return (  # blog: banner, share buttons, newsletter box, comments
        f'{head}<body><div class="cookie-banner"><p>{bp["cookie"][0]}</p><button>OK</button></div>'
        f'<div class="site-header"><ul class="menu">{links(bp["nav"])}</ul></div>'
        f'<div class="post"><h1 class="post-title">{title}</h1><div class="share">{links(bp["share"])}</div>'
        f'<div class="post-body">{body}</div><div class="newsletter"><p>{bp["newsletter"][0]}</p>'
        f'<form><input type="email"><button>Subscribe</button></form></div>'
        f'<div class="comments"><h3>Comments</h3>{comments}</div></div>'
        f'<div class="sidebar"><ul>{links(bp["related"])}</ul></div><div class="site-footer">{footer}</div>'
        "</body></html>"
    )


def build_pages(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    vocab = made_up_words(rng, 4000)
    pages = []
    for i in range(n):
        lang = ("en", "en", "fr", "de")[i % 4]
        paragraphs = [[sentence(rng, lang, vocab) for _ in range(rng.randint(2, 6))] for _ in range(rng.randint(3, 10))]
        title = sentence(rng, lang, vocab)[:60].rstrip(".")
        bp = boilerplate(rng, vocab, i)
        html = page_html(i % 3, lang, title, paragraphs, bp)
        pages.append(
            {
                "lang": lang,
                "html": html,
                "sentences": [s for p in paragraphs for s in p],
                # only what this layout shows: the others leave some kinds out
                "boilerplate": [(kind, s) for kind, strings in bp.items() for s in strings if s in html],
            }
        )
    return pages


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def extractors() -> dict[str, Callable[[dict], str]]:
    """Every installed candidate, by label: page -> extracted text."""
    found: dict[str, Callable[[dict], str]] = {}
    try:
        from resiliparse.extract.html2text import extract_plain_text
        from resiliparse.parse.html import HTMLTree

        def resiliparse_main(page: dict) -> str:
            return extract_plain_text(HTMLTree.parse(page["html"]), main_content=True)

        def resiliparse_all(page: dict) -> str:
            return extract_plain_text(HTMLTree.parse(page["html"]), main_content=False)

        found["resiliparse main_content"] = resiliparse_main
        found["resiliparse (all text)"] = resiliparse_all
    except ImportError:
        pass
    try:
        import trafilatura

        found["trafilatura"] = lambda page: trafilatura.extract(page["html"], include_comments=False) or ""
        found["trafilatura fast"] = lambda page: (
            trafilatura.extract(page["html"], include_comments=False, fast=True) or ""
        )
        found["trafilatura favor_precision"] = lambda page: (
            trafilatura.extract(page["html"], include_comments=False, favor_precision=True) or ""
        )
    except ImportError:
        pass
    try:
        import justext

        english = justext.get_stoplist("English")
        by_lang = {lang: justext.get_stoplist(name) for lang, name in STOPLISTS.items()}

        def justext_with(stoplist: frozenset) -> str:
            return lambda page: "\n".join(
                p.text for p in justext.justext(page["html"].encode(), stoplist) if not p.is_boilerplate
            )

        found["justext (English stoplist)"] = justext_with(english)
        found["justext (page's language)"] = lambda page: justext_with(by_lang[page["lang"]])(page)
    except ImportError:
        pass
    try:
        from inscriptis import get_text

        found["inscriptis (all text)"] = lambda page: get_text(page["html"])
    except ImportError:
        pass
    return found


def judge(extract: Callable[[dict], str], pages: list[dict], repeat: int) -> dict[str, float]:
    outputs: list[str] = []
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        outputs = [extract(page) for page in pages]
        best = min(best, time.perf_counter() - start)
    found = sentences = empty = 0
    leaked: Counter[str] = Counter()
    shown: Counter[str] = Counter()
    for page, out in zip(pages, outputs, strict=True):
        text = _norm(out)
        empty += not text
        found += sum(_norm(s) in text for s in page["sentences"])
        sentences += len(page["sentences"])
        for kind, s in page["boilerplate"]:
            shown[kind] += 1
            leaked[kind] += _norm(s) in text
    html_mb = sum(len(p["html"].encode()) for p in pages) / 1e6
    return {
        "pages_s": len(pages) / best,
        "mb_s": html_mb / best,
        "recall": found / sentences,
        "leak": sum(leaked.values()) / sum(shown.values()),
        "empty": empty,
        "by_kind": {kind: leaked[kind] / shown[kind] for kind in shown},
    }


def warc_record(uri: str, payload: bytes, wet: bool) -> bytes:
    """A `response` record of an HTML page, or (wet) a `conversion` record of its text."""
    if not wet:
        payload = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
    content_type = "text/plain" if wet else "application/http; msgtype=response"
    head = (
        f"WARC/1.0\r\nWARC-Type: {'conversion' if wet else 'response'}\r\nWARC-Target-URI: {uri}\r\n"
        f"WARC-Date: 2024-01-01T00:00:00Z\r\nWARC-Record-ID: <urn:uuid:{uuid.UUID(int=random.getrandbits(128))}>\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    return head + payload + b"\r\n\r\n"


def warc_readers(path: Path, wet: bool) -> dict[str, Callable[[], int]]:
    """Every installed WARC parser, by label: () -> payload bytes read from `path`'s records of one type."""
    found: dict[str, Callable[[], int]] = {}
    try:
        from fastwarc.warc import ArchiveIterator, WarcRecordType

        kind = WarcRecordType.conversion if wet else WarcRecordType.response

        def fastwarc_native() -> int:
            return sum(len(r.reader.read()) for r in ArchiveIterator(str(path), record_types=kind))

        def fastwarc_checked() -> int:
            with open_decompressed(path) as stream:
                records = ArchiveIterator(stream, record_types=kind, parse_http=not wet, stream_detect=False)
                return sum(len(r.reader.read()) for r in records)

        found["fastwarc (path)"] = fastwarc_native
        found["fastwarc (open_decompressed)"] = fastwarc_checked
    except ImportError:
        pass
    try:
        from warcio.archiveiterator import ArchiveIterator as WarcioIterator

        wanted = "conversion" if wet else "response"

        def warcio_native() -> int:
            with open(path, "rb") as raw:
                return sum(len(r.content_stream().read()) for r in WarcioIterator(raw) if r.rec_type == wanted)

        def warcio_checked() -> int:
            with open_decompressed(path) as stream:
                return sum(len(r.content_stream().read()) for r in WarcioIterator(stream) if r.rec_type == wanted)

        found["warcio (file)"] = warcio_native
        found["warcio (open_decompressed)"] = warcio_checked
    except ImportError:
        pass
    if wet:
        found["iter_file_documents (wet)"] = lambda: sum(d.n_bytes for d in iter_file_documents(path, "wet", 1 << 30))
    return found


def installed(*names: str) -> str:
    out = []
    for name in names:
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=300, help="pages to build (a third of each layout)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per candidate; the best counts")
    parser.add_argument("--warc-copies", type=int, default=10, help="the pages are written this many times")
    args = parser.parse_args()

    pages = build_pages(args.pages)
    html_mb = sum(len(p["html"].encode()) for p in pages) / 1e6
    print(installed("resiliparse", "fastwarc", "warcio", "trafilatura", "justext", "inscriptis"))
    print(f"\n{len(pages)} pages, {html_mb:.1f} MB of HTML (en 50%, fr 25%, de 25%; 3 layouts)\n")
    print(f"{'extractor':30} {'pages/s':>9} {'MB/s':>7} {'recall':>7} {'leak':>7} {'empty':>6}")
    results = {}
    for label, extract in extractors().items():
        r = results[label] = judge(extract, pages, args.repeat)
        print(f"{label:30} {r['pages_s']:9.0f} {r['mb_s']:7.2f} {r['recall']:7.1%} {r['leak']:7.1%} {r['empty']:6d}")
    kinds = list(next(iter(results.values()))["by_kind"]) if results else []
    print(f"\nboilerplate leaked, by kind\n{'extractor':30} " + " ".join(f"{k:>10}" for k in kinds))
    for label, r in results.items():
        print(f"{label:30} " + " ".join(f"{r['by_kind'][k]:10.0%}" for k in kinds))

    with tempfile.TemporaryDirectory() as tmp:
        random.seed(0)
        for wet in (False, True):
            path = Path(tmp) / ("bench.warc.wet.gz" if wet else "bench.warc.gz")
            payload_mb = 0.0
            with open(path, "wb") as out:
                for copy in range(args.warc_copies):
                    for i, page in enumerate(pages):
                        payload = (" ".join(page["sentences"]) if wet else page["html"]).encode()
                        payload_mb += len(payload) / 1e6
                        record = warc_record(f"https://example.com/{copy}/{i}", payload, wet)
                        out.write(gzip.compress(record, 6))
            size_mb = path.stat().st_size / 1e6
            records = len(pages) * args.warc_copies
            what = "WET conversion records (text)" if wet else "WARC response records (HTML)"
            print(f"\n{records} {what}, {size_mb:.1f} MB gzipped, {payload_mb:.0f} MB of payload")
            print(f"{'reader':30} {'records/s':>10} {'MB/s (gz)':>10}")
            for label, read in warc_readers(path, wet).items():
                best = float("inf")
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    read()
                    best = min(best, time.perf_counter() - start)
                print(f"{label:30} {records / best:10.0f} {size_mb / best:10.1f}")


if __name__ == "__main__":
    main()

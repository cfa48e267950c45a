"""The embedded default corpus: deterministic documents and pairs, packed in the real OpenWebText layout."""

import hashlib
import io
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from tasks.sample_data import (
    ARCHIVE_NAME,
    CORPUS_MODULES,
    HELDOUT_MODULE_FRACTION,
    HELDOUT_MODULES,
    default_corpus_documents,
    default_finetune_pairs,
    ensure_sample_archive,
    is_heldout_module,
    write_openwebtext_archive,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, str]]:
    return default_corpus_documents()


@pytest.fixture(scope="module")
def pairs() -> list[dict[str, str]]:
    return default_finetune_pairs()


def read_layout(path) -> dict[str, list[tuple[tarfile.TarInfo, bytes]]]:
    """{outer member name: [(inner member, its bytes)]} of an OpenWebText-layout archive."""
    layout = {}
    with tarfile.open(path, "r:xz") as outer:
        for member in outer.getmembers():
            if not member.isfile():
                layout[member.name] = None
                continue
            inner_bytes = lzma.decompress(outer.extractfile(member).read())
            with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:") as inner:
                layout[member.name] = [(m, inner.extractfile(m).read()) for m in inner.getmembers()]
    return layout


def test_corpus_is_sorted_named_uniquely_and_large_enough_to_train_on(corpus):
    names = [name for name, _ in corpus]
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    assert len(corpus) >= 1000
    assert sum(len(text.encode("utf-8")) for _, text in corpus) >= 1_000_000
    kinds = {name.split("/", 1)[0] for name in names}
    assert kinds == {"topic", "module", "class", "function"}
    assert all(text.strip() for _, text in corpus)


def test_corpus_holds_documentation_topics_and_docstrings(corpus):
    documents = dict(corpus)
    from pydoc_data.topics import topics

    assert documents["topic/assert"] == topics["assert"].strip()
    wrapper = documents["class/textwrap.TextWrapper"]
    assert wrapper.startswith("class textwrap.TextWrapper")
    assert "wrap(text)" in wrapper  # methods are listed with their signature, without `self`
    assert "textwrap.dedent(text)" in documents["function/textwrap.dedent"]


def test_corpus_never_shows_memory_addresses(corpus):
    # a default like `<object object at 0x7f...>` would make the corpus differ from run to run
    assert not [name for name, text in corpus if re.search(r" at 0x[0-9a-f]+", text)]


def test_corpus_ignores_what_the_caller_imported_and_its_directory(corpus, tmp_path, monkeypatch):
    # Libraries replace standard-library functions at import time; the corpus must not notice.
    monkeypatch.setattr(textwrap.dedent, "__doc__", "changed in this process")
    monkeypatch.chdir(tmp_path)
    assert default_corpus_documents() == corpus


def test_finetune_pairs_pair_a_signature_with_the_first_paragraph_of_its_docstring(pairs):
    by_prompt = {pair["prompt"]: pair["response"] for pair in pairs}
    assert by_prompt["textwrap.wrap(text, width=70, **kwargs)"].startswith("Wrap a single paragraph of text")
    assert "textwrap.TextWrapper.wrap(text)" in by_prompt  # a method, without `self`
    assert 300 <= len(pairs) <= 20_000
    prompts = [pair["prompt"] for pair in pairs]
    assert prompts == sorted(prompts) and len(set(prompts)) == len(prompts)
    for pair in pairs:
        assert set(pair) == {"prompt", "response", "split"}
        assert pair["split"] in ("train", "heldout")
        assert 20 <= len(pair["response"]) <= 400
        assert pair["response"] == " ".join(pair["response"].split())  # one paragraph, whitespace collapsed
        assert " at 0x" not in pair["prompt"]


def module_of(qualname: str) -> str:
    """The corpus module a qualified name was found under: the longest one it starts with."""
    return max((m for m in CORPUS_MODULES if qualname == m or qualname.startswith(m + ".")), key=len)


def test_heldout_modules_are_the_seeded_fraction_of_the_corpus_modules():
    assert HELDOUT_MODULES == tuple(m for m in CORPUS_MODULES if is_heldout_module(m))
    share = len(HELDOUT_MODULES) / len(CORPUS_MODULES)
    assert HELDOUT_MODULE_FRACTION / 2 < share < HELDOUT_MODULE_FRACTION * 2
    # A hash of the name decides, not the position in the list.
    assert HELDOUT_MODULES != CORPUS_MODULES[: len(HELDOUT_MODULES)]


def test_heldout_modules_give_the_heldout_pairs_and_no_documents(corpus, pairs):
    held = set(HELDOUT_MODULES)
    documented = {module_of(name.split("/", 1)[1]) for name, _ in corpus if not name.startswith("topic/")}
    assert not documented & held
    assert len(documented) > 150  # every other module still feeds the corpus
    heldout = [pair for pair in pairs if pair["split"] == "heldout"]
    assert {module_of(pair["prompt"].split("(", 1)[0]) in held for pair in heldout} == {True}
    train = [pair for pair in pairs if pair["split"] == "train"]
    assert {module_of(pair["prompt"].split("(", 1)[0]) in held for pair in train} == {False}
    # Enough to score: a few hundred answers from many modules.
    assert len(heldout) >= 200
    assert len({module_of(pair["prompt"].split("(", 1)[0]) for pair in heldout}) >= 15


@pytest.mark.slow
def test_corpus_and_pairs_are_the_same_bytes_whatever_path_starts_the_interpreter(tmp_path):
    """The interpreter's own path, HOME, TMPDIR and the current folder must not reach the archive or the pairs:
    `platform.architecture(executable=sys.executable)` would otherwise print the path it was started through."""
    link = tmp_path / "other" / "bin" / "python"
    link.parent.mkdir(parents=True)
    link.symlink_to(sys.executable)
    script = (
        "import json, sys; from pathlib import Path; "
        "from tasks.sample_data import default_finetune_pairs, ensure_sample_archive; "
        "ensure_sample_archive(Path(sys.argv[1])); "
        "Path(sys.argv[2]).write_text(json.dumps(default_finetune_pairs()))"
    )
    runs = []
    for name, interpreter in (("one", sys.executable), ("two", str(link))):
        home = tmp_path / name
        (home / "tmp").mkdir(parents=True)
        env = {**os.environ, "HOME": str(home), "TMPDIR": str(home / "tmp"), "PYTHONPATH": str(REPO)}
        command = [interpreter, "-c", script, str(home / "corpus"), str(home / "pairs.json")]
        runs.append((home, subprocess.Popen(command, cwd=home, env=env, stderr=subprocess.PIPE, text=True)))
    for _, process in runs:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    (one, _), (two, _) = runs
    archive = one / "corpus" / ARCHIVE_NAME
    assert archive.read_bytes() == (two / "corpus" / ARCHIVE_NAME).read_bytes()
    assert (one / "pairs.json").read_bytes() == (two / "pairs.json").read_bytes()
    signature = "platform.architecture(executable=..., bits='', linkage='')"
    packed = [data.decode("utf-8") for members in read_layout(archive).values() if members for _, data in members]
    assert any(text.startswith(signature) for text in packed)
    assert signature in {pair["prompt"] for pair in json.loads((one / "pairs.json").read_text())}


def test_archive_has_the_real_openwebtext_layout(tmp_path):
    documents = [(f"doc{i}", f"Document number {i}.\nSecond line, ünïcode {i}.") for i in range(7)]
    dest = write_openwebtext_archive(documents, tmp_path / ARCHIVE_NAME, docs_per_subset=2, subsets_per_file=2)
    assert dest == tmp_path / ARCHIVE_NAME
    assert dest.read_bytes()[:6] == b"\xfd7zXZ\x00"
    layout = read_layout(dest)
    assert list(layout) == [
        "openwebtext",
        "openwebtext/urlsf_subset00-1_data.xz",
        "openwebtext/urlsf_subset00-2_data.xz",
        "openwebtext/urlsf_subset01-1_data.xz",
        "openwebtext/urlsf_subset01-2_data.xz",
    ]
    texts = []
    for members in list(layout.values())[1:]:
        for info, data in members:
            number, md5 = info.name.removesuffix(".txt").split("-")
            assert info.name.endswith(".txt") and len(number) == 7
            assert md5 == hashlib.md5(data).hexdigest()
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (1_577_836_800, 0, 0, "", "")
            texts.append((int(number), data.decode("utf-8")))
    assert texts == [(i, text) for i, (_, text) in enumerate(documents)]


def test_archive_bytes_depend_on_the_documents_only(tmp_path):
    documents = [("a", "alpha " * 50), ("b", "beta " * 50), ("c", "gamma " * 50)]
    first = write_openwebtext_archive(documents, tmp_path / "one" / ARCHIVE_NAME, docs_per_subset=2)
    os.utime(first, (0, 0))
    second = write_openwebtext_archive(documents, tmp_path / "two" / ARCHIVE_NAME, docs_per_subset=2)
    assert first.read_bytes() == second.read_bytes()
    other = write_openwebtext_archive(documents[:2], tmp_path / "three" / ARCHIVE_NAME, docs_per_subset=2)
    assert other.read_bytes() != first.read_bytes()
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [ARCHIVE_NAME]  # no temporary file left


def test_archive_rejects_bad_grouping_with_every_problem_named(tmp_path):
    with pytest.raises(ValueError, match="docs_per_subset.*subsets_per_file"):
        write_openwebtext_archive([("a", "text")], tmp_path / ARCHIVE_NAME, docs_per_subset=0, subsets_per_file=0)
    assert not (tmp_path / ARCHIVE_NAME).exists()


@pytest.mark.slow
def test_sample_archive_is_written_once_and_then_left_untouched(tmp_path, corpus):
    path = ensure_sample_archive(tmp_path / "sample")
    assert path == (tmp_path / "sample" / ARCHIVE_NAME).resolve()
    layout = read_layout(path)
    packed = [data.decode("utf-8") for members in layout.values() if members for _, data in members]
    assert packed == [text for _, text in corpus]

    original = path.read_bytes()
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # an mtime a rewrite would change
    assert ensure_sample_archive(tmp_path / "sample") == path
    assert path.stat().st_mtime_ns == 1_000_000_000

    path.write_bytes(b"damaged")
    ensure_sample_archive(tmp_path / "sample")
    assert path.read_bytes() == original
    assert sorted(p.name for p in path.parent.iterdir()) == [ARCHIVE_NAME]

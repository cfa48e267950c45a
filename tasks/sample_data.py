"""The embedded default corpus: English text every Python installation carries, packed like OpenWebText.

`gptflow run` with no source needs no network: its corpus is the interpreter's documentation topics
(`pydoc_data.topics`) and the docstrings of an explicit list of standard-library modules, written as an
archive in the real OpenWebText layout and then processed like any downloaded archive:

    openwebtext.tar.xz                              xz-compressed tar
      openwebtext/urlsf_subsetNN-M_data.xz          each an xz-compressed tar
        NNNNNNN-<md5 of the text>.txt               one document per member (UTF-8)

The default fine-tuning pairs come from the same docstrings (a function's signature, the first paragraph
of its docstring). So that held-out pairs score something the model was not trained on, evaluation is held
out by module: the modules whose seeded name hash falls below HELDOUT_MODULE_FRACTION (HELDOUT_MODULES,
about a tenth) give the held-out pairs and nothing to the corpus. A held-out pair whose prompt or response
still occurs in the corpus or in a training pair (a docstring copied into another module, say) is left out.
Each default pair carries its side in a `split` field, "train" or "heldout".

Everything here is deterministic for one Python installation: modules are visited in a fixed order, names
are sorted, and nothing depends on the current directory, the clock, memory addresses, or the path the
interpreter was started through (a signature default that names a path of the installation, such as
`platform.architecture(executable=sys.executable)`, is shown as `...`). The docstrings are read in a fresh,
isolated interpreter (this file run as a script with `-I -S`), because libraries imported by the calling
process may replace standard-library functions (one replaces `inspect.getfile`), which would make the
corpus depend on what the caller happened to import. Archive members carry fixed metadata (mtime, owner,
mode) and the xz streams fixed settings (preset, check), so the same documents give the same bytes.
"""

import hashlib
import importlib
import inspect
import io
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

# Standard-library modules whose docstrings make the corpus. Explicit (not discovered) so the corpus does
# not change with what else is installed; none of them does anything on import beyond defining names
# (no `this`, `antigravity`, `idlelib`, `tkinter`, `turtle`). Modules missing from an installation, such as
# those removed in newer Pythons, are skipped.
CORPUS_MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "asyncio", "asyncio.base_events", "asyncio.events", "asyncio.futures",
    "asyncio.locks", "asyncio.queues", "asyncio.runners", "asyncio.streams", "asyncio.subprocess",
    "asyncio.tasks", "asyncio.transports", "base64", "bdb", "binascii", "bisect", "builtins", "bz2", "calendar",
    "cmath", "cmd", "code", "codecs", "codeop", "collections", "collections.abc", "colorsys", "compileall",
    "concurrent.futures", "configparser", "contextlib", "contextvars", "copy", "copyreg", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "doctest", "email", "email.charset", "email.contentmanager",
    "email.encoders", "email.errors", "email.feedparser", "email.generator", "email.header",
    "email.headerregistry", "email.iterators", "email.message", "email.mime.base", "email.mime.multipart",
    "email.mime.text", "email.parser", "email.policy", "email.utils", "enum", "errno", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gc", "getopt", "gettext", "glob", "graphlib",
    "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http", "http.client", "http.cookiejar",
    "http.cookies", "http.server", "imaplib", "importlib", "importlib.abc", "importlib.machinery",
    "importlib.metadata", "importlib.resources", "importlib.util", "inspect", "io", "ipaddress", "itertools",
    "json", "json.decoder", "json.encoder", "keyword", "linecache", "locale", "logging", "logging.config",
    "logging.handlers", "lzma", "mailbox", "marshal", "math", "mimetypes", "modulefinder", "multiprocessing",
    "multiprocessing.connection", "multiprocessing.managers", "multiprocessing.pool",
    "multiprocessing.shared_memory", "netrc", "numbers", "operator", "optparse", "os", "os.path", "pathlib",
    "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile",
    "pstats", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random", "re", "reprlib", "runpy", "sched",
    "secrets", "select", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "sqlite3", "stat", "statistics", "string", "stringprep", "struct", "subprocess", "symtable", "sys",
    "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "token",
    "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "types", "typing", "unicodedata", "unittest",
    "unittest.case", "unittest.mock", "unittest.result", "unittest.suite", "urllib.error", "urllib.parse",
    "urllib.request", "urllib.response", "urllib.robotparser", "uuid", "warnings", "wave", "weakref",
    "wsgiref.handlers", "wsgiref.headers", "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate",
    "xml.dom", "xml.dom.minidom", "xml.dom.pulldom", "xml.etree.ElementTree", "xml.parsers.expat", "xml.sax",
    "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server", "zipapp",
    "zipfile", "zipimport", "zlib", "zoneinfo",
)  # fmt: skip

# Modules held out for evaluation: those whose seeded hash of the name falls below the fraction. A tenth,
# like the fine-tuning stage's default heldout_fraction for a data file; with seed 0 on Python 3.11 that is
# 23 of the 213 modules and 300 held-out pairs. Changing either changes the corpus and the pairs together.
HELDOUT_MODULE_FRACTION = 0.1
HELDOUT_MODULE_SEED = 0


def is_heldout_module(name: str) -> bool:
    """Whether module `name` is reserved for evaluation: none of its docstrings go into the corpus."""
    digest = hashlib.sha256(f"{HELDOUT_MODULE_SEED}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELDOUT_MODULE_FRACTION


HELDOUT_MODULES: tuple[str, ...] = tuple(name for name in CORPUS_MODULES if is_heldout_module(name))

# A docstring shorter than this says little more than its name ("Return self.") and makes a poor document.
MIN_DOC_CHARS = 80
# Fine-tuning answers: long enough to say something, short enough for a tiny model's context.
MIN_RESPONSE_CHARS = 20
MAX_RESPONSE_CHARS = 400
# Fixed member metadata so that the archive's bytes depend on the documents only (2020-01-01T00:00:00Z).
ARCHIVE_MTIME = 1_577_836_800
ARCHIVE_NAME = "openwebtext.tar.xz"
# Every xz stream records its integrity check, so it is set here rather than left to the library
# (CRC64 is xz's own default).
XZ_CHECK = lzma.CHECK_CRC64
# A default value whose repr is longer than this, is an object repr like `<object at 0x...>`, or holds an
# absolute path is printed as `...` in signatures: such reprs vary between runs, drown the signature, or
# name this installation (`platform.architecture(executable=sys.executable)` is the interpreter's path as
# it was started, `pydoc.Doc.getdocloc(basedir=...)` the standard library's folder).
_MAX_DEFAULT_REPR = 40
_ABSOLUTE_PATH = re.compile(r"""['"](?:/|[A-Za-z]:\\\\)[^'"]""")  # a quoted '/x...' or 'C:\\x...' in a repr


def _import(name: str) -> ModuleType | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices of old modules are not our concern here
            return importlib.import_module(name)
    except Exception:  # a module this installation lacks or cannot load: the corpus does without it
        return None


def _clean_doc(doc: Any) -> str:
    return inspect.cleandoc(doc).strip() if isinstance(doc, str) else ""


class _Ellipsis:
    def __repr__(self) -> str:
        return "..."


def _signature(obj: Any, drop_self: bool = False) -> str | None:
    """`(text, width=70, **kwargs)`: parameters only, stable across runs; None when there is none."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = []
    for i, param in enumerate(sig.parameters.values()):
        if drop_self and i == 0 and param.name in ("self", "cls"):
            continue
        param = param.replace(annotation=inspect.Parameter.empty)
        if param.default is not inspect.Parameter.empty:
            shown = repr(param.default)
            if shown.startswith("<") or len(shown) > _MAX_DEFAULT_REPR or _ABSOLUTE_PATH.search(shown):
                param = param.replace(default=_Ellipsis())
        params.append(param)
    try:
        text = str(inspect.Signature(params))
    except ValueError:
        return None
    return None if " at 0x" in text else text


def _members(module: ModuleType, name: str) -> list[tuple[str, Any]]:
    """The module's public names, sorted: those in its `__all__` and those it defines itself."""
    public = getattr(module, "__all__", None)
    names = {n for n in public if isinstance(n, str)} if isinstance(public, list | tuple) else set()
    names |= {n for n, obj in vars(module).items() if getattr(obj, "__module__", None) == name}
    return [(n, getattr(module, n)) for n in sorted(names) if not n.startswith("_") and hasattr(module, n)]


def _methods(cls: type) -> list[tuple[str, Any]]:
    """Public methods (and properties) a class defines itself, sorted, unwrapped to their functions."""
    found = []
    for name, attr in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(attr, staticmethod | classmethod):
            attr = attr.__func__
        elif isinstance(attr, property):
            attr = attr.fget
        if callable(attr) and not inspect.isclass(attr):
            found.append((name, attr))
    return found


def _walk_stdlib() -> Iterator[tuple[str, str, str, Any]]:
    """(module, kind, qualified name, object) for each module, class and function of CORPUS_MODULES, once each.

    An object re-exported by several modules (os.path and posixpath) is kept under the first module met,
    which is also the module that decides whether it is held out.
    """
    seen: set[int] = set()
    for module_name in CORPUS_MODULES:
        module = _import(module_name)
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        yield module_name, "module", module_name, module
        for name, obj in _members(module, module_name):
            if id(obj) in seen or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            seen.add(id(obj))
            yield module_name, ("class" if inspect.isclass(obj) else "function"), f"{module_name}.{name}", obj


def _class_document(qualname: str, cls: type) -> str:
    """Like a pydoc page: the class, its docstring, then each documented method with its signature."""
    parts = [f"class {qualname}", _clean_doc(cls.__doc__)]
    for name, method in _methods(cls):
        doc = _clean_doc(getattr(method, "__doc__", None))
        if doc and doc != parts[1]:
            parts.append(f"{name}{_signature(method, drop_self=True) or '(...)'}\n{doc}")
    return "\n\n".join(part for part in parts if part)


def _corpus_documents_here() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    documents = {f"topic/{name}": text.strip() for name, text in topics.items() if len(text) >= MIN_DOC_CHARS}
    for module_name, kind, qualname, obj in _walk_stdlib():
        if is_heldout_module(module_name):
            continue  # its docstrings are the held-out fine-tuning answers
        own_doc = _clean_doc(obj.__doc__)
        if kind == "module":
            text = own_doc
        elif kind == "class":
            text = _class_document(qualname, obj)
        else:
            text = f"{qualname}{_signature(obj) or '(...)'}\n\n{own_doc}"
        if len(own_doc) >= MIN_DOC_CHARS or (kind == "class" and len(text) >= 2 * MIN_DOC_CHARS):
            documents[f"{kind}/{qualname}"] = text
    return sorted(documents.items())


def _first_paragraph(doc: str) -> str:
    paragraph = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(paragraph.split())


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _finetune_pairs_here() -> list[dict[str, str]]:
    pairs: dict[str, tuple[str, str]] = {}  # prompt -> (response, split)

    def add(module_name: str, qualname: str, func: Callable[..., Any], drop_self: bool) -> None:
        signature = _signature(func, drop_self=drop_self)
        response = _first_paragraph(_clean_doc(getattr(func, "__doc__", None)))
        if signature is not None and MIN_RESPONSE_CHARS <= len(response) <= MAX_RESPONSE_CHARS:
            split = "heldout" if is_heldout_module(module_name) else "train"
            pairs.setdefault(f"{qualname}{signature}", (response, split))

    for module_name, kind, qualname, obj in _walk_stdlib():
        if kind == "function":
            add(module_name, qualname, obj, drop_self=False)
        elif kind == "class":
            for name, method in _methods(obj):
                add(module_name, f"{qualname}.{name}", method, drop_self=True)

    # What pretraining and fine-tuning see, whitespace collapsed (a response is one collapsed paragraph):
    # a held-out pair found in it would be scored on text the model was trained on, so it is left out.
    seen = [_collapse(text) for _, text in _corpus_documents_here()]
    seen += [f"{prompt}\n{response}" for prompt, (response, split) in pairs.items() if split == "train"]
    haystack = "\n".join(seen)
    return [
        {"prompt": prompt, "response": response, "split": split}
        for prompt, (response, split) in sorted(pairs.items())
        if split == "train" or (_collapse(prompt) not in haystack and response not in haystack)
    ]


def _in_fresh_interpreter(what: str) -> Any:
    """Compute `what` ("documents" or "pairs") in an isolated interpreter that imported nothing else."""
    command = [sys.executable, "-I", "-S", str(Path(__file__).resolve()), what]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"building the default corpus ({what}) with {sys.executable} failed: {last}")
    return json.loads(result.stdout)


def default_corpus_documents() -> list[tuple[str, str]]:
    """(name, text) of every document of the default corpus, sorted by name.

    Names: `topic/<pydoc topic>`, `module/<module>`, `class/<module.Class>`, `function/<module.function>`.
    """
    return [(name, text) for name, text in _in_fresh_interpreter("documents")]


def default_finetune_pairs() -> list[dict[str, str]]:
    """Prompt/response pairs: a public function's qualified name and signature, and the first paragraph
    of its docstring, e.g. `textwrap.wrap(text, width=70, **kwargs)` -> "Wrap a single paragraph of text...".

    Each pair's `split` says its side: "heldout" for the functions of HELDOUT_MODULES, whose docstrings
    are not in the default corpus and whose prompt and response occur neither in it nor in a training
    pair; "train" for the others. Sorted by prompt; one pair per prompt.
    """
    return _in_fresh_interpreter("pairs")


def tar_member(name: str, size: int, directory: bool = False) -> tarfile.TarInfo:
    """A tar header with fixed owner, mode and time, so that the same content gives the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = ARCHIVE_MTIME
    info.mode = 0o755 if directory else 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if directory:
        info.type = tarfile.DIRTYPE
    return info


def inner_archive(documents: Iterable[tuple[int, str]], preset: int) -> bytes:
    """One `urlsf_subsetNN-M_data.xz`: an xz-compressed tar with one `NNNNNNN-<md5>.txt` per document."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for number, text in documents:
            data = text.encode("utf-8")
            info = tar_member(f"{number:07d}-{hashlib.md5(data).hexdigest()}.txt", len(data))
            tar.addfile(info, io.BytesIO(data))
    return lzma.compress(buffer.getvalue(), format=lzma.FORMAT_XZ, check=XZ_CHECK, preset=preset)


def write_openwebtext_archive(
    documents: list[tuple[str, str]],
    dest: Path,
    docs_per_subset: int = 500,
    subsets_per_file: int = 10,
    preset: int = 6,
) -> Path:
    """Pack (name, text) documents, in the order given, as an OpenWebText-layout `dest` (openwebtext.tar.xz).

    Every `docs_per_subset` documents make one inner archive `openwebtext/urlsf_subsetNN-M_data.xz`;
    `subsets_per_file` inner archives share one subset number NN (M counts 1, 2, ... within it), as in
    the real corpus. Names are not stored (the real layout has none): a member is `<index>-<md5>.txt`.
    The same documents give the same bytes; the file appears at `dest` by one atomic rename.
    """
    problems = []
    if docs_per_subset < 1:
        problems.append(f"docs_per_subset must be at least 1, got {docs_per_subset}")
    if subsets_per_file < 1:
        problems.append(f"subsets_per_file must be at least 1, got {subsets_per_file}")
    if not 0 <= preset <= 9:
        problems.append(f"preset must be an xz preset 0-9, got {preset}")
    if problems:
        raise ValueError("; ".join(problems))
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        with lzma.open(tmp, "wb", format=lzma.FORMAT_XZ, check=XZ_CHECK, preset=preset) as packed:
            with tarfile.open(fileobj=packed, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                tar.addfile(tar_member("openwebtext", 0, directory=True))
                for group, start in enumerate(range(0, len(documents), docs_per_subset)):
                    texts = [text for _, text in documents[start : start + docs_per_subset]]
                    chunk = [(start + i, text) for i, text in enumerate(texts)]
                    subset, file_number = divmod(group, subsets_per_file)
                    data = inner_archive(chunk, preset)
                    info = tar_member(f"openwebtext/urlsf_subset{subset:02d}-{file_number + 1}_data.xz", len(data))
                    tar.addfile(info, io.BytesIO(data))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _same_bytes(a: Path, b: Path, block: int = 1 << 20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk = fa.read(block)
            if chunk != fb.read(block):
                return False
            if not chunk:
                return True


def ensure_sample_archive(folder: Path) -> Path:
    """`folder/openwebtext.tar.xz` holding the default corpus; an identical file already there is left
    untouched, so the download stage need not hash it again (its content is the source's identity)."""
    folder = Path(folder).expanduser().resolve()
    dest = folder / ARCHIVE_NAME
    fresh = write_openwebtext_archive(default_corpus_documents(), folder / f".{ARCHIVE_NAME}.{uuid.uuid4().hex}.new")
    try:
        if dest.is_file() and _same_bytes(fresh, dest):
            return dest
        os.replace(fresh, dest)
    finally:
        fresh.unlink(missing_ok=True)
    return dest


def default_source_dir() -> Path:
    """Where the pipeline keeps the generated default archive: `$GPTFLOW_CACHE`, else `~/.cache/gptflow`.

    Outside the store on purpose: the store holds stages and run records only; the archive is an input,
    which the download stage copies into the store like any other source.
    """
    base = os.environ.get("GPTFLOW_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "gptflow"
    return Path(base).expanduser() / "default-corpus"


if __name__ == "__main__":
    # The fresh interpreter of `_in_fresh_interpreter`: the answer goes to stdout as ASCII JSON.
    _builders = {"documents": _corpus_documents_here, "pairs": _finetune_pairs_here}
    sys.stdout.write(json.dumps(_builders[sys.argv[1]]()))

"""The model registry: every evaluated model, the `champion` and `challenger` aliases, the promotion log and
the frozen evaluation set, kept in the store beside the run records (the store's top level holds only stages
and `runs/`: tools read every other folder there as a stage).

    <root>/runs/registry/models/<stage>-<version>.json   each evaluated model: its origin and scores
    <root>/runs/registry/aliases/challenger.json         the last decision, whole, and the model it judged
    <root>/runs/registry/aliases/champion.json           the promoted model, and the decision that made it
    <root>/runs/registry/promotions.jsonl                one line per decision: appended, fsynced, never rewritten
    <root>/runs/registry/frozen/<id>/                    a frozen evaluation set: documents, held-out pairs
    <root>/runs/registry/.lock                           held while anything here is written

A decision is committed under the lock in an order that a crash cannot break: the challenger alias, which
holds the whole decision, is replaced by one atomic rename (that rename commits it); then the champion
alias, when the decision promotes; then the decision is appended to the log. A writer that dies midway
leaves every file whole, the old alias or the new; the next writer completes what a committed decision left
undone. A log line cut short by a crash is cut off and written again whole; the lines before it are never
touched.

`Store.gc` keeps the versions the aliases name, and their lineage, so the champion stays loadable.
"""

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from storage.errors import DataIntegrityError, TransientError
from storage.store import RUNS, atomic_write_json, canonical_json

REGISTRY = "registry"
CHAMPION, CHALLENGER = "champion", "challenger"
ALIASES = (CHAMPION, CHALLENGER)
PROMOTED, REJECTED = "promoted", "rejected"
LOG = "promotions.jsonl"
DOCUMENTS, HELDOUT, FROZEN_INFO = "documents.jsonl", "heldout.jsonl", "frozen.json"
FROZEN_ID_CHARS = 12
# A commit takes milliseconds; a lock held this long belongs to a writer that hangs.
LOCK_SECONDS = 300.0


def model_id(stage: str, version: str) -> str:
    """How the registry names a model: the store version it is, `finetune/3f2a9c01b2d4`."""
    return f"{stage}/{version}"


def split_model_id(model: str) -> tuple[str, str]:
    stage, _, version = model.partition("/")
    if not stage or not version or "/" in version:
        raise ValueError(f"not a model id (stage/version): {model!r}")
    return stage, version


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
    # ASCII escapes: a lone surrogate (which a character tokenizer can hold) survives the round trip.
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode("ascii")


@dataclass(frozen=True)
class FrozenSet:
    """The evaluation set every challenger and champion is scored on: documents as text (so that a model of
    another tokenizer encodes them with its own) and held-out prompt/response pairs. Its id is a hash of
    its content."""

    id: str
    documents: tuple[str, ...]
    heldout: tuple[dict[str, str], ...]
    source: dict[str, Any]

    @classmethod
    def make(cls, documents: Sequence[str], heldout: Sequence[dict[str, str]], source: dict[str, Any]) -> "FrozenSet":
        docs = tuple(documents)
        pairs = tuple({"prompt": p["prompt"], "response": p["response"]} for p in heldout)
        digest = hashlib.sha256(_jsonl([{"text": d} for d in docs]) + b"\0" + _jsonl(pairs))
        return cls(digest.hexdigest()[:FROZEN_ID_CHARS], docs, pairs, dict(source))

    @property
    def text_bytes(self) -> int:
        """UTF-8 bytes of the documents: what bits per byte divides by, the same for every tokenizer."""
        return sum(len(doc.encode("utf-8", errors="surrogatepass")) for doc in self.documents)

    def files(self) -> dict[str, bytes]:
        return {DOCUMENTS: _jsonl([{"text": d} for d in self.documents]), HELDOUT: _jsonl(list(self.heldout))}

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "documents": len(self.documents),
            "text_bytes": self.text_bytes,
            "heldout_pairs": len(self.heldout),
            "source": self.source,
        }


class Registry:
    """The registry of the store rooted at `store_root`. Reading takes no lock; every write holds it."""

    def __init__(self, store_root: str | os.PathLike[str]) -> None:
        self.root = Path(store_root).expanduser().resolve() / RUNS / REGISTRY

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # -- reading ------------------------------------------------------------------------------------
    def alias(self, name: str) -> dict[str, Any] | None:
        """The alias file's record (`stage`, `version`, `model`, `seq`, ...), or None when it was never set."""
        if name not in ALIASES:
            raise ValueError(f"unknown alias {name!r}; the aliases are {', '.join(ALIASES)}")
        return self._read_json(self.root / "aliases" / f"{name}.json")

    def model(self, stage: str, version: str) -> dict[str, Any] | None:
        return self._read_json(self._model_path(stage, version))

    def history(self) -> list[dict[str, Any]]:
        """Every committed decision, oldest first. A last line without its newline is one a crash cut short:
        it is not a decision (the next writer writes it again whole)."""
        path = self.root / LOG
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")[:-1]  # the part after the last newline is unfinished
        decisions = []
        for number, raw in enumerate(lines, start=1):
            try:
                line = json.loads(raw)
            except ValueError:
                raise DataIntegrityError(f"{path}:{number}: not a JSON decision record") from None
            if not isinstance(line, dict) or "seq" not in line:
                raise DataIntegrityError(f"{path}:{number}: not a decision record (no seq)")
            decisions.append(line)
        return decisions

    def frozen_info(self, frozen_id: str) -> dict[str, Any] | None:
        """What the frozen set `frozen_id` holds (counts, source), without reading it."""
        return self._read_json(self.root / "frozen" / frozen_id / FROZEN_INFO)

    def frozen(self, frozen_id: str) -> FrozenSet:
        """The frozen evaluation set `frozen_id`, checked against the hashes it was written with."""
        folder = self.root / "frozen" / frozen_id
        info = self._read_json(folder / FROZEN_INFO)
        if info is None:
            raise DataIntegrityError(f"{folder}: the frozen evaluation set {frozen_id} is not in the registry")
        rows: dict[str, list[dict[str, Any]]] = {}
        for name in (DOCUMENTS, HELDOUT):
            try:
                data = (folder / name).read_bytes()
            except FileNotFoundError:
                raise DataIntegrityError(f"{folder / name}: missing from the frozen evaluation set") from None
            if hashlib.sha256(data).hexdigest() != info.get("files", {}).get(name):
                raise DataIntegrityError(f"{folder / name}: does not match the sha256 it was frozen with")
            rows[name] = [json.loads(line) for line in data.splitlines()]
        frozen = FrozenSet.make([r["text"] for r in rows[DOCUMENTS]], rows[HELDOUT], info.get("source", {}))
        if frozen.id != frozen_id:
            raise DataIntegrityError(f"{folder}: its content hashes to {frozen.id}, not {frozen_id}")
        return frozen

    # -- writing ------------------------------------------------------------------------------------
    def record(self, models: Sequence[dict[str, Any]]) -> None:
        """Write the records of evaluated `models` (each with `stage` and `version`), replacing older ones."""
        with self._locked():
            self._recover()
            self._record(models)

    def commit(
        self,
        decision: dict[str, Any],
        *,
        expected_seq: int | None,
        models: Sequence[dict[str, Any]] = (),
        frozen: FrozenSet | None = None,
    ) -> dict[str, Any]:
        """Commit `decision` and record `models` (as `record` does); returns the decision as committed, with
        its `seq` and time.

        `decision` holds at least `decision` (promoted or rejected), `challenger` and `champion` (model ids;
        the champion None for the first), `frozen_set` (the id it was scored on) and `evaluate_version`;
        `compared_with`, when given, is kept with the champion alias it makes. It is committed only while
        the champion alias is still the one it was judged against, the one whose `seq` is `expected_seq`
        (None: no champion yet); otherwise the judgement is stale, a TransientError, and it must be made
        again. A decision whose `evaluate_version` was committed already is not committed twice: that
        commit is returned.
        """
        if decision.get("decision") not in (PROMOTED, REJECTED):
            raise ValueError(f"a decision is {PROMOTED} or {REJECTED}, not {decision.get('decision')!r}")
        split_model_id(decision["challenger"])
        with self._locked():
            self._recover()
            version = decision.get("evaluate_version")
            done = next((d for d in self.history() if version and d.get("evaluate_version") == version), None)
            if done is not None:
                self._record(models)
                return done
            champion = self.alias(CHAMPION)
            current = None if champion is None else champion["seq"]
            if current != expected_seq:
                now = "none" if champion is None else f"{champion['model']} (decision {current})"
                raise TransientError(
                    f"{self.root}: the champion is now {now}, not the one this decision was judged against "
                    f"(decision {expected_seq}): it must be judged again"
                )
            self._record(models)
            if frozen is not None:
                self._write_frozen(frozen)
            last = self.alias(CHALLENGER)
            line = {**decision, "seq": (last["seq"] if last else 0) + 1, "at": _now()}
            self._apply(line)
            return line

    def _record(self, models: Sequence[dict[str, Any]]) -> None:
        for record in models:
            atomic_write_json(self._model_path(record["stage"], record["version"]), record)

    def _apply(self, line: dict[str, Any]) -> None:
        """Make the committed decision `line` take effect: aliases first (the challenger's rename commits
        it), then the log. Run again after a crash, it does what is left."""
        stage, version = split_model_id(line["challenger"])
        last = self.alias(CHALLENGER)
        if last is None or last["seq"] < line["seq"]:
            self._write_alias(CHALLENGER, {"stage": stage, "version": version, "seq": line["seq"], "decision": line})
        champion = self.alias(CHAMPION)
        if line["decision"] == PROMOTED and (champion is None or champion["seq"] < line["seq"]):
            record = {
                "stage": stage,
                "version": version,
                "seq": line["seq"],
                "at": line["at"],
                "run_id": line.get("run_id"),
                "frozen_set": line["frozen_set"],
                "previous": line.get("champion"),
                "promoted_by": line.get("evaluate_version"),
                "compared_with": line.get("compared_with"),
            }
            self._write_alias(CHAMPION, record)
        logged = self.history()
        if not logged or logged[-1]["seq"] < line["seq"]:
            self._append(line)

    def _recover(self) -> None:
        """Finish what a writer that died left undone (the caller holds the lock)."""
        path = self.root / LOG
        if path.is_file():
            with open(path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    # An append cut short: its decision is whole in the challenger alias and is written again.
                    f.truncate(data.rfind(b"\n") + 1)
                    f.flush()
                    os.fsync(f.fileno())
        last = self.alias(CHALLENGER)
        if last is not None:
            self._apply(last["decision"])

    def _write_alias(self, name: str, record: dict[str, Any]) -> None:
        record = {"alias": name, "model": model_id(record["stage"], record["version"]), **record}
        atomic_write_json(self.root / "aliases" / f"{name}.json", record)

    def _append(self, line: dict[str, Any]) -> None:
        path = self.root / LOG
        created = not path.exists()
        data = (canonical_json(line) + "\n").encode("utf-8")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(path.parent)

    def _write_frozen(self, frozen: FrozenSet) -> None:
        """Write `frozen` under its id (once: its content is its name), published by one rename."""
        final = self.root / "frozen" / frozen.id
        if (final / FROZEN_INFO).is_file():
            return
        tmp = final.parent / f".tmp-{frozen.id}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            hashes = {}
            for name, data in frozen.files().items():
                with open(tmp / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                hashes[name] = hashlib.sha256(data).hexdigest()
            atomic_write_json(tmp / FROZEN_INFO, {**frozen.describe(), "created_at": _now(), "files": hashes})
            shutil.rmtree(final, ignore_errors=True)  # a folder without its info file is a dead writer's
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @contextmanager
    def _locked(self, timeout: float = LOCK_SECONDS) -> Iterator[None]:
        """flock on one file that is never removed: the kernel releases it when its holder dies."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        deadline = time.monotonic() + timeout
        with open(path, "a+") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TransientError(
                            f"{path}: another run has held the registry's lock for {timeout:.0f} s"
                        ) from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- layout -------------------------------------------------------------------------------------
    def _model_path(self, stage: str, version: str) -> Path:
        split_model_id(model_id(stage, version))
        return self.root / "models" / f"{stage}-{version}.json"

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise DataIntegrityError(f"{path}: unreadable ({type(exc).__name__})") from exc
        if not isinstance(value, dict):
            raise DataIntegrityError(f"{path}: not a JSON object")
        return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The versioned store (storage contract in DESIGN.md).

    <root>/<stage>/<version>/manifest.json   + the stage's files
    <root>/<stage>/latest                     the version the newest successful run of the stage made or used
    <root>/runs/<run_id>.json                 which version of each stage one pipeline run used or made

A version is built in a temporary folder beside its final place and published with one atomic rename, so a
crash never leaves a half-written version visible. Building one version is serialised across processes by a
lock file (flock: the kernel releases it when the holder dies).
"""

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from storage.errors import DiskFullError, StoreError, TransientError

VERSION_CHARS = 12
MANIFEST = "manifest.json"
RUNS = "runs"
_HASH_BLOCK = 1 << 20
# How often a build waiting for another run's lock on the same version says so in its log.
LOCK_REPORT_SECONDS = 60.0

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageRef:
    """What tasks pass between each other: a stage's name and version id, never the data itself."""

    stage: str
    version: str
    reused: bool = False  # True when the version was already in the store and nothing was computed


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def version_id(
    stage: str,
    code_version: str,
    params: dict[str, Any],
    inputs: dict[str, str],
    identity: Any = None,
    environment: dict[str, Any] | None = None,
) -> str:
    """Same stage, code, parameters, inputs (and source identity, for download), and the same library
    versions and machine traits that shape the output (`environment`): same version id."""
    fields = {"stage": stage, "code": code_version, "params": params, "inputs": inputs, "identity": identity}
    if environment:
        fields["environment"] = environment
    payload = canonical_json(fields)
    return hashlib.sha256(payload.encode()).hexdigest()[:VERSION_CHARS]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old content or the new, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


# The per-shard cache of a stage (written by the data stages' shard maps): <stage>/.shards/<step>/<xx>/<hash>/
SHARDS = ".shards"
SHARD_RESULT = "result.json"
# How long gc keeps a shard cache entry that no version links to (signatures, token arrays): a nightly run
# reuses them, so a week covers missed nights.
SHARD_DAYS = 7.0


class Store:
    """A store rooted at one folder; every method is safe to call from several processes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- layout -------------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        if not stage or "/" in stage or stage.startswith(".") or stage == RUNS:
            raise ValueError(f"invalid stage name {stage!r}")
        return self.root / stage

    def path(self, stage: str, version: str) -> Path:
        if not version or "/" in version or version.startswith("."):
            raise ValueError(f"invalid version id {version!r}")
        return self.stage_dir(stage) / version

    def work_dir(self, stage: str, version: str) -> Path:
        """Scratch space that survives a failed attempt (download partials, training checkpoints)."""
        path = self.stage_dir(stage) / ".work" / version
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clear_work(self, stage: str, version: str) -> None:
        shutil.rmtree(self.stage_dir(stage) / ".work" / version, ignore_errors=True)

    # -- reading ------------------------------------------------------------------------------------
    def has(self, stage: str, version: str) -> bool:
        return (self.path(stage, version) / MANIFEST).is_file()

    def damage(self, stage: str, version: str, verify: bool = False) -> str | None:
        """Why the stored `stage/version` cannot be trusted, or None when it is intact: its manifest must parse
        and name it, and every file it lists must exist with the listed size (and, with `verify`, the listed
        sha256: slower, it reads every byte). A version that is not there at all is not damaged: see `has`."""
        folder = self.path(stage, version)
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            files = manifest["files"]
            named = (manifest["stage"], manifest["version"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"its {MANIFEST} is unreadable ({type(exc).__name__})"
        if named != (stage, version) or not isinstance(files, dict):
            return f"its {MANIFEST} describes {named[0]}/{named[1]}"
        for name, info in sorted(files.items()):
            path = folder / name
            try:
                size = path.stat().st_size
            except OSError:
                return f"{name} is missing"
            if size != info.get("bytes"):
                return f"{name} has {size} bytes, the manifest lists {info.get('bytes')}"
            if verify and sha256_file(path) != info.get("sha256"):
                return f"{name} does not match its sha256"
        return None

    def manifest(self, stage: str, version: str) -> dict[str, Any]:
        path = self.path(stage, version) / MANIFEST
        if not path.is_file():
            raise StoreError(f"{stage}/{version} is not in the store at {self.root}")
        return json.loads(path.read_text(encoding="utf-8"))

    def latest(self, stage: str) -> str | None:
        path = self.stage_dir(stage) / "latest"
        if not path.is_file():
            return None
        version = path.read_text(encoding="utf-8").strip()
        return version if version and self.has(stage, version) else None

    def require_latest(self, stage: str) -> str:
        version = self.latest(stage)
        if version is None:
            raise StoreError(f"the store at {self.root} has no complete version of stage {stage!r}: run it first")
        return version

    def set_latest(self, stage: str, version: str) -> None:
        if not self.has(stage, version):
            raise StoreError(f"cannot point {stage}/latest at {version}: it is not in the store")
        atomic_write_text(self.stage_dir(stage) / "latest", version + "\n")

    def stages(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and p.name != RUNS and not p.name.startswith(".")
        )

    def versions(self, stage: str) -> list[dict[str, Any]]:
        """Manifests of the stage's complete versions, oldest first."""
        folder = self.stage_dir(stage)
        if not folder.is_dir():
            return []
        found = [
            json.loads((p / MANIFEST).read_text(encoding="utf-8"))
            for p in folder.iterdir()
            if not p.name.startswith(".") and (p / MANIFEST).is_file()
        ]
        return sorted(found, key=lambda m: m["created_at"])

    def lineage(self, stage: str, version: str) -> dict[str, str]:
        """Every version `stage/version` was built from, directly or not: {stage: version}."""
        found: dict[str, str] = {}
        todo = [(stage, version)]
        while todo:
            for name, input_version in self.manifest(*todo.pop()).get("inputs", {}).items():
                if name not in found:
                    found[name] = input_version
                    todo.append((name, input_version))
        return found

    def find(self, version: str) -> tuple[str, str]:
        """The (stage, version) whose id is `version` or starts with it."""
        hits = [
            (stage, m["version"])
            for stage in self.stages()
            for m in self.versions(stage)
            if m["version"].startswith(version)
        ]
        if len(hits) != 1:
            what = "no version" if not hits else f"{len(hits)} versions"
            raise StoreError(f"{what} in {self.root} match {version!r}")
        return hits[0]

    # -- writing ------------------------------------------------------------------------------------
    @contextmanager
    def lock(
        self,
        stage: str,
        version: str,
        timeout: float = 6 * 3600.0,
        *,
        owner: dict[str, Any] | None = None,
        log: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> Iterator[None]:
        """Hold the lock that serialises building `stage/version` across processes.

        The holder writes who it is into the lock file (host, pid, and `owner`, e.g. its run id), so that a
        waiter can say in `log` whom it waits for: as soon as it has to wait, then every LOCK_REPORT_SECONDS.

        The lock file is removed by its holder on release, so that locks do not pile up one per version
        ever built. A waiter may then hold a lock on a file that is gone; it checks, once it holds the lock,
        that the path still names the file it locked, and starts over otherwise.
        """
        lock_dir = self.stage_dir(stage) / ".locks"
        path = lock_dir / f"{version}.lock"
        log = log or _log
        started = time.monotonic()
        deadline = started + timeout
        next_report = started
        while True:
            lock_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "a+") as handle:
                while True:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        now = time.monotonic()
                        if now > deadline:
                            raise TransientError(
                                f"{stage}/{version} is being built by another run ({lock_holder(path)}; lock {path})"
                            ) from None
                        if now >= next_report:
                            so_far = f", waited {_duration(now - started)} so far" if now - started >= 1 else ""
                            log.info(
                                "waiting for %s/%s: %s is building it (lock %s%s)",
                                stage,
                                version,
                                lock_holder(path),
                                path,
                                so_far,
                            )
                            next_report = now + LOCK_REPORT_SECONDS
                        time.sleep(0.2)
                try:
                    if not _same_file(handle, path):
                        continue  # its holder removed it as we waited: lock the file now there
                    holder = {"host": socket.gethostname(), "pid": os.getpid(), **(owner or {})}
                    handle.seek(0)
                    handle.truncate()
                    handle.write(json.dumps(holder, sort_keys=True))
                    handle.flush()
                    try:
                        yield
                    finally:
                        path.unlink(missing_ok=True)
                    return
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def publish(
        self,
        stage: str,
        version: str,
        build: Callable[[Path], dict[str, Any] | None],
        *,
        params: dict[str, Any],
        inputs: dict[str, str],
        code_version: str,
        environment: dict[str, Any] | None = None,
        prefect: dict[str, Any] | None = None,
        replace: bool = False,
        log: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> bool:
        """Build `stage/version` with `build(tmp_dir) -> metrics` and publish it atomically.

        Returns False, building nothing, when the version is already complete and intact (another run made
        it while this one waited for the lock) and `replace` is not set. With `replace`, or when the stored
        version is damaged, the stored one is swapped for the rebuilt one in two renames under the lock.

        A disk that fills up is a DiskFullError naming the path and how much of the version was written;
        nothing is published and the unfinished folder is removed.

        While another run builds the same version, `log` says whom this one waits for (see `lock`).
        """
        for name, input_version in inputs.items():
            if not self.has(name, input_version):
                raise StoreError(f"{stage}: input {name}/{input_version} is not in the store at {self.root}")
        final = self.path(stage, version)
        run_id = (prefect or {}).get("flow_run_id")
        with self.lock(stage, version, owner={"run_id": run_id} if run_id else None, log=log):
            self._recover(stage, version)
            if self.has(stage, version) and not replace and self.damage(stage, version) is None:
                return False
            tmp = final.parent / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                metrics = build(tmp) or {}
                manifest = {
                    "stage": stage,
                    "version": version,
                    "created_at": datetime.now(UTC).isoformat(),
                    "params": params,
                    "inputs": dict(inputs),
                    "code_version": code_version,
                    "environment": environment or {},
                    "files": self._describe_files(tmp),
                    "metrics": metrics,
                    "prefect": prefect or {},
                }
                atomic_write_json(tmp / MANIFEST, manifest)
                _fsync_path(tmp)
                trash = None
                if final.exists():
                    trash = final.parent / f".trash-{version}-{uuid.uuid4().hex[:8]}"
                    os.rename(final, trash)
                os.rename(tmp, final)
                _fsync_path(final.parent)
                if trash is not None:
                    shutil.rmtree(trash, ignore_errors=True)
            except BaseException as exc:
                written = _folder_bytes(tmp)
                shutil.rmtree(tmp, ignore_errors=True)
                if not isinstance(exc, DiskFullError) and (full := _disk_full(exc)) is not None:
                    where = full.filename or tmp
                    raise DiskFullError(
                        f"{stage}/{version}: no space left on the device writing {where} ({written:,} bytes of the "
                        f"version written, {_free_bytes(self.root):,} bytes free there); nothing was published: "
                        "free space and rerun"
                    ) from exc
                raise
        self.set_latest(stage, version)
        return True

    def _recover(self, stage: str, version: str) -> None:
        """Undo what a writer of `stage/version` that died left behind; the caller holds the version's lock.

        A forced rebuild swaps the old version out (to .trash-*) and the new one in with two renames; a
        crash between them leaves no version in place, so the old one is put back. Unfinished builds
        (.tmp-*) and swapped-out versions are then removed.
        """
        final = self.path(stage, version)
        trash = sorted(final.parent.glob(f".trash-{version}-*"), key=lambda p: p.stat().st_mtime)
        if not final.exists() and trash and (trash[-1] / MANIFEST).is_file():
            os.rename(trash.pop(), final)
        for leftover in [*trash, *final.parent.glob(f".tmp-{version}-*")]:
            shutil.rmtree(leftover, ignore_errors=True)

    @staticmethod
    def _describe_files(folder: Path) -> dict[str, dict[str, Any]]:
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            _fsync_path(path)
            files[path.relative_to(folder).as_posix()] = {
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        return files

    # -- runs ---------------------------------------------------------------------------------------
    def write_run(self, run_id: str, record: dict[str, Any]) -> Path:
        path = self.root / RUNS / f"{run_id}.json"
        atomic_write_json(path, record)
        return path

    def read_run(self, run_id: str) -> dict[str, Any] | None:
        """The record of run `run_id`, or None when there is none."""
        path = self.root / RUNS / f"{run_id}.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path} is not a readable run record ({type(exc).__name__})") from exc
        if not isinstance(record, dict):
            raise StoreError(f"{path} is not a readable run record (not a JSON object)")
        return record

    def runs(self) -> list[dict[str, Any]]:
        folder = self.root / RUNS
        if not folder.is_dir():
            return []
        records = [json.loads(p.read_text(encoding="utf-8")) for p in folder.glob("*.json")]
        return sorted(records, key=lambda r: r.get("started_at", ""))

    # -- garbage collection ---------------------------------------------------------------------------
    def gc(
        self, keep_runs: int = 5, dry_run: bool = False, scratch: bool = False, shard_days: float = SHARD_DAYS
    ) -> list[str]:
        """Remove versions that neither a `latest` pointer, the last `keep_runs` runs, a run still going, nor
        an alias of the model registry (the champion) reach. What a kept version was built from (its lineage)
        is kept too. Returns "stage/version" of each removed version.

        Leftovers of writers that died go as well (a version half swapped out by a crashed forced rebuild
        is put back first), and the scratch of versions that are complete. With `scratch`, the scratch of
        unfinished versions goes too (download partials, training checkpoints: their resume state), except
        where a build holds the version's lock. Per-shard cache entries (`<stage>/.shards/`) go once no stored
        version holds their files and no build has used them for `shard_days`.
        """
        if not dry_run:  # first, so that a version put back by recovery counts as present below
            for stage in self.stages():
                for leftover in list(self.stage_dir(stage).glob(".t*-*")):  # .tmp-* and .trash-*
                    self._sweep(stage, leftover.name.split("-")[1], lambda version: None)
        keep: set[tuple[str, str]] = set()
        for stage in self.stages():
            if (version := self.latest(stage)) is not None:
                keep.add((stage, version))
        records = self.runs()
        recent = records[-keep_runs:] if keep_runs > 0 else []
        for record in [*recent, *(r for r in records if _still_running(r))]:
            for stage, info in record.get("stages", {}).items():
                if info.get("version") and self.has(stage, info["version"]):
                    keep.add((stage, info["version"]))
        # The models the registry's aliases name (storage/registry.py; read here without importing it, so
        # that every stage's code fingerprint stays free of the registry's code): the champion stays loadable.
        for alias in sorted((self.root / RUNS / "registry" / "aliases").glob("*.json")):
            try:
                named = json.loads(alias.read_text(encoding="utf-8"))
                ref = (named["stage"], named["version"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise StoreError(f"{alias}: unreadable ({type(exc).__name__}); gc removes nothing until fixed") from exc
            if self.has(*ref):
                keep.add(ref)
        todo = list(keep)
        while todo:
            stage, version = todo.pop()
            for name, input_version in self.manifest(stage, version).get("inputs", {}).items():
                if (name, input_version) not in keep and self.has(name, input_version):
                    keep.add((name, input_version))
                    todo.append((name, input_version))
        removed = []
        for stage in self.stages():
            folder = self.stage_dir(stage)
            drop = [m["version"] for m in self.versions(stage) if (stage, m["version"]) not in keep]
            for version in drop:
                if dry_run or self._sweep(stage, version, lambda v, s=stage: shutil.rmtree(self.path(s, v))):
                    removed.append(f"{stage}/{version}")
            if not dry_run and (folder / ".work").is_dir():
                for work in list((folder / ".work").iterdir()):
                    if scratch or self.has(stage, work.name):
                        self._sweep(stage, work.name, lambda v, s=stage: self.clear_work(s, v))
            if not dry_run:
                self._gc_shards(folder / SHARDS, time.time() - shard_days * 86400)
        return removed

    @staticmethod
    def _gc_shards(folder: Path, unused_since: float) -> None:
        """Remove the shard cache entries under `folder` that no version links to, last used before
        `unused_since` (an entry's result file is touched each time a build takes it)."""
        for result in list(folder.glob(f"*/*/*/{SHARD_RESULT}")):
            entry = result.parent
            try:
                linked = any(p.stat().st_nlink > 1 for p in (entry / "files").rglob("*") if p.is_file())
                if not linked and result.stat().st_mtime < unused_since:
                    shutil.rmtree(entry, ignore_errors=True)
            except FileNotFoundError:  # another gc, or a build replacing a damaged entry
                continue

    def _sweep(self, stage: str, version: str, remove: Callable[[str], None]) -> bool:
        """`remove(version)` after recovering the version's leftovers, unless a live writer holds it."""
        try:
            with self.lock(stage, version, timeout=0.0):
                self._recover(stage, version)
                remove(version)
                return True
        except TransientError:
            return False  # a writer is at work on this version: nothing of it is a leftover


def _disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC (or quota) error behind `exc`, however a library wrapped it; None when there is none."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        if "No space left on device" in str(error):  # libraries that report it in words (pyarrow, torch)
            return OSError(errno.ENOSPC, str(error).strip().splitlines()[0][:300] if str(error).strip() else "")
        error = error.__cause__ or error.__context__
    return None


def _folder_bytes(folder: Path) -> int:
    try:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    except OSError:
        return 0


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def lock_holder(path: Path) -> str:
    """Who holds the lock file at `path`, as its holder wrote it there: `run <id> (pid <n> on <host>)`."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        holder = None
    if not isinstance(holder, dict) or "pid" not in holder:
        return "another process (it has not written its name yet)"
    where = f"pid {holder['pid']} on {holder.get('host', '?')}"
    return f"run {holder['run_id']} ({where})" if holder.get("run_id") else where


def _same_file(handle: Any, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def process_started(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None where that cannot be read.
    Together with the pid it names one process: a pid reused by a later process has another start."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 of /proc/PID/stat, counted after the command name, which is in parentheses and may hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def run_status(record: dict[str, Any]) -> str:
    """A run record's status, with `dead` for a run that says `running` but whose process is known to be
    gone (same host, and its pid gone or now another process): a run killed with SIGKILL cannot say so."""
    status = str(record.get("status"))
    if status != "running":
        return status
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int):
        return status  # cannot tell from here: assume it is alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        pass
    started = record.get("pid_started")
    if isinstance(started, int) and process_started(pid) not in (None, started):
        return "dead"
    return status


def _still_running(record: dict[str, Any]) -> bool:
    return run_status(record) == "running"

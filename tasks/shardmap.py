"""Per-shard work: one Prefect task run per shard, each cached in the store on its own inputs.

A data stage splits its work into shards (an inner archive, a document shard) and hands them to
`map_shards` as `ShardJob`s. Each job runs `fn(out_dir, *job.args)`: the function writes its files into
`out_dir` (a fresh folder) and returns a small JSON-able dict. Then:

- **Prefect**: inside a flow run, every job is a task run named `<stage>-<step>-<shard>`, submitted through
  the flow's task runner, so the UI shows each shard's state and a failed shard is retried alone (transient
  faults only, with backoff). The other shards still finish, so a rerun of the flow redoes only what failed.
  Locally the task runs are threads that hand the work itself to one pool of plain worker processes (which
  never start Prefect); on a Dask task runner the task runs execute on the cluster's workers.
- **Cache**: a job with a `key` (the content hashes of its inputs and anything else it reads that is not in
  the stage's parameters) is stored under `<stage>/.shards/<step>/<hash>/` with its result and files. The
  hash also covers the stage's code fingerprint, library versions and parameters, so a shard is recomputed
  exactly when something that shapes it changed: a nightly run with one new archive recomputes one archive's
  shards. Files are placed into `job.dest` by hard link (a copy where links are refused), so a version built
  from cached shards is byte-identical to one built from scratch, and costs no extra disk.

A cache entry is published by one atomic rename, checked (every file's size) before it is used, and an
entry that fails the check is removed and recomputed.
"""

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from storage.store import SHARD_RESULT as RESULT
from storage.store import SHARDS, canonical_json
from tasks.stage import retry_transient_only

FILES = "files"


@dataclass(frozen=True)
class ShardJob:
    """One shard's work. `fn(out_dir, *args)` writes files into out_dir and returns a JSON-able dict."""

    name: str  # unique within the step; part of the task run's name in the UI
    args: tuple[Any, ...]  # picklable plain values (paths as str)
    # What the result depends on besides the stage's code, libraries and parameters: the content hashes of
    # the inputs (never their paths, which differ between versions), whatever names the files it writes (two
    # empty shards have the same content), and any other input. None: not cached.
    key: Mapping[str, Any] | None = None
    dest: Path | None = None  # where the files written to out_dir go (relative names kept); None: dropped
    spool: Path | None = None  # a scratch file holding the job's input, removed once the job has ended


@dataclass(frozen=True)
class ShardScope:
    """What every shard of a stage's build shares: where its cache lives and what its key is made of."""

    stage: str
    root: Path  # the store's root
    fingerprint: Mapping[str, Any]  # code version, environment, identity parameters of the stage
    scratch: Path  # where a shard writes before its files are published

    def entry(self, step: str, fn: Callable[..., Any], key: Mapping[str, Any]) -> Path:
        payload = canonical_json(
            {"stage": self.stage, "step": step, "fn": _qualified(fn), "key": dict(key), **self.fingerprint}
        )
        digest = hashlib.sha256(payload.encode()).hexdigest()[:32]
        return self.root / self.stage / SHARDS / step / digest[:2] / digest


def scope_of(ctx: Any) -> ShardScope:
    """The shard scope of a stage's build (a StageContext)."""
    return ShardScope(ctx.stage, ctx.store.root, ctx.fingerprint, ctx.work / "shards")


def _qualified(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


# -- the cache ------------------------------------------------------------------------------------------


def _read_entry(entry: Path) -> dict[str, Any] | None:
    """The result stored at `entry`, or None when it is missing or damaged (then it is removed)."""
    try:
        record = json.loads((entry / RESULT).read_text(encoding="utf-8"))
        files = record["files"]
        if all((entry / FILES / name).stat().st_size == size for name, size in files.items()):
            os.utime(entry / RESULT)  # last used now: what gc goes by for entries no version links to
            return record
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        if not entry.exists():
            return None
    shutil.rmtree(entry, ignore_errors=True)  # damaged: recomputed by the caller
    return None


def cached_result(scope: ShardScope, step: str, fn: Callable[..., Any], key: Mapping[str, Any]) -> dict | None:
    """The stored result of the shard (step, fn, key) when its entry is there, intact; else None. Places and
    removes nothing: for a stage that decides from the results it has whether to read an input at all."""
    record = _read_entry(scope.entry(step, fn, key))
    return None if record is None else record["result"]


def _place(source: Path, files: Mapping[str, int], dest: Path | None) -> None:
    """Put each of `files` (relative to `source`) into `dest`, by hard link where the filesystem allows."""
    if dest is None:
        return
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(source / name, target)
        except OSError:
            shutil.copy2(source / name, target)


def _listing(folder: Path) -> dict[str, int]:
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size for path in sorted(folder.rglob("*")) if path.is_file()
    }


def run_job(scope: ShardScope, step: str, fn: Callable[..., dict[str, Any]], job: ShardJob, pool_id: str) -> dict:
    """Run one shard (or take it from the cache) and place its files; returns fn's result."""
    entry = scope.entry(step, fn, job.key) if job.key is not None else None
    if entry is not None and (record := _read_entry(entry)) is not None:
        _place(entry / FILES, record["files"], job.dest)
        return record["result"]
    scope.scratch.mkdir(parents=True, exist_ok=True)
    work = scope.scratch / f"{step}-{uuid.uuid4().hex[:12]}"
    out = work / FILES
    out.mkdir(parents=True)
    try:
        pool = _POOLS.get(pool_id)
        if pool is not None:
            result = pool.submit(fn, str(out), *job.args).result()
        else:
            result = fn(str(out), *job.args)
        # Round-tripped through JSON, so that a fresh result and a cached one are the same value.
        result = json.loads(json.dumps(result, sort_keys=True))
        files = _listing(out)
        if entry is None:
            _place(out, files, job.dest)
            return result
        (work / RESULT).write_text(json.dumps({"result": result, "files": files}, sort_keys=True), encoding="utf-8")
        entry.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(work, entry)
        except OSError:  # another run published this entry first: theirs is the same, use it
            if _read_entry(entry) is None:
                raise
        _place(entry / FILES, files, job.dest)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- worker processes -----------------------------------------------------------------------------------

# Pools by id, so that a task run (a thread of this process) finds the pool of the map that submitted it;
# in another process (a Dask worker) the id is unknown and the shard runs where its task run runs.
_POOLS: dict[str, Executor] = {}
_POOLS_LOCK = threading.Lock()


# The pool is the parallelism: libraries that would start a thread per core in every worker (the tokenizers
# library's Rust pool, OpenMP) are held to one thread each, or `workers` processes would each contend for
# every core (measured: encoding 110 shards on 2 cores, 74 s with the library's threads, 58 s without).
_ONE_THREAD = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _one_thread_each() -> None:
    os.environ.update(_ONE_THREAD)


@contextmanager
def worker_pool(workers: int, jobs: int) -> Iterator[str]:
    """Up to `workers` spawned processes (none for one worker or one job), registered under the id yielded.

    Processes are spawned rather than forked so that no lock or thread of the parent (Prefect's logging and
    API client, the tokenizer library's thread pool) is inherited half-held. As with any spawned pool, a
    script that starts one needs an `if __name__ == "__main__":` guard.
    """
    pool_id = uuid.uuid4().hex
    workers = min(workers, jobs)
    if workers <= 1:
        yield pool_id
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_one_thread_each) as pool:
        with _POOLS_LOCK:
            _POOLS[pool_id] = pool
        try:
            yield pool_id
        finally:
            with _POOLS_LOCK:
                _POOLS.pop(pool_id, None)


def map_shards(
    scope: ShardScope,
    step: str,
    fn: Callable[..., dict[str, Any]],
    jobs: Iterable[ShardJob],
    workers: int,
    pool_id: str | None = None,
) -> list[dict[str, Any]]:
    """Run `fn` over `jobs` (see the module's docstring); results in job order.

    `fn` must be a module-level function. `jobs` may be a generator: it is drawn as the window of shards in
    flight allows. `pool_id` reuses a `worker_pool` opened by the caller (spawning costs seconds, so a stage
    with several steps opens one); otherwise one of `workers` processes is opened for this call.
    Every job is attempted; then the first failure, if any, is raised.
    """
    address = _DASK_ADDRESS.get()
    in_flow = _in_flow_run()
    if in_flow and address is not None:  # every shard a task run on the cluster's workers
        from prefect_dask import DaskTaskRunner

        with DaskTaskRunner(address=address) as runner:
            return _drive(scope, step, jobs, DASK_WINDOW, _task_run_submitter(scope, step, fn, "", runner))
    if pool_id is None:
        with worker_pool(workers, workers) as own:
            return map_shards(scope, step, fn, jobs, workers, own)
    # Shards in flight: twice the workers keeps the pool fed, and bounds threads (and spooled input)
    # whatever the shard count. With no pool, shards run one at a time, in this process.
    window = 2 * workers if pool_id in _POOLS else 1
    if in_flow:
        return _drive(scope, step, jobs, window, _task_run_submitter(scope, step, fn, pool_id, None))
    with ThreadPoolExecutor(max_workers=window) as threads:  # outside a flow (tests, scripts): threads feed the pool
        return _drive(scope, step, jobs, window, lambda job: threads.submit(run_job, scope, step, fn, job, pool_id))


def _in_flow_run() -> bool:
    """Whether a Prefect flow run is in progress in this process. Without Prefect imported none can be; and
    importing it only to ask costs a process ~1.5 s (a stage run from a script, a worker)."""
    if "prefect" not in sys.modules:
        return False
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def _drive(
    scope: ShardScope, step: str, jobs: Iterable[ShardJob], window: int, submit: Callable[[ShardJob], Any]
) -> list[dict[str, Any]]:
    """Submit `jobs` keeping at most `window` in flight; once all have ended, raise the first failure (so
    that every shard that can finish is cached for the rerun) or return the results in job order."""
    outcomes: list[tuple[bool, Any]] = []
    in_flight: dict[Any, tuple[int, ShardJob]] = {}
    names: set[str] = set()
    pending = iter(jobs)
    try:
        while True:
            while len(in_flight) < window and (job := next(pending, None)) is not None:
                if job.name in names:
                    raise ValueError(f"{scope.stage}-{step}: two shards are named {job.name!r}")
                names.add(job.name)
                outcomes.append((False, None))
                in_flight[submit(job)] = (len(outcomes) - 1, job)
            if not in_flight:
                break
            done = _first_done(list(in_flight))
            index, job = in_flight.pop(done)
            outcomes[index] = _outcome(done)
            if job.spool is not None:
                job.spool.unlink(missing_ok=True)
    finally:
        for future, (_, job) in in_flight.items():  # an error while drawing jobs: let the started ones end
            _first_done([future])
            if job.spool is not None:
                job.spool.unlink(missing_ok=True)
    for ok, value in outcomes:
        if not ok:
            raise value
    return [value for _, value in outcomes]


def _first_done(futures: list[Any]) -> Any:
    if isinstance(futures[0], Future):
        done, _ = futures_wait(futures, return_when=FIRST_COMPLETED)
        return next(f for f in futures if f in done)
    from prefect.futures import as_completed

    return next(as_completed(futures))


def _outcome(future: Any) -> tuple[bool, Any]:
    """(True, result) or (False, the exception to raise)."""
    if isinstance(future, Future):
        error = future.exception()
        return (True, future.result()) if error is None else (False, error)
    future.wait()  # ended, but its final state may still be on its way
    state = future.state
    if state.is_completed():
        return True, state.result()
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        return False, error
    return False, RuntimeError(f"{state.name}: {state.message}")


# -- Prefect --------------------------------------------------------------------------------------------


def _shard_run(scope: ShardScope, step: str, fn: Callable[..., dict[str, Any]], job: ShardJob, pool_id: str) -> dict:
    """One shard as one task run (its work runs in the map's worker pool when there is one in this process)."""
    return run_job(scope, step, fn, job, pool_id)


@cache
def shard_task() -> Any:
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(persist_result=False, cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient_only)(
        _shard_run
    )


def _task_run_submitter(
    scope: ShardScope, step: str, fn: Callable[..., dict[str, Any]], pool_id: str, runner: Any
) -> Callable[[ShardJob], Any]:
    """Inside a flow: each job a task run, through `runner` (a Dask task runner) or the flow's own."""
    from prefect.tasks import exponential_backoff

    options: dict[str, Any] = {"name": f"{scope.stage}-{step}", "retry_delay_seconds": exponential_backoff(2)}

    def submit(job: ShardJob) -> Any:
        named = shard_task().with_options(task_run_name=f"{scope.stage}-{step}-{job.name}", **options)
        if runner is None:
            return named.submit(scope, step, fn, job, pool_id)
        parameters = {"scope": scope, "step": step, "fn": fn, "job": job, "pool_id": pool_id}
        return runner.submit(named, parameters)

    return submit


# -- Dask -----------------------------------------------------------------------------------------------

# Shards in flight on a cluster: enough to keep many workers busy, few enough to bound spooled input.
DASK_WINDOW = 256
_DASK_ADDRESS: ContextVar[str | None] = ContextVar("gptflow_dask_address", default=None)


@contextmanager
def dask_cluster(address: str | None) -> Iterator[None]:
    """Within this block, the shards of every map run on the Dask cluster whose scheduler is at `address`
    (through prefect-dask), instead of in this machine's worker processes. None: no change.

    The cluster's workers must reach the same store path (a shared filesystem) and the same Prefect API.
    """
    if address is None:
        yield
        return
    token = _DASK_ADDRESS.set(address)
    try:
        yield
    finally:
        _DASK_ADDRESS.reset(token)

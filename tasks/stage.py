"""What every stage shares: how its version id is derived, how it is built and published, and the one
thin Prefect task that wraps it (cache key = version id, retries for transient faults only).

A stage module defines a pydantic config, the plain functions that do the work, a `build(ctx, cfg)` that
writes the stage's files into `ctx.out` and returns its metrics, and then

    STAGE = Stage(name="clean", module=__name__, config=CleanConfig, build=build, inputs=("extract",))
    clean_task = stage_task(STAGE)

Prefect is imported only where a task is first used, not by importing a stage module: the worker processes
that run a stage's shards import its module for their functions, and Prefect would cost each ~1.5 s.
"""

import fnmatch
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from storage.errors import ConfigError, GptflowError, TransientError
from storage.fingerprint import code_fingerprint, library_versions
from storage.store import StageRef, Store, version_id


class StageConfig(BaseModel):
    """Base of every stage's parameters. Fields named in RUNTIME_FIELDS (worker counts, progress display)
    change how a stage runs, not what it produces, and so stay out of its version id."""

    # Strict types: `max_steps: true` is a mistake, not 1 (settings files are read so that 1e-3 is a float).
    model_config = ConfigDict(extra="forbid", strict=True)
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def identity_params(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.RUNTIME_FIELDS))


@dataclass
class StageContext:
    """What a stage's build function sees."""

    store: Store
    stage: str
    version: str
    inputs: dict[str, str]  # input stage -> version id
    out: Path  # the temporary folder that becomes the version
    log: logging.Logger | logging.LoggerAdapter
    metrics: dict[str, Any] = field(default_factory=dict)
    identity: Any = None  # what the stage's identity hook returned (the version id was made from it)
    # Code version, environment and identity parameters: with a shard's own inputs, its cache key.
    fingerprint: dict[str, Any] = field(default_factory=dict)
    # Fraction done (0..1) of a long stage; shown in the Prefect UI when the stage runs as a task.
    progress: Callable[[float], None] = field(default=lambda fraction: None)

    def input_path(self, stage: str) -> Path:
        return self.store.path(stage, self.inputs[stage])

    def input_manifest(self, stage: str) -> dict[str, Any]:
        return self.store.manifest(stage, self.inputs[stage])

    def require_common_ancestor(self, input_stage: str, ancestor: str) -> None:
        """The input `input_stage` must have been built from the very `ancestor` version this stage was given
        (with --only or --from, each input is simply the latest of its stage, and latest pointers move)."""
        built_from = self.store.lineage(input_stage, self.inputs[input_stage]).get(ancestor)
        if built_from is not None and built_from != self.inputs[ancestor]:
            raise ConfigError(
                f"{self.stage}: {input_stage}/{self.inputs[input_stage]} was built from {ancestor}/{built_from}, "
                f"not from the {ancestor}/{self.inputs[ancestor]} given here: rerun the stages between them"
            )

    @property
    def work(self) -> Path:
        """Scratch that survives a failed attempt of this version (resume state); cleared after publish."""
        return self.store.work_dir(self.stage, self.version)


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # the stage module: its import closure is the code fingerprint
    config: type[StageConfig]
    build: Callable[[StageContext, Any], dict[str, Any] | None]
    inputs: tuple[str, ...] = ()
    # For stages whose output depends on something outside the store (download: the source's identity):
    # called as identity(cfg, store), so that it may keep what it learns (content hashes) in the store.
    identity: Callable[[Any, Store], Any] | None = None
    # The libraries whose version can change what the stage writes ("python" for the interpreter's own
    # modules, e.g. unicodedata's tables): part of the version id, like the code.
    libraries: tuple[str, ...] = ()
    # What else about the machine shapes the output (training: the device kind and precision), from cfg.
    environment: Callable[[Any], dict[str, Any]] | None = None
    # Files that record how a build went (logs of timings, plots of them) rather than what it made: a forced
    # rebuild whose other files are the same is the same output, whatever these say.
    records: tuple[str, ...] = ()

    @property
    def code_version(self) -> str:
        return code_fingerprint(self.module)

    def environment_of(self, cfg: StageConfig) -> dict[str, Any]:
        """The library versions and machine traits that are part of the version id (worker counts never are)."""
        found: dict[str, Any] = {"libraries": library_versions(self.libraries)}
        if self.environment is not None:
            found.update(self.environment(cfg))
        return found

    def version(self, cfg: StageConfig, inputs: Mapping[str, str], identity: Any = None) -> str:
        environment = self.environment_of(cfg)
        return version_id(self.name, self.code_version, cfg.identity_params(), dict(inputs), identity, environment)

    def outputs(self, files: dict[str, Any]) -> dict[str, Any]:
        """A manifest's `files` less the stage's run records: what a forced rebuild compares."""
        return {name: info for name, info in files.items() if not any(fnmatch.fnmatch(name, r) for r in self.records)}

    def input_versions(self, inputs: Mapping[str, StageRef | str]) -> dict[str, str]:
        missing = set(self.inputs) - set(inputs)
        extra = set(inputs) - set(self.inputs)
        if missing or extra:
            raise ValueError(f"{self.name}: expects inputs {list(self.inputs)}, got {sorted(inputs)}")
        return {name: ref.version if isinstance(ref, StageRef) else str(ref) for name, ref in inputs.items()}

    def run(
        self,
        storage: str | Path,
        cfg: StageConfig,
        inputs: Mapping[str, StageRef | str] | None = None,
        *,
        force: bool = False,
        verify: bool = False,
        prefect: dict[str, Any] | None = None,
        log: logging.Logger | logging.LoggerAdapter | None = None,
        progress: Callable[[float], None] | None = None,
        on_version: Callable[[str], None] | None = None,
    ) -> StageRef:
        """Build this stage's version for `cfg` and `inputs` unless the store already has it intact (with
        `verify`, down to every file's sha256). A damaged stored version is rebuilt, with a warning.

        `on_version` is told the version id as soon as it is known, before anything is built."""
        if not isinstance(cfg, self.config):
            cfg = self.config.model_validate(cfg)
        store = Store(storage)
        log = log or logging.getLogger(f"gptflow.{self.name}")
        versions = self.input_versions(inputs or {})
        identity = self.identity(cfg, store) if self.identity else None
        version = self.version(cfg, versions, identity)
        if on_version is not None:
            on_version(version)
        stored = store.has(self.name, version)
        damage = store.damage(self.name, version, verify=verify) if stored else None
        if stored and damage is None and not force:
            log.info("%s/%s is already in the store: reused", self.name, version)
            store.set_latest(self.name, version)
            return StageRef(self.name, version, reused=True)
        if damage is not None:
            log.warning("%s/%s is damaged (%s): rebuilding it", self.name, version, damage)

        def build(out: Path) -> dict[str, Any]:
            fingerprint = {
                "code": self.code_version,
                "environment": self.environment_of(cfg),
                "params": cfg.identity_params(),
            }
            ctx = StageContext(
                store, self.name, version, versions, out, log, identity=identity, fingerprint=fingerprint
            )
            if progress is not None:
                ctx.progress = progress
            metrics = self.build(ctx, cfg) or {}
            return {**ctx.metrics, **metrics}

        log.info("building %s/%s", self.name, version)
        before = store.manifest(self.name, version)["files"] if stored and damage is None else None
        built = store.publish(
            self.name,
            version,
            build,
            params=cfg.model_dump(mode="json"),
            inputs=versions,
            code_version=self.code_version,
            environment=self.environment_of(cfg),
            prefect=prefect,
            replace=force or damage is not None,
            log=log,
        )
        store.clear_work(self.name, version)
        if before is not None and self.outputs(before) != self.outputs(store.manifest(self.name, version)["files"]):
            log.warning(
                "the forced rebuild of %s/%s changed its output; versions built from it keep the old one "
                "until they are forced too",
                self.name,
                version,
            )
        log.info("%s/%s %s", self.name, version, "published" if built else "was published by another run")
        return StageRef(self.name, version, reused=not built)


# -- Prefect ------------------------------------------------------------------------------------------

_TRANSIENT_OS_ERRORS = (ConnectionError, TimeoutError)


def is_transient(exc: BaseException | None) -> bool:
    """Retry what may go away by itself; never bad data, bad config, or a programming error."""
    if isinstance(exc, GptflowError):
        return isinstance(exc, TransientError)
    return isinstance(exc, _TRANSIENT_OS_ERRORS)


def retry_transient_only(task_: Any, task_run: Any, state: Any) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as error:  # the result itself could not be read: judge by that error
            exc = error
    return is_transient(exc if isinstance(exc, BaseException) else None)


def result_storage(storage: str | Path) -> Path:
    """Prefect's result records live inside the store (beside the run records, so that the store's top level
    holds only stages and `runs/`): a store and its cache go together."""
    return Store(storage).root / "runs" / ".prefect-results"


SERIALIZER_TYPE = "gptflow-stage-ref"


def stage_ref_from_json(blob: bytes) -> StageRef:
    data = json.loads(blob)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("stage", "version")):
        raise ValueError("not a gptflow stage reference")
    return StageRef(data["stage"], data["version"], reused=bool(data.get("reused")))


@cache
def result_serializer() -> Any:
    """The serializer of stage results (tasks/results.py), made where a task is."""
    from tasks.results import StageRefSerializer

    return StageRefSerializer()


def __getattr__(name: str) -> Any:
    if name == "RESULT_SERIALIZER":
        return result_serializer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trusted_record(path: Path, stage: str, version: str) -> bool:
    """Whether the result record at `path` is one this project wrote for `stage/version`.

    Prefect reads a record with the serializer the record itself names, pickle included, so a record is
    checked before Prefect may look at it: JSON naming our serializer, holding the reference to this very
    version. Anything else (tampered, damaged, from another tool) is not a cache hit.
    """
    try:
        record = json.loads(path.read_bytes())
        if record["metadata"]["serializer"]["type"] != SERIALIZER_TYPE:
            return False
        result = record["result"]
        ref = stage_ref_from_json(result.encode() if isinstance(result, str) else bytes(result))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return (ref.stage, ref.version) == (stage, version)


def planned_version(stage: Stage, parameters: dict[str, Any]) -> str:
    """The version id a stage task called with `parameters` will build or reuse."""
    cfg = parameters["cfg"]
    if not isinstance(cfg, stage.config):
        cfg = stage.config.model_validate(cfg)
    identity = stage.identity(cfg, Store(parameters["storage"])) if stage.identity else None
    return stage.version(cfg, stage.input_versions(parameters.get("inputs") or {}), identity)


def task_run_name(stage: Stage) -> Callable[..., str]:
    """The name of a stage's task run in the Prefect UI: `pretrain 86fb12daca70`, its stage and version."""

    def name(parameters: dict[str, Any]) -> str:
        try:
            return f"{stage.name} {planned_version(stage, parameters)}"
        except Exception:  # bad settings or inputs: the task run itself reports them, under its stage's name
            return stage.name

    return name


def cache_key(stage: Stage) -> Callable[[Any, dict[str, Any]], str | None]:
    """The Prefect cache key of a stage run is its version id: cached == already in the store, intact.

    For a stage with an identity hook (content outside the store, e.g. a data file), the hook runs here
    too, so that changed content is a new key; keep such hooks cheap and local (download, which must ask
    a server, is not cached by Prefect at all).

    A record must not short-circuit the build when its version has left the store (gc, a deleted folder), is
    damaged (a file missing or of the wrong size; with `verify`, of the wrong sha256), or when the record
    itself is not one this project wrote: such a record is removed before Prefect looks it up, so the task
    runs and rebuilds what is missing.
    """

    def key(context: Any, parameters: dict[str, Any]) -> str | None:
        if parameters.get("force"):
            return None
        store = Store(parameters["storage"])
        version = planned_version(stage, parameters)
        name = f"gptflow-{stage.name}-{version}"
        record = result_storage(store.root) / name
        if record.exists():
            intact = store.has(stage.name, version) and (
                store.damage(stage.name, version, verify=bool(parameters.get("verify"))) is None
            )
            if not intact or not trusted_record(record, stage.name, version):
                record.unlink(missing_ok=True)
        return name

    return key


class LazyTask:
    """A Prefect task made when it is first called or configured (see the module's docstring)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._task: Any = None

    @property
    def task(self) -> Any:
        if self._task is None:
            self._task = self._make()
        return self._task

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.task(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # with_options, fn, name, submit, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.task, name)


def stage_task(
    stage: Stage,
    *,
    retries: int = 3,
    backoff_seconds: float = 5.0,
    cache: bool = True,
    timeout_seconds: float | None = None,
) -> LazyTask:
    """The one thin Prefect task around `stage.run`.

    `cache=False` is for stages whose output depends on the outside world (download): their body always
    runs, checks the source's identity, and reuses the stored version when it has not changed.

    A task run is named by its stage and version (`pretrain 86fb12daca70`). A cached stage's version is
    known before it runs, from its parameters; an uncached stage learns its version inside the run (asking
    the source for its identity is the work itself), and the run is renamed then.
    """
    return LazyTask(lambda: _make_stage_task(stage, retries, backoff_seconds, cache, timeout_seconds))


def _make_stage_task(stage: Stage, retries: int, backoff_seconds: float, cache: bool, timeout: float | None) -> Any:
    from prefect import get_run_logger, task
    from prefect.cache_policies import NO_CACHE
    from prefect.tasks import exponential_backoff

    from tasks.artifacts import ProgressArtifact, publish_summary

    def run(
        storage: str,
        cfg: stage.config,
        inputs: dict[str, StageRef] | None = None,
        force: bool = False,
        verify: bool = False,
    ) -> StageRef:
        from prefect.runtime import flow_run, task_run

        ids = {"flow_run_id": str(flow_run.id or ""), "task_run_id": str(task_run.id or "")}
        log = get_run_logger()
        ref = stage.run(
            storage,
            cfg,
            inputs or {},
            force=force,
            verify=verify,
            prefect=ids,
            log=log,
            progress=ProgressArtifact(stage.name, log),
            on_version=lambda version: name_task_run(f"{stage.name} {version}"),
        )
        if not ref.reused:
            publish_summary(Store(storage), ref, log)
        return ref

    run.__name__ = run.__qualname__ = stage.name
    run.__module__ = stage.module
    options: dict[str, Any] = {
        "name": stage.name,
        "task_run_name": task_run_name(stage) if cache else stage.name,
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=backoff_seconds),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_transient_only,
        "cache_result_in_memory": False,
        "timeout_seconds": timeout,
    }
    if cache:
        options.update(cache_key_fn=cache_key(stage), persist_result=True, result_serializer=result_serializer())
    else:
        options.update(cache_policy=NO_CACHE)
    return task(**options)(run)


def name_task_run(name: str) -> None:
    """Rename the task run in progress. The engine sends its task run, name included, to the server with
    every change of state, so the new name shows from the next one on (at the latest, when the run ends)."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is not None:
        context.task_run.name = name

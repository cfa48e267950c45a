"""`gptflow status`: for each stage, whether a run with these settings would reuse what the store holds
(`up to date`) or build a new version (`stale`), and why.

The version a run would use is computed as the run computes it (`tasks.stage.planned_version`: the stage's
code fingerprint, its parameters, the library versions and machine traits in its id, its identity hook, and
the versions its inputs would have), stage after stage, so `up to date` means exactly that a run reuses the
stored version. A stale stage is compared with its stage's latest version to say why: its code changed, its
parameters changed (which ones), its libraries or machine changed, an upstream version changed (the version
it was built from is not the one a run would give it), or what it reads from outside the store changed (its
sources, the fine-tuning data, the champion).

Nothing is fetched: an http source is asked for its validators (HEAD), as a run asks; one that sends none
can only be told by fetching its body, which a run does and this command does not (`unknown`).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from flows.config import PipelineConfig
from flows.plan import STAGE_ORDER
from storage.errors import GptflowError
from storage.store import Store
from tasks.download import http_validators, local_path
from tasks.sample_data import default_source_dir, ensure_sample_archive
from tasks.stage import Stage, planned_version

State = Literal["up to date", "stale", "never built", "unknown"]

# What a stage's identity hook covers (it is not in the manifest): the reason when nothing else differs.
IDENTITY_CHANGES = {
    "download": "its sources changed (their content, ETag, Last-Modified or size)",
    "tokenizer": "the tokenizer it reuses changed",
    "finetune": "its fine-tuning data or imported model changed",
    "evaluate": "the champion it is compared with changed",
}
# Longest setting value shown in a reason; the manifest holds the rest.
SHOWN_CHARS = 60


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: State
    planned: str | None  # the version a run would build or reuse; None when it cannot be told
    latest: str | None  # the stage's latest version in the store
    reasons: tuple[str, ...] = ()


class _CannotTell(Exception):
    """The planned version cannot be computed here without doing a run's work."""


def pipeline_status(store: Store, cfg: PipelineConfig) -> list[StageStatus]:
    """Every stage's status in pipeline order, for a run of the whole pipeline with `cfg`."""
    from flows.pipeline import STAGES  # here: the pipeline may come to import this module

    if not store.root.is_dir():
        return [
            StageStatus(name, "never built", None, None, (f"there is no store at {store.root}",))
            for name in STAGE_ORDER
        ]
    if not cfg.sources:  # as the pipeline does: the embedded default corpus
        cfg = cfg.with_sources([str(ensure_sample_archive(default_source_dir()))])
    found: dict[str, StageStatus] = {}
    given: dict[str, str | None] = {}  # the version each stage hands the stages after it
    for name in STAGE_ORDER:
        stage = STAGES[name][0]
        found[name] = _stage_status(store, stage, cfg.stage_config(name), given, found)
        given[name] = found[name].planned
    return [found[name] for name in STAGE_ORDER]


def _stage_status(
    store: Store, stage: Stage, cfg: Any, given: Mapping[str, str | None], found: Mapping[str, StageStatus]
) -> StageStatus:
    latest = store.latest(stage.name)
    unknown = [name for name in stage.inputs if given[name] is None]
    if unknown:
        return StageStatus(
            stage.name, "unknown", None, latest, (f"the version of its input {unknown[0]} cannot be told",)
        )
    inputs = {name: str(given[name]) for name in stage.inputs}
    try:
        if stage.name == "download":
            _refuse_probes(cfg)
        planned = planned_version(stage, {"storage": str(store.root), "cfg": cfg, "inputs": inputs})
    except (_CannotTell, GptflowError) as exc:
        return StageStatus(stage.name, "unknown", None, latest, (_one_line(exc),))
    if store.has(stage.name, planned):
        damage = store.damage(stage.name, planned)
        if damage is not None:
            return StageStatus(
                stage.name, "stale", planned, latest, (f"{planned} is damaged ({damage}): a run rebuilds it",)
            )
        note = () if planned == latest else (f"a run reuses the stored {planned}, not the latest",)
        return StageStatus(stage.name, "up to date", planned, latest, note)
    versions = store.versions(stage.name)
    if not versions:
        return StageStatus(stage.name, "never built", planned, None)
    reference = store.manifest(stage.name, latest) if latest else versions[-1]
    return StageStatus(stage.name, "stale", planned, latest, tuple(_why_stale(stage, cfg, inputs, reference, found)))


def _why_stale(
    stage: Stage, cfg: Any, inputs: dict[str, str], built: dict[str, Any], found: Mapping[str, StageStatus]
) -> list[str]:
    """What differs between the version a run would make and the stored one `built` describes."""
    reasons = []
    if built.get("code_version") != stage.code_version:
        reasons.append(f"its code changed (fingerprint {built.get('code_version')} -> {stage.code_version})")
    params = cfg.identity_params()
    stored = built.get("params") or {}
    # The manifest keeps every setting; those a version id leaves out (worker counts) are not compared.
    changed = _changes({key: stored[key] for key in params if key in stored}, params, f"{stage.name}.")
    if changed:
        reasons.append(f"its parameters changed: {', '.join(changed)}")
    environment = _changes(built.get("environment") or {}, stage.environment_of(cfg), "")
    if environment:
        reasons.append(f"its libraries or machine changed: {', '.join(environment)}")
    for name, version in inputs.items():
        built_from = (built.get("inputs") or {}).get(name)
        if built_from != version:
            upstream = found[name]
            which = "a run builds first" if upstream.state in ("stale", "never built") else "is stored"
            reasons.append(
                f"upstream {name} changed: built from {name}/{built_from}; a run gives it {name}/{version}, "
                f"which {which}"
            )
    if not reasons:
        reasons.append(IDENTITY_CHANGES.get(stage.name, "what it reads from outside the store changed"))
    return reasons


_UNSET = object()


def _changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str) -> list[str]:
    """`name old -> new` for each value that differs, nested settings by their dotted names."""
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _UNSET), new.get(key, _UNSET)
        if before == after:
            continue
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            lines += _changes(before, after, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key} {_shown(before)} -> {_shown(after)}")
    return lines


def _shown(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _refuse_probes(cfg: Any) -> None:
    """An http source that sends no validators is identified by its body's hash, which only fetching it
    gives: a run does that, a status does not."""
    for source in cfg.sources:
        if source.sha256 or local_path(source.url) is not None:
            continue
        if all(value is None for value in http_validators(source.url, cfg.timeout_seconds).values()):
            raise _CannotTell(
                f"{source.url} sends no ETag, Last-Modified or Content-Length: only a run, which fetches it, can "
                "tell whether it changed"
            )


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def status_table(statuses: list[StageStatus]) -> list[str]:
    """The lines `gptflow status` prints: one per stage, and the reasons of each stale or unknown one."""
    lines = [f"{'stage':<10} {'status':<12} {'latest':<13} {'a run uses':<13} why"]
    for status in statuses:
        versions = f"{status.latest or '-':<13} {status.planned or '-':<13}"
        lines.append(f"{status.stage:<10} {status.state:<12} {versions} {'; '.join(status.reasons)}".rstrip())
    return lines

"""Checks that run before any stage: every mistake a user can make in a run's options or settings is found
here, all at once, and refused as one line, whether the run comes from the command line or from the Prefect
UI and API (the flow runs the same checks first).
"""

import os
from pathlib import Path

from pydantic import ValidationError

from flows.config import PipelineConfig
from flows.plan import Plan, StageSelection, check_options
from storage.errors import ConfigError, GptflowError
from storage.store import Store
from tasks.download import local_path
from tasks.tokenizer import reuse_identity


def check_run(
    store: Store,
    plan: Plan,
    selection: StageSelection,
    cfg: PipelineConfig,
    sources: list[str] | None = None,
    verify: bool = False,
) -> None:
    """Raise one ConfigError listing every problem that would make the planned run fail or mislead."""
    problems: list[str] = []
    try:
        check_options(plan, selection, sources)
    except ValueError as exc:
        problems.append(str(exc))
    storage_problems = _storage_problems(store.root)
    problems += storage_problems
    if not storage_problems:
        problems += _stored_input_problems(store, plan, selection, verify)
    if "download" in plan.run and cfg.sources:  # none: the embedded default corpus, made by the run
        problems += _source_problems(cfg)
    if "tokenizer" in plan.run and cfg.tokenizer.reuse is not None and not storage_problems:
        try:  # the tokenizer it names must be stored and agree with the settings: said before any work
            reuse_identity(cfg.tokenizer, store)
        except GptflowError as exc:
            problems.append(str(exc))
    if "finetune" in plan.run and cfg.finetune.data:
        problems += _file_problems("finetune.data", cfg.finetune.data)
    if problems:
        raise ConfigError("; ".join(problems))


def _storage_problems(root: Path) -> list[str]:
    if root.exists() and not root.is_dir():
        return [f"--storage {root} is a file, not a folder"]
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return [f"--storage {root}: {existing} is not a folder this user can write to"]
    return []


def _stored_input_problems(store: Store, plan: Plan, selection: StageSelection, verify: bool) -> list[str]:
    """The versions a run takes from the store as they are must be there, intact, and of one lineage."""
    how = f"--only {selection.only}" if selection.only else f"--from {selection.from_stage}"
    problems = []
    chosen: dict[str, str] = {}
    for stage in plan.from_store:
        version = store.latest(stage)
        if version is None:
            hint = f"run `gptflow run --until {stage}` first"
            problems.append(f"{how} needs a stored {stage} version and {store.root} has none: {hint}")
        elif (damage := store.damage(stage, version, verify=verify)) is not None:
            problems.append(f"{stage}/{version} in {store.root} is damaged ({damage}): rebuild it with --from {stage}")
        else:
            chosen[stage] = version
    for stage, version in chosen.items():
        for ancestor, built_from in store.lineage(stage, version).items():
            if ancestor in chosen and chosen[ancestor] != built_from:
                problems.append(
                    f"{how}: the latest {stage} ({version}) was built from {ancestor}/{built_from}, but the latest "
                    f"{ancestor} is {chosen[ancestor]}: rerun from {ancestor}"
                )
    return problems


def _source_problems(cfg: PipelineConfig) -> list[str]:
    try:
        download = cfg.stage_config("download")
    except ValidationError as exc:
        return [error["msg"].removeprefix("Value error, ") for error in exc.errors()]
    problems = []
    for source in download.sources:
        try:
            path = local_path(source.url)
        except GptflowError as exc:
            problems.append(str(exc))
            continue
        if path is not None:
            problems += _file_problems(f"source {source.url}", str(path))
    return problems


def _file_problems(what: str, name: str) -> list[str]:
    path = Path(name).expanduser()
    if not path.exists():
        return [f"{what}: {path} does not exist"]
    if not path.is_file():
        return [f"{what}: {path} is a {'folder' if path.is_dir() else 'special file'}, not a file"]
    if not os.access(path, os.R_OK):
        return [f"{what}: {path} cannot be read by this user"]
    return []

"""Which stages a pipeline run executes, and which it takes from the store as they are."""

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, model_validator

STAGE_ORDER = (
    "download",
    "extract",
    "clean",
    "dedup",
    "tokenizer",
    "tokens",
    "pretrain",
    "finetune",
    "quantize",
    "evaluate",
)
StageName = Literal[
    "download", "extract", "clean", "dedup", "tokenizer", "tokens", "pretrain", "finetune", "quantize", "evaluate"
]


class StageSelection(BaseModel):
    """Run part of the pipeline: stages outside the selection use the latest versions in the store."""

    only: StageName | None = Field(None, description="Run just this stage, on the latest versions of its inputs.")
    from_stage: StageName | None = Field(
        None, description="Start at this stage; earlier stages are taken from the store's latest versions."
    )
    until: StageName | None = Field(None, description="Stop after this stage.")
    force: list[StageName] = Field(
        default_factory=list, description="Recompute these stages even when their version is already stored."
    )

    @model_validator(mode="after")
    def _check(self) -> "StageSelection":
        problems = []
        if self.only and (self.from_stage or self.until):
            problems.append("--only cannot be combined with --from or --until")
        if self.from_stage and self.until and STAGE_ORDER.index(self.from_stage) > STAGE_ORDER.index(self.until):
            problems.append(f"--from {self.from_stage} comes after --until {self.until}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def selection_label(selection: StageSelection | dict | None) -> str:
    """The selection in a few words, as a run's name shows it: `until=tokens · force=clean`, or `all stages`."""
    if isinstance(selection, dict):
        selection = StageSelection.model_validate(selection)
    if selection is None:
        return "all stages"
    parts = [
        f"{option}={value}"
        for option, value in (("only", selection.only), ("from", selection.from_stage), ("until", selection.until))
        if value
    ]
    if selection.force:
        parts.append(f"force={','.join(selection.force)}")
    return " · ".join(parts) or "all stages"


@dataclass(frozen=True)
class Plan:
    run: tuple[str, ...]  # executed, in order
    from_store: tuple[str, ...]  # inputs of executed stages taken from the store's latest versions


def plan_stages(selection: StageSelection, inputs: dict[str, tuple[str, ...]]) -> Plan:
    """`inputs` maps each stage to the stages it reads."""
    if selection.only:
        run = (selection.only,)
    else:
        start = STAGE_ORDER.index(selection.from_stage) if selection.from_stage else 0
        stop = STAGE_ORDER.index(selection.until) + 1 if selection.until else len(STAGE_ORDER)
        run = STAGE_ORDER[start:stop]
    needed = {name for stage in run for name in inputs[stage]} - set(run)
    return Plan(run=run, from_store=tuple(s for s in STAGE_ORDER if s in needed))


def check_options(plan: Plan, selection: StageSelection, sources: list[str] | None) -> None:
    """Options that the planned stages would silently ignore are mistakes: say so before any work."""
    problems = []
    outside = [stage for stage in selection.force if stage not in plan.run]
    if outside:
        problems.append(f"--force {', '.join(outside)}: not among the stages this run executes ({', '.join(plan.run)})")
    if sources and "download" not in plan.run:
        problems.append("--source is read by the download stage, which this run does not execute")
    if problems:
        raise ValueError("; ".join(problems))

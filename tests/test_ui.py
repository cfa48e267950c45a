"""What a person sees of the pipeline in the Prefect UI before anything runs: the form's fields described, and
the name a run gets from its preset and selection."""

import pytest
from prefect.utilities.callables import parameter_schema

from flows.pipeline import pipeline
from flows.plan import StageSelection, selection_label


def test_every_parameter_of_the_run_form_is_described():
    """The deployment's parameter schema (what the UI renders as the run form) comes from the flow's docstring."""
    properties = parameter_schema(pipeline).model_dump()["properties"]
    assert set(properties) == {"storage", "preset", "sources", "config", "selection", "verify", "dask"}
    for name, prop in properties.items():
        description = prop.get("description") or ""
        assert len(description) > 20 and "\n" not in description, name
    assert "tiny" in properties["preset"]["description"] and "sha256" in properties["verify"]["description"]


@pytest.mark.parametrize(
    ("selection", "label"),
    [
        (None, "all stages"),
        (StageSelection(), "all stages"),
        (StageSelection(until="tokens", force=["clean"]), "until=tokens · force=clean"),
        (StageSelection(from_stage="pretrain", until="quantize"), "from=pretrain · until=quantize"),
        ({"from_stage": "tokens", "force": ["tokens", "pretrain"]}, "from=tokens · force=tokens,pretrain"),
    ],
)
def test_a_run_is_named_by_its_selection(selection, label):
    assert selection_label(selection) == label

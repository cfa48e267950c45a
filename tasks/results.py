"""How a stage task's result is persisted by Prefect: a StageRef as plain JSON, so that a result record never
holds code to run. Imported only where a stage task is made (this module imports Prefect)."""

import json

from prefect.serializers import Serializer
from pydantic import Field

from storage.store import StageRef
from tasks.stage import SERIALIZER_TYPE, stage_ref_from_json


class StageRefSerializer(Serializer):
    type: str = Field(default=SERIALIZER_TYPE, frozen=True)

    def dumps(self, obj: StageRef) -> bytes:
        return json.dumps({"stage": obj.stage, "version": obj.version, "reused": obj.reused}).encode()

    def loads(self, blob: bytes) -> StageRef:
        return stage_ref_from_json(blob)

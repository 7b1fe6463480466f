"""Triton adapter for erasing a shopper (see shopserve.ensemble.personal.LiveEvents.forget)."""

import numpy as np
from shopserve.ensemble.personal import LiveEvents
from shopserve.ensemble.triton_adapter import (
    freeze_loaded_state,
    input_array,
    invalid_argument,
    model_context,
    respond,
)
from shopserve.ensemble.validation import InvalidRequest


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir, _ = model_context(args)
        self.live = LiveEvents.from_repository(version_dir.parents[1])
        freeze_loaded_state()

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                found = self.live.forget(input_array(request, "USER_ID"))
            except InvalidRequest as exc:
                responses.append(invalid_argument(exc))
                continue
            responses.append(respond(FORGOTTEN=np.array([found])))
        return responses

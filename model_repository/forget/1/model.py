"""Triton adapter for erasing a shopper (see shopserve.ensemble.personal.LiveEvents.forget).

Only operators may erase: the request must carry the operator's key as its ``admin_key`` parameter
(the one ``shopserve serve --admin-key-file`` was given, which reaches this model as an environment
variable). A missing or wrong key is refused and nothing is deleted.
"""

import json
import os

import numpy as np
from shopserve.ensemble.personal import LiveEvents, OperatorKeyError
from shopserve.ensemble.profile_store import ProfileStoreUnavailable
from shopserve.ensemble.triton_adapter import (
    StoreFailures,
    freeze_loaded_state,
    input_array,
    invalid_argument,
    model_context,
    respond,
    unavailable,
)
from shopserve.ensemble.validation import InvalidRequest

ADMIN_KEY_ENV = "SHOPSERVE_ADMIN_KEY"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir, _ = model_context(args)
        self.live = LiveEvents.from_repository(version_dir.parents[1], int(version_dir.name))
        self.operator_key = os.environ.get(ADMIN_KEY_ENV)
        self.store_failures = StoreFailures("forget")
        freeze_loaded_state()

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            given = json.loads(request.parameters() or "{}").get("admin_key")
            try:
                found = self.live.forget(input_array(request, "USER_ID"), given, self.operator_key)
            except (InvalidRequest, OperatorKeyError) as exc:
                # A model cannot answer PERMISSION_DENIED; INVALID_ARGUMENT is never retried, and
                # the client reads a missing or wrong key from the message.
                responses.append(invalid_argument(exc))
                continue
            except ProfileStoreUnavailable as exc:  # nothing was erased: the operator retries
                responses.append(unavailable(exc))
                self.store_failures.count_up_to(self.live.refusals)
                continue
            responses.append(respond(FORGOTTEN=np.array([found])))
        return responses

"""Triton adapter for live events (see shopserve.ensemble.events and .personal.LiveEvents).

Every request queued together is validated alone (a bad one gets INVALID_ARGUMENT, the rest go on),
then the valid ones are committed in one transaction, and only then answered.
"""

import numpy as np
from shopserve.ensemble.events import parse_events
from shopserve.ensemble.personal import LiveEvents
from shopserve.ensemble.profile_store import ProfileStoreUnavailable
from shopserve.ensemble.triton_adapter import (
    StoreFailures,
    freeze_loaded_state,
    input_array,
    model_context,
    optional_input,
    parse_each,
    respond,
    unavailable,
)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir, _ = model_context(args)
        self.live = LiveEvents.from_repository(version_dir.parents[1], int(version_dir.name))
        self.store_failures = StoreFailures("events")
        freeze_loaded_state()

    def _parse(self, request, known_products):
        return parse_events(
            input_array(request, "USER_IDS"),
            input_array(request, "PRODUCT_IDS"),
            input_array(request, "EVENT_TYPES"),
            input_array(request, "TIMESTAMPS"),
            input_array(request, "EVENT_IDS"),
            optional_input(request, "BASKET_IDS"),
            known_products,
        )

    def execute(self, requests: list) -> list:
        known_products = self.live.known_products()
        responses, valid = parse_each(requests, lambda r: self._parse(r, known_products))
        if valid:
            try:
                accepted = self.live.record([batch for _, batch in valid])
            except ProfileStoreUnavailable as exc:  # nothing of these batches was written
                for index, _ in valid:
                    responses[index] = unavailable(exc)
                self.store_failures.count_up_to(self.live.refusals)
            else:
                for (index, batch), new in zip(valid, accepted, strict=True):
                    responses[index] = respond(
                        ACCEPTED=np.array([[new]], dtype=np.int32),
                        DUPLICATES=np.array([[len(batch) - new]], dtype=np.int32),
                    )
        return responses

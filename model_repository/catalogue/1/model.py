"""Triton adapter for live catalogue updates (see shopserve.ensemble.catalogue and .catalogue_log).

Every update queued together is checked alone (a bad one gets INVALID_ARGUMENT naming its rows, the
rest go on); their titles are embedded in one encoder call, then each is appended to the catalogue
log in its own transaction and answered. On a server started with an operator's key
(``--admin-key-file``) the request must carry it as its ``admin_key`` parameter.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from shopserve.ensemble.catalogue import parse_update
from shopserve.ensemble.catalogue_log import CatalogueWriter
from shopserve.ensemble.personal import OperatorKeyError, check_operator_key
from shopserve.ensemble.triton_adapter import (
    freeze_loaded_state,
    input_array,
    invalid_argument,
    model_context,
    optional_input,
    parse_each,
    respond,
)
from shopserve.ensemble.validation import InvalidRequest

ADMIN_KEY_ENV = "SHOPSERVE_ADMIN_KEY"
NICENESS = 10


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        os.nice(NICENESS)  # embedding updates yields the CPU to the requests shoppers wait for
        version_dir, _ = model_context(args)
        self.writer = CatalogueWriter.from_repository(version_dir.parents[1], int(version_dir.name))
        self.operator_key = os.environ.get(ADMIN_KEY_ENV)
        freeze_loaded_state()

    def _parse(self, request):
        if self.operator_key:
            given = json.loads(request.parameters() or "{}").get("admin_key")
            check_operator_key("a catalogue update", given, self.operator_key)
        return parse_update(
            input_array(request, "UPDATE_ID"),
            input_array(request, "OPERATIONS"),
            input_array(request, "PRODUCT_IDS"),
            input_array(request, "TITLES"),
            optional_input(request, "PRICES"),
            optional_input(request, "IN_STOCK"),
            optional_input(request, "CATEGORIES"),
        )

    def execute(self, requests: list) -> list:
        responses, valid = parse_each(requests, self._parse, (InvalidRequest, OperatorKeyError))
        if not valid:
            return responses
        results = self.writer.write([update for _, update in valid])
        for (index, update), result in zip(valid, results, strict=True):
            if isinstance(result, InvalidRequest):
                responses[index] = invalid_argument(result)
            elif isinstance(result, Exception):  # the log's store failed: not written
                error = pb_utils.TritonError(
                    f"the catalogue log did not take the update: {type(result).__name__}",
                    pb_utils.TritonError.UNAVAILABLE,
                )
                responses[index] = pb_utils.InferenceResponse(error=error)
            else:
                applied = len(update.products) if result else 0
                responses[index] = respond(
                    APPLIED=np.array([[applied]], dtype=np.int32),
                    DUPLICATE=np.array([[not result]]),
                )
        return responses

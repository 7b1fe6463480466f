"""Triton adapter for the whole search graph in one model (see shopserve.ensemble.pipeline).

The steps load from the step models' directories and configs in this repository, so this model
answers exactly as the "search_steps" ensemble and the in-process SearchPipeline do.
"""

from shopserve.ensemble import SearchPipeline
from shopserve.ensemble.triton_adapter import (
    freeze_loaded_state,
    input_array,
    invalid_argument,
    model_context,
    search_response,
)
from shopserve.ensemble.validation import InvalidRequest


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir, _ = model_context(args)
        self.pipeline = SearchPipeline.from_repository(version_dir.parents[1])
        freeze_loaded_state()

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                result = self.pipeline.search(
                    input_array(request, "QUERY"), input_array(request, "TOP_K")
                )
            except InvalidRequest as exc:
                responses.append(invalid_argument(exc))
                continue
            responses.append(search_response(result))
        return responses

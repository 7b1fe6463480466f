"""Triton adapter for softmax + top-k (see shopserve.ensemble.postprocess)."""

from shopserve.ensemble import store
from shopserve.ensemble.postprocess import PostProcessor
from shopserve.ensemble.triton_adapter import (
    freeze_loaded_state,
    input_array,
    model_context,
    search_response,
)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir, _ = model_context(args)
        self.postprocess = PostProcessor(store.Catalogue.load(version_dir / store.CATALOGUE_FILE))
        freeze_loaded_state()

    def execute(self, requests: list) -> list:
        return [
            search_response(
                self.postprocess(
                    input_array(request, "CANDIDATE_ROWS"),
                    input_array(request, "LOGITS"),
                    int(input_array(request, "TOP_K")[0]),
                )
            )
            for request in requests
        ]

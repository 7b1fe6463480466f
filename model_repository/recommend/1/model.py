"""Triton adapter for recommendations (see shopserve.ensemble.personal.RecommendPipeline)."""

from shopserve.ensemble.filters import FILTER_INPUTS
from shopserve.ensemble.personal import RecommendPipeline
from shopserve.ensemble.triton_adapter import (
    StoreFailures,
    answer_each,
    freeze_loaded_state,
    input_array,
    model_context,
    optional_input,
)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir, _ = model_context(args)
        self.pipeline = RecommendPipeline.from_repository(
            version_dir.parents[1], int(version_dir.name)
        )
        self.store_failures = StoreFailures("recommend")
        freeze_loaded_state()

    def execute(self, requests: list) -> list:
        responses = answer_each(
            requests,
            lambda request: self.pipeline.recommend(
                input_array(request, "USER_ID"),
                input_array(request, "TOP_K"),
                optional_input(request, "NEW_ONLY"),
                {name: optional_input(request, name) for name in FILTER_INPUTS},
                optional_input(request, "EXPLAIN"),
            ),
        )
        self.store_failures.count_up_to(self.pipeline.refusals)
        return responses

"""Triton adapter for the whole search graph in one model (see shopserve.ensemble.pipeline).

The steps load from the step models' directories and configs in this repository, so this model
answers exactly as the "search_steps" ensemble and the in-process SearchPipeline do. An optional
USER_ID personalises the answer (stores built with --events); optional IN_STOCK, PRICE_MIN,
PRICE_MAX and CATEGORY filter it (catalogues with those columns); optional EXPOSURE, TEMPERATURE
and SEED draw an exposure-aware answer (shopserve.ensemble.exposure); EXPLAIN adds each hit's
reasons (shopserve.ensemble.explain). The requests of one execution share one encoder call.
"""

from shopserve.ensemble.exposure import EXPOSURE_INPUTS
from shopserve.ensemble.filters import FILTER_INPUTS
from shopserve.ensemble.pipeline import SearchPipeline, SearchRequest
from shopserve.ensemble.triton_adapter import (
    StoreFailures,
    answer_together,
    freeze_loaded_state,
    input_array,
    model_context,
    optional_input,
)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir, _ = model_context(args)
        self.pipeline = SearchPipeline.from_repository(
            version_dir.parents[1], int(version_dir.name)
        )
        self.store_failures = StoreFailures("search")
        freeze_loaded_state()

    def execute(self, requests: list) -> list:
        # The requests the dynamic batcher hands over together share one encoder call.
        responses = answer_together(
            requests,
            lambda live: self.pipeline.search_many(
                [
                    SearchRequest(
                        input_array(request, "QUERY"),
                        input_array(request, "TOP_K"),
                        optional_input(request, "USER_ID"),
                        {name: optional_input(request, name) for name in FILTER_INPUTS},
                        {name: optional_input(request, name) for name in EXPOSURE_INPUTS},
                        optional_input(request, "EXPLAIN"),
                    )
                    for request in live
                ]
            ),
            batched=True,
        )
        self.store_failures.count_up_to(self.pipeline.anonymous_fallbacks)
        return responses

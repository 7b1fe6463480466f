"""Triton adapter for softmax + top-k (see shopserve.ensemble.postprocess)."""

import numpy as np
from shopserve.ensemble import store
from shopserve.ensemble.postprocess import PostProcessor
from shopserve.ensemble.triton_adapter import input_array, model_context, respond


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir, _ = model_context(args)
        self.postprocess = PostProcessor(store.Catalogue.load(version_dir / store.CATALOGUE_FILE))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            result = self.postprocess(
                input_array(request, "CANDIDATE_ROWS"),
                input_array(request, "LOGITS"),
                int(input_array(request, "TOP_K")[0]),
            )
            titles = np.array([t.encode("utf-8") for t in result.titles], dtype=np.object_)
            responses.append(
                respond(PRODUCT_IDS=result.product_ids, SCORES=result.scores, TITLES=titles)
            )
        return responses

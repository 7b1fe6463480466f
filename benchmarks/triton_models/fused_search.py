"""Tuning variant: the whole search graph in one Python model (one Python hop instead of five).

Copied as ``search/1/model.py`` of a variant repository whose ``search`` model is this Python model;
it runs ``shopserve.ensemble.SearchPipeline`` over the artefacts of the same repository, so it returns
exactly what the ensemble returns. Config parameter ``pad_to_buckets`` ("true"/"false", default true):
"false" tokenizes each query to its own length, as ``unpadded_tokenize.py`` does.
"""

import locale
from pathlib import Path

import numpy as np
from shopserve.ensemble import SearchPipeline
from shopserve.ensemble.triton_adapter import input_array, invalid_argument, model_context, respond
from shopserve.ensemble.validation import InvalidRequest


class _Unpadded:
    """A QueryTokenizer whose single queries are not padded up to a length bucket."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        return self.tokenizer.batch([query])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        # The stub runs in the C locale and store.config_parameters reads configs (which hold
        # UTF-8, e.g. "∪") without an encoding: read them as UTF-8 (proposed fix: encoding="utf-8").
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        version_dir, params = model_context(args)
        # The steps' artefacts and thread settings come from their own configs in this repository.
        self.pipeline = SearchPipeline.from_repository(Path(version_dir).parents[1])
        if params.get("pad_to_buckets", "true") == "false":
            self.pipeline.tokenizer = _Unpadded(self.pipeline.tokenizer)

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
            titles = np.array([t.encode("utf-8") for t in result.titles], dtype=np.object_)
            responses.append(
                respond(PRODUCT_IDS=result.product_ids, SCORES=result.scores, TITLES=titles)
            )
        return responses

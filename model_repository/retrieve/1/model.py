"""Triton adapter for hybrid retrieval and feature fusion (see shopserve.ensemble.retrieve)."""

from shopserve.ensemble import store
from shopserve.ensemble.dense import open_dense
from shopserve.ensemble.lexical import LexicalIndex
from shopserve.ensemble.retrieve import Retriever
from shopserve.ensemble.triton_adapter import (
    freeze_loaded_state,
    input_array,
    model_context,
    respond,
)
from shopserve.ensemble.validation import decode_query


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir, params = model_context(args)
        self.retriever = Retriever(
            open_dense(version_dir, params),
            LexicalIndex.load(version_dir / store.LEXICAL_INDEX_DIR),
            dense_depth=int(params["dense_depth"]),
            lexical_depth=int(params["lexical_depth"]),
        )
        freeze_loaded_state()

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            # The query was validated by the tokenize step before this one ran.
            query = decode_query(input_array(request, "QUERY"))
            candidates = self.retriever(query, input_array(request, "EMBEDDING")[0])
            responses.append(respond(CANDIDATE_ROWS=candidates.rows, FEATURES=candidates.features))
        return responses

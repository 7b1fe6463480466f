"""Triton adapter for the tokenize step (see shopserve.ensemble.tokenize and .validation)."""

from shopserve.ensemble.tokenize import QueryTokenizer, WordPiece
from shopserve.ensemble.triton_adapter import (
    freeze_loaded_state,
    input_array,
    invalid_argument,
    model_context,
    respond,
)
from shopserve.ensemble.validation import InvalidRequest, check_top_k, decode_query


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir, params = model_context(args)
        self.tokenizer = QueryTokenizer(
            WordPiece.load(version_dir), max_length=int(params["max_length"])
        )
        freeze_loaded_state()

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                query = decode_query(input_array(request, "QUERY"))
                check_top_k(input_array(request, "TOP_K"))
            except InvalidRequest as exc:
                responses.append(invalid_argument(exc))
                continue
            input_ids, attention_mask = self.tokenizer(query)
            responses.append(respond(INPUT_IDS=input_ids, ATTENTION_MASK=attention_mask))
        return responses

"""Tuning variant of the tokenize adapter: no length-bucket padding (the encoder does not batch).

Identical to ``model_repository/tokenize/1/model.py`` except that each query is tokenized to its own
length (``QueryTokenizer.batch`` of one query) instead of being padded up to a bucket.
"""

from shopserve.ensemble import store
from shopserve.ensemble.tokenize import QueryTokenizer
from shopserve.ensemble.triton_adapter import input_array, invalid_argument, model_context, respond
from shopserve.ensemble.validation import InvalidRequest, check_top_k, decode_query


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir, params = model_context(args)
        self.tokenizer = QueryTokenizer(
            version_dir / store.TOKENIZER_FILE, max_length=int(params["max_length"])
        )

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                query = decode_query(input_array(request, "QUERY"))
                check_top_k(input_array(request, "TOP_K"))
            except InvalidRequest as exc:
                responses.append(invalid_argument(exc))
                continue
            input_ids, attention_mask = self.tokenizer.batch([query])
            responses.append(respond(INPUT_IDS=input_ids, ATTENTION_MASK=attention_mask))
        return responses

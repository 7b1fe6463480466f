"""Query tokenization for the encoder (Hugging Face fast tokenizer, no transformers needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

DEFAULT_MAX_LENGTH = 256


class QueryTokenizer:
    """Tokenize text for the encoder, truncating to ``max_length`` tokens.

    A single query is not padded: padding would only add compute (the Home Depot queries average 6
    tokens). Where requests share an encoder call, the Triton backend pads them to the longest; the
    encoder's attention mask keeps that padding out of every embedding.
    """

    def __init__(self, tokenizer_file: Path | str, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.max_length = max_length
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()

    def __call__(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(input_ids, attention_mask)``, each int64 of shape ``[1, tokens]``."""
        return self.batch([query])

    def batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize many texts, padded to the longest of them."""
        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        input_ids = np.zeros((len(texts), width), dtype=np.int64)
        attention_mask = np.zeros((len(texts), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            input_ids[row, : len(encoding.ids)] = encoding.ids
            attention_mask[row, : len(encoding.ids)] = 1
        return input_ids, attention_mask

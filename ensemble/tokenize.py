"""Query tokenization for the encoder (Hugging Face fast tokenizer, no transformers needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

DEFAULT_MAX_LENGTH = 256
DEFAULT_BUCKETS = (16, 32, 64, 128, 256)


class QueryTokenizer:
    """Tokenize text for the encoder, truncating to ``max_length`` tokens.

    Single queries are padded up to the next length bucket, so that concurrent requests share a few
    shapes and the encoder's dynamic batcher can merge them. Padding is masked out by the encoder's
    mean pooling, so it does not change the embedding.
    """

    def __init__(
        self,
        tokenizer_file: Path | str,
        max_length: int = DEFAULT_MAX_LENGTH,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    ) -> None:
        self.max_length = max_length
        self.buckets = (*tuple(sorted(b for b in buckets if b < max_length)), max_length)
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()

    def bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def __call__(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(input_ids, attention_mask)``, each int64 of shape ``[1, bucket]``."""
        ids = self.tokenizer.encode(query).ids
        width = self.bucket(len(ids))
        input_ids = np.zeros((1, width), dtype=np.int64)
        attention_mask = np.zeros((1, width), dtype=np.int64)
        input_ids[0, : len(ids)] = ids
        attention_mask[0, : len(ids)] = 1
        return input_ids, attention_mask

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

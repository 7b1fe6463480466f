"""The build's catalogue embedding cache: a rebuild embeds only the titles the cache lacks."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from shopserve.ensemble.models import INT16_PAIR_SUMS, INT32_SUMS, int8_sums
from shopserve.export import embeddings
from shopserve.export.cache import CACHE_ENV
from shopserve.export.embeddings import BuildEmbeddings, cache_file_for, embed_catalogue

WIDTH = 8


def vector(title: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(title.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(WIDTH).astype(np.float32)


class CountingEncoder:
    """Embeds by a title's hash, and records every title it was asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.asked.extend(texts)
        return np.stack([vector(t) for t in texts])


class CountingTextEncoder(CountingEncoder):
    """The same, in OnnxEncoder's form (``embed_texts``), each call's texts recorded apart."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    def embed_texts(self, _tokenizer, texts: list[str], progress: str | None = None) -> np.ndarray:
        self.calls.append(list(texts))
        return self(texts)


def test_a_build_embeds_a_kept_text_once() -> None:
    """What the accuracy gate embeds (kept) the catalogue step reuses; a text not kept is embedded
    again, and a repeated text is embedded once per call."""
    encoder = CountingTextEncoder()
    embed = BuildEmbeddings(encoder, tokenizer=None)
    gate = ["drill", "saw", "drill"]
    np.testing.assert_array_equal(embed(gate, keep=True), np.stack([vector(t) for t in gate]))
    everything = ["hammer", "saw", "drill", "hammer", "nail"]
    np.testing.assert_array_equal(embed(everything), np.stack([vector(t) for t in everything]))
    assert encoder.calls == [["drill", "saw"], ["hammer", "nail"]]
    np.testing.assert_array_equal(embed(["nail"]), vector("nail")[None])
    assert encoder.calls[-1] == ["nail"]  # not kept: embedded again
    embed(["saw", "drill"])
    assert len(encoder.calls) == 3  # all kept: nothing embedded


def catalogue(n: int) -> list[str]:
    return [f"product {i} cordless drill {i % 7}" for i in range(n)]


def test_a_rebuild_after_a_one_percent_change_embeds_one_percent(tmp_path) -> None:
    cache = tmp_path / "cache.npz"
    titles = catalogue(1000) + ["a duplicated title"] * 3
    encoder = CountingEncoder()
    rows, report = embed_catalogue(encoder, titles, cache)
    assert sorted(encoder.asked) == sorted(set(titles))
    assert report.int8_sums == int8_sums()  # the manifest says how this CPU adds INT8 products
    assert (report.titles, report.distinct_titles, report.embedded, report.from_cache) == (
        1003,
        1001,
        1001,
        0,
    )
    np.testing.assert_array_equal(rows, np.stack([vector(t) for t in titles]))

    changed = list(titles)
    for i in range(0, 1000, 100):  # ten titles changed: 1 %
        changed[i] = f"renamed product {i}"
    changed.append("a new product")
    encoder = CountingEncoder()
    rows, report = embed_catalogue(encoder, changed, cache)
    assert sorted(encoder.asked) == sorted(
        [changed[i] for i in range(0, 1000, 100)] + ["a new product"]
    )
    assert (report.embedded, report.from_cache) == (11, 1001 + 1 - 11)
    np.testing.assert_array_equal(rows, np.stack([vector(t) for t in changed]))

    # Both catalogues are cached now: going back to the first embeds nothing.
    encoder = CountingEncoder()
    rows, report = embed_catalogue(encoder, titles, cache)
    assert encoder.asked == [] and report.embedded == 0
    np.testing.assert_array_equal(rows, np.stack([vector(t) for t in titles]))


@pytest.mark.parametrize("change", ["encoder", "tokenizer", "max_length", "int8_sums"])
def test_another_encoder_or_tokenizer_has_its_own_cache(tmp_path, monkeypatch, change) -> None:
    """... and another kind of CPU: one that adds INT8 products otherwise embeds otherwise."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    encoder_file, tokenizer_file = tmp_path / "model.onnx", tmp_path / "tokenizer.json"
    encoder_file.write_bytes(b"graph one")
    tokenizer_file.write_text("{}")
    before = cache_file_for(encoder_file, tokenizer_file, 128)
    assert before.parent == tmp_path / "cache" / "embeddings"
    if change == "encoder":
        encoder_file.write_bytes(b"graph two")
    elif change == "tokenizer":
        tokenizer_file.write_text('{"changed": true}')
    elif change == "int8_sums":
        other = INT32_SUMS if int8_sums() != INT32_SUMS else INT16_PAIR_SUMS
        monkeypatch.setattr(embeddings, "int8_sums", lambda: other)
    after = cache_file_for(encoder_file, tokenizer_file, 256 if change == "max_length" else 128)
    assert after != before

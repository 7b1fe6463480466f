"""The encoder's fine-tuning step on a small cut of the Home Depot data (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_cut
from shopserve.export import finetune as finetune_module
from shopserve.export.cache import CACHE_ENV
from shopserve.export.data import load_catalogue, load_judgments, split_queries
from shopserve.export.encoder import model_dir, pooled_encoder
from shopserve.export.finetune import FinetuneOptions, examples_for, finetune
from shopserve.export.lexical import build_lexical_index

TRAIN_QUERIES = 64


@pytest.fixture(scope="module")
def cut(data_dir: Path, module_folder):
    items, judged = write_cut(data_dir, module_folder("cut"))
    catalogue = load_catalogue(items)
    judgments = load_judgments(judged, catalogue)
    train, dev = split_queries(judgments.queries, 0.2, 13)
    lexical = build_lexical_index(catalogue.titles, show_progress=False)
    return catalogue, judgments.subset(train[:TRAIN_QUERIES]), judgments.subset(dev), lexical


def test_examples_take_a_judged_positive_and_a_worse_negative(cut):
    catalogue, train, _, lexical = cut
    examples = examples_for(train, catalogue.product_ids, lexical, 30, np.random.default_rng(0))
    assert len(examples) >= TRAIN_QUERIES * 0.8
    for example in examples:
        gains = train.gains(example.query)
        positive = int(catalogue.product_ids[example.positive])
        negative = int(catalogue.product_ids[example.negative])
        assert gains[positive] > 0
        assert gains.get(negative, -1.0) < gains[positive]


def _margin(weights: Path | None, examples, titles: list[str]) -> float:
    """Mean cos(query, positive) - cos(query, negative) under the encoder in ``weights``."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    encoder = pooled_encoder(weights)

    def embed(texts: list[str]):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            return encoder(batch["input_ids"], batch["attention_mask"])

    queries = embed([e.query for e in examples])
    positives = embed([titles[e.positive] for e in examples])
    negatives = embed([titles[e.negative] for e in examples])
    return float(((queries * positives).sum(1) - (queries * negatives).sum(1)).mean())


def test_finetuning_learns_the_train_queries_and_is_cached(cut, tmp_path, monkeypatch):
    catalogue, train, dev, lexical = cut
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    options = FinetuneOptions(epochs=2, batch_size=16, learning_rate=1e-4, time_budget_s=300)
    checkpoint, report = finetune(
        model_dir(), train, catalogue.product_ids, catalogue.titles, lexical, options
    )
    assert report.steps == 2 * int(np.ceil(report.examples / 16))
    assert not report.stopped_by_budget
    assert report.train_queries == len(train) and not set(dev.queries) & set(train.queries)
    assert (checkpoint / "config.json").exists() and report.checkpoint == str(checkpoint)
    examples = examples_for(
        train, catalogue.product_ids, lexical, 30, np.random.default_rng(options.seed)
    )
    before = _margin(None, examples, catalogue.titles)
    after = _margin(checkpoint, examples, catalogue.titles)
    assert after > before + 0.05, (before, after)

    def no_training(*_args, **_kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(finetune_module, "_train", no_training)
    again, cached = finetune(
        model_dir(), train, catalogue.product_ids, catalogue.titles, lexical, options
    )
    assert (again, cached) == (checkpoint, report)


def test_the_time_budget_stops_training(cut, tmp_path, monkeypatch):
    catalogue, train, _, lexical = cut
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    _, report = finetune(
        model_dir(),
        train,
        catalogue.product_ids,
        catalogue.titles,
        lexical,
        FinetuneOptions(time_budget_s=0),
    )
    assert report.stopped_by_budget and report.steps == 0

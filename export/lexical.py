"""Build the lexical index serving reads (shopserve.ensemble.lexical): the titles analysed by the
serving analyzer, BM25 weighted by bm25s (its Lucene variant), and each title's word and trigram
ids for the ranker's overlap features."""

from __future__ import annotations

from collections.abc import Sequence

import bm25s
from bm25s.stopwords import STOPWORDS_EN
from shopserve.ensemble.lexical import (
    Analyzer,
    Bm25,
    LexicalIndex,
    TermSets,
    Vocabulary,
)
from tqdm.auto import tqdm


def build_lexical_index(titles: Sequence[str], show_progress: bool = True) -> LexicalIndex:
    analyzer = Analyzer(STOPWORDS_EN)
    word_ids: dict[str, int] = {}
    title_words = [
        [word_ids.setdefault(w, len(word_ids)) for w in analyzer.tokens(title)]
        for title in tqdm(titles, desc="Analyse titles", unit="title", disable=not show_progress)
    ]
    weighted = bm25s.BM25()
    # bm25s adds an empty term to the vocabulary it is given: give it a copy.
    weighted.index((title_words, dict(word_ids)), show_progress=show_progress)
    scores = weighted.scores
    bm25 = Bm25(
        scores["data"],
        scores["indices"],
        scores["indptr"],
        int(scores["num_docs"]),
        float(weighted.k1),
        float(weighted.b),
    )
    trigram_ids: dict[str, int] = {}
    trigrams = TermSets.from_lists(
        [trigram_ids.setdefault(g, len(trigram_ids)) for g in analyzer.trigrams(title)]
        for title in titles
    )
    return LexicalIndex(
        analyzer,
        bm25,
        Vocabulary.of(word_ids),
        TermSets.from_lists(title_words),
        Vocabulary.of(trigram_ids),
        trigrams,
    )

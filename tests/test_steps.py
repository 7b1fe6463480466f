"""Fast unit tests of the ensemble's step logic and the export's data handling (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shopserve.ensemble import MAX_QUERY_BYTES, InvalidRequest
from shopserve.ensemble.features import (
    FEATURE_NAMES,
    RANKER_FEATURES,
    CatalogueStats,
    ranking_features,
)
from shopserve.ensemble.lexical import LexicalIndex, SparseScores, char_trigrams, fold, top_rows
from shopserve.ensemble.postprocess import softmax, top_k
from shopserve.ensemble.tokenize import QueryTokenizer, WordPiece
from shopserve.ensemble.validation import check_top_k, decode_query, plain_text
from shopserve.export import encoder as encoder_export
from shopserve.export.data import DataError, load_catalogue, load_judgments, split_queries
from shopserve.export.lexical import build_lexical_index
from shopserve.export.metrics import ndcg_at_k, rank_by_score, recall_at_k

TITLES = [
    "DEWALT 20-Volt MAX Cordless Drill Driver Kit",
    "Simpson Strong-Tie 12-Gauge Angle Bracket",
    "Drill Bit Set for Wood and Metal (21-Piece)",
    "BEHR Premium Deck Over Wood Coating",
]


@pytest.fixture(scope="module")
def lexical() -> LexicalIndex:
    return build_lexical_index(TITLES, show_progress=False)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "empty"),
        (b"   \t ", "empty"),
        (b"\xff\xfe drill", "not valid UTF-8"),
        (b"x" * (MAX_QUERY_BYTES + 1), "limit"),
        (np.array([b"a", b"b"], dtype=object), "exactly one"),
        ("🔨🪚 ★ ™ & -".encode(), "no letter or digit"),
    ],
)
def test_bad_queries_are_named(raw: object, problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem):
        decode_query(raw)


def test_query_decoding_keeps_text() -> None:
    assert decode_query(np.array(["perceuse sans fil é".encode()], dtype=object)) == (
        "perceuse sans fil é"
    )
    assert decode_query(b"x" * MAX_QUERY_BYTES) == "x" * MAX_QUERY_BYTES
    for query in ("drill 🔨", "½", "3/4", "電動ドリル", "Дрель"):  # a letter or digit of any script
        assert decode_query(query.encode()) == query


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (np.array([0], np.int32), "between 1 and 100"),
        (np.array([-3], np.int32), "between 1 and 100"),
        (np.array([101], np.int32), "between 1 and 100"),
        (np.array([1.5], np.float32), "integer"),
        (True, "integer"),
    ],
)
def test_bad_top_k_is_named(raw: object, problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem):
        check_top_k(raw)


def test_top_k_bounds_are_inclusive() -> None:
    assert check_top_k(np.array([1], np.int32)) == 1
    assert check_top_k(np.array([100], np.int32)) == 100


def test_tokenizer_does_not_pad_and_truncates(tmp_path) -> None:
    WordPiece.from_json(encoder_export.model_dir() / "tokenizer.json").save(tmp_path)
    tokenizer = QueryTokenizer(WordPiece.load(tmp_path), max_length=256)  # as a store serves it
    ids, mask = tokenizer("cordless drill")
    assert ids.tolist() == [[101, 11601, 3238, 12913, 102]]  # cord ##less drill
    assert mask.tolist() == [[1] * 5] and ids.dtype == mask.dtype == np.int64
    ids, mask = tokenizer("drill " * 400)
    assert ids.shape == (1, 256) and mask.all() and ids[0, -1] == 102


AWKWARD_TEXTS = [
    "",
    "   ",
    "ΑΣ ΟΔΟΣ",  # lower-cased by character: no final sigma
    "İstanbul naïve résumé e\u0301",  # accents stripped before lower-casing
    "a\u200bb x\u00a0y\u3000z\u2028w",  # format characters dropped, white space split
    "\x0bv\x85w a\x00b \ufffd",  # control characters and U+FFFD dropped
    "\u0378 unassigned \U0002b820x \U0002b920x",  # kept; Hugging Face's CJK ranges
    "[CLS]drill[MASK] [CLS",  # special tokens are matched in the raw text
    "日本語のテキスト 🔧🪛 ＡＢＣ ß Ǆ ﷽ ١٢٣",
    "x^2 ~y `z` ¿qué? «quotes» $5.99 & 10% 1/2-in. x 10-ft.",
    "a" * 150,  # past max_input_chars_per_word: one [UNK]
]


def test_the_python_tokenizer_is_hugging_faces_to_the_token(data_dir) -> None:
    """The same ids as the tokenizers library on real titles and queries and on awkward text."""
    import random

    from tokenizers import Tokenizer

    path = encoder_export.model_dir() / "tokenizer.json"
    reference = Tokenizer.from_file(str(path))
    reference.no_padding()
    reference.enable_truncation(256)
    ours = QueryTokenizer(WordPiece.from_json(path), max_length=256)
    catalogue = load_catalogue(data_dir / "products.csv")
    rng = random.Random(7)
    alphabet = [chr(c) for c in [*range(32, 0x250), *range(0x370, 0x3FF), *range(0x2000, 0x2070)]]
    texts = [
        *rng.sample(list(catalogue.titles), 3000),
        *rng.sample(load_judgments(data_dir / "judgments.csv", catalogue).queries, 1000),
        *AWKWARD_TEXTS,
        *("".join(rng.choices(alphabet, k=rng.randint(1, 30))) for _ in range(500)),
    ]
    expected = [e.ids for e in reference.encode_batch(texts)]
    differing = [t for t, e in zip(texts, expected, strict=True) if ours.encode(t) != e]
    assert not differing, differing[:5]


def test_a_tokenizer_other_than_berts_is_refused(tmp_path) -> None:

    from shopserve.ensemble.tokenize import TokenizerConfigError

    config = json.loads((encoder_export.model_dir() / "tokenizer.json").read_text())
    config["normalizer"] = {"type": "NFKC"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerConfigError, match="not a BERT WordPiece tokenizer"):
        WordPiece.from_json(tmp_path / "tokenizer.json")


def test_top_rows_orders_by_score_then_row() -> None:
    scores = np.array([0.0, 2.0, 1.0, 2.0, -1.0, 3.0], dtype=np.float32)
    assert top_rows(scores, 3).tolist() == [5, 1, 3]
    assert top_rows(scores, 10).tolist() == [5, 1, 3, 2]  # non-positive scores are not hits
    assert top_rows(np.zeros(4, np.float32), 2).tolist() == []


def test_top_rows_keeps_the_lowest_rows_of_a_tie_at_the_edge() -> None:
    scores = np.array([0.5, 0.0, 0.9, 0.5, -1.0, 0.5, 0.7], dtype=np.float32)
    assert top_rows(scores, 3).tolist() == [2, 6, 0]
    assert top_rows(scores, 4).tolist() == [2, 6, 0, 3]
    tied = np.ones(1000, np.float32)  # a partition would keep any 10 of them
    assert top_rows(tied, 10).tolist() == list(range(10))


def test_lexical_scores_and_term_matches(lexical: LexicalIndex) -> None:
    terms = lexical.analyze("cordless drills drills")
    assert terms.words == ["cordless", "drill"]
    scores = lexical.scores(terms)
    assert scores.argmax() == 0 and scores[1] == 0 and scores[2] > 0
    assert lexical.words.matches(terms.word_ids, np.arange(4)).tolist() == [2, 0, 1, 0]


def test_sparse_scores_are_the_dense_ones_to_the_bit(lexical: LexicalIndex) -> None:
    """Retrieval holds BM25 only for the titles with a query term: the same scores, the same top
    rows (filtered or not), the same statistics as from the dense array."""
    for query in ("cordless drills drills", "drill", "unknownword", "cordless nail gun"):
        terms = lexical.analyze(query)
        dense = lexical.scores(terms)
        sparse = lexical.sparse_scores(terms)
        rows = np.arange(len(dense))
        assert np.array_equal(sparse.at(rows), dense)
        assert sparse.top(2).tolist() == top_rows(dense, 2).tolist()
        allowed = rows % 2 == 0
        assert sparse.top(3, allowed).tolist() == top_rows(dense * allowed, 3).tolist()
        assert CatalogueStats.of(sparse, 0.0, 1.0) == CatalogueStats.of(
            SparseScores.of_dense(dense), 0.0, 1.0
        )
        stats = CatalogueStats.of(sparse, 0.0, 1.0)
        assert stats.best_bm25 == dense.max()
        np.testing.assert_allclose(
            [stats.bm25_mean, stats.bm25_std], [dense.mean(), dense.std()], rtol=1e-6, atol=1e-9
        )


def test_trigrams_tolerate_typos(lexical: LexicalIndex) -> None:
    assert char_trigrams("Go go") == ["#go", "go#"]
    terms = lexical.analyze("cordles dril")  # misspelt: no word matches, many trigrams do
    assert lexical.words.matches(terms.word_ids, np.arange(4)).tolist() == [0, 0, 0, 0]
    grams = lexical.trigrams.matches(terms.trigram_ids, np.arange(4))
    assert grams.argmax() == 0 and grams[0] >= 6 and grams[1] == 0


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        ("DEWALT Drill", "dewalt drill"),
        ("Café", "cafe"),
        ("Cafe\u0301 CRÈME brûlée", "cafe creme brulee"),  # a combining accent, as macOS writes it
        ("ｃａｆｅ ＴＯＲＣＨ", "cafe torch"),  # full-width forms
        ("Straße", "strasse"),
        ("Łódź Ελληνικά", "łodz ελληνικα"),  # ł has no accent to drop; Greek loses its tonos
        ("йогурт ёлка", "йогурт ёлка"),  # Cyrillic keeps its marks: й is not и
        ("हिन्दी", "हिन्दी"),
    ],
)
def test_titles_and_queries_are_folded(text: str, folded: str) -> None:
    assert fold(text) == folded


def test_an_unaccented_query_finds_an_accented_title(tmp_path) -> None:
    titles = ["Café Bustelo Espresso Ground Coffee", "Creme\u0301 Bru\u0302le\u0301e Torch", "Tea"]
    index = build_lexical_index(titles, show_progress=False)
    for query, row in (("cafe bustelo", 0), ("CAFÉ", 0), ("crème brûlée", 1), ("creme brulee", 1)):
        terms = index.analyze(query)
        assert index.scores(terms).argmax() == row and index.scores(terms)[row] > 0, query
        assert index.trigrams.matches(terms.trigram_ids, np.arange(3)).argmax() == row
    index.save(tmp_path / "folded")
    assert LexicalIndex.load(tmp_path / "folded").analyze("cafe").word_ids.size == 1
    # An index built before folding (its analyzer.json without "folds") keeps its analysis.
    settings = tmp_path / "folded" / "analyzer.json"
    earlier = json.loads(settings.read_text())
    del earlier["folds"]
    settings.write_text(json.dumps(earlier))
    assert LexicalIndex.load(tmp_path / "folded").analyzer.normalize("Café") == "café"


def test_the_served_analysis_and_bm25_are_bm25s_to_the_last_bit(
    lexical: LexicalIndex, tmp_path
) -> None:
    """Serving analyses and scores without bm25s, exactly as bm25s does (tokenize, then BM25's
    Lucene variant), from the saved arrays."""
    import bm25s
    import Stemmer

    queries = ["cordless drills", "the DRILL-bit set", "wood", "x", "Wood & Metal 21 piece", ""]
    stemmer = Stemmer.Stemmer("english")
    reference = bm25s.BM25()
    reference.index(bm25s.tokenize(TITLES, stopwords="en", stemmer=stemmer, show_progress=False))
    lexical.save(tmp_path)
    loaded = LexicalIndex.load(tmp_path)
    expected = bm25s.tokenize(
        queries, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False
    )
    for query, tokens in zip(queries, expected, strict=True):
        terms = loaded.analyze(query)
        assert terms.words == list(dict.fromkeys(tokens)), query
        bm25 = loaded.scores(terms)
        want = reference.get_scores(terms.words) if terms.words else np.zeros(len(TITLES))
        assert bm25.dtype == np.float32 and np.array_equal(bm25, want.astype(np.float32)), query


def test_vocabulary_finds_terms_by_binary_search(tmp_path) -> None:
    from shopserve.ensemble.store import Vocabulary

    Vocabulary.of({"drill": 2, "angl": 0, "wood": 1, "é": 3}).save(tmp_path / "v")
    vocabulary = Vocabulary.load(tmp_path / "v")
    assert len(vocabulary) == 4 and vocabulary.get("wood") == 1 and vocabulary.get("é") == 3
    assert vocabulary.get("aaa") is None and vocabulary.get("zzz") is None
    assert vocabulary.known_ids(["wood", "nail", "angl", "wood"]) == [1, 0, 1]


def test_features_follow_their_names(lexical: LexicalIndex) -> None:
    terms = lexical.analyze("cordless drill unknownword")
    rows = np.array([0, 2, 3])
    bm25 = lexical.scores(terms)
    cosine = np.array([0.8, 0.5, 0.9], dtype=np.float32)
    stats = CatalogueStats.of(SparseScores.of_dense(bm25), cosine_mean=0.3, cosine_std=0.1)
    features = ranking_features(lexical, terms, rows, cosine, bm25[rows], stats)
    named = dict(zip(FEATURE_NAMES, features.T, strict=True))
    assert features.shape == (3, len(FEATURE_NAMES)) and features.dtype == np.float32
    np.testing.assert_allclose(named["cosine_z"], [5.0, 2.0, 6.0], rtol=1e-5)
    np.testing.assert_allclose(named["bm25_ratio"], bm25[rows] / bm25.max(), rtol=1e-6)
    np.testing.assert_allclose(named["bm25_z"], (bm25[rows] - bm25.mean()) / bm25.std(), rtol=1e-5)
    np.testing.assert_allclose(named["query_coverage"], [2 / 3, 1 / 3, 0], rtol=1e-6)
    assert named["query_trigram_coverage"][0] > named["query_trigram_coverage"][1] > 0
    learned = features[:, : len(RANKER_FEATURES)]
    assert learned.min() >= -1 and learned.max() <= 1  # every learned-ranker input is bounded


def test_cosine_moments_match_a_full_scan() -> None:
    from shopserve.ensemble.dense import DenseIndex

    rng = np.random.default_rng(0)
    items = rng.normal(size=(500, 16)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    index = DenseIndex.build(items, m=8, ef_construction=40, ef_search=40)
    query = items[3]
    mean, std = index.cosine_moments(query)
    np.testing.assert_allclose(
        [mean, std], [(items @ query).mean(), (items @ query).std()], rtol=1e-4
    )
    rows, scores = index.search(query[None], 5)
    assert rows[0, 0] == 3 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_saved_index_loads_mapped_and_answers_the_same(tmp_path) -> None:
    from shopserve.ensemble.dense import DenseIndex

    items = np.random.default_rng(1).normal(size=(300, 16)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    built = DenseIndex.build(items, m=8, ef_construction=40, ef_search=40)
    built.save(tmp_path / "dense.faiss")
    loaded = DenseIndex.load(tmp_path / "dense.faiss", ef_search=40)
    assert str(tmp_path / "dense.faiss") in Path("/proc/self/maps").read_text()
    np.testing.assert_array_equal(loaded.search(items[:20], 10)[0], built.search(items[:20], 10)[0])
    np.testing.assert_array_equal(loaded.vectors(np.arange(300)), items)
    with pytest.raises(ValueError, match="read-only"):
        loaded.stored[0, 0] = 1.0  # the mapped file is never written through


def _mapped(array: np.ndarray) -> bool:
    """A plain view of a read-only memory map (store.mapped)."""
    return (
        type(array) is np.ndarray
        and isinstance(array.base, np.memmap)
        and not array.flags.writeable
    )


def test_catalogue_round_trip_maps_ids_and_titles(tmp_path) -> None:
    from shopserve.ensemble.store import Catalogue, Titles

    titles = ["Cordless drill", "", "Sägeblatt 24 Zähne", 'Hose, 50 ft "heavy"']
    Catalogue(np.array([7, 3, 11, 5]), titles, log_through=12.5).save(tmp_path / "catalogue.json")
    loaded = Catalogue.load(tmp_path / "catalogue.json")
    assert _mapped(loaded.product_ids) and isinstance(loaded.titles, Titles)
    assert loaded.product_ids.tolist() == [7, 3, 11, 5] and loaded.log_through == 12.5
    assert list(loaded.titles) == titles and loaded.titles[2] == titles[2]
    assert loaded.titles[-1] == titles[-1] and loaded.titles[1:3] == titles[1:3]
    rows = loaded.product_rows()  # the saved id index, mapped
    assert _mapped(rows.sorted_ids) and rows.rows(np.array([11, 4, 7])).tolist() == [
        2,
        -1,
        0,
    ]
    with pytest.raises(IndexError):
        loaded.titles[4]
    np.save(tmp_path / "catalogue_ids.npy", np.array([7, 3]))  # a broken store says so
    with pytest.raises(ValueError, match="disagree on its size"):
        Catalogue.load(tmp_path / "catalogue.json")


def test_a_store_of_the_earlier_format_asks_for_a_rebuild(tmp_path) -> None:

    from shopserve.ensemble.lexical import TermSets
    from shopserve.ensemble.store import Catalogue, StoreFormatError

    (tmp_path / "catalogue.json").write_text(json.dumps({"product_ids": [1], "titles": ["a"]}))
    with pytest.raises(StoreFormatError, match="build the store again"):
        Catalogue.load(tmp_path / "catalogue.json")
    np.savez(tmp_path / "title_words.npz", ids=np.array([0]), offsets=np.array([0, 1]))
    with pytest.raises(StoreFormatError, match="build the store again"):
        TermSets.load(tmp_path / "title_words")
    # bm25s's own files, before serving mapped the BM25 weights and vocabularies
    (tmp_path / "analyzer.json").write_text(json.dumps({"stopwords": "en", "stemmer": "english"}))
    with pytest.raises(StoreFormatError, match="build the store again"):
        LexicalIndex.load(tmp_path)
    with pytest.raises(StoreFormatError, match="build the store again"):  # tokenizer.json only
        WordPiece.load(tmp_path)


def test_a_model_digest_covers_its_external_weights(tmp_path) -> None:
    import hashlib

    from shopserve.ensemble.store import model_digest, weights_file

    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"graph")
    alone = model_digest(graph)
    assert alone == hashlib.sha256(b"graph").hexdigest()  # a one-file model: its file's digest
    weights_file(graph).write_bytes(b"weights one")
    first = model_digest(graph)
    weights_file(graph).write_bytes(b"weights two")
    assert len({alone, first, model_digest(graph)}) == 3


def test_product_rows_find_built_and_added_products() -> None:
    from shopserve.ensemble.store import ProductRows

    rows = ProductRows.of(np.array([40, 10, 30, 20]))
    assert rows.rows(np.array([10, 20, 99, 40])).tolist() == [1, 3, -1, 0]
    assert rows[30] == 2 and 99 not in rows and rows.get(99) is None
    rows.add(99, 4)
    assert rows[99] == 4 and rows.rows(np.array([99, 30])).tolist() == [4, 2]
    with pytest.raises(ValueError, match="has a row"):
        rows.add(10, 5)
    with pytest.raises(KeyError):
        rows[12]
    assert ProductRows.of(np.array([], dtype=np.int64)).rows(np.array([1])).tolist() == [-1]


def test_top_k_is_softmax_with_stable_ties() -> None:
    ids = np.array([30, 10, 20, 40])
    logits = np.array([1.0, 2.0, 1.0, 0.0], dtype=np.float32)
    product_ids, scores = top_k(ids, logits, 3)
    assert product_ids.tolist() == [10, 20, 30]
    np.testing.assert_allclose(scores, softmax(logits)[[1, 0, 2]], rtol=1e-6)
    np.testing.assert_allclose(softmax(logits).sum(), 1.0, rtol=1e-6)


def test_ndcg_recall_and_ranking() -> None:
    gains = {1: 2.0, 2: 1.0, 3: 0.0}
    assert ndcg_at_k([1, 2, 3], gains) == pytest.approx(1.0)
    assert ndcg_at_k([9, 1], gains) == pytest.approx((2 / np.log2(3)) / (2 + 1 / np.log2(3)))
    assert recall_at_k([5, 1, 7], {1, 2}, 2) == 0.5
    assert rank_by_score([7, 3, 5], np.array([1.0, 2.0, 2.0])) == [3, 5, 7]


def test_generic_catalogue_format_and_split(tmp_path) -> None:
    catalogue_file = tmp_path / "items.csv"
    catalogue_file.write_text("product_id,title,brand\n1,Red Drill,ACME\n2,Blue Saw,ACME\n")
    judgments_file = tmp_path / "judged.csv"
    judgments_file.write_text("query,product_id,relevance\ndrill,1,3\ndrill,2,1\nsaw,2,2\n")
    catalogue = load_catalogue(catalogue_file)
    assert catalogue.product_ids.tolist() == [1, 2] and catalogue.extra["brand"] == ["ACME"] * 2
    judgments = load_judgments(judgments_file, catalogue)
    assert judgments.queries == ["drill", "saw"] and judgments.gains("drill") == {1: 2.0, 2: 0.0}
    judgments_file.write_text("query,product_id,relevance\ndrill,99,3\n")
    with pytest.raises(DataError, match="a product_id not in the catalogue \\(first: row 2: '99'"):
        load_judgments(judgments_file, catalogue)
    with pytest.raises(DataError, match="missing columns"):
        load_catalogue(judgments_file)


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ("KidKraft Lil&#39; Doll Bunk Bed", "KidKraft Lil' Doll Bunk Bed"),
        ("Black &amp; Decker 15&quot; Saw &#x2122;", 'Black & Decker 15" Saw ™'),
        ("AT&T R&D B & Q", "AT&T R&D B & Q"),  # no reference: left alone
        ("Salt &amp Pepper &para", "Salt &amp Pepper &para"),  # incomplete: left alone
        ("&amp;amp; &nosuchentity;", "&amp; &nosuchentity;"),  # decoded once; unknown kept
    ],
)
def test_html_character_references_are_decoded(text: str, plain: str) -> None:
    assert plain_text(text) == plain


def test_a_catalogue_is_read_as_plain_text(tmp_path, caplog) -> None:
    """A web shop's export escapes its titles and categories: they are served and matched as the
    characters they stand for, and a title that stands for no letter or digit is refused."""
    path = tmp_path / "items.csv"
    path.write_text(
        "product_id,title,category,price\n"
        '1,Hunter &amp; Co Fan,Lighting &amp; Fans,10\n2,Leviton 15 Amp Outlet,Electrical,"&amp;"\n'
    )
    with caplog.at_level("INFO", logger="shopserve.export.data"):
        catalogue = load_catalogue(path)
    assert catalogue.titles == ["Hunter & Co Fan", "Leviton 15 Amp Outlet"]
    assert catalogue.extra["category"] == ["Lighting & Fans", "Electrical"]
    assert catalogue.extra["price"] == ["10", "&amp;"]  # not text: refused later, as it was given
    assert "decoded HTML character references in 1 titles" in caplog.text
    index = build_lexical_index(catalogue.titles, show_progress=False)
    assert index.scores(index.analyze("15 amp"))[0] == 0  # "&amp;" is not the word "amp"
    path.write_text("product_id,title\n1,&#128296;\n")
    with pytest.raises(DataError, match="a title without a letter or digit"):
        load_catalogue(path)


def test_a_spreadsheets_csv_reads_and_bad_rows_are_named(tmp_path) -> None:
    """A byte-order mark before the header is not part of a column name; a file of a header alone,
    empty titles, repeated or out-of-range ids, unreadable grades and a single grade each stop the
    build with the rows they are on."""
    path = tmp_path / "items.csv"
    path.write_bytes("\ufeffproduct_id,title\n1,Drill\n2,Saw\n".encode())
    catalogue = load_catalogue(path)
    assert catalogue.product_ids.tolist() == [1, 2]
    path.write_text("product_id,title\n")
    with pytest.raises(DataError, match="has no rows"):
        load_catalogue(path)
    path.write_text(
        "product_id,title\n1,Drill\n2, \n1,Saw\nSKU-1,Hammer\n99999999999999999999,Nail\n"
        "7,🔨🔨\n8,Drill™\n"
    )
    with pytest.raises(DataError) as error:
        load_catalogue(path)
    assert "1 rows with an empty title (first: row 3: ' ')" in str(error.value)
    assert "1 rows with a title without a letter or digit (first: row 7: '🔨🔨')" in str(
        error.value
    )
    assert "1 rows with a product_id already given (on row 2) (first: row 4: 1)" in str(error.value)
    assert (
        "2 rows with a product_id that is not a 64-bit integer (first: row 5: 'SKU-1', row 6"
        in (str(error.value))
    )
    judged = tmp_path / "judged.csv"
    judged.write_text("query,product_id,relevance\ndrill,1,high\ndrill,2,\nsaw,SKU-1,1\n")
    with pytest.raises(DataError) as error:
        load_judgments(judged, catalogue)
    assert "2 rows with a relevance that is not a number (first: row 2: 'high', row 3: '')" in (
        str(error.value)
    )
    assert "1 rows with a product_id not in the catalogue (first: row 4: 'SKU-1')" in str(
        error.value
    )
    judged.write_text("query,product_id,relevance\ndrill,1,2\nsaw,2,2\n")
    with pytest.raises(DataError, match="every relevance is 2; nDCG needs at least two grades"):
        load_judgments(judged, catalogue)
    judged.write_text("query,product_id,relevance\ndrill,1,2\n ,1,2\n,2,1\n")
    with pytest.raises(
        DataError, match=r"2 rows with an empty query \(first: row 3: ' ', row 4: ''\)"
    ):
        load_judgments(judged, catalogue)


def test_parquet_catalogue_reads_like_csv(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "items.parquet"
    pq.write_table(pa.table({"product_uid": [7, 9], "product_title": ["Hammer", "Saw"]}), path)
    catalogue = load_catalogue(path)
    assert catalogue.product_ids.tolist() == [7, 9] and catalogue.titles == ["Hammer", "Saw"]
    # ids a dataframe turned into floats read as the integers they hold
    pq.write_table(pa.table({"product_id": [7.0, 9.0], "title": ["Hammer", "Saw"]}), path)
    assert load_catalogue(path).product_ids.tolist() == [7, 9]
    (tmp_path / "items.txt").write_text("product_id,title\n")
    with pytest.raises(DataError, match=r"expected a \.csv or \.parquet file"):
        load_catalogue(tmp_path / "items.txt")


def test_home_depot_split_is_seeded_and_disjoint(data_dir) -> None:
    catalogue = load_catalogue(data_dir / "products.csv")
    judgments = load_judgments(data_dir / "judgments.csv", catalogue)
    assert len(catalogue) == 54_667 and len(judgments) == 10_617
    train, dev = split_queries(judgments.queries, 0.2, seed=13)
    assert not set(train) & set(dev) and len(train) + len(dev) == len(judgments)
    assert (train, dev) == split_queries(judgments.queries, 0.2, seed=13)
    assert dev != split_queries(judgments.queries, 0.2, seed=14)[1]


def test_store_reads_the_served_file_and_parameters_from_the_source_configs(tmp_path) -> None:
    from conftest import SOURCE_REPOSITORY
    from shopserve.ensemble import store

    repository = tmp_path / "repo"
    for model in (store.ENCODER, store.RANKER, store.RETRIEVE):
        (repository / model / "1").mkdir(parents=True)
        config = (SOURCE_REPOSITORY / model / "config.pbtxt").read_text(encoding="utf-8")
        (repository / model / "config.pbtxt").write_text(config, encoding="utf-8")
    assert store.model_file(repository, store.RANKER) == repository / "ranker/1/model.onnx"
    encoder_config = repository / store.ENCODER / "config.pbtxt"
    encoder_config.write_text(
        encoder_config.read_text().replace('"model_int8.onnx"', '"model.onnx"'), encoding="utf-8"
    )
    assert store.model_file(repository, store.ENCODER) == repository / "encoder/1/model.onnx"
    assert store.config_parameters(repository, store.RETRIEVE)["ef_search"] == "512"


def test_each_version_serves_its_own_fitted_values(tmp_path) -> None:
    from conftest import SOURCE_REPOSITORY
    from shopserve.ensemble import store
    from shopserve.export.repository import RepositoryWriter

    repository = tmp_path / "repo"
    for version, ef_search in ((1, "96"), (2, "256")):
        with RepositoryWriter(repository, version) as writer:
            writer.set_parameter(store.RETRIEVE, "ef_search", ef_search)
            assert writer.parameters(store.RETRIEVE)["ef_search"] == ef_search
            writer.commit({})
    template = store.config_parameters(SOURCE_REPOSITORY, store.RETRIEVE)["ef_search"]
    assert store.config_parameters(repository, store.RETRIEVE, 1)["ef_search"] == "96"
    assert store.config_parameters(repository, store.RETRIEVE, 2)["ef_search"] == "256"
    assert store.config_parameters(repository, store.RETRIEVE)["ef_search"] == "256"  # newest
    config = (repository / store.RETRIEVE / "config.pbtxt").read_text()
    assert config == (SOURCE_REPOSITORY / store.RETRIEVE / "config.pbtxt").read_text()
    assert f'"{template}"' in config  # the shared config keeps the template's default
    version_one = {"parameters": {"ef_search": {"string_value": template}}}
    assert store.adapter_parameters(version_one, repository / store.RETRIEVE / "1") == {
        "ef_search": "96"
    }


def test_free_ports_are_distinct() -> None:
    from shopserve.server import free_ports

    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(1024 < p < 65536 for p in ports)

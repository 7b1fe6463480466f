"""``python -m shopserve.export``: build a model repository, or evaluate a built one."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .data import DEFAULT_DATA_DIR, DataError


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="folder with products.csv and judgments.csv (default: $DATA_DIR/homedepot, "
        "DATA_DIR defaulting to ../shared/data)",
    )
    parser.add_argument("--catalogue", type=Path, help="catalogue file (overrides --data)")
    parser.add_argument("--judgments", type=Path, help="judgments file (overrides --data)")
    parser.add_argument("--no-judgments", action="store_true", help="ignore judgments in --data")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))


def _inputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    catalogue = args.catalogue or args.data / "products.csv"
    judgments = args.judgments or args.data / "judgments.csv"
    if args.no_judgments or not judgments.exists():
        judgments = None
    return catalogue, judgments


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m shopserve.export", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="export, quantize, index, train and write the repository")
    _data_arguments(build)
    build.add_argument("--version", type=int, default=1, help="model version to write")
    build.add_argument("--seed", type=int, default=13, help="seed of the train/dev query split")
    build.add_argument("--dev-fraction", type=float, default=0.2)
    build.add_argument("--epochs", type=int, default=40)
    build.add_argument("--ranker", type=Path, help="reuse this ranker ONNX (no judgments)")
    build.add_argument(
        "--int8-weights",
        choices=("per-channel", "per-tensor"),
        default="per-channel",
        help="INT8 weight scales of the encoder (per-tensor fails the accuracy gate on MiniLM)",
    )
    evaluate = sub.add_parser("evaluate", help="reproduce the evaluation from a built repository")
    _data_arguments(evaluate)
    evaluate.add_argument(
        "--fp32",
        action="store_true",
        help="also evaluate the FP32 encoder (re-embeds the catalogue)",
    )
    evaluate.add_argument("--output", type=Path, help="write the metrics as JSON here")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-probe chatter
    catalogue, judgments = _inputs(args)  # evaluate reads the catalogue from the repository
    try:
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
                )
            )
            print(json.dumps({k: record[k] for k in ("timings_s",) if k in record}, indent=2))
        else:
            from .reproduce import evaluate_repository

            if judgments is None:
                raise DataError("evaluate needs a judgments file")
            result = evaluate_repository(args.repository, judgments, fp32=args.fp32)
            text = json.dumps(result, indent=2)
            print(text)
            if args.output:
                args.output.write_text(text + "\n")
    except (DataError, RuntimeError) as exc:
        logging.getLogger("shopserve.export").error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0

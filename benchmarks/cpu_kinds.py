"""Whether a CPU store's INT8 encoder embeds a text alike on the two kinds of x86 CPU.

With VNNI or AMX, ONNX Runtime sums INT8 products in 32 bits; without (AVX2, AVX-512 without
VNNI) it adds them in pairs in 16 bits, which saturates where weights use all 8 bits
(docs/serving.md, "INT8 and the CPU"). This script embeds titles of a store's catalogue with its
served encoder on this machine, then again in a subprocess under an emulator of the other kind, and
compares the two text by text. On a machine with VNNI the default emulator, QEMU's user mode with
a Haswell CPU (AVX2, no VNNI; Debian's ``qemu-user``, QEMU 7.2 or later), makes ONNX Runtime pick
its AVX2 kernels::

    python benchmarks/cpu_kinds.py --repository STORE --out cpu_kinds.json

``--emulator ""`` runs the second embedding natively too (a check of the script itself).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_EMULATOR = "qemu-x86_64 -cpu Haswell"


def _texts(repository: Path, count: int, seed: int) -> list[str]:
    from shopserve.ensemble import store

    titles = store.load_catalogue(repository).titles
    rows = np.random.default_rng(seed).choice(len(titles), min(count, len(titles)), replace=False)
    return [titles[int(row)] for row in np.sort(rows)]


def _embed(repository: Path, texts: list[str]) -> np.ndarray:
    from shopserve.ensemble import store
    from shopserve.ensemble.pipeline import load_tokenizer
    from shopserve.export import qdq

    graph = store.in_process_model_file(repository, store.ENCODER)
    return qdq.embed(graph, qdq.calibration_batches(load_tokenizer(repository), texts, 32))


def compare(repository: Path, count: int, seed: int, emulator: str) -> dict:
    """Embed ``count`` titles here and under ``emulator``; their agreement, text by text."""
    here = _embed(repository, _texts(repository, count, seed))
    with tempfile.TemporaryDirectory(prefix="cpu-kinds.") as tmp:
        rows = Path(tmp) / "emulated.npy"
        command = [*shlex.split(emulator), sys.executable, __file__, "embed"]
        command += [str(repository), str(count), str(seed), str(rows)]
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
        seconds = time.monotonic() - started
        there = np.load(rows)
    from shopserve.ensemble.models import int8_weight_bits
    from shopserve.export.qdq import cosines

    cosine = cosines(here, there)
    manifest = json.loads((repository / "manifest.json").read_text())
    return {
        "repository": str(repository),
        "weight_bits": int8_weight_bits(manifest["encoder"].get("int8", {})),
        "emulator": emulator or "(none: both runs native)",
        "texts": len(here),
        "identical_rows": int((here == there).all(axis=1).sum()),
        "cosine": {"mean": float(cosine.mean()), "min": float(cosine.min())},
        "max_abs_difference": float(np.abs(here - there).max()),
        "emulated_seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "embed":  # the second run: repository, count, seed, output
        repository, count, seed, output = argv[1:]
        repository_path = Path(repository)
        np.save(output, _embed(repository_path, _texts(repository_path, int(count), int(seed))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--texts", type=int, default=300, help="catalogue titles to embed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--emulator", default=DEFAULT_EMULATOR, help="command prefix ('' for none)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    report = compare(args.repository, args.texts, args.seed, args.emulator)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

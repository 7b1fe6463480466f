"""``python -m benchmarks memory``: the whole server's memory against search instances and
catalogue size.

For each store and each count in INSTANCES, the server runs a private copy of the store (its
``search`` config set to that many instances), answers WARM_QUERIES real queries from 4 threads so
every instance has served, and then the resident (RSS) and proportional (PSS: a shared page counted
once over all the processes that map it) memory of tritonserver and all its model processes is read
from /proc (shopserve.memory). The target: PSS with four ``search`` instances ≤ 1.25× that with one.
"""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from shopserve.client import SearchClient
from shopserve.ensemble import store

from shopserve.memory import server_memory, total_kib
from shopserve.server import ServerConfig, TritonServer, free_ports

from . import machine
from .common import WORK_DIR, BenchmarkError, provenance, write_results
from .queries import load_traffic

INSTANCES = (1, 2, 4)
WARM_QUERIES = 200
TARGET_RATIO = 1.25
_COUNT = re.compile(r"(instance_group \[ \{ kind: KIND_CPU count: )\d+( \} \])")


def store_copy(repository: Path, destination: Path) -> Path:
    """A private copy of ``repository``: files of their own, so that no other process that maps
    the original (another server, a test) shares their pages and lowers this server's PSS."""
    shutil.rmtree(destination, ignore_errors=True)
    return Path(shutil.copytree(repository, destination, ignore=shutil.ignore_patterns(".triton")))


def set_search_instances(repository: Path, count: int) -> None:
    """Set the ``search`` model's instance count in ``repository``'s config."""
    config = repository / store.SEARCH / "config.pbtxt"
    text, replaced = _COUNT.subn(rf"\g<1>{count}\g<2>", config.read_text(encoding="utf-8"))
    if replaced != 1:
        raise BenchmarkError(f"{config}: no single instance_group count to set")
    config.write_text(text, encoding="utf-8")


def _served_bytes(repository: Path, models: list[str]) -> int:
    """Bytes on disk of every served version's files (the artefacts the processes map or load)."""
    return sum(
        path.stat().st_size
        for model in models
        for path in store.version_dir(repository, model).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )


def measure(copy: Path, count: int, queries: list[str]) -> dict:
    set_search_instances(copy, count)
    config = ServerConfig(copy, *free_ports(3), work_dir=WORK_DIR / "memory" / "triton")
    with TritonServer(config, log_file=WORK_DIR / "logs" / "memory.log") as server:
        with SearchClient(server.grpc_url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda q: client.search(q, top_k=10), queries))
        processes = server_memory(server.process.pid)
    by_model: dict[str, dict[str, int]] = {}
    for process in processes:
        totals = by_model.setdefault(process.model, {"processes": 0, "Pss": 0, "Rss": 0})
        totals["processes"] += 1
        totals["Pss"] += process.kib["Pss"]
        totals["Rss"] += process.kib["Rss"]
    search = [p for p in processes if p.model == store.SEARCH]
    return {
        "search_instances": count,
        "pss_mib": total_kib(processes, "Pss") / 1024,
        "rss_mib": total_kib(processes, "Rss") / 1024,
        "search_anonymous_mib_each": [p.kib["Anonymous"] / 1024 for p in search],
        "by_model_mib": {
            model: {k: v / 1024 if k != "processes" else v for k, v in totals.items()}
            for model, totals in sorted(by_model.items())
        },
    }


def run(repositories: list[Path], out: Path) -> Path:
    stores = []
    for repository in repositories:
        manifest = json.loads((repository / store.MANIFEST_FILE).read_text())
        queries = load_traffic(manifest, WARM_QUERIES).queries
        copy = store_copy(repository, WORK_DIR / "memory" / "store")
        runs = [measure(copy, count, queries) for count in INSTANCES]
        stores.append(
            {
                "repository": str(repository),
                "products": len(store.load_catalogue(repository)),
                "served_files_mib": _served_bytes(repository, manifest["models"]) / 2**20,
                "runs": runs,
                "pss_4_over_1": runs[-1]["pss_mib"] / runs[0]["pss_mib"],
            }
        )
    result = {"machine": machine.describe(), "target_ratio": TARGET_RATIO, "stores": stores}
    return write_results(out, "memory", result, markdown(result))


def markdown(result: dict) -> str:
    described = result["machine"]
    lines = [
        "# Server memory against search instances and catalogue size",
        "",
        provenance(described, "memory") + " PSS counts a page shared by n "
        "processes 1/n in each, so the PSS of all the server's processes is the memory it takes.",
        "",
        "| store | products | files served (MiB) | search instances | PSS (MiB) | RSS (MiB) "
        "| search PSS (MiB, all instances) | each search instance's own memory (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in result["stores"]:
        for run in entry["runs"]:
            search = run["by_model_mib"][store.SEARCH]
            own = run["search_anonymous_mib_each"]
            lines.append(
                f"| {Path(entry['repository']).name} | {entry['products']:,} "
                f"| {entry['served_files_mib']:.0f} | {run['search_instances']} "
                f"| {run['pss_mib']:.0f} | {run['rss_mib']:.0f} | {search['Pss']:.0f} "
                f"| {sum(own) / len(own):.0f} |"
            )
    lines += ["", "| store | PSS with 4 search instances ÷ with 1 | target |", "|---|---|---|"]
    for entry in result["stores"]:
        lines.append(
            f"| {Path(entry['repository']).name} | {entry['pss_4_over_1']:.2f} "
            f"| ≤ {result['target_ratio']} |"
        )
    return "\n".join(lines) + "\n"

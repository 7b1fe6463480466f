"""What machine a benchmark ran on: CPU, memory, OS, and the versions of everything measured."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from .common import PROJECT

PACKAGES = (
    "onnxruntime",
    "torch",
    "transformers",
    "faiss-cpu",
    "bm25s",
    "tokenizers",
    "numpy",
    "tritonclient",
    "nvidia-pytriton",
    "fastapi",
    "uvicorn",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def _os_release() -> str:
    try:
        fields = dict(
            line.split("=", 1)
            for line in Path("/etc/os-release").read_text().splitlines()
            if "=" in line
        )
        return fields.get("PRETTY_NAME", "").strip('"')
    except OSError:
        return platform.platform()


def _git_commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe(perf_analyzer_version: str = "") -> dict:
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git_commit(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(),
        "os": _os_release(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "tritonserver": "2.51.0 (nvidia-pytriton " + _version("nvidia-pytriton") + ")",
        "perf_analyzer": perf_analyzer_version,
        "packages": {p: _version(p) for p in PACKAGES},
    }


def write(info: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = ["# Machine", "", "| | |", "|---|---|"]
    for key, value in info.items():
        if key == "packages":
            value = ", ".join(f"{p} {v}" for p, v in value.items())
        lines.append(f"| {key.replace('_', ' ')} | {value} |")
    (directory / "machine.md").write_text("\n".join(lines) + "\n")

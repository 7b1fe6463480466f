"""Model repository variants for the sweep and the tuning experiments, built as copies.

The built store is never modified: a variant is a directory under ``benchmarks/work/repos/`` whose
configs are edited copies and whose large artefacts are symlinks to the source repository's files (or
to the FP32 artefacts cached by :mod:`benchmarks.fp32`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shopserve.ensemble import store
from shopserve.export.repository import record_rewritten_files

from .common import WORK_DIR, BenchmarkError

log = logging.getLogger("benchmarks.variants")

REPOS_DIR = WORK_DIR / "repos"
LINK_ABOVE_BYTES = 64 * 1024  # smaller files (configs, adapters) are copied
FP32_ENCODER_FILE = "model_fp32.onnx"  # what the build serves on CPU
DYNAMIC_INT8_ENCODER_FILE = "model_dynamic_int8.onnx"  # the encoder shipped before (benchmarks)

Edit = Callable[[str], str]


def _replace_once(pattern: str, replacement: str, text: str, what: str) -> str:
    new, count = re.subn(pattern, replacement, text, count=1, flags=re.DOTALL)
    if count != 1:
        raise BenchmarkError(f"config edit {what!r}: pattern not found")
    return new


def _replacing(pattern: str, replacement: str, what: str) -> Edit:
    """An edit that replaces the one match of ``pattern`` (an error when there is none)."""
    return lambda text: _replace_once(pattern, replacement, text, what)


def _replace_or_append(pattern: str, line: str) -> Edit:
    """Replace the first match of ``pattern`` with ``line``, or append ``line`` if none."""

    def edit(text: str) -> str:
        if re.search(pattern, text):
            return re.sub(pattern, line, text, count=1)
        return text.rstrip("\n") + "\n" + line + "\n"

    return edit


def set_parameter(key: str, value: str) -> Edit:
    """Set (or add) a string parameter of a model config; it also overrides the value a build
    fitted for the version (see :func:`materialize`)."""
    edit = _replace_or_append(
        rf'parameters\s*\{{\s*key:\s*"{re.escape(key)}"\s*value:\s*\{{[^}}]*\}}\s*\}}',
        f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}',
    )
    edit.parameter = key  # type: ignore[attr-defined]
    return edit


def set_instances(count: int) -> Edit:
    return _replacing(
        r"instance_group\s*\[.*?\]",
        f"instance_group [ {{ kind: KIND_CPU count: {count} }} ]",
        "instance_group",
    )


def set_response_cache(enabled: bool) -> Edit:
    return _replace_or_append(
        r"response_cache\s*\{[^}]*\}",
        f"response_cache {{ enable: {'true' if enabled else 'false'} }}",
    )


def set_queue_size(size: int) -> Edit:
    return _replacing(r"max_queue_size:\s*\d+", f"max_queue_size: {size}", "max_queue_size")


def set_default_model_filename(filename: str) -> Edit:
    return _replacing(
        r'default_model_filename:\s*"[^"]*"',
        f'default_model_filename: "{filename}"',
        "default_model_filename",
    )


def dynamic_batching(max_batch_size: int, preferred: tuple[int, ...], delay_us: int) -> Edit:
    """Turn on Triton's dynamic batcher: the first dim of every tensor becomes the batch dim."""

    def edit(text: str) -> str:
        text = _replace_once(
            r"max_batch_size:\s*\d+", f"max_batch_size: {max_batch_size}", text, "max_batch_size"
        )
        text = re.sub(r"dims:\s*\[\s*-1\s*,\s*", "dims: [ ", text)
        sizes = ", ".join(str(s) for s in preferred)
        return (
            text.rstrip("\n")
            + f"\ndynamic_batching {{ preferred_batch_size: [ {sizes} ] "
            + f"max_queue_delay_microseconds: {delay_us} }}\n"
        )

    return edit


@dataclass(frozen=True)
class Variant:
    """A named set of config edits (per model) on top of the source repository."""

    name: str
    description: str
    edits: Mapping[str, tuple[Edit, ...]] = field(default_factory=dict)
    fp32: bool = False  # FP32 encoder and an HNSW index over FP32 catalogue embeddings

    def plus(self, name: str, description: str, **edits: tuple[Edit, ...]) -> Variant:
        merged = {m: tuple(self.edits.get(m, ())) for m in self.edits}
        for model, more in edits.items():
            merged[model] = merged.get(model, ()) + tuple(more)
        return Variant(name, description, merged, self.fp32)


def _link_or_copy(source: Path, destination: Path) -> None:
    if source.is_dir():
        destination.symlink_to(source.resolve(), target_is_directory=True)
    elif source.stat().st_size > LINK_ABOVE_BYTES:
        destination.symlink_to(source.resolve())
    else:
        shutil.copy2(source, destination)


def materialize(
    variant: Variant,
    source: Path,
    fp32_index: Path | None = None,
    files: Mapping[str, Path] | None = None,
) -> Path:
    """Write ``variant`` as a repository under ``benchmarks/work/repos/<name>`` and return it;
    ``files`` adds (or replaces) files by path relative to the repository, "{version}" standing
    for the model's newest version."""
    destination = REPOS_DIR / variant.name
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    shutil.copy2(source / store.MANIFEST_FILE, destination / store.MANIFEST_FILE)
    # Every version's manifest: a server seeds its live profiles from the version it serves.
    if (source / store.MANIFESTS_DIR).is_dir():
        shutil.copytree(
            source / store.MANIFESTS_DIR,
            destination / store.MANIFESTS_DIR,
            ignore=shutil.ignore_patterns(".*"),
        )
    replace: dict[str, Path] = {
        relative.format(version=store.latest_version_dir(source, relative.split("/")[0]).name): path
        for relative, path in (files or {}).items()
    }
    edits = {model: list(more) for model, more in variant.edits.items()}
    if variant.fp32:
        if fp32_index is None:
            raise BenchmarkError(f"variant {variant.name} needs the FP32 HNSW index")
        retrieve_version = store.latest_version_dir(source, store.RETRIEVE).name
        replace[f"{store.RETRIEVE}/{retrieve_version}/{store.DENSE_INDEX_FILE}"] = fp32_index
        edits.setdefault(store.ENCODER, []).insert(0, set_default_model_filename(FP32_ENCODER_FILE))
    models = list(json.loads((source / store.MANIFEST_FILE).read_text())["models"])
    unknown = set(edits) - set(models)
    if unknown:
        raise BenchmarkError(f"variant {variant.name} edits unknown models {sorted(unknown)}")
    rewritten: set[Path] = set()  # version directories whose files differ from the source's
    for model in models:
        model_dir = destination / model
        model_dir.mkdir()
        config = (source / model / "config.pbtxt").read_text()
        for edit in edits.get(model, []):
            config = edit(config)
        (model_dir / "config.pbtxt").write_text(config)
        # A parameter the variant sets wins over the value the build fitted for each version.
        overridden = {getattr(e, "parameter", None) for e in edits.get(model, [])} - {None}
        for version in store.version_dirs(source, model):
            (model_dir / version.name).mkdir()
            for item in version.iterdir():
                if item.name == "__pycache__":
                    continue
                if item.name == store.FITTED_FILE and overridden:
                    fitted = store.fitted_parameters(version)
                    kept = {k: v for k, v in fitted.items() if k not in overridden}
                    (model_dir / version.name / item.name).write_text(json.dumps(kept) + "\n")
                    rewritten.add(model_dir / version.name)
                    continue
                relative = f"{model}/{version.name}/{item.name}"
                if relative in replace:
                    rewritten.add(model_dir / version.name)
                _link_or_copy(replace.pop(relative, item), model_dir / version.name / item.name)
    for relative, item in replace.items():  # files the source does not have: added
        target = destination / relative
        if not target.parent.is_dir():
            raise BenchmarkError(f"variant {variant.name}: no directory for {relative}")
        _link_or_copy(item, target)
        rewritten.add(destination.joinpath(*Path(relative).parts[:2]))
    # A server checks the version it serves against its manifest: the variant's own files.
    for version_dir in sorted(rewritten):
        record_rewritten_files(version_dir)
    (destination / "variant.json").write_text(
        json.dumps({"name": variant.name, "description": variant.description}, indent=2) + "\n"
    )
    log.info("variant %s: %s -> %s", variant.name, variant.description, destination)
    return destination

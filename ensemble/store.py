"""Where each step's artefacts live in a model repository, and how to load them."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import overload

import numpy as np

SEARCH = "search"  # the served endpoint: the whole step graph in one Python model (one IPC hop)
ENSEMBLE = "search_steps"  # the same graph as a Triton ensemble of the five step models
TOKENIZE = "tokenize"
ENCODER = "encoder"
RETRIEVE = "retrieve"
RANKER = "ranker"
POSTPROCESS = "postprocess"
CATALOGUE = "catalogue"  # live catalogue updates (upsert, delete) into the catalogue log
STEPS = (TOKENIZE, ENCODER, RETRIEVE, RANKER, POSTPROCESS)
MODELS = (SEARCH, ENSEMBLE, *STEPS, CATALOGUE)
RECOMMEND = "recommend"  # a shopper's recommendations (stores built with --events)
REC_RANKER = "rec_ranker"  # the recommendation ranker (ONNX), also read in-process by the above
EVENTS = "events"  # live events into the profile store
FORGET = "forget"  # erase a shopper
PERSONAL_MODELS = (RECOMMEND, REC_RANKER, EVENTS, FORGET)

TOKENIZER_FILE = "tokenizer.json"
ONNX_FILE = "model.onnx"
DENSE_INDEX_FILE = "dense.faiss"
LEXICAL_INDEX_DIR = "lexical"
CATALOGUE_FILE = "catalogue.json"
ATTRIBUTES_FILE = "attributes.npz"  # retrieve/N: the catalogue's filterable attributes
WEIGHTS_SUFFIX = ".data"  # an ONNX graph's weights kept beside it: model.onnx -> model.onnx.data
MANIFEST_FILE = "manifest.json"
MANIFESTS_DIR = "manifests"  # every version's own manifest: manifests/v<N>.json
FITTED_FILE = "fitted.json"  # in a version directory: the values the build fitted for it
# Where the build writes and the server reads by default (git-ignored): never the shipped templates.
DEFAULT_REPOSITORY = Path("stores/homedepot")

_DEFAULT_MODEL_FILENAME = re.compile(r'default_model_filename:\s*"([^"]+)"')
_PARAMETER = re.compile(
    r'parameters\s*\{\s*key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"\s*\}\s*\}'
)


def version_dirs(repository: Path, model: str) -> list[Path]:
    model_dir = Path(repository) / model
    return (
        sorted(
            (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
            key=lambda p: int(p.name),
        )
        if model_dir.is_dir()
        else []
    )


def latest_version_dir(repository: Path, model: str) -> Path:
    """The newest numbered version directory of ``model`` (Triton's default version policy)."""
    versions = version_dirs(repository, model)
    if not versions:
        raise FileNotFoundError(f"no numbered version directory under {Path(repository) / model}")
    return versions[-1]


def version_dir(repository: Path, model: str, version: int | None = None) -> Path:
    """Version ``version`` of ``model`` (the newest when None): the models of one store version
    load each other's artefacts from the same version, so a rollout or rollback never mixes them."""
    if version is None:
        return latest_version_dir(repository, model)
    directory = Path(repository) / model / str(version)
    if not directory.is_dir():
        raise FileNotFoundError(f"no version {version} of {model} in {repository}")
    return directory


def fitted_parameters(version_directory: Path) -> dict[str, str]:
    """The values the build fitted for one version of a model (efSearch, the personal weight):
    they live with that version's files, so a rollback serves exactly what the version served."""
    path = Path(version_directory) / FITTED_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def write_fitted_parameters(version_directory: Path, fitted: dict[str, str]) -> None:
    """Replace one version's fitted values. The file is written beside and renamed over (a new
    inode), so a store copied with hard links keeps its own."""
    path = Path(version_directory) / FITTED_FILE
    staged = path.with_suffix(".tmp")
    staged.write_text(json.dumps(fitted, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(staged, path)


def config_parameters(repository: Path, model: str, version: int | None = None) -> dict[str, str]:
    """The string ``parameters`` of a model's config.pbtxt with the values fitted for version
    ``version`` (the newest when None) over them, as the Triton adapters see them."""
    parameters = dict(_PARAMETER.findall(_config_text(repository, model)))
    if version is not None or version_dirs(repository, model):
        parameters.update(fitted_parameters(version_dir(repository, model, version)))
    return parameters


def with_parameter(config: str, key: str, value: str) -> str:
    """``config`` (config.pbtxt text) with string parameter ``key`` set to ``value``."""
    line = f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
    pattern = re.compile(
        r'parameters\s*\{\s*key:\s*"' + re.escape(key) + r'"\s*value:\s*\{[^}]*\}\s*\}'
    )
    if pattern.search(config):
        return pattern.sub(line, config)
    return config.rstrip("\n") + "\n" + line + "\n"


_VERSION_POLICY = re.compile(r"version_policy\s*:?\s*\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}")


def version_manifest(repository: Path, version: int) -> Path:
    """Version ``version``'s manifest (``manifest.json`` is the newest build's)."""
    return Path(repository) / MANIFESTS_DIR / f"v{version}.json"


class StoreIntegrityError(RuntimeError):
    """A version's files are not the ones its build wrote (missing, or another SHA-256)."""


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in blocks (an encoder's weights are 90 MB)."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def verify_version(repository: Path, version: int) -> dict:
    """Version ``version``'s manifest, once every file of its version directories matches the
    SHA-256 the build recorded. Configs are shared by every version in Triton's layout, and a
    later build or a rollout rewrites them, so they are not checked."""
    path = version_manifest(repository, version)
    if not path.is_file():
        raise StoreIntegrityError(f"{repository} has no manifest for version {version} ({path})")
    manifest = json.loads(path.read_text())
    for relative, expected in manifest["files"].items():
        if Path(relative).parts[1:2] != (str(version),):
            continue
        target = Path(repository) / relative
        if not target.is_file():
            raise StoreIntegrityError(f"version {version}: {relative} is missing")
        if file_digest(target) != expected:
            raise StoreIntegrityError(f"version {version}: {relative} fails its manifest checksum")
    return manifest


USER_KEY_FINGERPRINT = "user_key_fingerprint"  # in a build's manifest, under "personalization"


def built_user_key(repository: Path, version: int) -> str | None:
    """The fingerprint of the secret version ``version`` hashed its shoppers with (None: a build
    from before fingerprints were recorded)."""
    manifest = json.loads(version_manifest(Path(repository), version).read_text())
    return manifest.get("personalization", {}).get(USER_KEY_FINGERPRINT)


def served_version(repository: Path) -> int:
    """The version a server started on ``repository`` serves: the one a rollout pinned in the
    search config (see ``with_version_policy``), else the newest."""
    policy = version_policy(_config_text(Path(repository), SEARCH))
    pinned = policy and re.search(r"specific\s*:?\s*\{\s*versions\s*:\s*\[?\s*(\d+)", policy)
    return int(pinned[1]) if pinned else int(latest_version_dir(repository, SEARCH).name)


def version_policy(config: str) -> str | None:
    """The ``version_policy`` a config.pbtxt text states (None: Triton's default, the newest)."""
    found = _VERSION_POLICY.search(config)
    return found[0] if found else None


def with_version_policy(config: str, *versions: int) -> str:
    """``config`` (config.pbtxt text) serving only ``versions`` (side by side when more than one)."""
    listed = ", ".join(str(v) for v in sorted(set(versions)))
    line = f"version_policy: {{ specific: {{ versions: [ {listed} ] }} }}"
    if _VERSION_POLICY.search(config):
        return _VERSION_POLICY.sub(line, config, count=1)
    return config.rstrip("\n") + "\n" + line + "\n"


_STEP_VERSION = re.compile(r"(model_version\s*:\s*)-?\d+")


def with_step_versions(config: str, version: int) -> str:
    """An ensemble's ``config`` with every step pinned to ``version`` of its model (the build
    writes -1, the newest loaded: mid-rollout, that could be a different version for each step)."""
    return _STEP_VERSION.sub(rf"\g<1>{version}", config)


def with_model_filename(config: str, filename: str, note: str = "") -> str:
    """``config`` serving ``filename`` (its ``default_model_filename``), ``note`` as the line's
    comment."""
    line = f'default_model_filename: "{filename}"' + (f"  # {note}" if note else "")
    text, count = re.subn(r'default_model_filename:\s*"[^"]*"[^\n]*', lambda _: line, config)
    if count != 1:
        raise ValueError(f"the config names {count} default_model_filename, not 1")
    return text


def model_file(repository: Path, model: str, version: int | None = None) -> Path:
    """The ONNX file Triton serves for ``model``: its ``default_model_filename`` (else model.onnx)
    in version ``version`` (the newest when None)."""
    found = _DEFAULT_MODEL_FILENAME.search(_config_text(repository, model))
    return version_dir(repository, model, version) / (found.group(1) if found else ONNX_FILE)


def in_process_model_file(repository: Path, model: str, version: int | None = None) -> Path:
    """The ONNX file the in-process pipeline (and so the one-model "search" endpoint) loads for
    ``model``: the config's ``in_process_model_filename`` parameter where a GPU config names one
    (its engine's input runs on TensorRT, not in ONNX Runtime on CPU), else :func:`model_file`."""
    name = config_parameters(repository, model).get("in_process_model_filename")
    if name:
        return version_dir(repository, model, version) / name
    return model_file(repository, model, version)


def weights_file(model_path: Path) -> Path:
    """Where an ONNX graph's external weights are kept (they need not exist)."""
    return model_path.with_name(model_path.name + WEIGHTS_SUFFIX)


def model_digest(model_path: Path) -> str:
    """SHA-256 over an ONNX graph's file and its external weights where it has them: two graphs
    of one shape with other weights must not share a digest."""
    digest = hashlib.sha256()
    for path in (model_path, weights_file(model_path)):
        if path.exists():
            with path.open("rb") as handle:
                for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _config_text(repository: Path, model: str) -> str:
    return (Path(repository) / model / "config.pbtxt").read_text(encoding="utf-8")


def adapter_parameters(model_config: dict, version_directory: Path) -> dict[str, str]:
    """The same parameters from the JSON model config that Triton hands a Python model, with the
    values fitted for the version it loads."""
    parameters = model_config.get("parameters", {})
    return {key: value["string_value"] for key, value in parameters.items()} | fitted_parameters(
        version_directory
    )


class StoreFormatError(ValueError):
    """A store whose files this version cannot serve."""


# What a store built before the served artefacts were memory-mapped needs.
REBUILD = (
    "built by an earlier shopserve, in a format this one cannot serve (its catalogue and lexical "
    "index are now memory-mapped arrays): build the store again"
)


class Titles(Sequence[str]):
    """Titles by catalogue row, kept as one UTF-8 buffer and row offsets; a title is decoded when
    asked for. Loaded, both arrays are memory-mapped: every process shares one copy."""

    def __init__(self, text: np.ndarray, offsets: np.ndarray) -> None:
        self.text = text  # uint8: every title's UTF-8 bytes, in row order
        self.offsets = offsets  # int64 [rows + 1]

    @classmethod
    def of(cls, titles: Sequence[str]) -> Titles:
        if isinstance(titles, Titles):
            return titles
        encoded = [t.encode("utf-8") for t in titles]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, row: int) -> str: ...
    @overload
    def __getitem__(self, row: slice) -> list[str]: ...
    def __getitem__(self, row: int | slice) -> str | list[str]:
        if isinstance(row, slice):
            return [self[r] for r in range(*row.indices(len(self)))]
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"title row {row} out of range ({len(self)} rows)")
        start, end = self.offsets[row], self.offsets[row + 1]
        return self.text[start:end].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        text = self.text.tobytes()
        offsets = self.offsets.tolist()
        for start, end in pairwise(offsets):
            yield text[start:end].decode("utf-8")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)


def mapped(path: Path | str) -> np.ndarray:
    """A saved array, memory-mapped read-only (its pages shared by every process that maps it), as a
    plain ndarray view: indexing an np.memmap costs several times more."""
    return np.asarray(np.load(path, mmap_mode="r"))


@dataclass(frozen=True)
class Vocabulary:
    """Term -> id: the terms sorted, as one UTF-8 buffer and offsets (as Titles keeps them), beside
    their ids, found by binary search over the bytes (UTF-8 sorts as the code points do). Loaded,
    the arrays are memory-mapped: a dict of tens of thousands of terms would cost every serving
    process megabytes of its own."""

    text: np.ndarray  # uint8: the sorted terms' UTF-8 bytes
    offsets: np.ndarray  # int64 [terms + 1]
    ids: np.ndarray  # int64: the id of each term

    @classmethod
    def of(cls, ids_by_term: Mapping[str, int]) -> Vocabulary:
        ordered = sorted(ids_by_term)
        terms = Titles.of(ordered)
        ids = np.array([ids_by_term[t] for t in ordered], np.int64)
        return cls(terms.text, terms.offsets, ids)

    def save(self, prefix: Path) -> None:
        for part in ("text", "offsets", "ids"):
            np.save(f"{prefix}.{part}.npy", getattr(self, part))

    @classmethod
    def load(cls, prefix: Path) -> Vocabulary:
        return cls(*(mapped(f"{prefix}.{part}.npy") for part in ("text", "offsets", "ids")))

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, term: str) -> int | None:
        key = term.encode("utf-8")
        text, offsets = self.text, self.offsets
        low, high = 0, len(self.ids)
        while low < high:
            middle = (low + high) // 2
            probe = text[offsets.item(middle) : offsets.item(middle + 1)].tobytes()
            if probe < key:
                low = middle + 1
            elif probe > key:
                high = middle
            else:
                return self.ids.item(middle)
        return None

    def known_ids(self, terms: Iterable[str]) -> list[int]:
        """The ids of the known ``terms``, in their order (unknown ones left out)."""
        return [i for i in map(self.get, terms) if i is not None]


@dataclass(frozen=True)
class Catalogue:
    """The products a build serves, by catalogue row. Saved as ``catalogue.json`` (the row count
    and ``log_through``) beside plain arrays of the ids and titles, which load memory-mapped."""

    product_ids: np.ndarray  # int64 [n], by catalogue row
    titles: Sequence[str]
    # The catalogue log's updates logged up to this time (Unix seconds) are in this catalogue (the
    # build folded them): serving replays only the later ones.
    log_through: float = 0.0
    # Product id -> row: saved with the catalogue and memory-mapped when loaded (else computed).
    row_index: ProductRows | None = None

    def save(self, path: Path) -> None:
        titles = Titles.of(self.titles)
        rows = self.product_rows()
        for key, array in (
            ("ids", np.asarray(self.product_ids, np.int64)),
            ("text", titles.text),
            ("offsets", titles.offsets),
            ("sorted_ids", rows.sorted_ids),
            ("id_rows", rows.order),
        ):
            np.save(path.with_name(_CATALOGUE_ARRAYS[key]), array)
        data: dict = {"products": len(self.product_ids)}
        if self.log_through:
            data["log_through"] = self.log_through
        path.write_text(json.dumps(data))

    @classmethod
    def load(cls, path: Path) -> Catalogue:
        path = Path(path)
        data = json.loads(path.read_text())
        missing = [n for n in _CATALOGUE_ARRAYS.values() if not path.with_name(n).exists()]
        if "products" not in data or missing:  # a format from before the arrays could be mapped
            raise StoreFormatError(f"{path.parent}: {REBUILD}")
        arrays = {key: mapped(path.with_name(name)) for key, name in _CATALOGUE_ARRAYS.items()}
        catalogue = cls(
            arrays["ids"],
            Titles(arrays["text"], arrays["offsets"]),
            float(data.get("log_through", 0.0)),
            ProductRows(arrays["sorted_ids"], arrays["id_rows"]),
        )
        sizes = {len(catalogue), len(catalogue.titles), len(arrays["id_rows"]), data["products"]}
        if len(sizes) != 1:
            raise ValueError(f"{path.parent}: the catalogue's arrays disagree on its size")
        return catalogue

    def product_rows(self) -> ProductRows:
        """A product id -> row index of its own (rows added to it stay its own), over the saved
        arrays where the catalogue was loaded."""
        if self.row_index is None:
            return ProductRows.of(self.product_ids)
        return ProductRows(self.row_index.sorted_ids, self.row_index.order)

    def __len__(self) -> int:
        return len(self.product_ids)


class ProductRows:
    """Product id -> catalogue row by binary search over the ids sorted once: a dict of every
    product would cost each serving process about 100 bytes a product. A built catalogue saves the
    sorted ids and their rows, which load memory-mapped (shared by every process). Rows added while
    serving (the live catalogue's new products) are kept beside them."""

    def __init__(self, sorted_ids: np.ndarray, order: np.ndarray) -> None:
        self.sorted_ids = sorted_ids  # int64: the catalogue's ids, ascending
        self.order = order  # int64: the row of each
        self._added: dict[int, int] = {}

    @classmethod
    def of(cls, product_ids: np.ndarray) -> ProductRows:
        ids = np.asarray(product_ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        return cls(ids[order], order)

    def rows(self, product_ids: np.ndarray) -> np.ndarray:
        """Rows of ``product_ids``; -1 for an id without one."""
        product_ids = np.asarray(product_ids, dtype=np.int64).reshape(-1)
        if len(self.sorted_ids):
            at = np.minimum(np.searchsorted(self.sorted_ids, product_ids), len(self.sorted_ids) - 1)
            found = np.where(self.sorted_ids[at] == product_ids, self.order[at], -1)
        else:
            found = np.full(len(product_ids), -1)
        if self._added:
            added = [self._added.get(pid, -1) for pid in product_ids.tolist()]
            found = np.where(found >= 0, found, added)
        return found.astype(np.int64)

    def get(self, product_id: int, default: int | None = None) -> int | None:
        row = int(self.rows(np.array([product_id]))[0])
        return default if row < 0 else row

    def __getitem__(self, product_id: int) -> int:
        row = self.get(product_id)
        if row is None:
            raise KeyError(product_id)
        return row

    def __contains__(self, product_id: object) -> bool:
        return isinstance(product_id, (int, np.integer)) and self.get(int(product_id)) is not None

    def add(self, product_id: int, row: int) -> None:
        """A product given a row after these rows were indexed."""
        if product_id in self:
            raise ValueError(f"product {product_id} has a row already")
        self._added[product_id] = row


# Beside catalogue.json: its arrays (titles: UTF-8 bytes and row offsets into them).
_CATALOGUE_ARRAYS = {
    "ids": "catalogue_ids.npy",
    "text": "catalogue_titles.npy",
    "offsets": "catalogue_title_offsets.npy",
    "sorted_ids": "catalogue_sorted_ids.npy",  # the ids ascending, and each one's row (ProductRows)
    "id_rows": "catalogue_id_rows.npy",
}


def load_catalogue(repository: Path, version: int | None = None) -> Catalogue:
    """The catalogue a built store serves (ids and titles by catalogue row)."""
    return Catalogue.load(version_dir(repository, POSTPROCESS, version) / CATALOGUE_FILE)

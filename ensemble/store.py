"""Where each step's artefacts live in a model repository, and how to load them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

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
MANIFEST_FILE = "manifest.json"
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


def with_version_policy(config: str, version: int) -> str:
    """``config`` (config.pbtxt text) serving only version ``version``."""
    line = f"version_policy: {{ specific: {{ versions: [ {version} ] }} }}"
    if _VERSION_POLICY.search(config):
        return _VERSION_POLICY.sub(line, config, count=1)
    return config.rstrip("\n") + "\n" + line + "\n"


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


def _config_text(repository: Path, model: str) -> str:
    return (Path(repository) / model / "config.pbtxt").read_text(encoding="utf-8")


def adapter_parameters(model_config: dict, version_directory: Path) -> dict[str, str]:
    """The same parameters from the JSON model config that Triton hands a Python model, with the
    values fitted for the version it loads."""
    parameters = model_config.get("parameters", {})
    return {key: value["string_value"] for key, value in parameters.items()} | fitted_parameters(
        version_directory
    )


@dataclass(frozen=True)
class Catalogue:
    product_ids: np.ndarray  # int64 [n], by catalogue row
    titles: list[str]
    # The catalogue log's updates logged up to this time (Unix seconds) are in this catalogue (the
    # build folded them): serving replays only the later ones.
    log_through: float = 0.0

    def save(self, path: Path) -> None:
        data = {"product_ids": self.product_ids.tolist(), "titles": self.titles}
        if self.log_through:
            data["log_through"] = self.log_through
        path.write_text(json.dumps(data))

    @classmethod
    def load(cls, path: Path) -> Catalogue:
        data = json.loads(Path(path).read_text())
        return cls(
            np.asarray(data["product_ids"], dtype=np.int64),
            data["titles"],
            float(data.get("log_through", 0.0)),
        )

    def __len__(self) -> int:
        return len(self.product_ids)


def load_catalogue(repository: Path, version: int | None = None) -> Catalogue:
    """The catalogue a built store serves (ids and titles by catalogue row)."""
    return Catalogue.load(version_dir(repository, POSTPROCESS, version) / CATALOGUE_FILE)

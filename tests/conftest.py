"""Shared fixtures: a fully built model repository and a real tritonserver serving it.

The repository is built once per session from the real Home Depot data (``DATA_DIR``, default
``../shared/data``) into a temporary copy of ``model_repository/``. Set ``SHOPSERVE_REPOSITORY`` to a
repository you already built to skip that step while iterating.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# The in-process reference runs numpy with the thread settings the server gives its model processes
# (shopserve.server), so both sum floats in the same order. Set before numpy is first imported.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import pytest  # noqa: E402
from shopserve.export.data import DEFAULT_DATA_DIR  # noqa: E402

from benchmarks.local_redis import running_redis  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]


def export(*arguments: object, cwd: Path | None = None):
    """``python -m shopserve.export ARGUMENTS`` in a subprocess, its output captured."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "shopserve.export", *map(str, arguments)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True)


SOURCE_REPOSITORY = PROJECT / "model_repository"


def documented_commands(doc: str, name: str) -> list[list[str]]:
    """The command lines of ``docs/DOC``'s runnable block ``NAME`` (``<!-- runnable: NAME -->``
    right before its fence), split as a shell would; comment lines are left out."""
    text = (PROJECT / "docs" / doc).read_text(encoding="utf-8")
    block = re.search(rf"<!-- runnable: {name} -->\n```bash\n(.*?)```", text, re.S)
    assert block, f"docs/{doc} lost its runnable block {name}"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    return [shlex.split(line) for line in lines if not line.lstrip().startswith("#")]


def copy_source_repository(destination: Path) -> Path:
    """The project's model repository as source: configs and adapters, no built artefacts."""
    shutil.copytree(
        SOURCE_REPOSITORY,
        destination,
        ignore=lambda _dir, names: [
            n
            for n in names
            if n.endswith((".onnx", ".faiss", ".json")) or n in ("lexical", "__pycache__")
        ],
    )
    return destination


@pytest.fixture(scope="module")
def module_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """Folders for one module's fixtures (stores, servers' work), removed when its tests are done.

    A whole run kept 8.8 GB of stores until it ended, and CI's disk is shared: only the session's
    stores live that long. A test's own ``tmp_path`` goes when it passes (pyproject's
    ``tmp_path_retention_policy``)."""
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DEFAULT_DATA_DIR / "products.csv").exists():
        pytest.fail(f"the Home Depot data is not at {DEFAULT_DATA_DIR}; set DATA_DIR")
    return DEFAULT_DATA_DIR


# The session store's fine-tuning stops here, not at the build's default 10 minutes, to keep CI
# within its hour. Measured on a machine at 2.9 s a step: dev re-ranking nDCG@10 0.9346 before,
# 0.9358 after 77 steps (240 s) as after 202 (600 s); the encoder's own nDCG@10 0.344 against
# 0.355, the served 0.434 against 0.438.
FINETUNE_BUDGET_S = 240.0


@pytest.fixture(scope="session")
def built_repository(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    existing = os.environ.get("SHOPSERVE_REPOSITORY")
    if existing:
        return Path(existing)
    from shopserve.export.build import BuildOptions, build
    from shopserve.export.finetune import FinetuneOptions

    repository = copy_source_repository(tmp_path_factory.mktemp("store") / "model_repository")
    build(
        BuildOptions(
            catalogue=data_dir / "products.csv",
            judgments=data_dir / "judgments.csv",
            repository=repository,
            finetune_options=FinetuneOptions(time_budget_s=FINETUNE_BUDGET_S),
        )
    )
    return repository


@pytest.fixture(scope="session")
def manifest(built_repository: Path) -> dict:
    import json

    return json.loads((built_repository / "manifest.json").read_text())


@pytest.fixture(scope="session")
def pipeline(built_repository: Path):
    from shopserve.ensemble import SearchPipeline

    return SearchPipeline.from_repository(built_repository)


@pytest.fixture(scope="session")
def server(built_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    from shopserve.server import ServerConfig, TritonServer, free_ports

    work = tmp_path_factory.mktemp("triton")
    grpc_port, http_port, metrics_port = free_ports(3)
    config = ServerConfig(
        built_repository,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        work_dir=work,
    )
    with TritonServer(config, log_file=work / "server.log") as running:
        yield running


INSTACART_EXTRA_PRODUCTS = 3000  # beside every purchased product: a catalogue of about 17,000


@pytest.fixture(scope="session")
def user_key_file(tmp_path_factory: pytest.TempPathFactory):
    """A throwaway user-id secret, made at run time and set for the session's processes (the one in
    $SHOPSERVE_USER_KEY_FILE when a prebuilt SHOPSERVE_PERSONAL_REPOSITORY is used)."""
    from shopserve.ensemble.profiles import USER_KEY_FILE_ENV, new_secret

    if os.environ.get("SHOPSERVE_PERSONAL_REPOSITORY"):
        yield Path(os.environ[USER_KEY_FILE_ENV])
        return
    path = tmp_path_factory.mktemp("secrets") / "user.key"
    path.write_bytes(new_secret())
    previous = os.environ.get(USER_KEY_FILE_ENV)
    os.environ[USER_KEY_FILE_ENV] = str(path)
    yield path
    if previous is None:
        os.environ.pop(USER_KEY_FILE_ENV, None)
    else:
        os.environ[USER_KEY_FILE_ENV] = previous


@pytest.fixture(scope="session")
def instacart_files(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, Path]:
    """Instacart through the generic formats: every event, and a catalogue of the purchased
    products plus INSTACART_EXTRA_PRODUCTS others."""
    from shopserve.export.instacart import write_generic

    folder = tmp_path_factory.mktemp("instacart")
    return write_generic(
        data_dir.parent / "instacart", folder, extra_products=INSTACART_EXTRA_PRODUCTS
    )


@pytest.fixture(scope="session")
def personal_repository(
    tmp_path_factory: pytest.TempPathFactory, built_repository: Path, instacart_files, user_key_file
) -> Path:
    """A store built from the generic catalogue and events files alone (no judgments), with the
    Home Depot store's ranker transferred, into a new folder."""
    existing = os.environ.get("SHOPSERVE_PERSONAL_REPOSITORY")
    if existing:  # a store built beforehand (its secret in $SHOPSERVE_USER_KEY_FILE)
        return Path(existing)
    items, events = instacart_files
    return build_personal(
        tmp_path_factory.mktemp("personal") / "store", items, events, built_repository
    )


def build_personal(
    repository: Path,
    items: Path,
    events: Path,
    built_repository: Path,
    rec_ranker: Path | None = None,
) -> Path:
    """Build a personal store from generic files, with the Home Depot store's ranker (and
    ``rec_ranker`` as its recommendation ranker, when given, instead of training one)."""
    from shopserve.ensemble import store
    from shopserve.export.build import BuildOptions, build

    build(
        BuildOptions(
            catalogue=items,
            judgments=None,
            repository=repository,
            ranker=store.model_file(built_repository, store.RANKER),
            events=events,
            rec_ranker=rec_ranker,
        )
    )
    return repository


@pytest.fixture(scope="session")
def newer_personal_repository(
    tmp_path_factory: pytest.TempPathFactory,
    built_repository: Path,
    personal_repository: Path,
    instacart_files,
    user_key_file,
) -> Path:
    """The personal store built again, into a new folder, from a newer events file: every event
    of the first build's file plus one later basket of another shopper (a new snapshot and
    watermark). Its recommendation ranker is the first build's, passed as ``--rec-ranker``
    (gated again), which saves the ranker's training."""
    import csv
    from datetime import datetime, timedelta

    from shopserve.ensemble import store

    items, events = instacart_files
    folder = tmp_path_factory.mktemp("personal-newer")
    with events.open() as handle:
        rows = list(csv.DictReader(handle))
    latest = max(datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")) for r in rows)
    later = (latest + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    products = list(dict.fromkeys(r["product_id"] for r in rows))[:3]
    rows += [
        {"user_id": "2", "product_id": p, "timestamp": later, "event": "purchase",
         "basket_id": "a-newer-basket"}
        for p in products
    ]  # fmt: skip
    newer = folder / "events.csv"
    with newer.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return build_personal(
        folder / "store",
        items,
        newer,
        built_repository,
        rec_ranker=store.model_file(personal_repository, store.REC_RANKER),
    )


@pytest.fixture(scope="session")
def personal_server(personal_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    """The personalised store served, its live profiles as built (tests here send no events)."""
    with start_server(personal_repository, tmp_path_factory.mktemp("triton-personal")) as running:
        yield running


SCORE_NOISE = 1e-6


def assert_same_ranking(ids, scores, reference_ids, reference_scores, context: object = "") -> None:
    """The same top-k up to float noise. Scores agree within SCORE_NOISE position by position; ids
    agree exactly, except that products whose scores are within SCORE_NOISE of each other may trade
    places (a query embedded inside a batch differs from the same query alone by about 4e-8, which
    can reorder near-ties), and the last such run may hold another near-tie from below the cut."""
    import numpy as np

    np.testing.assert_allclose(
        scores, reference_scores, rtol=0, atol=SCORE_NOISE, err_msg=f"{context}"
    )
    assert len(ids) == len(reference_ids), context
    start = 0
    for end in range(1, len(reference_ids) + 1):
        if end == len(reference_ids):
            break  # the last run: a near-tie with the first product below the top-k may swap in
        if reference_scores[end - 1] - reference_scores[end] > SCORE_NOISE:
            assert set(ids[start:end]) == set(reference_ids[start:end]), (context, start, end)
            start = end


def assert_hits_match(hits, reference, context: object = "") -> None:
    """Served ``hits`` (client Hits) rank as the in-process ``reference`` (a SearchResult) does."""
    assert_same_ranking(
        [h.product_id for h in hits],
        [h.score for h in hits],
        reference.product_ids.tolist(),
        reference.scores,
        context,
    )


def raw_infer(url: str, model: str, inputs: list):
    """Send ``inputs`` as they are and return the error the server answers with."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    triton = grpcclient.InferenceServerClient(url)
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(model, inputs)
    return caught.value


def tensor(name: str, value, datatype: str):
    import tritonclient.grpc as grpcclient

    item = grpcclient.InferInput(name, list(value.shape), datatype)
    item.set_data_from_numpy(value)
    return item


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    with running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


ADMIN_KEY = "test-operator-key-0123456789"


def start_server(repository: Path, work: Path, profile_store: str | None = None, **settings):
    """A TritonServer serving ``repository`` on free ports, logging to ``work/server.log``, with
    the operator's key ADMIN_KEY unless ``settings`` say otherwise."""
    from shopserve.server import ServerConfig, TritonServer, free_ports

    grpc_port, http_port, metrics_port = free_ports(3)
    config = ServerConfig(
        repository,
        grpc_port,
        http_port,
        metrics_port,
        work_dir=work,
        profile_store=profile_store,
        **{"admin_key": ADMIN_KEY, **settings},
    )
    return TritonServer(config, log_file=work / "server.log")


def ensure_installed(command: str, package: str) -> str:
    """The path of ``command``, installing Debian's ``package`` first where it is missing and
    this is a Debian machine we may install on (root); else the test is skipped, saying why."""
    import shutil
    import subprocess

    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
        for steps in ([install], [["apt-get", "update", "-q"], install]):
            for step in steps:
                subprocess.run(step, env=env, capture_output=True, timeout=600, check=False)
            found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
            if found:
                break
    if found is None:
        pytest.skip(f"{command} is not installed and could not be: apt-get install {package}")
    return found


CUT_QUERIES = 300
CUT_PRODUCTS = 3000


def write_cut(data_dir: Path, workdir: Path) -> tuple[Path, Path]:
    """items.csv and judged.csv of a CUT_QUERIES-query, CUT_PRODUCTS-product Home Depot cut."""
    from shopserve.export.cut import cut_homedepot

    return cut_homedepot(data_dir, workdir, CUT_QUERIES, CUT_PRODUCTS)


@pytest.fixture(scope="session")
def dev_queries(data_dir, manifest) -> list[str]:
    from shopserve.export.data import load_catalogue, load_judgments, split_queries

    judgments = load_judgments(
        data_dir / "judgments.csv", load_catalogue(data_dir / "products.csv")
    )
    split = manifest["split"]
    return split_queries(judgments.queries, split["dev_fraction"], split["seed"])[1]


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def issue(subject: str, key, issuer: str, issuer_key, ca: bool, server: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(issuer_key, hashes.SHA256())

    files = {}

    def write(label: str, key, certificate) -> None:
        files[f"{label}_key"] = folder / f"{label}.key"
        files[f"{label}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        files[f"{label}_cert"] = folder / f"{label}.crt"
        files[f"{label}_cert"].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    write(
        "ca", ca_key, issue("shopserve test CA", ca_key, "shopserve test CA", ca_key, True, False)
    )
    for label, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        write(
            label, key, issue(f"shopserve {label}", key, "shopserve test CA", ca_key, False, server)
        )
    return files


@contextmanager
def tls_in_front_of(url: str, certificate, key):
    """A TLS listener that forwards each connection to the Redis at ``url`` (the bundled Redis is
    built without TLS); yields its port."""
    import contextlib
    import socket
    import ssl
    import threading

    import redis

    from shopserve.server import free_ports

    (port,) = free_ports(1)
    backend = redis.connection.parse_url(url)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    listener = socket.create_server(("127.0.0.1", port))

    def pump(source: socket.socket, target: socket.socket) -> None:
        with source, target, contextlib.suppress(OSError):  # either side may hang up
            while data := source.recv(65536):
                target.sendall(data)

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                client = context.wrap_socket(raw, server_side=True)
            except ssl.SSLError:
                raw.close()
                continue
            upstream = socket.create_connection((backend["host"], backend["port"]))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield port
    finally:
        listener.close()

"""The container and Kubernetes definitions under deploy/, checked as far as this machine allows:
Docker and Kubernetes cannot run here. The manifests validate against the Kubernetes API schemas
(kubernetes-validate, strict), the probes point at Triton's health endpoints on the port HTTP
listens on, and every container command parses with ``shopserve serve``'s own options."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import PROJECT

from shopserve.cli import serve_parser

DEPLOY = PROJECT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.30.0"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def every_document() -> list[dict]:
    return [d for path in MANIFESTS for d in documents(path)]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_manifests_validate_against_the_kubernetes_schema(path) -> None:
    for document in documents(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_manifests_declare_what_operators_need() -> None:
    kinds = {d["kind"] for d in every_document()}
    assert kinds >= {"Deployment", "Service", "Secret", "ConfigMap", "StatefulSet"}
    secret = next(d for d in every_document() if d["kind"] == "Secret")
    assert not secret.get("data") and not secret.get("stringData")  # no key material committed


def shopserve_container() -> dict:
    deployment = next(d for d in every_document() if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_the_probes_reach_tritons_health_endpoints_on_the_http_port() -> None:
    container = shopserve_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = serve_parser().parse_args(_substituted(container["args"])[2:])
    assert args.http_address == "0.0.0.0" and ports["http"] == args.http_port
    assert ports["grpc"] == args.grpc_port and ports["metrics"] == args.metrics_port
    for probe, path in (
        ("readinessProbe", "/v2/health/ready"),
        ("startupProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}


def _substituted(args: list[str]) -> list[str]:
    """The container's args with $(VAR) taken from the ConfigMap it loads."""
    config = next(d for d in every_document() if d["kind"] == "ConfigMap")["data"]
    return [re.sub(r"\$\((\w+)\)", lambda m: config[m.group(1)], a) for a in args]


def test_the_deployment_reads_keys_from_the_mounted_secret() -> None:
    container = shopserve_container()
    args = serve_parser().parse_args(_substituted(container["args"])[2:])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for key_file in (args.admin_key_file, args.inference_key_file, args.user_key_file):
        assert key_file.parent == Path(mounts["keys"])
    assert str(args.model_repository) == mounts["models"]
    assert args.profile_store.startswith("redis://shopserve-redis:")


def test_the_cpu_image_runs_shopserve_serve_with_valid_options() -> None:
    text = (DEPLOY / "Dockerfile.cpu").read_text()
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
    command = json.loads(cmd)
    assert command[:2] == ["shopserve", "serve"]
    args = serve_parser().parse_args(command[2:])
    assert args.http_address == "0.0.0.0" and args.work_dir is not None
    assert re.search(r'pip install --no-cache-dir "\$\(ls /tmp/shopserve-\*\.whl\)\[serve\]"', text)
    assert re.search(r"^FROM python:3\.11", text, re.M)  # the backend stub's Python


def test_the_gpu_image_is_nvidias_triton_with_the_native_server() -> None:
    text = (DEPLOY / "Dockerfile.gpu").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\S+-py3$", text, re.M)
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
    command = json.loads(cmd)
    assert command[0] == "tritonserver" and "--http-address=0.0.0.0" in command
    assert shlex.join(command)  # a plain argv, no shell

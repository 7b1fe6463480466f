"""The package as users install it: a wheel made by ``python -m build``, installed (not editable)
into fresh virtual environments.

* ``shopserve[client]`` from PyPI's packages: the client imports, without torch.
* The wheel alone (its dependencies borrowed from this environment through a ``.pth`` file, to keep
  the test within CI's time): it builds a small store from its own templates, serves it with its
  own launcher and backend shim, and answers a query.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import pytest
from conftest import PROJECT, write_cut
from shopserve.client import SearchClient

from shopserve.server import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.server]


def run(*command: object, cwd: Path | None = None, timeout: float = 900) -> str:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(module_folder) -> Path:
    out = module_folder("dist")
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, PROJECT)
    (found,) = out.glob("shopserve-*.whl")
    return found


def fresh_environment(folder: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    return folder / "bin" / "python"


def test_the_wheel_holds_the_templates_and_adapters(wheel) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("search", "retrieve", "recommend", "events", "forget"):
        assert f"shopserve/model_repository/{model}/config.pbtxt" in names
        assert f"shopserve/model_repository/{model}/1/model.py" in names
    assert "shopserve/ort_backend.py" in names


def test_the_client_extra_installs_and_imports_without_torch(wheel, tmp_path) -> None:
    python = fresh_environment(tmp_path / "client-env")
    run(python, "-m", "pip", "install", "-q", f"{wheel}[client]")
    script = (
        "import sys, shopserve.client as c; "
        "from shopserve.client._client import build_inputs; "
        "assert len(build_inputs('drill', 5)) == 2; "
        "assert 'torch' not in sys.modules; print(c.__file__)"
    )
    location = run(python, "-c", script, cwd=tmp_path).strip()  # not the checkout's shopserve/
    assert "site-packages" in location and str(PROJECT) not in location


def test_a_non_editable_install_builds_serves_and_answers(wheel, data_dir, tmp_path) -> None:
    python = fresh_environment(tmp_path / "env")
    run(python, "-m", "pip", "install", "-q", "--no-deps", wheel)
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).strip()
    )
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = run(
        python, "-c", "import shopserve.export.repository as r; print(r.TEMPLATES)", cwd=tmp_path
    )
    assert Path(where.strip()).is_relative_to(site)  # the wheel's templates, not the checkout's
    items, _ = write_cut(data_dir, tmp_path)
    run(
        python, "-m", "shopserve.export", "build", "--catalogue", items,
        "--repository", tmp_path / "shop", cwd=tmp_path,
    )  # fmt: skip
    grpc_port, http_port, metrics_port = free_ports(3)
    server = subprocess.Popen(
        [
            tmp_path / "env" / "bin" / "shopserve", "serve",
            "--model-repository", tmp_path / "shop",
            "--grpc-port", str(grpc_port), "--http-port", str(http_port),
            "--metrics-port", str(metrics_port), "--log-file", tmp_path / "server.log",
        ],
        stdout=(tmp_path / "launcher.out").open("w"),
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )  # fmt: skip
    try:
        with SearchClient(f"127.0.0.1:{grpc_port}") as probe:
            for _ in range(480):
                if probe.ready() or server.poll() is not None:
                    break
                time.sleep(0.5)
        # The launcher polls readiness too, every 0.25 s: give its line the time to follow.
        for _ in range(20):
            if "shopserve ready" in (tmp_path / "launcher.out").read_text():
                break
            time.sleep(0.25)
        assert "shopserve ready" in (tmp_path / "launcher.out").read_text()
        answer = run(
            tmp_path / "env" / "bin" / "shopserve", "search", "cordless drill", "-k", "3",
            "--url", f"127.0.0.1:{grpc_port}", "--json", cwd=tmp_path,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)
    assert len(answer.splitlines()) == 3 and "drill" in answer.lower()

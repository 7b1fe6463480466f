"""The client must import (and build requests) without torch or transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = {"torch", "transformers"}

    class BlockHeavyModules(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockHeavyModules())

    import shopserve.client
    from shopserve.client import AsyncSearchClient, Hit, SearchClient, SearchError
    from shopserve.client._cli import format_table
    from shopserve.client._client import build_inputs

    assert len(build_inputs("drill", 5)) == 2
    assert format_table([Hit(rank=1, product_id=1, score=0.5, title="drill")])
    assert issubclass(shopserve.client.InvalidRequestError, SearchError)
    assert callable(SearchClient) and callable(AsyncSearchClient)
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("ok")
    """
)


def test_client_imports_without_torch_or_transformers() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


SERVING = textwrap.dedent(
    """
    import sys

    import shopserve.ensemble.catalogue_log
    import shopserve.ensemble.personal
    import shopserve.ensemble.pipeline
    import shopserve.ensemble.recommend
    import shopserve.server

    heavy = {"scipy", "bm25s", "torch", "transformers", "pandas", "onnx"}
    loaded = sorted({m.partition(".")[0] for m in sys.modules} & heavy)
    assert not loaded, loaded
    print("ok")
    """
)


def test_serving_imports_none_of_the_builds_libraries() -> None:
    """Every model process imports the serving modules: SciPy and bm25s would cost each instance
    about 11 MiB of its own memory, and the build's libraries more."""
    proc = subprocess.run(
        [sys.executable, "-c", SERVING], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"

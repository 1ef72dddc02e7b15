"""mnist_client stays client-side: importing it loads no server internals.

The client library and CLIs live apart from `service/` so a caller can tell them from the
server by the tree, and so the server's dependencies and start-up work never ride along with a
client. The one shared piece is the generated protos, which live in `service/pb`: importing
`service.pb.mnist.v1` imports the package `service` itself, which is why `service/__init__.py`
must stay empty (checked here too). Each import runs in a fresh interpreter, since this test
process has long since imported the server.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imports every module of a package (found on disk, so a new module is covered without editing
# this test) and prints what got imported that was not there before, as JSON.
_PROBE = """
import json, pkgutil, sys, importlib
before = set(sys.modules)
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""

# Packages a client has no use for at import: if one of them is imported, some server (or
# trainer) module came along. (grpc_health and grpc_reflection are not here: `import grpc` itself
# imports their top-level packages.)
SERVER_ONLY = ("prometheus_client", "trainer")


def imported_by(package: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, package], cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    names: list[str] = json.loads(done.stdout)
    return names


def test_mnist_client_imports_only_the_generated_protos_from_service() -> None:
    names = imported_by("mnist_client")
    assert "mnist_client.cli" in names  # the probe worked
    assert "mnist_client.client" in names
    assert "service.pb.mnist.v1.classifier_pb2" in names
    server = [n for n in names if n.startswith("service.") and n.split(".")[1] != "pb"]
    assert server == [], f"mnist_client imports server modules: {server}"
    extra = [n for n in names if n.split(".")[0] in SERVER_ONLY]
    assert extra == [], f"mnist_client imports server-side dependencies: {extra}"


def test_mnist_imaging_is_a_leaf_shared_by_client_and_server() -> None:
    names = imported_by("mnist_imaging")
    assert "mnist_imaging.decode" in names  # the probe worked
    assert "mnist_imaging.pool" in names
    sides = [n for n in names if n.split(".")[0] in ("service", "mnist_client", "trainer", "grpc")]
    assert sides == [], f"mnist_imaging imports client or server code: {sides}"
    assert "mnist_imaging.decode" in imported_by("mnist_client")


def test_service_package_init_stays_bare_so_the_protos_bring_nothing_else() -> None:
    # `service` is imported on the way to `service.pb`: at most a docstring, no code.
    tree = ast.parse((ROOT / "service" / "__init__.py").read_text())
    code = [node for node in tree.body
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    assert code == [], "service/__init__.py runs code that every client import would run"

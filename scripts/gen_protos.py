"""Regenerate service/pb/ from proto/: the one command for generated code.

    python scripts/gen_protos.py          # regenerate
    python scripts/gen_protos.py --check  # exit 1 if the committed code is stale (CI)

protoc writes imports as `from mnist.v1 import x_pb2`; they are rewritten to
`from service.pb.mnist.v1 import x_pb2` so the code lives inside the `service` package.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "service" / "pb"
PACKAGE = "service.pb"


def generate(out: Path) -> None:
    from grpc_tools import protoc  # dev dependency: grpcio-tools

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    if not protos:
        return
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc", f"-I{PROTO_DIR}", f"-I{include}",
        f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    top_packages = {p.split("/")[0] for p in protos}
    pattern = re.compile(rf"^(from|import) ({'|'.join(map(re.escape, top_packages))})(\.|\s)", re.M)
    for path in out.rglob("*.py*"):
        text = pattern.sub(rf"\1 {PACKAGE}.\2\3", path.read_text())
        path.write_text(text)
    for directory in [out, *(d for d in out.rglob("*") if d.is_dir())]:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("")


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if service/pb/ is stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "pb"
        fresh.mkdir()
        generate(fresh)
        if check:
            old, new = tree(OUT_DIR) if OUT_DIR.exists() else {}, tree(fresh)
            if old != new:
                for name in sorted(set(old) | set(new)):
                    if old.get(name) != new.get(name):
                        sys.stdout.writelines(difflib.unified_diff(
                            old.get(name, "").splitlines(True), new.get(name, "").splitlines(True),
                            f"committed/{name}", f"regenerated/{name}", n=1,
                        ))
                print("service/pb/ is stale: run python scripts/gen_protos.py")
                return 1
            print("service/pb/ matches proto/")
            return 0
        shutil.rmtree(OUT_DIR, ignore_errors=True)
        shutil.copytree(fresh, OUT_DIR)
    print(f"generated {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

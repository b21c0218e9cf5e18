"""Generate (or check) the Python stubs of the project's own .proto files.

Data flow::

    protos/mcp_extproc/**/*.proto ──grpc_tools.protoc──▶ mcp_extproc/**/{*_pb2.py, *_pb2.pyi,
                                   (+ mypy-protobuf)          *_pb2_grpc.py, *_pb2_grpc.pyi}

The stubs are committed, so installing mcp-extproc needs no code generator.
``python protos/generate.py`` rewrites them after a change to a .proto;
``python protos/generate.py --check`` (run by the test suite) regenerates into a
temporary directory and fails, naming the files, when the committed stubs differ.
Both need the dev extras (grpcio-tools and mypy-protobuf, pinned so the output is
byte-for-byte reproducible).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    """Every .proto of the project, relative to ``protos/``."""
    return sorted(p.relative_to(PROTOS) for p in PROTOS.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc (with the mypy plugins) over every .proto into ``out``; the written files.

    Raises:
        SystemExit: protoc failed (its message is on stderr).
    """
    from grpc_tools import protoc  # a dev dependency: imported only here

    bin_dir = Path(sys.executable).parent
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"  # protoc-gen-mypy lives here
    include = str(Path(protoc.__file__).parent / "_proto")  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(PROTOS / p) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the message above")
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.name.endswith(SUFFIXES))


def check() -> list[str]:
    """Regenerate into a temporary directory; the committed files that are missing or differ."""
    with tempfile.TemporaryDirectory() as tmp:
        problems = []
        for rel in generate(Path(tmp)):
            committed = ROOT / rel
            if not committed.is_file():
                problems.append(f"{rel}: missing")
            elif not filecmp.cmp(committed, Path(tmp) / rel, shallow=False):
                problems.append(f"{rel}: differs from what protoc generates")
        return problems


def main() -> int:
    """Command line: generate, or ``--check``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    if parser.parse_args().check:
        problems = check()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("the generated stubs are stale: run `python protos/generate.py`", file=sys.stderr)
            return 1
        print("generated stubs match the .proto files")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for rel in generate(Path(tmp)):
            (ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / rel, ROOT / rel)
            print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

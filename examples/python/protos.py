"""agentmesh's protos for Python, compiled from `proto/` with grpcio-tools on first use.

Nothing generated is kept in the repository: `load()` runs `grpc_tools.protoc` over
`proto/agentmesh/v1/*.proto` into `generated/` next to this file (or into
`$AGENTMESH_PYTHON_GENERATED`), in a folder named after a hash of the protos and the
grpcio-tools version, so an edited proto or another grpcio-tools compiles again. The
folder is filled under a temporary name and renamed into place, so processes starting
side by side never see half of it.

    python protos.py   # compile now and print where the modules went
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType, SimpleNamespace

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO_FILES = ("envelope", "agent", "discovery", "queue", "fanout")


def output_root() -> Path:
    """Where compiled modules go: `$AGENTMESH_PYTHON_GENERATED` or `generated/` here."""
    configured = os.environ.get("AGENTMESH_PYTHON_GENERATED")
    return Path(configured) if configured else HERE / "generated"


def _fingerprint() -> str:
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    try:
        digest.update(version("grpcio-tools").encode())
    except PackageNotFoundError as missing:
        raise SystemExit(
            "grpcio-tools is not installed: python3 -m pip install -r requirements.txt"
        ) from missing
    for name in PROTO_FILES:
        digest.update(name.encode())
        digest.update((PROTO_ROOT / "agentmesh" / "v1" / f"{name}.proto").read_bytes())
    return digest.hexdigest()[:16]


def _compile(into: Path) -> None:
    from importlib.resources import files

    from grpc_tools import protoc

    # The well-known types (google/protobuf/*.proto) ship inside grpcio-tools.
    well_known = str(files("grpc_tools") / "_proto")
    sources = [str(PROTO_ROOT / "agentmesh" / "v1" / f"{name}.proto") for name in PROTO_FILES]
    arguments = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={into}",
        f"--pyi_out={into}",
        f"--grpc_python_out={into}",
        *sources,
    ]
    if protoc.main(arguments) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {PROTO_ROOT}")


def compiled() -> Path:
    """The folder holding the compiled modules, compiling them if needed."""
    root = output_root()
    target = root / _fingerprint()
    if (target / "agentmesh" / "v1" / "agent_pb2_grpc.py").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".compiling-", dir=root))
    try:
        _compile(scratch)
        try:
            scratch.rename(target)
        except OSError:
            # Another process got there first; its copy is as good as ours.
            if not target.exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def load() -> SimpleNamespace:
    """The compiled modules: `pb.agent`, `pb.agent_grpc`, `pb.envelope`, … (`_pb2` and
    `_pb2_grpc` of each proto)."""
    folder = str(compiled())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    modules: dict[str, ModuleType] = {}
    for name in PROTO_FILES:
        modules[name] = importlib.import_module(f"agentmesh.v1.{name}_pb2")
        modules[f"{name}_grpc"] = importlib.import_module(f"agentmesh.v1.{name}_pb2_grpc")
    return SimpleNamespace(**modules)


if __name__ == "__main__":
    print(compiled())

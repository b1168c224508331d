"""The build steps pyproject.toml cannot declare: the gRPC code and the C module.

1. keyquorum.v1 is generated from proto/keyquorum/v1/*.proto by grpc_tools'
   protoc (with mypy-protobuf's stubs) into build/gen/keyquorum/v1, before
   any setuptools command looks for packages (`egg_info` runs first in a
   wheel, an sdist and an editable install alike). Both tools are in
   [build-system] requires, pinned: the generated code checks at import
   that the installed grpcio and protobuf are at least the versions that
   generated it, which the runtime ranges in [project] guarantee. The code
   is regenerated when a .proto or this file is newer than it, and replaced
   whole (written to a fresh folder, then renamed), so a failed run leaves
   the previous code or none, never a mix.
2. The one compiled part, the data plane's wire codec (hsm/dataplane/_wire.c:
   BatchWrap's per-item loop, docs/adr/0001), links OpenSSL's libcrypto (the
   library CPython's ssl and hashlib modules already load) and needs its
   headers to build (Debian: libssl-dev), with warnings as errors. It is
   required: a build that cannot compile it fails. Serving without it is a
   choice: `KEYQUORUM_WITHOUT_NATIVE=1` at install leaves it out, and the
   same variable at start lets the daemon serve with the Python path only
   (`keyquorum.hsm.dataplane.plane.require_wire_codec`).

`make proto` runs step 1 alone (`python setup.py build_protos`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from setuptools import Command, Extension, setup
from setuptools.command.build_py import build_py
from setuptools.command.egg_info import egg_info

ROOT = Path(__file__).resolve().parent
PROTO_DIR = ROOT / "proto"
GENERATED = ROOT / "build" / "gen" / "keyquorum" / "v1"
#: A build without the C module is this variable, set to 1: a choice, never a fallback.
WITHOUT_NATIVE = os.environ.get("KEYQUORUM_WITHOUT_NATIVE") == "1"
#: Written last, so its presence means a complete generation.
MARKER = GENERATED / "__init__.py"


def _protos() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def _up_to_date() -> bool:
    if not MARKER.exists():
        return False
    built = MARKER.stat().st_mtime
    return all(p.stat().st_mtime <= built for p in [*_protos(), Path(__file__)])


def _plugin(directory: Path, name: str, function: str) -> Path:
    """A protoc plugin script calling mypy-protobuf with this interpreter (no PATH lookup)."""
    script = directory / name
    script.write_text(
        f"#!{sys.executable}\nimport sys\nfrom mypy_protobuf.main import {function}\n"
        f"sys.exit({function}())\n"
    )
    script.chmod(0o755)
    return script


def generate_protos(force: bool = False) -> None:
    """Generate keyquorum.v1 (messages, services, type stubs) unless it is current."""
    if not force and _up_to_date():
        return
    try:
        from grpc_tools import protoc
    except ImportError:
        sys.exit(
            "building keyquorum needs grpcio-tools (the generated gRPC code); it is listed "
            "in pyproject.toml's [build-system] requires, which pip installs unless "
            "--no-build-isolation is given"
        )
    try:
        import mypy_protobuf  # noqa: F401
    except ImportError:
        sys.exit("building keyquorum needs mypy-protobuf (the stubs of keyquorum.v1)")
    protos = _protos()
    if not protos:
        sys.exit(f"no .proto files under {PROTO_DIR}")
    include = Path(protoc.__file__).parent / "_proto"
    GENERATED.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=GENERATED.parent.parent) as scratch:
        work = Path(scratch)
        out = work / "out"
        out.mkdir()
        mypy = _plugin(work, "protoc-gen-mypy", "main")
        mypy_grpc = _plugin(work, "protoc-gen-mypy_grpc", "grpc")
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--plugin=protoc-gen-mypy={mypy}",
            f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *(str(p) for p in protos),
        ]
        if protoc.main(args) != 0:
            sys.exit("protoc failed on " + " ".join(str(p.relative_to(ROOT)) for p in protos))
        package = out / "keyquorum" / "v1"
        (package / "py.typed").touch()
        (package / "__init__.py").write_text(
            '"""Generated from proto/keyquorum/v1 at build time; never edited by hand."""\n'
        )
        stale = work / "stale"
        if GENERATED.exists():
            GENERATED.rename(stale)
        package.rename(GENERATED)
        shutil.rmtree(stale, ignore_errors=True)
    os.utime(MARKER)


class BuildProtos(Command):
    """`python setup.py build_protos [--force]`: generate keyquorum.v1."""

    description = "generate keyquorum.v1 from proto/ with grpc_tools"
    user_options = [("force", "f", "regenerate even if up to date")]  # noqa: RUF012
    boolean_options = ["force"]  # noqa: RUF012

    def initialize_options(self) -> None:
        self.force = 0

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate_protos(force=bool(self.force))


class EggInfoWithProtos(egg_info):
    def run(self) -> None:
        generate_protos()
        super().run()


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


setup(
    cmdclass={
        "build_protos": BuildProtos,
        "egg_info": EggInfoWithProtos,
        "build_py": BuildPyWithProtos,
    },
    ext_modules=[]
    if WITHOUT_NATIVE
    else [
        Extension(
            "keyquorum.hsm.dataplane._wire",
            sources=["hsm/dataplane/_wire.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-std=c11"],
        )
    ],
)

"""keyquorum.client stands alone: nothing from hsm/ or cli/, and only grpcio, protobuf
and cryptography at run time (the client installs without the daemon)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.source_imports import top_level_imports

CLIENT = Path(__file__).resolve().parent.parent / "client"
ALLOWED_THIRD_PARTY = {"grpc", "google", "cryptography"}
OURS = ("keyquorum.client", "keyquorum.quorum", "keyquorum.v1")
#: Installed here for the daemon, the CLI or the tests; the client must not need them.
NOT_FOR_THE_CLIENT = (
    "grpc_health", "grpc_reflection", "grpc_status", "click", "rich", "psycopg",
    "psycopg_pool", "prometheus_client", "rfc8785", "hypothesis",
    "keyquorum.hsm", "keyquorum.cli",
)  # fmt: skip


def _keyquorum_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keyquorum"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("keyquorum"))
    return names


@pytest.mark.parametrize("path", sorted(CLIENT.glob("*.py")), ids=lambda p: p.name)
def test_client_module_imports_only_what_a_backend_installs(path: Path) -> None:
    third_party = {
        name
        for name in top_level_imports(path)
        if name not in sys.stdlib_module_names and name not in ("keyquorum", "__future__")
    }
    assert third_party <= ALLOWED_THIRD_PARTY, f"{path.name}: {sorted(third_party)}"
    for module in _keyquorum_imports(path):
        assert module.startswith(OURS), f"{path.name} imports {module}"


def test_the_client_imports_and_works_without_daemon_packages() -> None:
    """In a fresh interpreter where every other dependency fails to import."""
    probe = f"""
import importlib.abc, sys
BLOCKED = {NOT_FOR_THE_CLIENT!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError("blocked for this test: " + name)
        return None
sys.meta_path.insert(0, Block())
import io
import keyquorum.client
from keyquorum.client import aio, framing
from keyquorum.quorum.secret import SecretBytes
key = SecretBytes(bytes(32))
box = framing.seal_bytes(key, b"wrapped", b"hello", salt=bytes(32), frame_size=4)
out = io.BytesIO()
header = framing.parse_header(box)
framing.open_frames(header, key, io.BytesIO(box[header.size:]), out)
assert out.getvalue() == b"hello"
loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
print(loaded)
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

"""Packaging as an operator and a backend meet it: a wheel, clean venvs, the lock.

1. `pip wheel .` on a copy of the checkout's files alone (no build/, no
   .venv, no generated code: what a fresh clone has), with pip's build
   isolation, so pyproject.toml's [build-system] requires is what generates
   keyquorum.v1 and builds the C module.
2. That wheel with the `server` extra in a clean venv (`-c
   requirements.lock`): `keyquorum --help` and `server run --help` run, the
   generated code imports, the C module is built.
3. The wheel alone (the base install) in another clean venv: nothing but
   grpcio, protobuf, cryptography and their own dependencies is installed,
   `keyquorum` says which extra it needs, and keyquorum.client wraps and
   unwraps against a real daemon over mTLS.
4. requirements.lock pins every dependency pyproject.toml declares, within
   its declared range.

Slow (a build and two venvs, about a minute with pip's cache warm); it runs
in `make test` like every other test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from keyquorum.hsm.pki import DevPki
from tests.custodian_steps import K, ceremony, unseal
from tests.harness import FakeClock, in_process_daemon, make_custodians
from tests.key_plane import KeyPlane, key_plane, make_pki, ready_tenant

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: What the base install may bring: the three, and what they need themselves.
BASE_ALLOWED = {
    "keyquorum", "grpcio", "protobuf", "cryptography", "cffi", "pycparser",
    "typing-extensions", "pip", "setuptools", "wheel",
}  # fmt: skip
pytestmark = pytest.mark.slow


def sh(*argv: str | Path, cwd: Path | None = None, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYQUORUM_", "PYTHON"))}
    result = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def fresh_copy(directory: Path) -> Path:
    """The checkout's files as a clone has them (tracked, or new and not ignored)."""
    listed = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    for name in listed.split("\0"):
        source = ROOT / name
        if name and source.is_file():
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    assert not (directory / "build").exists()
    return directory


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files a clone has")
    source = fresh_copy(tmp_path_factory.mktemp("clone"))
    out = tmp_path_factory.mktemp("dist")
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, ".", cwd=source)
    (built,) = out.glob("keyquorum-*.whl")
    return built


def venv(directory: Path, requirement: str) -> Path:
    """A clean venv (no system packages) with `requirement` installed at the locked versions."""
    sh(sys.executable, "-m", "venv", directory)
    python = directory / "bin" / "python"
    sh(python, "-m", "pip", "install", "-q", "-c", LOCK, requirement)
    return python


def installed(python: Path) -> set[str]:
    out = sh(python, "-m", "pip", "list", "--format=freeze")
    return {str(canonicalize_name(line.split("==")[0])) for line in out.splitlines() if line}


def test_the_wheel_holds_the_generated_code_and_the_c_module(wheel: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("custodian", "key", "audit"):
        assert f"keyquorum/v1/{module}_pb2.py" in names
        assert f"keyquorum/v1/{module}_pb2_grpc.py" in names
        assert f"keyquorum/v1/{module}_pb2.pyi" in names
    assert "keyquorum/v1/py.typed" in names
    assert any(n.startswith("keyquorum/hsm/dataplane/_wire.") and n.endswith(".so") for n in names)
    assert not any(n.startswith(("cli/", "hsm/", "quorum/", "tests/")) for n in names)


def test_the_server_install_runs_from_a_clean_venv(wheel: Path, tmp_path: Path) -> None:
    python = venv(tmp_path / "venv", f"{wheel}[server]")
    keyquorum = python.with_name("keyquorum")
    top = sh(keyquorum, "--help")
    assert "server     Run the key-custody daemon." in top
    assert "--config FILE" in sh(keyquorum, "server", "run", "--help")
    probe = textwrap.dedent(
        """
        import keyquorum.v1.custodian_pb2_grpc, keyquorum.cli.server
        from keyquorum.hsm import dataplane
        print(dataplane.WIRE_CODEC_BUILT)
        """
    )
    assert sh(python, "-c", probe, cwd=tmp_path).strip() == "True"
    # What the install brought is at the locked versions (pip and setuptools
    # come with the venv, not with keyquorum).
    pins = locked()
    freeze = sh(python, "-m", "pip", "list", "--format=freeze")
    for line in freeze.splitlines():
        name, _, version = line.partition("==")
        name = str(canonicalize_name(name))
        if name not in {"pip", "setuptools", "wheel", "keyquorum"}:
            assert version == pins.get(name), name


@pytest.fixture(scope="module")
def daemon_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KeyPlane, DevPki]]:
    base = tmp_path_factory.mktemp("plane")
    pki = make_pki(base / "pki")
    custodians = make_custodians(base / "custodians")
    with in_process_daemon(base / "data", pki, clock=FakeClock()) as d:
        ceremony(d, custodians)
        unseal(d, custodians[:K])
        ready_tenant(d, custodians, "acme-health")
        with key_plane(d, pki) as kp:
            yield kp, pki


CLIENT = textwrap.dedent(
    """
    import sys
    from keyquorum.client import KeyClient, decrypt_record, encrypt_record
    target, ca, cert, key = sys.argv[1:]
    context = {"patient": "p-4711"}
    with KeyClient(target, ca=ca, cert=cert, key=key) as kq:
        wrapped = kq.wrap("acme-health", b"from a base install", context)
        with kq.unwrap(wrapped.ciphertext, context) as plain:
            assert plain.reveal() == b"from a base install"
        box = encrypt_record(kq, "acme-health", b"a record", context)
        with decrypt_record(kq, box, context) as record:
            assert record.reveal() == b"a record"
    print("wrapped and unwrapped")
    """
)


def test_the_client_alone_installs_and_wraps_against_a_daemon(
    wheel: Path, tmp_path: Path, daemon_plane: tuple[KeyPlane, DevPki]
) -> None:
    python = venv(tmp_path / "venv", str(wheel))
    have = installed(python)
    assert have <= BASE_ALLOWED, sorted(have - BASE_ALLOWED)
    assert {"grpcio", "protobuf", "cryptography", "keyquorum"} <= have
    # The command says what it needs instead of a traceback.
    result = subprocess.run(
        [python.with_name("keyquorum"), "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "pip install 'keyquorum[cli]'" in result.stderr
    kp, pki = daemon_plane
    files = pki.client("backend/booking")
    out = sh(python, "-c", CLIENT, kp.target, pki.ca_cert, files.cert, files.key, cwd=tmp_path)
    assert out.strip() == "wrapped and unwrapped"


# -- the lock ----------------------------------------------------------------------------


def declared() -> list[Requirement]:
    project = PYPROJECT["project"]
    raw = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        raw += extra
    raw += PYPROJECT["build-system"]["requires"]
    return [r for r in map(Requirement, raw) if canonicalize_name(r.name) != "keyquorum"]


def locked() -> dict[str, str]:
    out = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock: {line!r} is not name==version"
            out[str(canonicalize_name(name))] = version
    return out


@pytest.mark.parametrize("requirement", declared(), ids=str)
def test_the_lock_pins_each_declared_dependency_within_its_range(requirement: Requirement) -> None:
    pins = locked()
    name = str(canonicalize_name(requirement.name))
    assert name in pins, f"{name} is declared but not in requirements.lock (run make lock)"
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f"{name}=={pins[name]} is outside {requirement.specifier}"
    )


def test_runtime_dependencies_are_ranges_not_pins() -> None:
    for raw in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(raw)
        assert not any(s.operator == "==" for s in requirement.specifier), raw
        assert any(s.operator == "<" for s in requirement.specifier), f"{raw}: no upper bound"


def test_no_declared_dependency_goes_unused() -> None:
    """Each runtime or server dependency is imported somewhere in the package."""
    sources = "\n".join(
        p.read_text()
        for folder in ("quorum", "hsm", "cli", "client")
        for p in (ROOT / folder).rglob("*.py")
    )
    imports = {
        "grpcio": "import grpc", "protobuf": "google.protobuf", "cryptography": "cryptography",
        "click": "import click", "rfc8785": "import rfc8785",
        "grpcio-health-checking": "grpc_health", "grpcio-reflection": "grpc_reflection",
        "prometheus-client": "prometheus_client", "psycopg": "psycopg",
        "psycopg-pool": "psycopg_pool", "zxcvbn": "from zxcvbn import",
    }  # fmt: skip
    project = PYPROJECT["project"]
    runtime = list(project["dependencies"]) + project["optional-dependencies"]["cli"]
    runtime += project["optional-dependencies"]["server"]
    for raw in runtime:
        name = str(canonicalize_name(Requirement(raw).name))
        if name == "keyquorum":
            continue
        assert name in imports, f"{name}: say which import uses it"
        assert imports[name] in sources, f"{name} is declared but never imported"

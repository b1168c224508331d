"""The design card's layout rules, checked on the source itself."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.source_imports import top_level_imports

ROOT = Path(__file__).resolve().parent.parent
QUORUM = ROOT / "quorum"

# Modules that do I/O (network, files, processes, databases, clocks the
# caller cannot inject). quorum/ must import none of them. `secrets` is
# allowed: it is the default random source, always overridable by argument.
FORBIDDEN = {
    "grpc",
    "sqlite3",
    "psycopg",
    "psycopg_pool",
    "socket",
    "subprocess",
    "os",
    "io",
    "pathlib",
    "shutil",
    "tempfile",
    "select",
    "asyncio",
    "threading",
    "multiprocessing",
    "urllib",
    "http",
    "ssl",
    "logging",
    "time",
    "random",
    "prometheus_client",
    "click",
    "rich",
}


def _calls_open(path: Path) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "open"
        for n in ast.walk(tree)
    )


QUORUM_FILES = sorted(QUORUM.glob("*.py"))


@pytest.mark.parametrize("path", QUORUM_FILES, ids=lambda p: p.name)
def test_quorum_module_does_no_io(path: Path) -> None:
    bad = top_level_imports(path) & FORBIDDEN
    assert not bad, f"{path.name} imports I/O modules: {sorted(bad)}"
    assert not _calls_open(path), f"{path.name} calls open()"


def test_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import socket\nfrom os import path\nopen('x')\n")
    assert top_level_imports(sample) & FORBIDDEN == {"socket", "os"}
    assert _calls_open(sample)


def test_install_puts_no_bare_package_on_the_path(tmp_path: Path) -> None:
    # Run from an empty directory so the checkout itself is not on sys.path.
    probe = (
        "import importlib.util as u, json; "
        "print(json.dumps({n: u.find_spec(n) is not None for n in "
        "['cli', 'hsm', 'quorum', 'keyquorum.quorum', 'keyquorum.hsm', 'keyquorum.cli', "
        "'keyquorum.v1']}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    found = json.loads(out.stdout)
    assert found == {
        "cli": False,
        "hsm": False,
        "quorum": False,
        "keyquorum.quorum": True,
        "keyquorum.hsm": True,
        "keyquorum.cli": True,
        "keyquorum.v1": True,
    }


# -- the intended dependencies between our own packages --------------------------------


def _our_imports(path: Path) -> set[str]:
    """Every `keyquorum.*` module a file imports, at any depth (lazy imports too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("keyquorum"))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.startswith("keyquorum")
        ):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


#: (rule, files it binds, module prefixes those files must not import)
DEPENDENCY_RULES = [
    (
        "quorum/ imports nothing of ours outside quorum/",
        "quorum/*.py",
        ("keyquorum.hsm", "keyquorum.cli", "keyquorum.client", "keyquorum.v1"),
    ),
    ("hsm/ never imports cli/", "hsm/**/*.py", ("keyquorum.cli",)),
    (
        "stores never import the daemon, the data plane or the services",
        "hsm/stores/*.py",
        ("keyquorum.hsm.daemon", "keyquorum.hsm.dataplane", "keyquorum.hsm.services"),
    ),
    ("client/ never imports hsm/ or cli/", "client/*.py", ("keyquorum.hsm", "keyquorum.cli")),
    (
        "the data plane never imports governance (its lock is out of reach)",
        "hsm/dataplane/*.py",
        ("keyquorum.hsm.daemon", "keyquorum.hsm.services"),
    ),
]


def _violations(files: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted(ROOT.glob(files)):
        for name in sorted(_our_imports(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


@pytest.mark.parametrize(
    ("files", "forbidden"),
    [(files, forbidden) for _, files, forbidden in DEPENDENCY_RULES],
    ids=[rule for rule, _, _ in DEPENDENCY_RULES],
)
def test_dependency_rule(files: str, forbidden: tuple[str, ...]) -> None:
    assert list(ROOT.glob(files)), f"the rule binds no file: {files}"
    assert _violations(files, forbidden) == []


def test_dependency_checker_sees_lazy_and_from_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f():\n    from keyquorum.hsm import daemon\n    import keyquorum.cli.main\n"
    )
    assert _our_imports(sample) == {"keyquorum.hsm", "keyquorum.hsm.daemon", "keyquorum.cli.main"}


# -- the tests' own layout --------------------------------------------------------------


def _test_module_imports(path: Path) -> list[str]:
    """The test modules (`tests.test_*`) a file imports, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.ImportFrom):  # relative: `from . import test_x`
            modules = [f"tests.{a.name}" for a in node.names] + [f"tests.{node.module}"]
        else:
            continue
        found += [".".join(m.split(".")[:2]) for m in modules if m.startswith("tests.test_")]
    return sorted(set(found))


@pytest.mark.parametrize(
    "path",
    sorted([*(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_file_imports_a_test_module(path: Path) -> None:
    """What tests share lives in the harness modules (tests/*.py not named test_*)."""
    assert _test_module_imports(path) == []


def test_test_module_checker_sees_every_form(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    # Spelt in pieces, so that a grep of the tree for such imports finds none here.
    package = "tests"
    sample.write_text(
        f"import {package}.test_a\n"
        f"from {package}.test_b import x\n"
        f"from {package} import test_c\n"
        "from .test_d import y\n"
        f"def f():\n    from {package}.harness import z\n"
    )
    assert _test_module_imports(sample) == [
        "tests.test_a",
        "tests.test_b",
        "tests.test_c",
        "tests.test_d",
    ]

"""`--json` on every read command, checked against the schemas in docs/schemas/.

The documents come from the real commands: against a daemon over TLS for
status, proposals, tenants; offline against the golden export for the
audit commands. Every schema is itself a valid JSON Schema (2020-12) and
is used by at least one test, and every read command has `--json`.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
from click.testing import CliRunner

from keyquorum.cli.main import main as cli_main
from keyquorum.cli.proposal import _tenant_document
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.v1 import custodian_pb2 as pb
from tests.harness import (
    CEREMONY_CODE,
    Custodian,
    InProcessDaemon,
    in_process_daemon,
    make_custodians,
)
from tests.logfactory import EXPORT, LOG_KEY

SCHEMAS = Path(__file__).parent.parent / "docs" / "schemas"
#: The commands that only read; each must take --json.
READ_COMMANDS = {
    ("status",),
    ("proposal", "list"),
    ("proposal", "show"),
    ("tenant", "list"),
    ("custodian", "show"),
    ("audit", "verify"),
    ("audit", "checkpoint"),
    ("audit", "prove-inclusion"),
    ("audit", "prove-consistency"),
    ("audit", "check-receipt"),
}
USED: set[str] = set()


def check(doc: dict[str, Any]) -> dict[str, Any]:
    kind = str(doc["format"]).removeprefix("keyquorum/")
    schema = json.loads((SCHEMAS / f"{kind}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(doc, schema)
    USED.add(kind)
    return doc


def run_json(*args: str) -> dict[str, Any]:
    r = CliRunner().invoke(cli_main, [*args, "--json"])
    assert r.exit_code == 0, r.output
    doc: dict[str, Any] = json.loads(r.stdout)
    return check(doc)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("people"), ("alice", "bob", "carol"))


@pytest.fixture
def daemon(tmp_path: Path, pki: DevPki) -> Iterator[InProcessDaemon]:
    with in_process_daemon(tmp_path / "data", pki) as d:
        yield d


def test_status_json_before_and_after_the_ceremony_with_the_log_key(
    daemon: InProcessDaemon, pki: DevPki, people: list[Custodian]
) -> None:
    conn = ["--server", daemon.target, "--ca", str(pki.ca_cert)]
    before = run_json("status", *conn)
    assert before["initialized"] is False
    daemon.stub.InitCeremony(
        pb.InitCeremonyRequest(
            deployment="json-test",
            threshold=2,
            public_credentials=[c.public_path.read_bytes() for c in people],
            code=CEREMONY_CODE,
        )
    )
    after = run_json("status", *conn)
    assert after["log_key"] == daemon.daemon.state.log_key
    assert after["log_key"].startswith("keyquorum/json-test+")
    assert [(m["share_index"], m["name"]) for m in after["roster"]] == [
        (1, "alice"),
        (2, "bob"),
        (3, "carol"),
    ]
    alice = after["roster"][0]
    assert alice["fingerprint"] == people[0].fingerprint
    assert alice["short_fingerprint"] == people[0].credential.public().short_fingerprint
    assert after["unseal_session"] is None
    # Several replicas, one of them not answering: each said, exit 3 (partial).
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{free.getsockname()[1]}"
    r = CliRunner().invoke(
        cli_main,
        ["status", "--server", daemon.target, "--server", dead, "--ca", str(pki.ca_cert), "--json"],
    )
    assert r.exit_code == 3, r.output
    replicas = check(json.loads(r.stdout))["replicas"]
    assert [x["server"] for x in replicas] == [daemon.target, dead]
    assert check(replicas[0]["status"])["log_key"] == after["log_key"]
    assert replicas[1]["status"] is None
    assert "cannot reach the daemon" in replicas[1]["error"]


def test_proposals_and_tenants_json(
    daemon: InProcessDaemon, pki: DevPki, people: list[Custodian]
) -> None:
    conn = ["--server", daemon.target, "--ca", str(pki.ca_cert)]
    daemon.stub.InitCeremony(
        pb.InitCeremonyRequest(
            deployment="json-test",
            threshold=2,
            public_credentials=[c.public_path.read_bytes() for c in people],
            code=CEREMONY_CODE,
        )
    )
    # The CLI signs an expiry by its own clock: the daemon's must agree with it.
    daemon.clock.advance(int(time.time()) - daemon.clock.now)
    r = CliRunner().invoke(
        cli_main,
        ["proposal", "new", "create-tenant", "--param", "tenant=acme-health", *conn,
         *people[0].cli_args()],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    listed = run_json("proposal", "list", *conn)
    (p,) = listed["proposals"]
    assert p["operation"] == "create-tenant"
    assert p["parameters"] == {"tenant": "acme-health"}
    assert p["approve_statement"].startswith("keyquorum statement v2: APPROVE\n")
    shown = run_json("proposal", "show", p["id"], *conn)
    assert shown["proposal"] == p
    tenants = run_json("tenant", "list", *conn)
    assert tenants["tenants"] == []
    one = check(
        {
            "format": "keyquorum/tenants",
            "version": 1,
            "tenants": [
                _tenant_document(
                    pb.Tenant(name="acme-health", versions=2, disabled_versions=[1],
                              active_until=1_795_600_000, unwrapped=True, backends=["booking"])
                )
            ],
        }
    )  # fmt: skip
    assert one["tenants"][0]["destroy_at"] is None


def test_custodian_show_json(people: list[Custodian]) -> None:
    doc = run_json("custodian", "show", str(people[0].public_path))
    assert doc["fingerprint"] == people[0].fingerprint


def test_audit_read_commands_json(tmp_path: Path) -> None:
    source = ["--from", str(EXPORT), "--log-key", LOG_KEY]
    cp = run_json("audit", "checkpoint", *source)
    saved = tmp_path / "cp"
    saved.write_text(cp["note"])
    inclusion = run_json(
        "audit", "prove-inclusion", "3", *source, "--trusted-checkpoint", str(saved)
    )
    assert inclusion["entry"]["seq"] == 3
    assert inclusion["tree_size"] == cp["size"]
    consistency = run_json(
        "audit", "prove-consistency", *source, "--trusted-checkpoint", str(saved)
    )
    assert consistency["old_size"] == consistency["new_size"] == cp["size"]
    receipt = tmp_path / "r"
    r = CliRunner().invoke(
        cli_main, ["audit", "receipt", "5", "--from", str(EXPORT), "--out", str(receipt)]
    )
    assert r.exit_code == 0, r.output
    checked = run_json("audit", "check-receipt", str(receipt), "--log-key", LOG_KEY)
    assert checked["entry"]["seq"] == 5
    report = run_json("audit", "verify", str(EXPORT), "--log-key", LOG_KEY)
    assert report["log_key"] == LOG_KEY


def _commands(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_read_command_takes_json() -> None:
    commands = dict(_commands(cli_main))
    for path in READ_COMMANDS:
        options = {opt for p in commands[path].params for opt in getattr(p, "opts", [])}
        assert "--json" in options, path


def test_every_schema_is_used() -> None:
    """Runs last in this module: each schema validated at least one real document."""
    if len(USED) < 3:
        pytest.skip("needs the module's other tests to have run first (pytest order)")
    expected = {p.name.removesuffix(".schema.json") for p in SCHEMAS.glob("*.schema.json")}
    # The failure document is exercised in tests/test_audit_cli.py.
    assert USED | {"audit-failure"} == expected


def test_a_bare_fingerprint_still_names_the_custodian_from_the_roster(
    daemon: InProcessDaemon, people: list[Custodian]
) -> None:
    """actions.seal and confirm take a credential; a fingerprint alone is looked up."""
    from keyquorum.cli import custodian_actions as actions
    from keyquorum.quorum.errors import InvalidInputError

    daemon.stub.InitCeremony(
        pb.InitCeremonyRequest(
            deployment="json-test",
            threshold=2,
            public_credentials=[c.public_path.read_bytes() for c in people],
            code=CEREMONY_CODE,
        )
    )
    shown: list[str] = []

    def unlock(text: str) -> object:
        shown.append(text)
        return people[1].credential

    size = daemon.daemon.state.size
    actions.seal(daemon.stub, people[1].fingerprint, unlock, reason="drill", now=daemon.clock.now)  # type: ignore[arg-type]
    assert f"custodian: {people[1].credential.public().label}\n" in shown[0]
    assert daemon.daemon.state.size == size + 1
    with pytest.raises(InvalidInputError, match="not on the daemon's roster"):
        actions.seal(daemon.stub, "ab" * 32, unlock, reason="x", now=daemon.clock.now)  # type: ignore[arg-type]

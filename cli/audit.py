"""`keyquorum audit`: export the log, verify it offline, prove inclusion and consistency.

Everything that judges the log runs offline, in this process, with the
same replay code the daemon runs (`quorum.audit_report.audit` calls
`replay.verify_log`). The daemon is only a source of bytes: over the mTLS
listener with an auditor certificate (`--server`, `--ca`, `--cert`,
`--key`), or its data directory read directly (`--data-dir`), or an export
file (`--from`). Nothing it says is believed until checked against the log
key and a checkpoint the auditor already trusts.

Receipts use the C2SP tlog-proof layout (c2sp.org/tlog-proof): the
`extra` line carries the entry's exact bytes (base64), so one file proves
one event to anyone holding the log key, without the rest of the log.

The log key is pinned per deployment on first contact, in the same place
the custodians' CLI keeps it (cli/seen_checkpoints.py): a key given with
`--log-key` that differs from the pinned one is refused, naming both,
unless `audit verify` finds the log's own chain of rotations leading from
the pinned key to it (each rotation signed by the key before). `audit
verify` also checks the log extends the checkpoint this machine remembers
for the deployment, and remembers the newer one. `audit witness` runs a
witness (cli/witness.py).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import click
import grpc

from keyquorum.cli import seen_checkpoints
from keyquorum.cli.output import document, emit, json_option
from keyquorum.quorum import evidence, export, merkle
from keyquorum.quorum.audit_report import audit
from keyquorum.quorum.audit_text import render_text
from keyquorum.quorum.checkpoint import (
    Checkpoint,
    NoteSigner,
    VerifiedCheckpoint,
    cosign_checkpoint,
    parse_verifier_key,
    verify_checkpoint,
)
from keyquorum.quorum.errors import (
    DeserializationError,
    ForkError,
    InvalidInputError,
    KeyquorumError,
    LogIntegrityError,
    RollbackError,
    StateError,
    UnverifiableError,
    VerificationError,
)
from keyquorum.quorum.log import Entry, GenesisPayload
from keyquorum.quorum.note import SignatureType
from keyquorum.quorum.secret import SecretBytes

F = TypeVar("F", bound=Callable[..., Any])

KEY_FILE_HEADER = "keyquorum-cosigner-key v1"
ENTRY_BATCH = 5000


# -- where the bytes come from ---------------------------------------------------------


class Source(Protocol):
    """The log as some party serves it; nothing it returns is trusted unverified."""

    def latest(self) -> tuple[int, str]: ...

    def checkpoints(self) -> list[str]: ...

    def entries(self, start: int, end: int) -> Iterator[bytes]: ...

    def inclusion(self, index: int, size: int) -> tuple[list[bytes], bytes, str]: ...

    def consistency(self, size1: int, size2: int) -> tuple[list[bytes], str]: ...


class LocalSource:
    """An export file or a data directory, held in memory with its Merkle tree."""

    def __init__(self, entries: Sequence[bytes], notes: Sequence[str]) -> None:
        self._entries = list(entries)
        self._notes = list(notes)
        self._tree = merkle.MerkleTree()
        for raw in self._entries:
            self._tree.append(merkle.leaf_hash(raw))
        self._by_size: dict[int, str] = {}
        for note in self._notes:
            self._by_size.setdefault(_size_of(note), note)

    @classmethod
    def from_export(cls, path: Path) -> LocalSource:
        parsed = read_export(path)
        return cls(parsed.entries, parsed.checkpoints)

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> LocalSource:
        from keyquorum.hsm.stores.sqlite import SqliteStore

        with SqliteStore.in_directory(data_dir, create=False) as store:
            entries = list(store.read_all())
            notes = [note for size, note in store.checkpoints() if size <= len(entries)]
        return cls(entries, notes)

    def latest(self) -> tuple[int, str]:
        if not self._by_size:
            raise StateError("there is no signed checkpoint")
        size = max(self._by_size)
        return size, self._by_size[size]

    def checkpoints(self) -> list[str]:
        return list(self._notes)

    def entries(self, start: int, end: int) -> Iterator[bytes]:
        if not 0 <= start <= end <= len(self._entries):
            raise InvalidInputError(f"no entries [{start}, {end}) in a log of {len(self._entries)}")
        return iter(self._entries[start:end])

    def _note(self, size: int) -> str:
        if size == 0:
            return self.latest()[1]
        if size not in self._by_size:
            raise StateError(f"no checkpoint of tree size {size} here")
        return self._by_size[size]

    def inclusion(self, index: int, size: int) -> tuple[list[bytes], bytes, str]:
        note = self._note(size)
        size = _size_of(note)
        if not 0 <= index < min(size, self._tree.size):
            raise InvalidInputError(f"index is beyond the tree size: {index} >= {size}")
        return self._tree.inclusion_proof(index, size), self._entries[index], note

    def consistency(self, size1: int, size2: int) -> tuple[list[bytes], str]:
        note = self._note(size2)
        size2 = _size_of(note)
        if not 0 < size1 <= size2 <= self._tree.size:
            raise InvalidInputError(f"size1 must be in [1, {size2}], got {size1}")
        proof = self._tree.consistency_proof(size1, size2) if size1 < size2 else []
        return proof, note


class RemoteSource:
    """The daemon's AuditService over mTLS with an auditor certificate."""

    def __init__(self, channel: grpc.Channel) -> None:
        from keyquorum.v1 import audit_pb2_grpc

        self._stub = audit_pb2_grpc.AuditServiceStub(channel)

    def latest(self) -> tuple[int, str]:
        from keyquorum.v1 import audit_pb2 as pb

        with _rpc():
            cp = self._stub.GetCheckpoint(pb.GetCheckpointRequest(size=0))
        return cp.size, cp.note

    def checkpoints(self) -> list[str]:
        from keyquorum.v1 import audit_pb2 as pb

        with _rpc():
            return [cp.note for cp in self._stub.ListCheckpoints(pb.ListCheckpointsRequest())]

    def entries(self, start: int, end: int) -> Iterator[bytes]:
        from keyquorum.v1 import audit_pb2 as pb

        for lo in range(start, end, ENTRY_BATCH):
            hi = min(lo + ENTRY_BATCH, end)
            with _rpc():
                for i, e in enumerate(
                    self._stub.GetEntries(pb.GetEntriesRequest(start=lo, end=hi))
                ):
                    if e.seq != lo + i:
                        raise DeserializationError(f"the daemon sent entry {e.seq}, not {lo + i}")
                    yield e.data

    def inclusion(self, index: int, size: int) -> tuple[list[bytes], bytes, str]:
        from keyquorum.v1 import audit_pb2 as pb

        with _rpc():
            p = self._stub.GetInclusionProof(
                pb.GetInclusionProofRequest(index=index, tree_size=size)
            )
        return list(p.hashes), p.entry, p.checkpoint

    def consistency(self, size1: int, size2: int) -> tuple[list[bytes], str]:
        from keyquorum.v1 import audit_pb2 as pb

        with _rpc():
            p = self._stub.GetConsistencyProof(
                pb.GetConsistencyProofRequest(size1=size1, size2=size2)
            )
        return list(p.hashes), p.checkpoint

    def add_cosignature(self, note: str) -> str:
        from keyquorum.v1 import audit_pb2 as pb

        with _rpc():
            return self._stub.AddCosignature(pb.AddCosignatureRequest(note=note)).note

    def witnessed(self) -> tuple[int, str]:
        """The latest checkpoint m witnesses of the log cosigned."""
        from keyquorum.v1 import audit_pb2 as pb

        with _rpc():
            cp = self._stub.GetCheckpoint(pb.GetCheckpointRequest(size=0, witnessed=True))
        return cp.size, cp.note


@contextmanager
def _rpc() -> Iterator[None]:
    from keyquorum.cli.connect import rpc_errors

    with rpc_errors():
        yield


def _size_of(note: str) -> int:
    """The tree size a note claims, before verification (to index notes by size)."""
    text = note.rpartition("\n\n")[0] + "\n"
    try:
        return Checkpoint.parse(text).size
    except DeserializationError as e:
        raise DeserializationError(f"not a checkpoint note: {e}") from e


@dataclass(frozen=True)
class Conn:
    server: str | None
    ca: Path | None
    cert: Path | None
    key: Path | None
    data_dir: Path | None
    from_file: Path | None


def source_options(*, allow_file: bool = True) -> Callable[[F], F]:
    """Where the log comes from: the daemon over mTLS, a data directory, or an export."""

    def decorate(f: F) -> F:
        options = [
            click.option(
                "--server",
                envvar="KEYQUORUM_AUDIT_SERVER",
                help="The daemon's mTLS address HOST:PORT (env KEYQUORUM_AUDIT_SERVER).",
            ),
            click.option(
                "--ca",
                type=click.Path(exists=True, dir_okay=False, path_type=Path),
                envvar="KEYQUORUM_CA",
                help="CA of the daemon's certificate (env KEYQUORUM_CA).",
            ),
            click.option(
                "--cert",
                type=click.Path(exists=True, dir_okay=False, path_type=Path),
                envvar="KEYQUORUM_CLIENT_CERT",
                help="Your auditor client certificate (keyquorum://auditor/NAME).",
            ),
            click.option(
                "--key",
                "key_file",
                type=click.Path(exists=True, dir_okay=False, path_type=Path),
                envvar="KEYQUORUM_CLIENT_KEY",
                help="The private key of --cert.",
            ),
            click.option(
                "--data-dir",
                type=click.Path(file_okay=False, path_type=Path),
                help="Read the daemon's data directory directly instead (offline).",
            ),
        ]
        if allow_file:
            options.append(
                click.option(
                    "--from",
                    "from_file",
                    type=click.Path(exists=True, dir_okay=False, path_type=Path),
                    help="Read an export file instead (offline).",
                )
            )
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


@contextmanager
def open_source(conn: Conn) -> Iterator[Source]:
    chosen = [x for x in (conn.server, conn.data_dir, conn.from_file) if x is not None]
    if len(chosen) != 1:
        raise InvalidInputError("give exactly one of --server, --data-dir or --from")
    if conn.data_dir is not None:
        yield LocalSource.from_data_dir(conn.data_dir)
        return
    if conn.from_file is not None:
        yield LocalSource.from_export(conn.from_file)
        return
    from keyquorum.cli.connect import make_endpoint, open_channel

    if conn.ca is None or conn.cert is None or conn.key is None:
        raise InvalidInputError(
            "the audit service needs mTLS: give --ca, and your auditor --cert and --key"
        )
    assert conn.server is not None
    endpoint = make_endpoint(conn.server, conn.ca, False, cert=conn.cert, key=conn.key)
    with open_channel(endpoint) as channel:
        yield RemoteSource(channel)


# -- files and progress ------------------------------------------------------------------


def read_export(path: Path) -> export.ExportedLog:
    try:
        with path.open("rb") as f:
            return export.parse(f)
    except OSError as e:
        raise InvalidInputError(f"cannot read {path}: {e.strerror}") from e


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"cannot read the {what} {path}: {e}") from e


def _write_atomically(path: Path, chunks: Iterator[bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal (stderr), nothing at all when output is piped."""
    if not sys.stderr.isatty() or total < 2000:
        yield lambda _n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


def _log_key(option: str | None, path: Path | None) -> str | None:
    if option and path:
        raise InvalidInputError("give --log-key or --log-key-file, not both")
    if path is not None:
        return _read_text(path, "log key file").strip()
    return option


def _verified(note: str, log_key: str, what: str) -> VerifiedCheckpoint:
    try:
        return verify_checkpoint(note, parse_verifier_key(log_key))
    except KeyquorumError as e:
        raise VerificationError(f"{what} does not check under the log key: {e}") from e


def _entry_document(raw: bytes) -> dict[str, Any]:
    entry = Entry.from_bytes(raw)
    return {
        "seq": entry.seq,
        "type": entry.type,
        "time": entry.time,
        "leaf_hash": merkle.leaf_hash(raw).hex(),
    }


def _describe(raw: bytes) -> str:
    entry = Entry.from_bytes(raw)
    payload = entry.payload.to_json()
    detail = {k: v for k, v in payload.items() if isinstance(v, str | int) and len(str(v)) < 80}
    return f"entry {entry.seq}: {entry.type} at {entry.time} {json.dumps(detail, sort_keys=True)}"


# -- the commands ------------------------------------------------------------------------


@click.group("audit")
def audit_group() -> None:
    """Export the quorum log and verify it offline; proofs and receipts."""


log_key_options = [
    click.option("--log-key", help="The log's verifier key (NAME+HASH+KEY) you trust."),
    click.option(
        "--log-key-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="A file holding the log's verifier key.",
    ),
]


def _with(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


@audit_group.command("export")
@source_options(allow_file=False)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="File to write."
)
def export_cmd(
    server: str | None,
    ca: Path | None,
    cert: Path | None,
    key_file: Path | None,
    data_dir: Path | None,
    out: Path,
) -> None:
    """Write the log and its checkpoints to one export file (docs/audit.md).

    \b
    Examples:
      keyquorum audit export --server kq.example:7444 --ca ca.crt \\
          --cert auditor-alice.crt --key auditor-alice.key --out log.kqexport
      keyquorum audit export --data-dir /var/lib/keyquorum --out log.kqexport
    """
    with open_source(Conn(server, ca, cert, key_file, data_dir, None)) as source:
        size, _note = source.latest()
        notes = [n for n in source.checkpoints() if _size_of(n) <= size]
        with progress_bar(size, "exporting") as advance:

            def entries() -> Iterator[bytes]:
                for i, raw in enumerate(source.entries(0, size), start=1):
                    if i % 1000 == 0:
                        advance(1000)
                    yield raw

            _write_atomically(out, export.produce(entries(), notes))
    click.echo(f"exported {size} entries and {len(notes)} checkpoints to {out}")


#: `audit verify` exit codes: what a script can rely on.
EXIT_VERIFIED = 0
EXIT_TAMPERED = 1
EXIT_USAGE = 2
EXIT_UNVERIFIABLE = 3


def pinned_log_key(option: str | None, path: Path | None) -> str | None:
    """The log key the auditor pinned, or None: the one place a pin is looked up.

    Today a pin is given explicitly, as `--log-key` or `--log-key-file`;
    a key found in the export itself is never a pin (whoever wrote the file
    chose it). A malformed key is a usage error (exit 2), not tampering.
    """
    key = _log_key(option, path)
    if key is None:
        return None
    try:
        verifier = parse_verifier_key(key)
    except KeyquorumError as e:
        raise click.UsageError(f"the log key you gave is not a note verifier key: {e}") from None
    if verifier.sig_type is not SignatureType.ED25519:
        raise click.UsageError("the log key must be an Ed25519 (type 0x01) note verifier key")
    return key


def parse_utc(text: str | None, option: str) -> int | None:
    """`2026-11-25`, `2026-11-25T10:00:00Z` or `2026-11-25 10:00:00` (UTC) to Unix seconds."""
    if text is None:
        return None
    from datetime import UTC, datetime

    value = text.strip().removesuffix("Z").removesuffix(" UTC").replace("T", " ")
    for form in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return int(datetime.strptime(value, form).replace(tzinfo=UTC).timestamp())
        except ValueError:
            continue
    raise click.BadParameter(
        f"{text!r} is not a UTC date (2026-11-25) or time (2026-11-25T10:00:00Z)",
        param_hint=option,
    )


@audit_group.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--trusted-checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A checkpoint you trusted before: the log must extend it.",
)
@_with(log_key_options)
@click.option("--cosigner", multiple=True, help="A cosigner (witness) key you trust; repeatable.")
@click.option("--min-cosigners", default=0, show_default=True, help="Cosigners required.")
@click.option(
    "--witnesses",
    "witnesses",
    type=click.IntRange(0, 255),
    default=0,
    show_default=True,
    help="Require a checkpoint cosigned by this many of the witnesses the log itself names "
    "(add-witness); the report says which entries they vouch for.",
)
@click.option("--json", "as_json", is_flag=True, help="The report as JSON, for machines.")
@click.option(
    "--html",
    "html_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the report as one self-contained HTML page here.",
)
@click.option("--since", help="Details from this UTC date or time on (2026-11-25[T10:00:00Z]).")
@click.option("--until", help="Details before this UTC date or time.")
@click.option(
    "--type",
    "types",
    multiple=True,
    help="Details of one kind only: roster, confirm, unseal, seal, proposal, tenant, grant, "
    "checkpoint (or an entry type such as approval); repeatable.",
)
@click.option("--tenant", help="Details concerning this tenant only.")
@click.option(
    "--custodian",
    help="Details of what this custodian did (name, FKAO-JAYM-... or fingerprint prefix).",
)
@click.option(
    "--save-checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    help="After success, write the latest verified checkpoint here (next --trusted-checkpoint).",
)
def verify_cmd(
    file: Path,
    trusted_checkpoint: Path | None,
    log_key: str | None,
    log_key_file: Path | None,
    cosigner: tuple[str, ...],
    min_cosigners: int,
    witnesses: int,
    as_json: bool,
    html_out: Path | None,
    since: str | None,
    until: str | None,
    types: tuple[str, ...],
    tenant: str | None,
    custodian: str | None,
    save_checkpoint: Path | None,
) -> None:
    """Verify an export offline and print who authorised what, and when.

    Runs the daemon's own replay over every entry. The report opens with a
    summary of the whole log; --since, --until, --type, --tenant and
    --custodian cut down the details after it. Times are UTC.

    \b
    Exit codes:
      0  VERIFIED against the log key you pinned (--log-key or --log-key-file)
      1  the log is not intact: tampered, damaged, truncated, forked, badly signed
      2  usage error (a bad option, a malformed log key)
      3  cannot be judged: no log key pinned (the report says NOT VERIFIED),
         not an export file, nothing that vouches for the entries

    The deployment's log key is pinned on this machine on first contact;
    a log under another key is refused, naming both, unless the log's own
    rotations lead there from the pinned key, and the log must extend the
    checkpoint this machine remembers. Only a key you gave (now, or once
    before for this deployment) makes the verdict VERIFIED.

    \b
    Example:
      keyquorum audit verify kq-export.jsonl --log-key 'keyquorum/acme-prod+1a2b3c4d+AW...' \\
          --trusted-checkpoint yesterday.checkpoint --html report.html
      keyquorum audit verify kq-export.jsonl --log-key-file acme-prod.vkey \\
          --since 2026-11-01 --tenant acme-health
    """
    from keyquorum.quorum.audit_report import Filters

    given = pinned_log_key(log_key, log_key_file)
    try:
        filters = Filters(
            since=parse_utc(since, "--since"),
            until=parse_utc(until, "--until"),
            sections=frozenset(types),
            tenant=tenant,
            custodian=custodian,
        )
    except InvalidInputError as e:
        raise click.UsageError(str(e)) from None
    trusted = None if trusted_checkpoint is None else _read_text(trusted_checkpoint, "checkpoint")
    try:
        try:
            parsed = read_export(file)
        except DeserializationError as e:
            raise UnverifiableError(f"{file} is not a keyquorum export: {e}") from e
        deployment = _deployment_of_export(parsed)
        seen = None if deployment is None else seen_checkpoints.load(deployment)
        # The key trusted: the pinned one first (a given one must be in its chain).
        key = seen.log_key if seen is not None else given
        pinned = given is not None or (seen is not None and seen.key_given)
        remembered = _remembered_for(seen, parsed) if trusted is None else None
        with progress_bar(len(parsed.entries), "verifying") as advance:
            report = audit(
                parsed,
                log_key=key,
                trusted_checkpoint=trusted or remembered,
                cosigners=cosigner,
                min_cosigners=min_cosigners,
                witnesses=witnesses,
                progress=advance,
                pinned=pinned,
            )
        chain = [k.log_key for k in report.log_keys]
        if given is not None and seen is not None and given not in chain:
            seen_checkpoints.refuse_other_key(seen, given)
        if deployment is not None:
            _remember_verified(deployment, seen, chain, parsed, given=given is not None)
    except KeyquorumError as e:
        _fail(e, as_json, html_out)
    shown = report.filtered(filters)
    if as_json:
        click.echo(json.dumps(shown.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(render_text(shown), nl=False)
    if html_out is not None:
        from keyquorum.quorum.audit_html import render_html

        _write_atomically(html_out, iter([render_html(shown).encode("utf-8")]))
        click.echo(f"HTML report written to {html_out}", err=True)
    if not report.verified:
        sys.exit(EXIT_UNVERIFIABLE)
    if save_checkpoint is not None:
        note = max(parsed.checkpoints, key=_size_of)
        save_checkpoint.write_text(note, encoding="utf-8")


def _deployment_of_export(parsed: export.ExportedLog) -> str | None:
    """The deployment the export's genesis names (verified with the rest, later);
    None if there is no readable genesis (`audit` says what is wrong)."""
    if not parsed.entries:
        return None
    try:
        genesis = Entry.from_bytes(parsed.entries[0])
    except DeserializationError:
        return None
    if not isinstance(genesis.payload, GenesisPayload):
        return None
    return genesis.payload.deployment


def _remembered_for(seen: seen_checkpoints.Seen | None, parsed: export.ExportedLog) -> str | None:
    """The checkpoint this machine remembers, when the export is long enough to extend it.

    An older export (a historical audit) is verified on its own.
    """
    if seen is None or not seen.checkpoint:
        return None
    if _size_of(seen.checkpoint) > len(parsed.entries):
        click.echo(
            f"note: this export is older than the checkpoint this machine remembers for the "
            f"deployment ({_size_of(seen.checkpoint)} entries); verified on its own",
            err=True,
        )
        return None
    return seen.checkpoint


def _remember_verified(
    deployment: str,
    seen: seen_checkpoints.Seen | None,
    chain: list[str],
    parsed: export.ExportedLog,
    *,
    given: bool,
) -> None:
    """Pin the log's key in force and remember the export's latest checkpoint (when newer).

    `chain`: the log keys the verified log went through, the one in force
    last (the keys before it are remembered as superseded, for the other
    audit commands). `given`: the key was given by the auditor (or follows
    from one that was).
    """
    key = chain[-1]
    superseded = (seen or seen_checkpoints.Seen(deployment, key, "")).followed(chain)
    if seen is None and not given:
        click.echo(
            f"note: pinning the log key of deployment {deployment} on first contact (not "
            f"VERIFIED until you give it, --log-key): {key}",
            err=True,
        )
    given = given or (seen is not None and seen.key_given)
    latest = max(parsed.checkpoints, key=_size_of) if parsed.checkpoints else ""
    older = (
        seen is not None and bool(seen.checkpoint) and _size_of(seen.checkpoint) > _size_of(latest)
    )
    if older and seen is not None:
        if given and not seen.key_given:
            seen_checkpoints.save(dataclasses.replace(seen, key_given=True))
        return
    entries = () if seen is None else seen.witness_entries
    seen_checkpoints.save(
        seen_checkpoints.Seen(deployment, key, latest, entries, given, superseded)
    )


def exit_code_for(error: KeyquorumError) -> int:
    """Tampered (1), usage (2) or unverifiable (3): what a failed verify means."""
    if isinstance(error, UnverifiableError):
        return EXIT_UNVERIFIABLE
    if isinstance(error, VerificationError | DeserializationError):
        return EXIT_TAMPERED
    if isinstance(error, InvalidInputError):
        return EXIT_USAGE
    return EXIT_UNVERIFIABLE


def _fail(error: KeyquorumError, as_json: bool, html_out: Path | None = None) -> NoReturn:
    seq = error.seq if isinstance(error, LogIntegrityError) else None
    evidence = error.evidence if isinstance(error, ForkError) else ()
    code = exit_code_for(error)
    verdict = {EXIT_TAMPERED: "failed", EXIT_USAGE: "usage", EXIT_UNVERIFIABLE: "unverifiable"}
    if as_json:
        out = {
            "format": "keyquorum/audit-failure",
            "version": 1,
            "verdict": verdict[code],
            "exit_code": code,
            "error": type(error).__name__,
            "message": str(error),
            "seq": seq,
            "evidence": list(evidence),
        }
        click.echo(json.dumps(out, indent=2, sort_keys=True))
    else:
        head = "VERIFICATION FAILED" if code == EXIT_TAMPERED else "CANNOT VERIFY"
        click.echo(f"{head}: {error}", err=True)
        if seq is not None:
            click.echo(f"first bad entry: {seq}", err=True)
        for i, note in enumerate(evidence, start=1):
            click.echo(f"\nevidence {i} (a note signed by the log key):\n{note}", err=True)
    if html_out is not None:
        from keyquorum.quorum.audit_html import render_failure_html

        page = render_failure_html(str(error), seq, evidence)
        _write_atomically(html_out, iter([page.encode("utf-8")]))
    sys.exit(code)


@audit_group.command("checkpoint")
@source_options()
@_with(log_key_options)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Save it here.")
@json_option
def checkpoint_cmd(
    server: str | None,
    ca: Path | None,
    cert: Path | None,
    key_file: Path | None,
    data_dir: Path | None,
    from_file: Path | None,
    log_key: str | None,
    log_key_file: Path | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """Fetch the latest signed checkpoint, check its signature, print or save it.

    \b
    Example:
      keyquorum audit checkpoint --server kq.example:7444 --ca ca.crt \\
          --cert auditor.crt --key auditor.key --out today.checkpoint
    """
    with open_source(Conn(server, ca, cert, key_file, data_dir, from_file)) as source:
        _, note = source.latest()
    key = _required_key(log_key, log_key_file, _origin_of(note))
    cp = _verified(note, key, "the latest checkpoint").checkpoint
    if out is not None:
        out.write_text(note, encoding="utf-8")
    if as_json:
        emit(
            document(
                "checkpoint",
                log_key=key,
                origin=cp.origin,
                size=cp.size,
                root=cp.root.hex(),
                note=note,
                verified=True,
            )
        )
        return
    click.echo(note, nl=False)
    click.echo(f"checkpoint of size {cp.size} verified under the log key", err=True)


@audit_group.command("prove-inclusion")
@click.argument("seq", type=int)
@source_options()
@click.option(
    "--trusted-checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The checkpoint you trust; the proof is against its root.",
)
@_with(log_key_options)
@json_option
def prove_inclusion_cmd(
    seq: int,
    server: str | None,
    ca: Path | None,
    cert: Path | None,
    key_file: Path | None,
    data_dir: Path | None,
    from_file: Path | None,
    trusted_checkpoint: Path,
    log_key: str | None,
    log_key_file: Path | None,
    as_json: bool,
) -> None:
    """Check that entry SEQ is in the log your trusted checkpoint vouches for.

    \b
    Example:
      keyquorum audit prove-inclusion 42 --server kq.example:7444 --ca ca.crt \\
          --cert auditor.crt --key auditor.key --trusted-checkpoint today.checkpoint
    """
    text = _read_text(trusted_checkpoint, "checkpoint")
    key = _required_key(log_key, log_key_file, _origin_of(text))
    trusted = _verified(text, key, "your checkpoint")
    cp = trusted.checkpoint
    with open_source(Conn(server, ca, cert, key_file, data_dir, from_file)) as source:
        proof, entry, _note = source.inclusion(seq, cp.size)
    evidence.require_included(seq, entry, proof, cp)
    if as_json:
        emit(
            document(
                "inclusion",
                log_key=key,
                seq=seq,
                entry=_entry_document(entry),
                tree_size=cp.size,
                root=cp.root.hex(),
                proof=[h.hex() for h in proof],
                verified=True,
            )
        )
        return
    click.echo(_describe(entry))
    click.echo(
        f"included: entry {seq} is in the tree of size {cp.size} with root {cp.root.hex()} "
        f"({len(proof)} proof hashes verified)"
    )


@audit_group.command("prove-consistency")
@source_options()
@click.option(
    "--trusted-checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Yesterday's checkpoint: today's log must extend it.",
)
@_with(log_key_options)
@click.option(
    "--save",
    type=click.Path(dir_okay=False, path_type=Path),
    help="After success, write the newer checkpoint here (your next trusted one).",
)
@json_option
def prove_consistency_cmd(
    server: str | None,
    ca: Path | None,
    cert: Path | None,
    key_file: Path | None,
    data_dir: Path | None,
    from_file: Path | None,
    trusted_checkpoint: Path,
    log_key: str | None,
    log_key_file: Path | None,
    save: Path | None,
    as_json: bool,
) -> None:
    """Check that the latest checkpoint extends your trusted one (RFC 9162 2.1.4).

    \b
    Example:
      keyquorum audit prove-consistency --server kq.example:7444 --ca ca.crt \\
          --cert auditor.crt --key auditor.key --trusted-checkpoint yesterday.checkpoint
    """
    text = _read_text(trusted_checkpoint, "checkpoint")
    key = _required_key(log_key, log_key_file, _origin_of(text))
    old = _verified(text, key, "your checkpoint")
    with open_source(Conn(server, ca, cert, key_file, data_dir, from_file)) as source:
        _, latest_note = source.latest()
        new = _verified(latest_note, key, "the latest checkpoint")
        proof: list[bytes] = []
        if 0 < old.checkpoint.size < new.checkpoint.size:
            proof, _ = source.consistency(old.checkpoint.size, new.checkpoint.size)
    evidence.require_extends(old.checkpoint, new.checkpoint, proof)
    if save is not None:
        save.write_text(latest_note, encoding="utf-8")
    if as_json:
        emit(
            document(
                "consistency",
                log_key=key,
                old_size=old.checkpoint.size,
                old_root=old.checkpoint.root.hex(),
                new_size=new.checkpoint.size,
                new_root=new.checkpoint.root.hex(),
                proof=[h.hex() for h in proof],
                verified=True,
            )
        )
        return
    click.echo(
        f"consistent: the checkpoint of size {new.checkpoint.size} extends your checkpoint "
        f"of size {old.checkpoint.size} ({len(proof)} proof hashes verified)"
    )


@audit_group.command("receipt")
@click.argument("seq", type=int)
@source_options()
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--size", default=0, help="Tree size of the checkpoint to prove against (0: latest).")
@click.option(
    "--witnessed",
    is_flag=True,
    help="Prove against the latest checkpoint the log's witnesses cosigned (its "
    "cosignatures travel in the receipt); from --server only.",
)
def receipt_cmd(
    seq: int,
    server: str | None,
    ca: Path | None,
    cert: Path | None,
    key_file: Path | None,
    data_dir: Path | None,
    from_file: Path | None,
    out: Path,
    size: int,
    witnessed: bool,
) -> None:
    """Write a portable receipt for entry SEQ (C2SP tlog-proof with the entry as extra).

    The checkpoint in the receipt carries every cosignature stored with it;
    with --witnessed it is the latest one the log's witnesses cosigned.

    \b
    Example:
      keyquorum audit receipt 42 --out entry-42.receipt --server kq.example:7444 \\
          --ca ca.crt --cert auditor.crt --key auditor.key --witnessed
    """
    with open_source(Conn(server, ca, cert, key_file, data_dir, from_file)) as source:
        if witnessed:
            if size or not isinstance(source, RemoteSource):
                raise InvalidInputError("--witnessed asks the daemon (--server), without --size")
            size, _ = source.witnessed()
        proof, entry, note = source.inclusion(seq, size)
    out.write_text(evidence.make_receipt(seq, entry, proof, note), encoding="utf-8")
    click.echo(f"receipt for entry {seq} against the checkpoint of size {_size_of(note)}: {out}")


@audit_group.command("check-receipt")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_with(log_key_options)
@click.option("--cosigner", multiple=True, help="A cosigner (witness) key you trust; repeatable.")
@click.option("--min-cosigners", default=0, show_default=True, help="Cosigners required.")
@json_option
def check_receipt_cmd(
    file: Path,
    log_key: str | None,
    log_key_file: Path | None,
    cosigner: tuple[str, ...],
    min_cosigners: int,
    as_json: bool,
) -> None:
    """Check a receipt offline: signed checkpoint, inclusion proof, the entry itself.

    \b
    Example:
      keyquorum audit check-receipt entry-42.receipt --log-key 'keyquorum/acme-prod+...'
    """
    receipt = evidence.parse_receipt(_read_text(file, "receipt"))
    key = _required_key(log_key, log_key_file, _origin_of(receipt.note))
    verified = evidence.verify_receipt(
        receipt,
        parse_verifier_key(key),
        [parse_verifier_key(c) for c in cosigner],
        min_cosigners=min_cosigners,
    )
    if as_json:
        emit(
            document(
                "receipt-check",
                log_key=key,
                seq=receipt.seq,
                entry=_entry_document(receipt.entry),
                tree_size=verified.checkpoint.size,
                root=verified.checkpoint.root.hex(),
                cosigned_by=sorted(verified.cosigned_by),
                verified=True,
            )
        )
        return
    click.echo(_describe(receipt.entry))
    cos = ", ".join(sorted(verified.cosigned_by)) or "no cosigner you named"
    click.echo(
        f"valid: entry {receipt.seq} is in the log of size {verified.checkpoint.size} "
        f"signed by the log key; cosigned by {cos}"
    )


def _origin_of(note: str) -> str | None:
    """The origin a checkpoint note names on its first line (to look up the pin)."""
    first = note.split("\n", 1)[0]
    return first if first.startswith("keyquorum/") else None


def _required_key(option: str | None, path: Path | None, origin: str | None = None) -> str:
    """The log key: given (and pinned for its deployment), or one given here before.

    A given key that differs from the pinned one is refused, naming both,
    unless this machine followed the log's rotations from it to the pinned
    one (`audit verify` over the log, or a custodian's CLI, each checking
    every rotation was signed by the key before): then the key in force is
    used, and said. A key this machine took on first contact (a custodian's
    CLI) is no key you gave.
    """
    key = pinned_log_key(option, path)
    if key is not None:
        name = parse_verifier_key(key).name
        if name.startswith("keyquorum/"):  # a deployment's key: pinned for it
            deployment = seen_checkpoints.deployment_of(name)
            seen = seen_checkpoints.load(deployment)
            if seen is not None and seen.log_key != key and key in seen.superseded_keys:
                click.echo(
                    f"note: the log key you gave was rotated; this machine followed the "
                    f"rotations signed key by key to {seen.log_key}, which is used",
                    err=True,
                )
                if not seen.key_given:
                    seen_checkpoints.save(dataclasses.replace(seen, key_given=True))
                return seen.log_key
            seen_checkpoints.pin_key(deployment, key, given=True)
        return key
    if origin is not None:
        seen = seen_checkpoints.load(seen_checkpoints.deployment_of(origin))
        if seen is not None and seen.key_given:
            return seen.log_key
    raise InvalidInputError(
        "give the log key you trust: --log-key or --log-key-file (it is pinned for the "
        "deployment from then on)"
    )


# -- cosigning -------------------------------------------------------------------------------


@audit_group.command("keygen")
@click.option("--name", required=True, help="Cosigner key name, e.g. auditor.example/alice.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
def keygen_cmd(name: str, out: Path) -> None:
    """Make a C2SP cosignature key; prints the verifier key to give the operator.

    \b
    Example:
      keyquorum audit keygen --name auditor.example/alice --out alice.cosigner
    """
    signer = NoteSigner.generate(name, sig_type=SignatureType.COSIGNATURE_V1)
    with signer.export_seed() as seed:
        body = f"{KEY_FILE_HEADER}\nname {name}\nseed {base64.b64encode(seed.view()).decode()}\n"
    try:
        fd = out.open("x", encoding="ascii")
    except FileExistsError as e:
        raise StateError(f"refusing to overwrite {out}") from e
    with fd:
        out.chmod(0o600)
        fd.write(body)
    out.with_name(out.name + ".vkey").write_text(signer.verifier_key() + "\n")
    click.echo(signer.verifier_key())


def load_cosigner(path: Path) -> NoteSigner:
    lines = _read_text(path, "cosigner key").split("\n")
    if len(lines) != 4 or lines[0] != KEY_FILE_HEADER or lines[3] != "":
        raise DeserializationError(f"{path} is not a keyquorum cosigner key file")
    if not lines[1].startswith("name ") or not lines[2].startswith("seed "):
        raise DeserializationError(f"{path} is not a keyquorum cosigner key file")
    try:
        raw = base64.b64decode(lines[2][len("seed ") :], validate=True)
    except binascii.Error as e:
        raise DeserializationError(f"{path}: the seed is not base64") from e
    with SecretBytes(raw, label="cosigner seed") as seed:
        return NoteSigner(lines[1][len("name ") :], seed, SignatureType.COSIGNATURE_V1)


@audit_group.command("cosign")
@source_options(allow_file=False)
@click.option(
    "--signing-key",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Your cosigner key file (audit keygen).",
)
@click.option(
    "--trusted-checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The last checkpoint you cosigned: the new one must extend it.",
)
@_with(log_key_options)
@click.option("--now", type=int, help="Cosignature time (Unix seconds); default: now.")
def cosign_cmd(
    server: str | None,
    ca: Path | None,
    cert: Path | None,
    key_file: Path | None,
    data_dir: Path | None,
    signing_key: Path,
    trusted_checkpoint: Path | None,
    log_key: str | None,
    log_key_file: Path | None,
    now: int | None,
) -> None:
    """Check the latest checkpoint extends yours, cosign it, and send the cosignature.

    \b
    Example:
      keyquorum audit cosign --server kq.example:7444 --ca ca.crt --cert auditor.crt \\
          --key auditor.key --signing-key alice.cosigner \\
          --trusted-checkpoint yesterday.checkpoint
    """
    import time

    if server is None:
        raise InvalidInputError("cosigning sends the cosignature to the daemon: give --server")
    signer = load_cosigner(signing_key)
    with open_source(Conn(server, ca, cert, key_file, data_dir, None)) as source:
        assert isinstance(source, RemoteSource)
        _, note = source.latest()
        key = _required_key(log_key, log_key_file, _origin_of(note))
        new = _verified(note, key, "the latest checkpoint").checkpoint
        if trusted_checkpoint is not None:
            old = _verified(_read_text(trusted_checkpoint, "checkpoint"), key, "your checkpoint")
            proof: list[bytes] = []
            if 0 < old.checkpoint.size < new.size:
                proof, _ = source.consistency(old.checkpoint.size, new.size)
            evidence.require_extends(old.checkpoint, new, proof)
        when = int(time.time()) if now is None else now
        cosigned = cosign_checkpoint(note, parse_verifier_key(key), signer, when)
        merged = source.add_cosignature(cosigned)
    if trusted_checkpoint is not None:
        trusted_checkpoint.write_text(merged, encoding="utf-8")
    click.echo(merged, nl=False)
    click.echo(f"cosigned the checkpoint of size {new.size} as {signer.name}", err=True)


# -- the demo's last act -----------------------------------------------------------------------


def run_audit_demo_steps(
    work_dir: Path,
    data_dir: Path,
    *,
    log_key: str | None = None,
    step: Callable[[str], None] | None = None,
    witnesses: int = 0,
) -> None:
    """Export the demo's log, verify it, then flip one byte of a copy and verify again.

    For `keyquorum demo` (it calls this at the end). Runs the real commands
    in this process, echoing each. The log key is pinned from the daemon's
    key file in `data_dir` unless given. Raises `click.ClickException` if
    the intact export does not verify or the tampered one does.
    """
    from keyquorum.hsm.daemon.logkey import LogKey

    def heading(text: str) -> None:
        if step is not None:
            step(text)
        else:
            click.secho(f"\n== {text}", bold=True)

    key = log_key if log_key is not None else LogKey.load(data_dir).vkey
    exported = work_dir / "demo-log.kqexport"
    tampered = work_dir / "demo-log-tampered.kqexport"
    heading("The auditor exports the log (offline, from the data directory)")
    _demo_run(["audit", "export", "--data-dir", str(data_dir), "--out", str(exported)], 0)
    heading(
        "The auditor verifies it: the daemon's own replay, then the report"
        + (f" (cosigned by {witnesses} of the log's witnesses)" if witnesses else "")
    )
    extra = ["--witnesses", str(witnesses)] if witnesses else []
    _demo_run(["audit", "verify", str(exported), "--log-key", key, *extra], 0)
    heading("One byte of a copy flipped: the verifier names the entry")
    seq = flip_one_byte(exported, tampered)
    click.echo(f"(flipped one byte inside entry {seq} of {tampered.name})")
    _demo_run(["audit", "verify", str(tampered), "--log-key", key], 1)


def flip_one_byte(src: Path, dst: Path) -> int:
    """Copy an export, flipping one bit of one byte of the middle entry; returns its seq.

    The byte is a digit of the entry's `time`, so the result is still
    canonical JSON and still base64: only the verifier can tell.
    """
    parsed = read_export(src)
    entries = list(parsed.entries)
    seq = len(entries) // 2
    raw = bytearray(entries[seq])
    at = raw.index(b'"time":') + len(b'"time":') + 3
    raw[at] ^= 0x01
    entries[seq] = bytes(raw)
    _write_atomically(dst, export.produce(entries, parsed.checkpoints))
    return seq


def _demo_run(args: list[str], expected: int) -> None:
    from keyquorum.cli.main import main

    click.secho("$ keyquorum " + " ".join(shlex.quote(a) for a in args), fg="cyan")
    code: int | str | None = 0
    try:
        main.main(args, prog_name="keyquorum", standalone_mode=False)
    except SystemExit as e:
        code = e.code
    except KeyquorumError as e:
        click.echo(f"error: {e}", err=True)
        code = 1
    if (code or 0) != expected:
        raise click.ClickException(f"`keyquorum {args[0]} {args[1]}` exited {code}, not {expected}")


@audit_group.command("witness")
@source_options(allow_file=False)
@click.option(
    "--signing-key",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="This witness's cosigner key file (audit keygen); the quorum adds its verifier key "
    "to the log (proposal new add-witness).",
)
@click.option(
    "--state",
    "state_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="This witness's state: the log key it follows and the last checkpoint it cosigned.",
)
@_with(log_key_options)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds between two looks at the log.",
)
@click.option("--once", is_flag=True, help="Look once, cosign if due, and exit.")
def witness_cmd(
    server: str | None,
    ca: Path | None,
    cert: Path | None,
    key_file: Path | None,
    data_dir: Path | None,
    signing_key: Path,
    state_file: Path,
    log_key: str | None,
    log_key_file: Path | None,
    interval: float,
    once: bool,
) -> None:
    """Run a witness: cosign each new checkpoint that extends the last one cosigned.

    Polls the daemon's audit service; a checkpoint that does not extend
    the last one this witness cosigned (a rollback, or another history: a
    split view) is refused with both notes as evidence, and the witness
    exits 1 so that someone looks. The first run needs the log key
    (--log-key); the state file keeps it, and follows its rotations.

    \b
    Example:
      keyquorum audit witness --server kq.example:7444 --ca ca.crt --cert w1.crt \\
          --key w1.key --signing-key w1.cosigner --state w1.state --log-key 'keyquorum/...'
    """
    import time

    from keyquorum.cli import witness as w

    if server is None:
        raise InvalidInputError("a witness reads the daemon's audit service: give --server")
    signer = load_cosigner(signing_key)
    given = _log_key(log_key, log_key_file)
    state = w.load_state(state_file)
    if state is None:
        if given is None:
            raise InvalidInputError("the first run of a witness needs --log-key")
        state = w.WitnessState(given)
        w.save_state(state_file, state)
    elif given is not None and given != state.log_key:
        raise VerificationError(
            f"you gave log key {given}, but this witness follows {state.log_key} "
            f"({state_file}): refusing"
        )

    def remember(new: w.WitnessState) -> None:
        w.save_state(state_file, new)

    with open_source(Conn(server, ca, cert, key_file, data_dir, None)) as source:
        assert isinstance(source, RemoteSource)
        while True:
            try:
                state, cosigned = w.step(source, signer, state, int(time.time()), remember)
            except (RollbackError, ForkError) as e:
                for line in w.refusal_lines(e):
                    click.echo(line, err=True)
                sys.exit(1)
            except KeyquorumError as e:
                if once:
                    raise
                click.echo(f"witness: {e}; trying again in {interval:g} s", err=True)
            else:
                if cosigned is not None:
                    click.echo(f"cosigned the checkpoint of size {cosigned.size} as {signer.name}")
            if once:
                return
            time.sleep(interval)

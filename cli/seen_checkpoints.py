"""What this machine knows of each deployment's log, and the checks that use it.

A daemon (or a database administrator, or an operator holding its data
directory) could show a custodian another log: one restored from a
snapshot, from before a seal, a revocation or their own approval; one
rebuilt under a new log key; or one history to the custodians and another
to the auditors (a split view). The custodian's machine is outside the
daemon's reach, so the CLI keeps, per deployment:

- the **log key**, pinned on first contact (`ceremony init`, or the first
  command against the deployment). It changes only by following a
  `rotate-log-key` entry signed by the pinned key and naming the new one;
  a daemon answering with any other key is refused, naming both keys.
- the **last checkpoint** it saw, including the entry of every action this
  custodian took (`remember_entry`: the checkpoint that includes the
  confirmation, the unseal, the approval, the refusal, the seal, the
  genesis of a ceremony, with an RFC 9162 inclusion proof). A log that
  does not extend it (`evidence.require_extends_notes`: not shorter, the
  consistency proof verifies) is refused as a rollback, with both notes
  as evidence.
- the **witness changes** it saw (`add-witness` / `remove-witness`
  entries, proven included): the witness set and threshold m follow from
  them, and a daemon that later leaves one out is refused.

Before a custodian signs anything but a seal, the log must be covered, up
to the entry the statement is about, by a checkpoint m witnesses of the
log's policy cosigned (`Checked.require_witnessed`): a checkpoint no
independent party has seen is not signed over. A seal is never held back
by witnesses.

Where: `$XDG_CONFIG_HOME/keyquorum/checkpoints/<deployment>.json` (default
`~/.config/keyquorum/...`), mode 0600, RFC 8785 JSON
`{"v": 2, "deployment", "log_key", "checkpoint", "witness_entries",
"key_given"}` (`key_given`: the key was given by a person, `audit ...
--log-key`, not only taken on first contact; `audit verify` calls a log
VERIFIED only against such a key). To
start over for a deployment (a new ceremony under the same name), remove
its file: the refusal names it.

A log shorter than the remembered checkpoint is accepted in one case only:
a store restored from a snapshot with the custodians' consent
(`approve-restore`, hsm/daemon/restoring.py). The log must show, proven
included in its checkpoint, an executed `approve-restore` that abandons a
checkpoint at least as large as the remembered one (the same root if the
same size) and keeps no more entries than the log now has; then the new
checkpoint is remembered and a warning names both. A custodian deciding
on that very proposal (`custodian approve|refuse ID`, `deciding_on`) may
follow the shorter log before it executes, without remembering it.

Limits: the witness policy a CLI has never seen is learnt from the daemon
(entries proven in the log, but the daemon could leave out one the CLI
never saw); from then on a weaker one is refused.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import click

from keyquorum.cli.connect import rpc_errors
from keyquorum.quorum import canonical, evidence, merkle
from keyquorum.quorum.checkpoint import (
    Checkpoint,
    NoteVerifier,
    parse_verifier_key,
    unverified_size,
    verify_checkpoint,
)
from keyquorum.quorum.errors import (
    DeserializationError,
    ForkError,
    InvalidInputError,
    KeyquorumError,
    LogIntegrityError,
    RollbackError,
    StorageError,
    ThresholdError,
    VerificationError,
    with_context,
)
from keyquorum.quorum.log import Entry, ExecutionPayload, ProposalPayload, log_signature_message
from keyquorum.quorum.operations import LogKeyRotated, RestoreApproved, WitnessChanged
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc

VERSION: Final = 2
_DEPLOYMENT = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: A remembered file holds a few notes and keys; anything larger is not ours.
MAX_FILE_BYTES: Final = 262_144
#: Seconds between two looks while waiting for witnesses.
WITNESS_POLL_SECONDS: Final = 1.0


@dataclass(frozen=True)
class Seen:
    """What this machine remembers of one deployment's log."""

    deployment: str
    log_key: str
    checkpoint: str
    #: (seq, leaf hash hex) of every witness change seen, in log order.
    witness_entries: tuple[tuple[int, str], ...] = ()
    #: The key was given by a person (`audit ... --log-key`), or follows by
    #: rotations from one that was; False: taken on first contact.
    key_given: bool = False
    #: Keys this machine followed away from, oldest first: each was rotated to
    #: the next by a `rotate-log-key` entry it signed, checked here.
    superseded_keys: tuple[str, ...] = ()

    def followed(self, keys: Sequence[str]) -> tuple[str, ...]:
        """`superseded_keys` after following the log keys `keys`, in order, the one in
        force last (each rotated to the next by an entry it signed, checked)."""
        return tuple(dict.fromkeys([*self.superseded_keys, *keys[:-1]]))


@dataclass(frozen=True)
class Checked:
    """A daemon's log as this CLI verified it: the checkpoint, the witnessed one."""

    deployment: str
    log_key: str
    checkpoint: Checkpoint
    note: str
    #: The latest checkpoint m witnesses in force cosigned (None: none yet).
    witnessed: Checkpoint | None
    witnesses: tuple[str, ...]
    witness_threshold: int
    #: The entry asked for (`include_seq`), proven included in `checkpoint`.
    included: bytes | None = None

    def require_witnessed(self, size: int) -> None:
        """Refuse to sign unless m witnesses cosigned a checkpoint of at least `size`."""
        if self.witness_threshold == 0:
            return
        have = 0 if self.witnessed is None else self.witnessed.size
        if have < size:
            raise ThresholdError(
                f"refusing to sign: deployment {self.deployment} requires {self.witness_threshold} "
                f"witness cosignature(s), and no checkpoint they cosigned covers entry "
                f"{size - 1} yet (the latest witnessed covers {have} entries of "
                f"{self.checkpoint.size}); wait for the witnesses, or ask whether they still run"
            )


def directory() -> Path:
    """`$XDG_CONFIG_HOME/keyquorum/checkpoints`, `~/.config/...` when unset or relative."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "keyquorum" / "checkpoints"


def path_for(deployment: str) -> Path:
    if not _DEPLOYMENT.fullmatch(deployment):
        raise InvalidInputError(f"the daemon names a deployment {deployment!r} that is not valid")
    return directory() / f"{deployment}.json"


def load(deployment: str) -> Seen | None:
    """What this machine remembers of `deployment`, if anything."""
    path = path_for(deployment)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e}") from e
    if len(raw) > MAX_FILE_BYTES:
        raise DeserializationError(f"{path} is too large to be a remembered checkpoint")
    obj = canonical.decode(raw)
    keys = {"v", "deployment", "log_key", "checkpoint", "witness_entries", "key_given"}
    if isinstance(obj, dict):  # written before keys were followed: none superseded yet
        obj.setdefault("superseded_keys", [])
    keys.add("superseded_keys")
    if (
        not isinstance(obj, dict)
        or obj.get("v") != VERSION
        or set(obj) != keys
        or obj["deployment"] != deployment
        or not isinstance(obj["log_key"], str)
        or not isinstance(obj["checkpoint"], str)
        or not isinstance(obj["witness_entries"], list)
        or not isinstance(obj["key_given"], bool)
        or not isinstance(obj["superseded_keys"], list)
        or not all(isinstance(k, str) for k in obj["superseded_keys"])
    ):
        raise DeserializationError(f"{path} is not what this machine remembers of {deployment}")
    entries: list[tuple[int, str]] = []
    for item in obj["witness_entries"]:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], int)
            or not isinstance(item[1], str)
        ):
            raise DeserializationError(f"{path}: a witness entry is not [seq, hash]")
        entries.append((item[0], item[1]))
    return Seen(
        deployment,
        obj["log_key"],
        obj["checkpoint"],
        tuple(entries),
        obj["key_given"],
        tuple(obj["superseded_keys"]),
    )


def save(seen: Seen) -> None:
    """Remember `seen` (0600 file in a 0700 directory, replaced atomically)."""
    path = path_for(seen.deployment)
    data = canonical.encode(
        {
            "v": VERSION,
            "deployment": seen.deployment,
            "log_key": seen.log_key,
            "checkpoint": seen.checkpoint,
            "witness_entries": [[seq, digest] for seq, digest in seen.witness_entries],
            "key_given": seen.key_given,
            "superseded_keys": list(seen.superseded_keys),
        }
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except OSError as e:
        raise StorageError(f"cannot remember the checkpoint in {path}: {e}") from e


def deployment_of(origin: str) -> str:
    """The deployment a checkpoint origin or log key name (`keyquorum/<deployment>`) names."""
    prefix = "keyquorum/"
    if not origin.startswith(prefix) or not _DEPLOYMENT.fullmatch(origin[len(prefix) :]):
        raise InvalidInputError(f"{origin!r} is not a keyquorum deployment's log")
    return origin[len(prefix) :]


def pin_key(deployment: str, log_key: str, *, given: bool = False) -> None:
    """Pin `log_key` for `deployment` on first contact; refuse another one, naming both.

    `given`: a person gave the key (`--log-key`), which confirms a pin
    taken on first contact.
    """
    seen = load(deployment)
    if seen is None:
        if not given:  # a key the person gave needs no announcement
            click.echo(
                f"note: pinning the log key of deployment {deployment} on first contact: {log_key}",
                err=True,
            )
        save(Seen(deployment, log_key, "", key_given=given))
        return
    refuse_other_key(seen, log_key)
    if given and not seen.key_given:
        save(dataclasses.replace(seen, key_given=True))


def refuse_other_key(seen: Seen, log_key: str) -> None:
    if seen.log_key != log_key:
        raise VerificationError(
            f"deployment {seen.deployment} answers with log key {log_key}, but this machine "
            f"pinned {seen.log_key} ({path_for(seen.deployment)}) and no rotation signed by it "
            "leads there: refusing (a log rebuilt under another key?)"
        )


# -- following the log key -------------------------------------------------------------------


def _proven(item: pb.ProvenEntry, cp: Checkpoint) -> Entry:
    evidence.require_included(item.seq, item.entry, list(item.proof), cp)
    return Entry.from_bytes(item.entry)


def follow_rotations(
    pinned: str, current: str, rotations: Sequence[pb.ProvenEntry], cp: Checkpoint, after: int
) -> list[tuple[int, str]]:
    """The chain of log keys from `pinned` to `current` (what signs from which size).

    Each rotation at seq >= `after` (the size this machine saw under
    `pinned`) must be included in `cp`, name the key before it as its
    previous key, and be signed by that key; the chain must end at
    `current`. A machine that pinned a key without seeing a checkpoint
    (`after` 0) may have pinned it mid-chain: the rotations up to the one
    that put it in force are before its time and skipped. Returns
    [(first size it signs, key), ...] starting with the pinned key.
    """
    chain = [(0, pinned)]
    key = pinned
    last = -1
    started = after > 0
    for item in rotations:
        entry = _proven(item, cp)
        if entry.seq <= last:
            raise LogIntegrityError("the rotations are not in log order", seq=entry.seq)
        last = entry.seq
        payload = entry.payload
        if not isinstance(payload, ExecutionPayload) or not isinstance(
            payload.result, LogKeyRotated
        ):
            raise LogIntegrityError("a rotation the daemon sent is not one", seq=entry.seq)
        if entry.seq < after:
            continue
        if not started:
            if payload.result.log_key == pinned:
                started = True  # the rotation that put the pinned key in force
                continue
            if payload.result.previous_log_key != pinned:
                continue  # before the pinned key's time
            started = True
        if payload.result.previous_log_key != key or payload.log_signature is None:
            raise VerificationError(
                f"entry {entry.seq} rotates the log key from {payload.result.previous_log_key}, "
                f"not from {key}, the key this machine follows"
            )
        parse_verifier_key(key).verify_message(log_signature_message(entry), payload.log_signature)
        key = payload.result.log_key
        chain.append((entry.seq + 1, key))
    if key != current:
        raise VerificationError(
            f"the daemon's log key is {current}, but this machine pinned {pinned} and the "
            f"rotations it shows lead to {key}: refusing (a log rebuilt under another key?)"
        )
    return chain


def _key_at(chain: Sequence[tuple[int, str]], size: int) -> NoteVerifier:
    key = chain[0][1]
    for first, vkey in chain:
        if first <= size:
            key = vkey
    return parse_verifier_key(key)


# -- the witness policy --------------------------------------------------------------------


def witness_policy(
    changes: Sequence[pb.ProvenEntry], cp: Checkpoint, seen: Sequence[tuple[int, str]]
) -> tuple[tuple[str, ...], int, tuple[tuple[int, str], ...]]:
    """The witnesses and m in force at `cp`, from the witness changes proven in it.

    Every change this machine saw before must be among them (a daemon may
    not leave one out). Returns (witnesses, m, the changes as remembered).
    """
    witnesses: list[str] = []
    threshold = 0
    remembered: list[tuple[int, str]] = []
    last = -1
    for item in changes:
        entry = _proven(item, cp)
        if entry.seq <= last:
            raise LogIntegrityError("the witness changes are not in log order", seq=entry.seq)
        last = entry.seq
        payload = entry.payload
        if not isinstance(payload, ExecutionPayload) or not isinstance(
            payload.result, WitnessChanged
        ):
            raise LogIntegrityError("a witness change the daemon sent is not one", seq=entry.seq)
        result = payload.result
        if payload.operation == "add-witness":
            witnesses.append(result.witness)
        elif result.witness in witnesses:
            witnesses.remove(result.witness)
        threshold = result.witness_threshold
        remembered.append((entry.seq, merkle.leaf_hash(item.entry).hex()))
    missing = sorted(set(seen) - set(remembered))
    if missing:
        raise RollbackError(
            f"the daemon no longer shows the witness change at entry {missing[0][0]} this "
            "machine saw: another history"
        )
    return tuple(witnesses), threshold, tuple(remembered)


def _witnessed(
    extension: pb.LogExtension,
    current: Checkpoint,
    chain: Sequence[tuple[int, str]],
    witnesses: Sequence[str],
    threshold: int,
) -> Checkpoint | None:
    """The witnessed checkpoint, if m of `witnesses` cosigned it and `current` extends it."""
    if threshold == 0:
        return current
    note = extension.witnessed_checkpoint
    if not note:
        return None
    cosigners = [parse_verifier_key(w) for w in witnesses]
    try:
        size = unverified_size(note)
        verified = verify_checkpoint(note, _key_at(chain, size), cosigners)
    except KeyquorumError:
        # Not checkable here (say, signed under a key before this machine's
        # pin): as good as no witnessed checkpoint.
        return None
    if len(verified.cosigned_by) < threshold:
        return None
    # The witnessed checkpoint and the latest are one history.
    evidence.require_extends(verified.checkpoint, current, list(extension.witnessed_proof))
    return verified.checkpoint


# -- the check ----------------------------------------------------------------------------------


def require_extension(
    stub: pb_grpc.CustodianServiceStub,
    *,
    include_seq: int | None = None,
    deciding_on: str | None = None,
) -> Checked | None:
    """Refuse a daemon whose log this machine cannot follow; remember where it is now.

    0. the daemon's deployment and log key in force (`GetStatus`); nothing
       to check before its ceremony (None);
    1. its checkpoint, proofs, rotations and witness changes
       (`GetLogExtension`, from the size remembered);
    2. the log key: the pinned one (pinned now on first contact), or
       reached from it by rotations each signed by the key before
       (`follow_rotations`); any other key is refused, naming both;
    3. the checkpoint is signed by the key in force, and the log extends
       the remembered checkpoint (RFC 9162 consistency proof), else a
       rollback with both notes as evidence;
    4. the witness policy (`witness_policy`) and the latest checkpoint m
       witnesses cosigned, which the checkpoint extends;
    5. the entry asked for is included;
    6. remember the checkpoint, the key and the witness changes.

    A shorter log passes 3 only with the quorum's `approve-restore` (module
    docstring); `deciding_on` is the proposal id the custodian is deciding on.
    """
    # 0. Which log.
    with rpc_errors():
        status = stub.GetStatus(pb.GetStatusRequest())
    if not status.initialized:
        return None
    deployment = status.deployment
    current_key = status.log_key
    if parse_verifier_key(current_key).name != f"keyquorum/{deployment}":
        raise InvalidInputError(
            f"the daemon's log key {current_key!r} is not deployment {deployment}'s"
        )
    seen = load(deployment)
    if seen is None:
        click.echo(
            f"note: pinning the log key of deployment {deployment} on first contact: {current_key}",
            err=True,
        )
        seen = Seen(deployment, current_key, "")
    pinned = parse_verifier_key(seen.log_key)
    first = 0
    if seen.checkpoint:
        first = verify_checkpoint(seen.checkpoint, pinned).checkpoint.size
    # 1. The extension.
    request = pb.GetLogExtensionRequest(first_size=first)
    if include_seq is not None:
        request.include_seq = include_seq
    with rpc_errors():
        extension = stub.GetLogExtension(request)
    # 2-3. The key chain, then the checkpoint and its extension of what was seen.
    claimed = verify_checkpoint(extension.checkpoint, parse_verifier_key(current_key)).checkpoint
    if seen.log_key != current_key:
        chain = follow_rotations(
            seen.log_key, current_key, list(extension.rotations), claimed, first
        )
    else:
        chain = [(0, current_key)]
    remember = True
    if seen.checkpoint:
        try:
            current = evidence.require_extends_notes(
                seen.checkpoint,
                extension.checkpoint,
                list(extension.proof),
                pinned,
                parse_verifier_key(current_key),
            )
        except (RollbackError, ForkError) as refused:
            remembered = verify_checkpoint(seen.checkpoint, pinned).checkpoint
            going_back = _approved_going_back(stub, remembered, claimed, current_key, deciding_on)
            if going_back is None:
                raise with_context(
                    refused, "no approve-restore of the custodians abandons the checkpoint you saw"
                ) from None
            approved, remember = going_back
            current = claimed
            # Witness changes of the abandoned part are gone with it.
            kept = tuple(e for e in seen.witness_entries if e[0] < approved.restored_size)
            seen = dataclasses.replace(seen, checkpoint="", witness_entries=kept)
    else:
        current = claimed
    # 4. Witnesses.
    witnesses, threshold, changes = witness_policy(
        list(extension.witness_changes), current, seen.witness_entries
    )
    witnessed = _witnessed(extension, current, chain, witnesses, threshold)
    # 5. The entry asked for.
    included = None
    if include_seq is not None:
        if not extension.HasField("included") or extension.included.seq != include_seq:
            raise LogIntegrityError("the daemon did not prove the entry asked for", seq=include_seq)
        _proven(extension.included, current)
        included = extension.included.entry
    # 6. Remembered.
    if remember:
        save(
            Seen(
                deployment,
                current_key,
                extension.checkpoint,
                changes,
                seen.key_given,
                seen.followed([key for _, key in chain]),
            )
        )
    return Checked(
        deployment=deployment,
        log_key=current_key,
        checkpoint=current,
        note=extension.checkpoint,
        witnessed=witnessed,
        witnesses=witnesses,
        witness_threshold=threshold,
        included=included,
    )


def _approved_going_back(
    stub: pb_grpc.CustodianServiceStub,
    remembered: Checkpoint,
    claimed: Checkpoint,
    current_key: str,
    deciding_on: str | None,
) -> tuple[RestoreApproved, bool] | None:
    """The approve-restore that lets this log leave `remembered`; whether it executed.

    An executed one anywhere in the log, or the pending one the custodian
    decides on now; each proven included in the daemon's checkpoint. It
    must restore to fewer entries than the remembered checkpoint has (a
    checkpoint within the restored part must still be extended) and abandon
    at least as many (the same root if as many). None: no such approval.
    """
    with rpc_errors():
        listed = stub.ListProposals(pb.ListProposalsRequest(include_closed=True))
    for proposal in listed.proposals:
        if proposal.operation != "approve-restore":
            continue
        executed = proposal.executed_seq > 0
        if not executed and proposal.id != deciding_on:
            continue
        seq = proposal.executed_seq if executed else proposal.log_position
        with rpc_errors():
            extension = stub.GetLogExtension(
                pb.GetLogExtensionRequest(first_size=0, include_seq=seq)
            )
        served = verify_checkpoint(extension.checkpoint, parse_verifier_key(current_key))
        if served.checkpoint.size < claimed.size or not extension.HasField("included"):
            continue
        entry = _proven(extension.included, served.checkpoint)
        approved = _restore_in(entry, executed)
        if approved is None:
            continue
        if not approved.restored_size < remembered.size <= approved.abandoned_size:
            continue
        if (
            approved.abandoned_size == remembered.size
            and approved.abandoned_root != remembered.root.hex()
        ):
            continue
        if approved.restored_size > claimed.size:
            continue
        click.echo(
            f"warning: the log went back from the checkpoint of {remembered.size} entries you "
            f"saw to {approved.restored_size} restored entries: the custodians' approve-restore "
            f"(proposal {proposal.id}) {'approved' if executed else 'asks to approve'} "
            f"abandoning the checkpoint of {approved.abandoned_size} entries",
            err=True,
        )
        return approved, executed
    return None


def _restore_in(entry: Entry, executed: bool) -> RestoreApproved | None:
    """What an approve-restore entry (its execution, or its proposal) names."""
    payload = entry.payload
    if executed:
        if isinstance(payload, ExecutionPayload) and isinstance(payload.result, RestoreApproved):
            return payload.result
        return None
    if not isinstance(payload, ProposalPayload) or payload.operation != "approve-restore":
        return None
    values = dict(payload.parameters)
    try:
        return RestoreApproved.from_json(values, "parameters")
    except DeserializationError:
        return None


def require_witnessed(
    stub: pb_grpc.CustodianServiceStub,
    size: int,
    *,
    wait: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
    deciding_on: str | None = None,
) -> Checked | None:
    """`require_extension`, then m witnesses' cosignatures over the first `size` entries.

    Waits up to `wait` seconds for the witnesses to cosign (they poll the
    log), checking the whole extension again each time.
    """
    deadline = time.monotonic() + wait
    while True:
        checked = require_extension(stub, deciding_on=deciding_on)
        if checked is None:
            return None
        try:
            checked.require_witnessed(size)
        except ThresholdError:
            if time.monotonic() >= deadline:
                raise
            sleep(WITNESS_POLL_SECONDS)
            continue
        return checked


def remember_entry(
    stub: pb_grpc.CustodianServiceStub,
    seq: int,
    is_mine: Callable[[Entry], bool],
    *,
    deciding_on: str | None = None,
) -> Checked:
    """After an action: the checkpoint including the entry it caused, remembered.

    The entry at `seq` must be included in the daemon's checkpoint (which
    extends what this machine saw) and be the one this custodian caused
    (`is_mine`); from now on a log without it is refused as a rollback.
    """
    checked = require_extension(stub, include_seq=seq, deciding_on=deciding_on)
    if checked is None or checked.included is None:
        raise LogIntegrityError("the daemon shows no log after this action", seq=seq)
    try:
        entry = Entry.from_bytes(checked.included)
    except KeyquorumError as e:
        raise LogIntegrityError(f"the entry of this action is malformed: {e}", seq=seq) from e
    if not is_mine(entry):
        raise LogIntegrityError(
            f"entry {seq}, which the daemon says records this action, records something else",
            seq=seq,
        )
    return checked

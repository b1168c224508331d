"""Unseal as custodians follow it: who has submitted, when the session ends, each replica.

`custodian unseal` and `custodian unseal --reset` run here, over one or
several replicas. Each replica is handled on its own: one that cannot be
reached, refuses, or is already unsealed is reported, and the others still
get the share (or the reset); the passphrase is asked once. The exit code
says how it went (`EXIT_*`): every replica done, none, or some.

A session that ended without unsealing since the last one (it expired
with shares in it, a custodian reset it, or a seal ended it) is said
plainly to the next custodian, with when it started, who submitted first
and when it ended, instead of a silent fresh start. Times are UTC
(`statements.render_time`); custodians appear as `people.label` shows them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import click

from keyquorum.cli import custodian_actions as actions
from keyquorum.cli import display, seen_checkpoints
from keyquorum.cli.connect import Endpoint, open_channel, rpc_errors
from keyquorum.cli.sessions import ended_text, submitted_text
from keyquorum.quorum.credentials import CustodianCredential, PublicCredential
from keyquorum.quorum.errors import KeyquorumError, NotOnRosterError
from keyquorum.quorum.log import Entry, UnsealPayload, UnsealResetPayload
from keyquorum.quorum.statements import Statement, render_time
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc

#: Every replica accepted the share (or the reset), or was already unsealed.
EXIT_DONE: Final = 0
#: Nothing was done on any replica (the one error line says why).
EXIT_FAILED: Final = 1
#: Some replicas were done and some not: the lines above say which.
EXIT_PARTIAL: Final = 3

Unlock = Callable[[str], CustodianCredential]


@dataclass
class _Replica:
    endpoint: Endpoint
    name: str = ""
    #: What happened, one line; `done` when the share (or reset) went through.
    outcome: str = ""
    done: bool = False
    statement: Statement | None = None
    requested_at: int = 0

    @property
    def where(self) -> str:
        return (
            f"{self.endpoint.target} (replica {self.name})" if self.name else self.endpoint.target
        )


def _finish(replicas: Sequence[_Replica], *, many: bool) -> None:
    """Print each replica's outcome (several replicas) and exit with the code it comes to."""
    if not many:
        return
    click.echo("result by replica:")
    for rep in replicas:
        click.echo(f"  {rep.where}: {rep.outcome}")
    done = sum(rep.done for rep in replicas)
    if done == len(replicas):
        return
    if done == 0:
        click.echo(f"nothing done on any of the {len(replicas)} replicas", err=True)
        raise SystemExit(EXIT_FAILED)
    click.echo(
        f"PARTIAL: done on {done} of {len(replicas)} replicas; run the command again for "
        "the others once they can be reached",
        err=True,
    )
    raise SystemExit(EXIT_PARTIAL)


def _attempt(
    rep: _Replica, many: bool, step: Callable[[pb_grpc.CustodianServiceStub], None]
) -> None:
    """Run `step` on the replica's own channel; with several replicas a failure is noted."""
    try:
        with open_channel(rep.endpoint) as channel:
            step(pb_grpc.CustodianServiceStub(channel))
    except KeyquorumError as e:
        if not many:
            raise
        rep.outcome = f"FAILED: {e}"
        click.echo(f"{rep.where}: {e}", err=True)


def _on_roster(status: pb.Status, public: PublicCredential) -> None:
    """Refuse before anything is opened or signed when this custodian is not on the roster."""
    if status.initialized and all(c.fingerprint != public.fingerprint for c in status.roster):
        raise NotOnRosterError(
            f"{public.label} is not on the roster of deployment {status.deployment}"
        )


def unseal(
    endpoints: Sequence[Endpoint],
    public: PublicCredential,
    unlock: Unlock,
    *,
    witness_wait: float,
    show_signing: Callable[[str], None],
) -> None:
    """`custodian unseal`: the share to each replica's own session (module docstring)."""
    many = len(endpoints) > 1
    replicas = [_Replica(e) for e in endpoints]
    ready: list[_Replica] = []
    lines: list[str] = []

    for rep in replicas:

        def prepare(stub: pb_grpc.CustodianServiceStub, rep: _Replica = rep) -> None:
            with rpc_errors():
                status = stub.GetStatus(pb.GetStatusRequest())
            rep.name = status.replica
            if status.initialized and not status.sealed:
                rep.outcome, rep.done = "already unsealed; nothing to do", True
                click.echo(f"{rep.where}: already unsealed; nothing to do")
                return
            _on_roster(status, public)
            seen_checkpoints.require_extension(stub)
            with rpc_errors():
                session = stub.OpenUnsealSession(pb.OpenUnsealSessionRequest())
            seen_checkpoints.require_witnessed(stub, session.log_size, wait=witness_wait)
            rep.name = session.replica
            # What a custodian follows goes with the prompt (stderr); stdout is the result.
            if session.HasField("previous") and session.created:
                click.echo(
                    f"{rep.where}: {ended_text(session.previous)}; starting a new one", err=True
                )
            elif not session.created:
                click.echo(
                    f"{rep.where}: joining unseal session {session.session_id[:16]}, opened at "
                    f"{render_time(session.opened_at)}; submitted so far: "
                    f"{submitted_text(session.submitted)}",
                    err=True,
                )
            click.echo(
                f"{rep.where}: the session expires at {render_time(session.expires_at)}; "
                f"{session.progress} of {session.threshold} shares so far",
                err=True,
            )
            lines.append(
                f"(unseal) deployment {session.deployment}, replica {session.replica}, "
                f"session {session.session_id[:16]}, log size {session.log_size}: your share, "
                "decrypted here, re-encrypted to this session's key and signed."
            )
            ready.append(rep)

        _attempt(rep, many, prepare)
    if not ready:
        _finish(replicas, many=many)
        return
    credential = unlock("\n".join(lines))
    fingerprint = credential.public().fingerprint

    def took_part(entry: Entry) -> bool:
        payload = entry.payload
        return isinstance(payload, UnsealPayload) and any(
            share.custodian == fingerprint for share in payload.shares
        )

    for rep in ready:

        def submit(stub: pb_grpc.CustodianServiceStub, rep: _Replica = rep) -> None:
            progress = actions.submit_share(stub, credential, show=show_signing)
            state = "still sealed" if progress.sealed else "UNSEALED"
            rep.outcome = f"share accepted: {progress.have} of {progress.need}; {state}"
            rep.done = True
            click.echo(f"{rep.endpoint.target + ': ' if many else ''}{rep.outcome}")
            if progress.HasField("seq"):
                seen_checkpoints.remember_entry(stub, progress.seq, took_part)
            else:
                seen_checkpoints.require_extension(stub)

        _attempt(rep, many, submit)
    _finish(replicas, many=many)


def reset(
    endpoints: Sequence[Endpoint],
    public: PublicCredential,
    unlock: Unlock,
    *,
    witness_wait: float,
    now: Callable[[], float] = time.time,
) -> None:
    """`custodian unseal --reset`: a signed, logged discard of each replica's open session."""
    many = len(endpoints) > 1
    replicas = [_Replica(e) for e in endpoints]
    ready: list[_Replica] = []
    for rep in replicas:

        def prepare(stub: pb_grpc.CustodianServiceStub, rep: _Replica = rep) -> None:
            with rpc_errors():
                status = stub.GetStatus(pb.GetStatusRequest())
            rep.name = status.replica
            _on_roster(status, public)
            if not status.HasField("unseal_session"):
                rep.outcome, rep.done = "no open unseal session; nothing to reset", True
                click.echo(f"{rep.where}: no open unseal session; nothing to reset")
                return
            seen_checkpoints.require_extension(stub)
            seen_checkpoints.require_witnessed(
                stub, status.unseal_session.log_size, wait=witness_wait
            )
            u = status.unseal_session
            click.echo(
                f"{rep.where}: unseal session {u.session_id[:16]} opened at "
                f"{render_time(u.opened_at)}; submitted: {submitted_text(u.submitted)}",
                err=True,
            )
            rep.requested_at = int(now())
            rep.statement = actions.reset_statement(status, public, now=rep.requested_at)
            ready.append(rep)

        _attempt(rep, many, prepare)
    if not ready:
        _finish(replicas, many=many)
        return
    if len(ready) == 1:
        assert ready[0].statement is not None
        credential = unlock(ready[0].statement.render())
    else:
        for rep in ready:
            assert rep.statement is not None
            for line in display.statement_block(
                rep.statement.render(), heading=f"For {rep.where} you will sign"
            ):
                click.echo(line, err=True)
        credential = unlock(f"(unseal --reset) the {len(ready)} statements above")
    fingerprint = credential.public().fingerprint

    for rep in ready:

        def send(stub: pb_grpc.CustodianServiceStub, rep: _Replica = rep) -> None:
            assert rep.statement is not None
            response = actions.reset_unseal_session(
                stub, credential, rep.statement, now=rep.requested_at
            )
            ended = ended_text(response.ended)
            rep.outcome, rep.done = f"reset, logged as entry {response.seq}", True
            click.echo(f"{rep.where}: {ended}; logged as entry {response.seq}")
            session = rep.statement.field("session")

            def my_reset(entry: Entry) -> bool:
                payload = entry.payload
                return (
                    isinstance(payload, UnsealResetPayload)
                    and payload.custodian == fingerprint
                    and payload.session.hex() == session
                )

            seen_checkpoints.remember_entry(stub, response.seq, my_reset)

        _attempt(rep, many, send)
    _finish(replicas, many=many)

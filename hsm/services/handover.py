"""The private channel between the daemon and its worker processes, and what crosses it.

The daemon (`server run --workers N`, hsm/services/workers.py) and each
worker (hsm/services/worker.py) share one Unix socketpair, inherited by the
worker at spawn: never a file, never the environment, never argv. Nothing
else can connect to it.

A frame is a JSON header and binary attachments:

    u32be header length | u32be attachments length | header | attachments

The header says the frame's `kind` and each attachment's length
(`sizes`). Secrets travel only as attachments: the sender writes them from
their buffers (`socket.sendmsg`, no copy into a Python `bytes`), the
receiver reads each straight into its own `bytearray` (`recv_into`), which
becomes a `SecretBytes`; a header never holds key material.

Snapshots (`snapshot_frame`, `SnapshotReader`): the data plane's
`DataPlaneSnapshot` without its keys (generation, seal state, log size,
grants, per tenant its versions, activation end, disabled versions,
destruction) and, per held key version, a serial number. A key's bytes
cross once, with the first snapshot that holds it; later snapshots name it
by serial, and a serial no longer named is closed and wiped by the worker.
The sender keeps a reference to every held key it sent, so a serial always
means one key object of the daemon's keyring (`KeysSent`).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from keyquorum.hsm.daemon.tenant_keys import TENANT_KEY_SIZE
from keyquorum.hsm.dataplane.snapshot import DataPlaneSnapshot, HeldKey, TenantAccess
from keyquorum.quorum import aead
from keyquorum.quorum.errors import DeserializationError, StateError
from keyquorum.quorum.limits import Limits
from keyquorum.quorum.secret import SecretBytes

_PREFIX: Final = struct.Struct(">II")
#: Largest header accepted (a snapshot of some thousands of tenants fits many times).
MAX_HEADER: Final = 64 * 1024 * 1024
#: Largest attachments of one frame.
MAX_ATTACHMENTS: Final = 64 * 1024 * 1024


class ChannelClosed(Exception):  # noqa: N818 (an end of stream, not a failure)
    """The other end closed the channel."""


class Channel:
    """One end of the socketpair: whole frames out (thread-safe) and in (one reader)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def send(
        self, header: Mapping[str, Any], attachments: Sequence[bytes | memoryview] = ()
    ) -> None:
        """Send one frame; OSError (a timeout too) if the other end does not take it."""
        sizes = [len(a) for a in attachments]
        encoded = json.dumps({**header, "sizes": sizes}, separators=(",", ":")).encode()
        parts: list[bytes | memoryview] = [
            _PREFIX.pack(len(encoded), sum(sizes)),
            encoded,
            *attachments,
        ]
        with self._send_lock:
            _send_all(self._sock, parts)

    def receive(self) -> tuple[dict[str, Any], list[bytearray]]:
        """The next frame: its header and each attachment in a buffer of its own."""
        prefix = self._exactly(_PREFIX.size)
        header_size, attached = _PREFIX.unpack(prefix)
        if header_size > MAX_HEADER or attached > MAX_ATTACHMENTS:
            raise DeserializationError("a frame on the worker channel is too large")
        try:
            header = json.loads(self._exactly(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DeserializationError("a frame header on the worker channel is not JSON") from e
        sizes = header.get("sizes") if isinstance(header, dict) else None
        if (
            not isinstance(sizes, list)
            or not all(isinstance(n, int) and n >= 0 for n in sizes)
            or sum(sizes) != attached
        ):
            raise DeserializationError("a frame on the worker channel has bad attachment sizes")
        return header, [self._exactly(n) for n in sizes]

    def _exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            n = self._sock.recv_into(view[got:])
            if n == 0:
                raise ChannelClosed("the other end closed the channel")
            got += n
        return buffer

    def close(self) -> None:
        self._sock.close()

    def __repr__(self) -> str:
        return f"<Channel fd {self._sock.fileno()}>"


def _send_all(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


# -- snapshots ---------------------------------------------------------------------


class KeysSent:
    """What one worker was given of the daemon's held keys: key object -> serial.

    It holds a reference to each key object it numbered, so an object is
    never freed (and its id never reused) while its serial is in use.
    """

    def __init__(self) -> None:
        self._serials: dict[int, tuple[HeldKey, int]] = {}
        self._next = 1

    def frame(
        self, snapshot: DataPlaneSnapshot, seq: int
    ) -> tuple[dict[str, Any], list[memoryview]]:
        """The frame that brings the worker to `snapshot`, and what it now holds.

        New keys are attached; keys the snapshot no longer holds are named
        in `drop` and forgotten here.
        """
        held_now: dict[int, HeldKey] = {}
        tenants: dict[str, dict[str, Any]] = {}
        new: list[int] = []
        keys: list[memoryview] = []
        for name, record in snapshot.tenants.items():
            held: dict[str, int] = {}
            for version, key in record.held.items():
                known = self._serials.get(id(key))
                if known is None:
                    view = key.view()
                    if len(view) != TENANT_KEY_SIZE:
                        raise StateError("a held tenant key is not 32 bytes")
                    serial = self._next
                    self._next += 1
                    self._serials[id(key)] = (key, serial)
                    new.append(serial)
                    keys.append(view)
                else:
                    serial = known[1]
                held[str(version)] = serial
                held_now[id(key)] = key
            tenants[name] = {
                "versions": record.versions,
                "current": record.current,
                "active_until": record.active_until,
                "destroyed": record.destroyed,
                "disabled": sorted(record.disabled),
                "held": held,
                "shredded_grants": sorted(record.shredded_grants),
            }
        drop = [serial for ident, (_k, serial) in self._serials.items() if ident not in held_now]
        for ident in [i for i in self._serials if i not in held_now]:
            del self._serials[ident]
        header = {
            "kind": "snapshot",
            "seq": seq,
            "generation": snapshot.generation,
            "sealed": snapshot.sealed,
            "log_size": snapshot.log_size,
            "grants": sorted([backend, tenant] for backend, tenant in snapshot.grants),
            "tenants": tenants,
            "new": new,
            "drop": drop,
        }
        return header, keys

    def __repr__(self) -> str:
        return f"<KeysSent: {len(self._serials)} keys>"


class WorkerKey:
    """A tenant key version a worker holds: its bytes and its prepared cipher.

    The `HeldKey` of a worker's snapshot. `wipe` closes the cipher first,
    then zeroes the bytes, as the daemon's keyring does.
    """

    __slots__ = ("_cipher", "_key")

    def __init__(self, key: SecretBytes) -> None:
        self._key = key
        self._cipher = aead.Cipher(key)

    @property
    def cipher(self) -> aead.Cipher:
        return self._cipher

    def view(self) -> memoryview:
        return self._key.view()

    def wipe(self) -> None:
        self._cipher.close()
        self._key.wipe()

    def buffer_for_test(self) -> bytearray:
        return self._key.buffer_for_test()

    def __repr__(self) -> str:
        return f"<WorkerKey {'closed' if self._cipher.closed else 'open'}>"

    def __reduce__(self) -> Any:
        raise TypeError("a WorkerKey cannot be pickled")


@dataclass(frozen=True)
class Applied:
    """What applying one snapshot frame did: the new snapshot and the keys wiped."""

    snapshot: DataPlaneSnapshot
    seq: int
    wiped: int


class SnapshotReader:
    """A worker's side: rebuilds each snapshot with its own keys and wipes dropped ones."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._keys: dict[int, WorkerKey] = {}

    @property
    def held(self) -> int:
        return len(self._keys)

    def apply(self, header: Mapping[str, Any], attachments: list[bytearray]) -> Applied:
        """Take the frame's new keys (their buffers adopted, not copied) and build its
        snapshot. The caller publishes it, then calls `wipe_dropped`, so that no
        call reads a snapshot whose keys are already gone. A malformed frame
        raises DeserializationError with its key buffers zeroed."""
        new = header.get("new")
        if (
            not isinstance(new, list)
            or len(new) != len(attachments)
            or any(len(a) != TENANT_KEY_SIZE for a in attachments)
            or any(serial in self._keys for serial in new)
        ):
            for buffer in attachments:
                buffer[:] = bytes(len(buffer))
            raise DeserializationError("a snapshot frame's keys do not match its header")
        for serial, buffer in zip(new, attachments, strict=True):
            self._keys[serial] = WorkerKey(SecretBytes.adopt(buffer, label="tenant key"))
        try:
            return self._build(header)
        except (KeyError, TypeError, ValueError) as e:
            raise DeserializationError(f"a snapshot frame is malformed: {e}") from e

    def _build(self, header: Mapping[str, Any]) -> Applied:
        tenants: dict[str, TenantAccess] = {}
        for name, record in header["tenants"].items():
            held: dict[int, HeldKey] = {}
            for version, serial in record["held"].items():
                key = self._keys.get(serial)
                if key is None:
                    raise DeserializationError(f"key serial {serial} was never sent")
                held[int(version)] = key
            tenants[name] = TenantAccess(
                versions=record["versions"],
                current=record["current"],
                active_until=record["active_until"],
                destroyed=record["destroyed"],
                disabled=frozenset(record["disabled"]),
                held=held,
                shredded_grants=frozenset(record["shredded_grants"]),
            )
        snapshot = DataPlaneSnapshot(
            generation=header["generation"],
            sealed=header["sealed"],
            log_size=header["log_size"],
            grants=frozenset((backend, tenant) for backend, tenant in header["grants"]),
            tenants=tenants,
            limits=self._limits,
        )
        return Applied(snapshot, header["seq"], len(header["drop"]))

    def wipe_dropped(self, drop: Iterable[int]) -> None:
        """Close and zero the keys the daemon no longer holds."""
        for serial in drop:
            key = self._keys.pop(serial, None)
            if key is not None:
                key.wipe()

    def wipe_all(self) -> None:
        for key in self._keys.values():
            key.wipe()
        self._keys.clear()

    def buffers_for_test(self) -> list[bytearray]:
        return [key.buffer_for_test() for key in self._keys.values()]

    def __repr__(self) -> str:
        return f"<SnapshotReader: {len(self._keys)} keys>"

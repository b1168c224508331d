"""SIGUSR2: a restart that keeps the daemon unsealed, for upgrades.

The running daemon (the predecessor) starts its successor itself, from its
own installed interpreter and package (`sys.executable -m
keyquorum.cli.main` with the same arguments, so the same configuration),
and talks to it over one end of a socketpair the successor inherits
(`pass_fds`; its number in `KEYQUORUM_HANDOVER_FD`): never a path or a
port another process could open. The channel is hsm/services/handover.py's
(a JSON header, secrets only as attachments read into buffers of their
own).

1. The predecessor refuses if it is sealed (nothing to keep: restart it).
   It stops its custodian listener (a seal in flight finishes and logs its
   entry; after that a custodian's seal is never accepted by a process about
   to hand its keys away: it is refused until the successor listens, and
   succeeds on retry), then holds its governance lock (no append from now
   on); sealed by then, it gives up and serves on, sealed. Otherwise it
   sends `ports`: the ports it serves.
2. The successor loads the store and replays the log as at any start
   (without the data directory's lock, which the predecessor holds),
   binds the same ports (SO_REUSEPORT: gRPC Python cannot serve on an
   inherited listening descriptor, and reusing the port lets both processes
   accept while one hands over to the other; only a process of the same
   user can join such a port, and it would need the TLS key to serve), and
   says `hello` with its deployment, log size and latest checkpoint.
3. The predecessor sends `state` only if they are its own: the master key
   (an attachment) when it is unsealed. The successor checks the same
   facts from its side, holds the key, restores the activations the log
   says are in force, starts serving, and says `serving`.
4. The predecessor and its workers answer new calls UNAVAILABLE while the
   calls in flight finish (up to 2 s), then it stops its workers (each
   wipes its keys), wipes every key it holds, says
   `done`, tells systemd the successor's pid (`MAINPID=`) and exits; its
   lock goes with it.
5. The successor takes the data directory's lock and logs a `handover`
   entry, signed by the log key, naming both processes; from then on it is
   the daemon.

A failure before step 3 leaves the predecessor serving as before (the
successor is killed). Who can trigger it: whoever can send signals to the
daemon's user (that user and root), who can also stop it; what they gain is
a new process of the same installed code, which they could already replace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.services.handover import Channel, ChannelClosed
from keyquorum.quorum.errors import StateError
from keyquorum.quorum.secret import SecretBytes

log = logging.getLogger("keyquorum.upgrade")

FD_ENV: Final = "KEYQUORUM_HANDOVER_FD"
#: How long the successor may take to replay the log and bind its ports.
HELLO_SECONDS: Final = 300.0
#: How long it may take from the key to serving.
SERVING_SECONDS: Final = 60.0
#: How long the successor waits for the predecessor to exit and free the lock.
LOCK_SECONDS: Final = 30.0


def _facts(daemon: Daemon) -> dict[str, Any]:
    """What both processes must agree on: the deployment and the log's head."""
    note = daemon.checkpoint_with_proof(0)[0] if daemon.initialized else ""
    return {
        "deployment": daemon.state.deployment,
        "log_size": daemon.log_size,
        "checkpoint": note,
    }


# -- the predecessor ---------------------------------------------------------------------


@dataclass
class Handing:
    """The predecessor's part; `run` returns the successor's pid once it serves."""

    daemon: Daemon
    ports: Mapping[str, int]
    stderr_fd: int
    _channel: Channel | None = None

    def run(self) -> int:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(HELLO_SECONDS)
        env = dict(os.environ)
        env[FD_ENV] = str(theirs.fileno())
        proc = subprocess.Popen(
            [sys.executable, "-m", "keyquorum.cli.main", *sys.argv[1:]],
            pass_fds=(theirs.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.stderr_fd,
            stderr=self.stderr_fd,
        )
        theirs.close()
        channel = Channel(ours)
        try:
            return self._hand_over(channel)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            channel.close()
            raise

    def _hand_over(self, channel: Channel) -> int:
        channel.send({"kind": "ports", **self.ports})
        header, _ = channel.receive()
        if header.get("kind") != "hello":
            raise StateError(f"the successor said {header.get('kind')!r}, not hello")
        mine = _facts(self.daemon)
        theirs = {k: header.get(k) for k in mine}
        if theirs != mine:
            channel.send({"kind": "refused", "reason": "another deployment or log head"})
            raise StateError(
                f"the successor serves another deployment or log head ({theirs['deployment']!r} "
                f"at {theirs['log_size']}, this process {mine['deployment']!r} at "
                f"{mine['log_size']}): not handed over"
            )
        pid, host = int(header["pid"]), str(header["host"])
        custody = self.daemon.custody_for_handover()
        state = {
            "kind": "state",
            **mine,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        if custody.sealed:
            channel.send({**state, "sealed": True})
        else:
            with custody.master() as (master, _generation):
                channel.send({**state, "sealed": False}, [master.view()])
        channel.socket.settimeout(SERVING_SECONDS)
        header, _ = channel.receive()
        if header.get("kind") != "serving":
            raise StateError(f"the successor said {header.get('kind')!r}, not serving")
        log.warning("handover: successor pid %d on %s serves; wiping keys and exiting", pid, host)
        self._channel = channel
        return pid

    def finish(self) -> None:
        """Keys wiped (the listeners and workers are stopped by the caller first)."""
        self.daemon.custody_for_handover().seal()
        if self._channel is not None:
            with contextlib.suppress(OSError):
                self._channel.send({"kind": "done", "wiped": True})
            self._channel.close()


# -- the successor -----------------------------------------------------------------------


class Taking:
    """The successor's part (see the module docstring), from its inherited descriptor."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self.ports: dict[str, int] = {}
        self.predecessor: tuple[int, str] | None = None
        self.handed_keys = False

    @classmethod
    def from_environment(cls) -> Taking | None:
        raw = os.environ.pop(FD_ENV, None)
        if raw is None:
            return None
        channel = Channel(socket.socket(fileno=int(raw)))
        taking = cls(channel)
        header, _ = channel.receive()
        if header.get("kind") != "ports":
            raise StateError("the predecessor's first frame is not its ports")
        taking.ports = {k: int(v) for k, v in header.items() if k not in ("kind", "sizes")}
        return taking

    def take(self, daemon: Daemon) -> None:
        """Say hello, check the predecessor's state, hold its master key."""
        facts = _facts(daemon)
        self._channel.send(
            {"kind": "hello", **facts, "pid": os.getpid(), "host": socket.gethostname()}
        )
        header, attachments = self._channel.receive()
        if header.get("kind") != "state":
            raise StateError(f"the predecessor refused the handover: {header.get('reason')}")
        if {k: header.get(k) for k in facts} != facts:
            for buffer in attachments:
                buffer[:] = bytes(len(buffer))
            raise StateError("the predecessor serves another deployment or log head")
        self.predecessor = (int(header["pid"]), str(header["host"]))
        if header.get("sealed") is False:
            if len(attachments) != 1:
                raise StateError("the predecessor sent no master key")
            daemon.adopt_master(SecretBytes.adopt(attachments[0], label="master key"))
            self.handed_keys = True
        log.warning(
            "handover: took the %s state of pid %d on %s",
            "unsealed" if self.handed_keys else "sealed",
            *self.predecessor,
        )

    def serving(self) -> None:
        self._channel.send({"kind": "serving"})

    def wait_done(self) -> None:
        """Until the predecessor wiped its keys and closed the channel (or died)."""
        self._channel.socket.settimeout(LOCK_SECONDS)
        with contextlib.suppress(ChannelClosed, OSError):
            while True:
                header, _ = self._channel.receive()
                if header.get("kind") == "done":
                    log.info("handover: the predecessor wiped its keys")
        self._channel.close()


def lock_when_free(lock: Callable[[], Any], seconds: float = LOCK_SECONDS) -> Any:
    """`lock()` retried until the predecessor's exit frees it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return lock()
        except StateError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)

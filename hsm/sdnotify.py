"""systemd's readiness protocol (sd_notify(3)) in the few lines it takes.

A `Type=notify` unit is started when the daemon says `READY=1` on the
datagram socket named by `$NOTIFY_SOCKET`, and `STOPPING=1` tells systemd a
stop has begun; `STATUS=...` is the line `systemctl status` shows. The
address is a path, or an abstract socket written with a leading `@`. The
variable is read once and removed from the environment, so no child
process can speak for the daemon. Without it (not under systemd) every
call does nothing. A failed send is logged, never raised: readiness
reporting must not stop the key service.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

ENV: str = "NOTIFY_SOCKET"


class Notifier:
    """Sends state lines to the service manager, if there is one."""

    def __init__(self, address: str | None) -> None:
        self._address: str | None = None
        if address and address[0] in "/@":
            self._address = "\0" + address[1:] if address[0] == "@" else address
        elif address:
            log.warning("%s=%r is not a socket path: no readiness notifications", ENV, address)

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier:
        """The notifier `$NOTIFY_SOCKET` names, taking the variable out of `environ`."""
        return cls(environ.pop(ENV, None))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send `KEY=value` lines in one datagram; whether it was sent."""
        if self._address is None:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError as e:
            log.warning("could not notify the service manager (%s): %s", fields[0], e)
            return False
        return True

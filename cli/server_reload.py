"""What `server run` does on SIGHUP: reload without a quorum, and never seal.

On SIGHUP the daemon re-reads its settings as at start (the command line's
flags as they were given, then the `--config` file read again) and applies
the reloadable ones (`RELOADABLE`):

- `tls-cert`, `tls-key`: the server certificate chain and key, on the
  custodian port and the mTLS port (the workers too); `client-ca`: the CA
  that backends' certificates must chain to. The files are read again even
  when their paths did not change (a renewed certificate written in place).
  New connections get the new files; open connections keep theirs and are
  never dropped (hsm/tls.py, `ServerCertificates`).
- `access-log`: the access log is reopened, at its new path if it changed
  (after a log rotation moved the old file away).
- `log-level`: the daemon's and the workers' log level.

Any other setting that differs is named in a warning and not applied: it
needs a restart (an upgrade by handover keeps the daemon unsealed, README).
So does turning TLS, the mTLS port or the access log on or off.

A reload is all or nothing: the settings and every file are read and
checked before anything changes, and a failure changes nothing; the
daemon goes on serving with what it had and logs one error line naming
the cause. Keys, seal state, store and listeners' addresses are never
touched.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from keyquorum.cli.server_config import SETTINGS, ServerConfig
from keyquorum.hsm import tls
from keyquorum.hsm.services.access_log import AccessLog
from keyquorum.hsm.services.backend_plane import BackendPlane
from keyquorum.quorum.errors import InvalidInputError, KeyquorumError

log = logging.getLogger("keyquorum.server")

#: The settings a SIGHUP applies; every other one needs a restart.
RELOADABLE: Final = ("tls-cert", "tls-key", "client-ca", "access-log", "log-level")


@dataclass
class Reloadable:
    """The running parts a reload changes."""

    custodian: tls.ServerCertificates | None
    backend: BackendPlane | None
    access_log: AccessLog | None


class Reloader:
    """Applies a SIGHUP (see the module docstring); `reload` never raises."""

    def __init__(
        self, settings: Callable[[], ServerConfig], running: ServerConfig, parts: Reloadable
    ) -> None:
        self._settings = settings
        self._running = running
        self._parts = parts
        self.reloads = 0

    def reload(self) -> bool:
        """Apply the reloadable settings; whether it did (a failure is logged)."""
        try:
            said = self._apply()
        except (KeyquorumError, OSError) as e:
            log.error("reload (SIGHUP) refused, nothing changed, still serving: %s", e)
            return False
        self.reloads += 1
        log.info("reloaded (SIGHUP), seal state unchanged: %s", "; ".join(said))
        return True

    def _apply(self) -> list[str]:
        new = self._settings()
        new.check()
        old = self._running
        ignored = [
            s.key
            for s in SETTINGS
            if s.key not in RELOADABLE and getattr(new, s.name) != getattr(old, s.name)
        ]
        if (new.access_log is None) != (old.access_log is None):
            raise InvalidInputError("turning the access log on or off needs a restart")
        if (new.tls_cert is None) != (old.tls_cert is None):
            raise InvalidInputError("turning TLS on or off needs a restart")
        # 1. read and check everything before changing anything
        custodian_files = None
        if self._parts.custodian is not None:
            assert new.tls_cert is not None  # check()
            assert new.tls_key is not None
            custodian_files = tls.read_files(new.tls_cert, new.tls_key, None)
        backend_files = None
        if self._parts.backend is not None:
            assert new.tls_cert is not None  # check()
            assert new.tls_key is not None
            assert new.client_ca is not None
            backend_files = tls.read_files(new.tls_cert, new.tls_key, new.client_ca)
        said = []
        # 2. apply: the access log first (its open can fail), then the certificates
        access = self._parts.access_log
        if access is not None and new.access_log is not None:
            access.reopen(new.access_log)
            said.append(f"access log reopened at {new.access_log}")
        if custodian_files is not None and self._parts.custodian is not None:
            chain, key, _ = custodian_files
            self._parts.custodian.replace(chain, key, None)
            said.append(f"custodian port certificate {self._parts.custodian.leaf_sha256[:16]}")
        if backend_files is not None and self._parts.backend is not None:
            chain, key, ca = backend_files
            assert ca is not None
            self._parts.backend.reload(chain, key, ca, new.log_level)
            said.append("mTLS port certificate and client CA reloaded")
        if new.log_level != old.log_level:
            logging.getLogger().setLevel(new.log_level)
        said.append(f"log level {new.log_level}")
        if ignored:
            log.warning(
                "reload (SIGHUP): changed but applied only at a restart: %s", ", ".join(ignored)
            )
        # What runs now: the reloadable settings new, the others as they were started.
        self._running = dataclasses.replace(
            old,
            tls_cert=new.tls_cert,
            tls_key=new.tls_key,
            client_ca=new.client_ca,
            access_log=new.access_log,
            log_level=new.log_level,
        )
        return said

    def __repr__(self) -> str:
        return f"<Reloader: {self.reloads} reloads>"

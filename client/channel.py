"""Where the client connects, and the gRPC service config that says how.

Retries, failover and deadlines are gRPC's own, set in the channel's
service config (gRFC A6 retries, A17 client-side health checking), not in
a loop of ours:

- `retryPolicy` on every KeyService method: up to `attempts` attempts in
  all (gRPC caps this at 5), exponential backoff with jitter from
  `backoff` seconds, only on UNAVAILABLE: the call never reached a
  KeyService that answered (a replica down, restarting, the connection
  lost) or the store could not be written; no key was released and
  nothing was counted twice that matters (a repeated Wrap or
  GenerateDataKey yields another valid ciphertext, a repeated Unwrap the
  same plaintext). Every other code is an answer and is final.
  `retryThrottling` stops retrying when most calls fail, so a dead
  deployment is not hammered.
- A deadline on every call, passed with the call (`timeout`): no call
  waits forever, retries included (a deadline spans all attempts). Not as
  the service config's `timeout`: Python's gRPC ends such calls up to about
  2 seconds early (grpc/grpc#34547, #40633; below 2 s they fail at once).
- Several addresses: one channel over all of them (`ipv4:` / `ipv6:`
  address lists), `round_robin` across the replicas, and
  `healthCheckConfig` on `keyquorum.v1.KeyService`, so gRPC watches every
  replica's health and sends calls only to those SERVING. A sealed
  replica reports NOT_SERVING and gets none; a retry after UNAVAILABLE
  goes to another replica. When no replica serves, calls fail with
  UNAVAILABLE. With one address, health checking is off unless asked
  for, so a sealed daemon's own answer (FAILED_PRECONDITION, "sealed")
  reaches the caller instead of an UNAVAILABLE.

Several addresses are IP literals (`10.0.0.5:7444`, `[fd00::5]:7444`) of
one family: gRPC's Python API has no resolver for a list of host names. A
DNS name whose records list the replicas is one address
(`dns:///kq.example:7444`, `health_check=True`). TLS checks every
replica's certificate against one name: `server_name`, by default the
address list's host when all share one, and required otherwise.

`service_config_disable_resolution` keeps a DNS TXT record from replacing
any of this.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from keyquorum.quorum.errors import InvalidInputError

SERVICE: Final = "keyquorum.v1.KeyService"
MAX_ATTEMPTS: Final = 5  # gRPC's own cap on retryPolicy.maxAttempts
MAX_BACKOFF: Final = 2.0

ChannelOptions = list[tuple[str, str | int]]


@dataclass(frozen=True)
class Address:
    """One replica's address: an IP literal (or a host name, alone) and a port."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.host).version

    def target(self) -> str:
        """host:port, with brackets around an IPv6 literal."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """'host:port' or '[v6]:port'."""
    if not isinstance(text, str):
        raise InvalidInputError(f"an address must be a str, got {type(text).__name__}")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise InvalidInputError(f"an address must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise InvalidInputError(f"put an IPv6 address in brackets: [{host}]:{port}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(f"the port of {text!r} must be 1 to 65535")
    return Address(host, int(port))


@dataclass(frozen=True)
class Targets:
    """What the client connects to: one gRPC target, and the replicas behind it."""

    target: str
    #: The replicas one by one (for the seal watch); empty for a single target
    #: given as is (a name gRPC resolves itself).
    replicas: tuple[Address, ...]
    server_name: str | None
    health_check: bool


def resolve_targets(
    target: str | Sequence[str], *, server_name: str | None, health_check: bool | None
) -> Targets:
    """The gRPC target for one address or several (see the module docstring)."""
    if isinstance(target, str):
        if not target:
            raise InvalidInputError("the target is empty")
        return Targets(target, (), server_name, bool(health_check))
    addresses = [parse_address(t) for t in target]
    if not addresses:
        raise InvalidInputError("give at least one address")
    if len(addresses) == 1:
        return Targets(addresses[0].target(), (), server_name, bool(health_check))
    if len(set(addresses)) != len(addresses):
        raise InvalidInputError("an address is given twice")
    names = [a.host for a in addresses if not a.is_ip]
    if names:
        raise InvalidInputError(
            f"several addresses must be IP literals, not host names ({names[0]!r}): gRPC "
            "resolves one name only; give one DNS name listing the replicas "
            "(dns:///NAME:PORT, with health_check=True) or their IP addresses"
        )
    families = {a.family for a in addresses}
    if len(families) != 1:
        raise InvalidInputError("several addresses must all be IPv4 or all IPv6")
    hosts = {a.host for a in addresses}
    if server_name is None:
        if len(hosts) != 1:
            raise InvalidInputError(
                "replicas on several hosts: give server_name, the name every replica's "
                "certificate carries"
            )
        server_name = next(iter(hosts))
    scheme = "ipv4" if families == {4} else "ipv6"
    joined = ",".join(a.target() for a in addresses)
    return Targets(
        f"{scheme}:{joined}",
        tuple(addresses),
        server_name,
        True if health_check is None else health_check,
    )


def service_config(
    *, attempts: int, backoff: float, timeout: float, health_check: bool, balance: bool
) -> str:
    """The channel's service config JSON (gRPC's format, gRFC A6 and A17).

    `timeout` is checked here and passed with every call, not written here
    (see the module docstring).
    """
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        raise InvalidInputError("attempts must be an int")
    if not 1 <= attempts <= MAX_ATTEMPTS:
        raise InvalidInputError(
            f"attempts must be 1 to {MAX_ATTEMPTS} (gRPC's cap), got {attempts}"
        )
    if not 0 < timeout < 3600:
        raise InvalidInputError(f"timeout must be between 0 and 3600 seconds, got {timeout}")
    if not 0 < backoff <= MAX_BACKOFF:
        raise InvalidInputError(f"backoff must be between 0 and {MAX_BACKOFF} s, got {backoff}")
    method: dict[str, object] = {"name": [{"service": SERVICE}]}
    if attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": attempts,
            "initialBackoff": _duration(backoff),
            "maxBackoff": _duration(MAX_BACKOFF),
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    config: dict[str, object] = {
        "methodConfig": [method],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
    if balance or health_check:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    if health_check:
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    return json.dumps(config, sort_keys=True)


def channel_options(
    targets: Targets, *, attempts: int, backoff: float, timeout: float
) -> ChannelOptions:
    """Options for `grpc.secure_channel` / `grpc.aio.secure_channel`."""
    options: ChannelOptions = [
        (
            "grpc.service_config",
            service_config(
                attempts=attempts,
                backoff=backoff,
                timeout=timeout,
                health_check=targets.health_check,
                balance=bool(targets.replicas),
            ),
        ),
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
    ]
    if targets.server_name is not None:
        options.append(("grpc.ssl_target_name_override", targets.server_name))
    return options


def watch_options(targets: Targets) -> ChannelOptions:
    """Options of a seal-watch channel to one replica: the same TLS name, no retries."""
    options: ChannelOptions = [("grpc.service_config_disable_resolution", 1)]
    if targets.server_name is not None:
        options.append(("grpc.ssl_target_name_override", targets.server_name))
    return options


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"

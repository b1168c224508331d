"""Why a connection to the daemon failed, in words that say what to fix.

gRPC reports a failed connection as UNAVAILABLE with the C core's own text
("Ssl handshake failed (TSI_PROTOCOL_FAILURE)", "Hostname Verification
Check failed"), which names neither the certificate's names nor the CA. When
a call fails that way, `diagnose` looks again with plain sockets and
Python's `ssl`, step by step, and returns the first thing that is wrong:

1. the name does not resolve;
2. nothing listens (refused), or nothing answers (timed out);
3. the port speaks first, as SSH or SMTP do: another service;
4. with `--insecure-dev-plaintext`: the port speaks TLS (give `--ca`);
5. the TLS handshake fails: the port speaks plaintext gRPC (a daemon run
   with `--insecure-dev-plaintext`), HTTP, or something else;
6. the certificate is not issued by the CA given with `--ca` (both are named);
7. the certificate does not hold the name connected to (its names are listed);
8. the certificate is outside its validity dates;
9. TLS without HTTP/2: a web server or another TLS service, not gRPC;
10. the server refuses the client certificate (mTLS ports).

cryptography is imported only once a handshake is to be examined, so a
plain "nothing listens" costs a status call no X.509 import (start-up time,
tests/test_cli_startup.py). It only looks: it sends a TLS ClientHello or an HTTP/2 preface, never a
request, and every step has a short timeout. When nothing is found the
caller falls back to gRPC's own message.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

TIMEOUT = 3.0
BANNER_WAIT = 0.3
#: RFC 9113, section 3.4: the client connection preface, then an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
H2_SETTINGS = 0x04


@dataclass(frozen=True)
class Target:
    """What the CLI tried to reach, and with which trust material."""

    host: str
    port: int
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    plaintext: bool = False

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def diagnose(target: Target) -> str | None:
    """The first problem found on the way to `target` (module docstring), or None."""
    # 1-2. Resolve and connect.
    try:
        sock = socket.create_connection((target.host, target.port), timeout=TIMEOUT)
    except socket.gaierror:
        return f"the name {target.host!r} does not resolve: check the host in --server"
    except ConnectionRefusedError:
        return (
            f"nothing listens on {target.address} (connection refused): is the daemon "
            "running, and is this its port? (custodians use the --listen port, auditors "
            "and backends the --listen-mtls port)"
        )
    except TimeoutError:
        return f"{target.address} does not answer (timed out): a firewall, or the wrong host"
    except OSError as e:
        return f"cannot connect to {target.address}: {e.strerror or e}"
    with sock:
        # 3. A service that speaks first is not gRPC over TLS; a plaintext
        # HTTP/2 server speaks first too, with its SETTINGS frame.
        banner = _banner(sock)
        if _is_h2_settings(banner):
            return None if target.plaintext else _PLAINTEXT_GRPC.format(address=target.address)
        if banner:
            return (
                f"{target.address} answered with another service ({_shown(banner)}), "
                "not a keyquorum daemon: check the port in --server"
            )
    # 4. Plaintext asked for, TLS found.
    if target.plaintext:
        if _speaks_tls(target):
            return (
                f"{target.address} speaks TLS: drop --insecure-dev-plaintext and give "
                "--ca with the CA of the daemon's certificate"
            )
        if not _speaks_h2(target):
            return f"{target.address} does not speak gRPC: another service on this port?"
        return None
    return _diagnose_tls(target)


def _diagnose_tls(target: Target) -> str | None:
    from cryptography import x509

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    if target.cert is not None and target.key is not None:
        try:
            context.load_cert_chain(target.cert, target.key)
        except (OSError, ssl.SSLError):
            return None  # the files themselves are checked, and named, when loaded
    sni = None if _is_ip(target.host) else target.host
    try:
        sock = socket.create_connection((target.host, target.port), timeout=TIMEOUT)
    except OSError:
        return None
    try:
        try:
            tls = context.wrap_socket(sock, server_hostname=sni)
        except (ssl.SSLError, OSError) as e:
            # 5. Not TLS at all.
            return _not_tls(target, e)
        with tls:
            der = tls.getpeercert(binary_form=True)
            alpn = tls.selected_alpn_protocol()
            refusal = _client_refused(tls)
    finally:
        sock.close()
    if der is None:
        return None
    leaf = x509.load_der_x509_certificate(der)
    names = _names(leaf)
    # 6. The CA.
    if target.ca is not None:
        problem = _not_from_ca(leaf, target.ca)
        if problem:
            return problem
    # 7. The name.
    if not _matches(target.host, names):
        held = ", ".join(names) or "no DNS name or IP address at all"
        return (
            f"the daemon's certificate holds the names {held}, not {target.host!r}: connect "
            f"with one of them (--server NAME:{target.port}), or have the certificate "
            f"reissued with {target.host!r} in its subject alternative names"
        )
    # 8. Dates.
    now = datetime.now(UTC)
    if now < leaf.not_valid_before_utc:
        return f"the daemon's certificate is not valid before {_when(leaf.not_valid_before_utc)}"
    if now > leaf.not_valid_after_utc:
        return f"the daemon's certificate expired on {_when(leaf.not_valid_after_utc)}"
    # 9. gRPC is HTTP/2.
    if alpn != "h2":
        return (
            f"{target.address} speaks TLS but not HTTP/2, so not gRPC: another service "
            "(a web server?) on this port"
        )
    # 10. mTLS refused.
    if refusal:
        which = "no client certificate" if target.cert is None else "your client certificate"
        return (
            f"the daemon refused {which} ({refusal}): this port needs a client "
            "certificate issued by the daemon's --client-ca (give --cert and --key)"
        )
    return None


def _banner(sock: socket.socket) -> bytes:
    sock.settimeout(BANNER_WAIT)
    try:
        return sock.recv(64)
    except (TimeoutError, OSError):
        return b""


def _shown(data: bytes) -> str:
    text = data.split(b"\n", 1)[0].decode("ascii", "replace").strip()
    return repr("".join(ch if ch.isprintable() else "?" for ch in text)[:40])


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _speaks_tls(target: Target) -> bool:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((target.host, target.port), timeout=TIMEOUT) as sock,
            context.wrap_socket(sock),
        ):
            return True
    except (ssl.SSLError, OSError):
        return False


def _speaks_h2(target: Target) -> bool:
    """Whether the port answers an HTTP/2 preface with a SETTINGS frame (plaintext gRPC)."""
    try:
        with socket.create_connection((target.host, target.port), timeout=TIMEOUT) as sock:
            sock.sendall(H2_PREFACE)
            head = sock.recv(9)
    except OSError:
        return False
    return _is_h2_settings(head)


def _speaks_http1(target: Target) -> bool:
    try:
        with socket.create_connection((target.host, target.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
            return sock.recv(5) == b"HTTP/"
    except OSError:
        return False


_PLAINTEXT_GRPC = (
    "{address} speaks plaintext gRPC, not TLS: a daemon run with --insecure-dev-plaintext. "
    "Use --insecure-dev-plaintext too (loopback only), or the daemon's TLS port"
)


def _is_h2_settings(data: bytes) -> bool:
    """An HTTP/2 frame header (RFC 9113, 4.1) of a SETTINGS frame on stream 0."""
    return len(data) >= 9 and data[3] == H2_SETTINGS and data[5:9] == b"\x00\x00\x00\x00"


def _not_tls(target: Target, error: Exception) -> str:
    if _speaks_h2(target):
        return _PLAINTEXT_GRPC.format(address=target.address)
    if _speaks_http1(target):
        return f"{target.address} is a plain HTTP server, not a keyquorum daemon: check the port"
    reason = getattr(error, "reason", None) or type(error).__name__
    return (
        f"{target.address} does not complete a TLS handshake ({reason}): another service "
        "on this port, or not a keyquorum daemon"
    )


def _client_refused(tls: ssl.SSLSocket) -> str | None:
    """With TLS 1.3 the server judges the client certificate after the handshake."""
    try:
        tls.settimeout(BANNER_WAIT * 3)
        tls.sendall(H2_PREFACE)
        tls.recv(9)
    except ssl.SSLError as e:
        return str(getattr(e, "reason", None) or e).lower().replace("_", " ")
    except OSError:
        return None
    return None


def _names(cert: x509.Certificate) -> list[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = list(san.get_values_for_type(x509.DNSName))
    names.extend(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return names


def _matches(host: str, names: list[str]) -> bool:
    """RFC 6125 in short: an IP matches an IP name; a DNS name, exactly or by one `*.` label."""
    if _is_ip(host):
        address = ipaddress.ip_address(host)
        return any(_is_ip(n) and ipaddress.ip_address(n) == address for n in names)
    wanted = host.lower().rstrip(".")
    for name in (n.lower().rstrip(".") for n in names):
        if name == wanted:
            return True
        if name.startswith("*.") and "." in wanted and wanted.split(".", 1)[1] == name[2:]:
            return True
    return False


def _subject(cert: x509.Certificate) -> str:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string() or "(no subject)"


def _issuer(cert: x509.Certificate) -> str:
    from cryptography.x509.oid import NameOID

    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.issuer.rfc4514_string() or "(no issuer)"


def _not_from_ca(leaf: x509.Certificate, ca_path: Path) -> str | None:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        cas = x509.load_pem_x509_certificates(ca_path.read_bytes())
    except (OSError, ValueError):
        return None  # load_ca names an unreadable or non-PEM --ca before any call
    for ca in cas:
        try:
            leaf.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return None
    expected = ", ".join(f"{_subject(ca)!r} (key id {_key_id(ca)})" for ca in cas)
    return (
        f"the daemon's certificate (for {_subject(leaf)!r}) was issued by "
        f"{_issuer(leaf)!r} (key id {_issuer_key_id(leaf)}), but --ca {ca_path} holds "
        f"{expected}: give the CA that issued the daemon's certificate, or check that "
        "--server is the daemon you mean"
    )


def _key_id(cert: x509.Certificate) -> str:
    """The CA's subject key identifier (RFC 5280, 4.2.1.2), its first 8 bytes in hex."""
    from cryptography import x509

    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return ski.digest.hex()[:16]
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest.hex()[:16]


def _issuer_key_id(cert: x509.Certificate) -> str:
    """The issuer's key identifier the certificate names (RFC 5280, 4.2.1.1)."""
    from cryptography import x509

    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return "not given"
    return aki.key_identifier.hex()[:16] if aki.key_identifier else "not given"


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")

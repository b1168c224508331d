"""Certificates a test makes itself, from a development CA.

`DevPki` issues the certificates a deployment hands out; tests of admission
and identity also need ones it never would: any common name, any SANs, two
identities, none.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from keyquorum.hsm import pki
from keyquorum.hsm.pki import DevPki


def client_cert(
    dev_pki: DevPki, directory: Path, common_name: str, sans: list[x509.GeneralName]
) -> tuple[Path, Path]:
    """A client certificate from the deployment's CA with any CN and SANs."""
    return _issue(dev_pki, directory, "client", common_name, sans, ExtendedKeyUsageOID.CLIENT_AUTH)


def server_cert(dev_pki: DevPki, directory: Path) -> tuple[Path, Path]:
    """A renewed server certificate (new key) for localhost from the deployment's CA."""
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    return _issue(dev_pki, directory, "server", "localhost", sans, ExtendedKeyUsageOID.SERVER_AUTH)


def _issue(
    dev_pki: DevPki,
    directory: Path,
    name: str,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> tuple[Path, Path]:
    ca_key = serialization.load_pem_private_key(dev_pki.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(dev_pki.ca_cert.read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki._issue(
        ca_key,
        ca_cert,
        key.public_key(),
        common_name=common_name,
        sans=sans,
        usage=usage,
        now=datetime.datetime.now(datetime.UTC),
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path

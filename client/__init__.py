"""keyquorum.client: the typed Python client for application backends.

    from keyquorum.client import KeyClient, encrypt_record, decrypt_record

    with KeyClient("kq.example:7444", ca="ca.crt", cert="booking.crt",
                   key="booking.key") as kq:
        box = encrypt_record(kq, "acme-health", record, {"patient": "p-123"})
        with decrypt_record(kq, box, {"patient": "p-123"}) as plain:
            ...

`KeyClient` speaks KeyService over mTLS (the certificate's URI SAN
`keyquorum://backend/<name>` is the backend's identity) and retries only
calls that failed with UNAVAILABLE. `encrypt_record` / `decrypt_record` do
envelope encryption: each record under a fresh data key from
GenerateDataKey, the wrapped key stored beside it.
"""

from keyquorum.client.client import DataKey, KeyClient, KeyServiceError, Wrapped
from keyquorum.client.envelope import decrypt_record, encrypt_record

__all__ = [
    "DataKey",
    "KeyClient",
    "KeyServiceError",
    "Wrapped",
    "decrypt_record",
    "encrypt_record",
]

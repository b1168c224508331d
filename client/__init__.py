"""keyquorum.client: the typed Python client for application backends.

    from keyquorum.client import KeyClient, encrypt_record, decrypt_record

    with KeyClient("kq.example:7444", ca="ca.crt", cert="booking.crt",
                   key="booking.key") as kq:
        box = encrypt_record(kq, "acme-health", record, {"patient": "p-123"})
        with decrypt_record(kq, box, {"patient": "p-123"}) as plain:
            ...

`KeyClient` speaks KeyService over mTLS (the certificate's URI SAN
`keyquorum://backend/<name>` is the backend's identity), to one address or
to several replicas (gRPC's round robin over the healthy ones; sealed
replicas skipped), retrying only UNAVAILABLE, with a deadline on every
call. `AsyncKeyClient` (`keyquorum.client.aio`) is the same for asyncio.
`encrypt_record` / `decrypt_record` do envelope encryption of records in
memory, `encrypt_stream` / `decrypt_stream` of files of any size in
bounded memory (one format: docs/streaming-format.md); with
`KeyClient(cache=CacheBounds(max_age=...))` they reuse data keys within
the AWS Encryption SDK's bounds (off by default; docs/client.md says what
that trades away). Plaintexts and keys come back as `SecretBytes`.

Run-time dependencies: grpcio, protobuf and cryptography only.
"""

from keyquorum.client.aio import AsyncKeyClient
from keyquorum.client.cache import CacheBounds, CacheStats
from keyquorum.client.client import DataKey, KeyClient, KeyServiceError, Wrapped
from keyquorum.client.envelope import decrypt_record, encrypt_record
from keyquorum.client.framing import Summary, TruncatedError
from keyquorum.client.streams import decrypt_stream, encrypt_stream
from keyquorum.quorum.secret import SecretBytes

__all__ = [
    "AsyncKeyClient",
    "CacheBounds",
    "CacheStats",
    "DataKey",
    "KeyClient",
    "KeyServiceError",
    "SecretBytes",
    "Summary",
    "TruncatedError",
    "Wrapped",
    "decrypt_record",
    "decrypt_stream",
    "encrypt_record",
    "encrypt_stream",
]

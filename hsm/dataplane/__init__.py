"""The data plane: what backends call all day (KeyService's core, without gRPC).

- `format`: the ciphertext format and the encoding of encryption contexts;
- `items`: what a call takes and gives, and the usage sinks;
- `counters`: encryptions per key version against the SP 800-38D bound;
- `nonces`: random 96-bit nonces drawn in blocks;
- `plane`: `DataPlane`, the order of checks for every call;
- `ratelimit`: per-backend token buckets;
- `_wire` (C, optional): KeyService requests read and batches sealed over
  the wire bytes, tested against the Python path.
"""

from keyquorum.hsm.dataplane.counters import EncryptionCounters, WouldWait
from keyquorum.hsm.dataplane.format import (
    AAD_LABEL,
    FORMAT_V1,
    Parsed,
    decrypt,
    encode_context,
    encode_context_pairs,
    encrypt,
    header,
    parse,
    sealed_info,
)
from keyquorum.hsm.dataplane.items import (
    GenerateItem,
    Revealed,
    RewrapItem,
    UnwrapItem,
    UsageSink,
    WrapItem,
    Wrapped,
)
from keyquorum.hsm.dataplane.nonces import NoncePool
from keyquorum.hsm.dataplane.plane import UNKNOWN, WIRE_CODEC_BUILT, DataPlane

__all__ = [
    "AAD_LABEL",
    "FORMAT_V1",
    "UNKNOWN",
    "WIRE_CODEC_BUILT",
    "DataPlane",
    "EncryptionCounters",
    "GenerateItem",
    "NoncePool",
    "Parsed",
    "Revealed",
    "RewrapItem",
    "UnwrapItem",
    "UsageSink",
    "WouldWait",
    "WrapItem",
    "Wrapped",
    "decrypt",
    "encode_context",
    "encode_context_pairs",
    "encrypt",
    "header",
    "parse",
    "sealed_info",
]

"""Types of the C accelerator hsm/dataplane/_wire.c (the BatchWrap and BatchUnwrap loops)."""

Limits = tuple[int, int, int, int]

def scan(request: bytes, limits: Limits, /) -> list[tuple[str, int]] | None: ...
def seal(
    request: bytes,
    limits: Limits,
    keys: list[tuple[memoryview, bytes, int]],
    label: bytes,
    nonces: bytes,
    want_contexts: bool,
    /,
) -> tuple[bytes, list[tuple[int, bytes]] | None]: ...
def scan_unwrap(request: bytes, limits: Limits, /) -> list[tuple[bytes, int]] | None: ...
def open_all(
    request: bytes,
    limits: Limits,
    keys: list[tuple[memoryview, bytes]],
    label: bytes,
    want_contexts: bool,
    /,
) -> tuple[bytearray, list[tuple[int, bytes]] | None] | None: ...

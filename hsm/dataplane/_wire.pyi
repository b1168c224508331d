"""Types of the C accelerator hsm/dataplane/_wire.c (BatchWrap's per-item loop)."""

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

"""`keyquorum backend`: what a backend does, from a shell, with the backend's certificate.

wrap, unwrap and data-key call KeyService once; encrypt-file and
decrypt-file are the client's streaming envelope (docs/streaming-format.md)
over files of any size, in bounded memory, with a progress bar on a
terminal. Secrets (a plaintext to wrap) are read from a file or stdin,
never from the command line, where other users see them (`ps`); a
plaintext typed at a terminal is not echoed. Secrets written out (an
unwrapped plaintext, a data key, a decrypted file) go to new files of
mode 0600 or to stdout. A decrypted file is written beside its target and
renamed only once every frame authenticated, so a truncated or altered
envelope never leaves part of a plaintext under the name asked for.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import click

from keyquorum.quorum.errors import InvalidInputError

if TYPE_CHECKING:
    from keyquorum.client import KeyClient

F = TypeVar("F", bound=Callable[..., Any])

#: Bytes read at most for wrap (the daemon takes 4096); more is refused unread.
WRAP_READ_LIMIT = 1 << 16
#: Ciphertext read at most for unwrap (wrapped values are small).
UNWRAP_READ_LIMIT = 1 << 20
#: A progress bar by default from this size, on a terminal.
PROGRESS_FROM = 8 << 20


@dataclass(frozen=True)
class Connection:
    servers: tuple[str, ...]
    ca: Path | None
    cert: Path | None
    key: Path | None
    server_name: str | None
    timeout: float

    def client(self) -> KeyClient:
        from keyquorum.client import KeyClient

        if not self.servers:
            raise InvalidInputError(
                "give the daemon's mTLS address: --server HOST:PORT (or KEYQUORUM_BACKEND_SERVER)"
            )
        if self.ca is None or self.cert is None or self.key is None:
            raise InvalidInputError(
                "KeyService needs mTLS: give --ca, and the backend's --cert and --key"
            )
        target = self.servers[0] if len(self.servers) == 1 else list(self.servers)
        return KeyClient(
            target,
            ca=self.ca,
            cert=self.cert,
            key=self.key,
            server_name=self.server_name,
            timeout=self.timeout,
        )


def connection_options(f: F) -> F:
    """The options every backend command takes: where, and as whom."""
    file = click.Path(exists=True, dir_okay=False, path_type=Path)
    options = [
        click.option(
            "--server",
            "servers",
            multiple=True,
            envvar="KEYQUORUM_BACKEND_SERVER",
            metavar="HOST:PORT",
            help="The daemon's mTLS address (repeatable for replicas; "
            "env KEYQUORUM_BACKEND_SERVER, space-separated).",
        ),
        click.option(
            "--ca", type=file, envvar="KEYQUORUM_CA", help="CA of the daemon (env KEYQUORUM_CA)."
        ),
        click.option(
            "--cert",
            type=file,
            envvar="KEYQUORUM_CLIENT_CERT",
            help="The backend's certificate, keyquorum://backend/NAME (env KEYQUORUM_CLIENT_CERT).",
        ),
        click.option(
            "--key",
            "key_file",
            type=file,
            envvar="KEYQUORUM_CLIENT_KEY",
            help="The private key of --cert (env KEYQUORUM_CLIENT_KEY).",
        ),
        click.option(
            "--server-name",
            help="The name the daemon's certificate carries (default: the address's host).",
        ),
        click.option(
            "--timeout", default=10.0, show_default=True, help="Deadline of each call, seconds."
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def context_options(f: F) -> F:
    options = [
        click.option(
            "--context",
            "pairs",
            multiple=True,
            metavar="KEY=VALUE",
            help="An encryption-context pair (repeatable). Values on a command line are "
            "visible to other users of this machine: prefer --context-file for personal data.",
        ),
        click.option(
            "--context-file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help='The context as a JSON object of strings, e.g. {"patient": "p-4711"}.',
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def read_context(pairs: tuple[str, ...], path: Path | None) -> dict[str, str]:
    """--context pairs and --context-file, merged; a key given twice is refused."""
    from keyquorum.client.inputs import check_context

    context: dict[str, str] = {}
    if path is not None:
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidInputError(f"cannot read the context file {path}: {e}") from None
        context = check_context(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"--context takes KEY=VALUE, got {pair.split('=')[0]!r}...")
        if key in context:
            raise InvalidInputError(f"context key {key!r} is given twice")
        context[key] = value
    return context


@click.group("backend")
def backend() -> None:
    """Wrap, unwrap and encrypt files as a backend (mTLS, the backend's certificate).

    Connection: --server (the daemon's --listen-mtls), --ca, --cert, --key, or
    KEYQUORUM_BACKEND_SERVER, KEYQUORUM_CA, KEYQUORUM_CLIENT_CERT, KEYQUORUM_CLIENT_KEY.
    Secrets are read from a file or stdin, never from the command line.

    \b
    Examples:
      keyquorum backend wrap --tenant acme-health --context-file ctx.json < secret.bin
      keyquorum backend unwrap --context-file ctx.json --out secret.bin < secret.wrapped
      keyquorum backend data-key --tenant acme-health --plaintext-out dk.bin > dk.json
      keyquorum backend encrypt-file --tenant acme-health --context-file ctx.json scan.pdf scan.kqe
      keyquorum backend decrypt-file --context-file ctx.json scan.kqe scan.pdf
    """


# -- reading and writing secrets -----------------------------------------------------------


def _read_limited(stream: BinaryIO, limit: int, what: str) -> bytearray:
    data = bytearray(stream.read(limit + 1))
    if len(data) > limit:
        data[:] = bytes(len(data))
        raise InvalidInputError(f"{what} is longer than {limit} bytes")
    return data


def read_secret(path: str, limit: int, what: str) -> bytearray:
    """A secret from a file or stdin ('-'); at a terminal, a prompt that does not echo."""
    if path != "-":
        try:
            with Path(path).open("rb") as f:
                return _read_limited(f, limit, what)
        except OSError as e:
            raise InvalidInputError(f"cannot read {path}: {e.strerror}") from None
    if sys.stdin.isatty():
        typed = click.prompt(f"{what} (not echoed)", hide_input=True, err=True)
        return bytearray(typed.encode())
    return _read_limited(sys.stdin.buffer, limit, what)


def write_new_secret(path: Path, data: bytes | memoryview) -> None:
    """A new file of mode 0600 (an existing one is never replaced)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidInputError(f"{path} exists; it is not overwritten") from None
    except OSError as e:
        raise InvalidInputError(f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def output_file(target: str, *, force: bool, mode: int) -> Iterator[BinaryIO]:
    """stdout for '-'; else a temporary file beside `target`, renamed onto it on success."""
    if target == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    out = Path(target)
    if out.exists() and not force:
        raise InvalidInputError(f"{out} exists; give --force to replace it")
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise InvalidInputError(f"cannot write beside {out}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def input_file(source: str) -> Iterator[tuple[BinaryIO, int | None]]:
    """(the open file, its size when known) for a path or '-' (stdin)."""
    if source == "-":
        yield sys.stdin.buffer, None
        return
    try:
        f = Path(source).open("rb")  # noqa: SIM115 (closed below, after the caller is done)
    except OSError as e:
        raise InvalidInputError(f"cannot read {source}: {e.strerror}") from None
    with f:
        yield f, os.fstat(f.fileno()).st_size


@contextlib.contextmanager
def progress_bar(
    total: int | None, label: str, mode: bool | None
) -> Iterator[Callable[[int], None]]:
    """A bar on stderr for an input of known size: on a terminal from 8 MiB, or when asked.

    click's bar draws only on a terminal; asked for elsewhere (a log), it
    writes its label once. Stdin has no known size, hence no bar.
    """
    shown = mode if mode is not None else sys.stderr.isatty() and (total or 0) >= PROGRESS_FROM
    if not shown or total is None:
        yield lambda _n: None
        return
    with click.progressbar(length=max(total, 1), label=label, file=sys.stderr) as bar:
        yield bar.update
        # Decryption counts plaintext against the envelope's size (0.03 % more).
        bar.update(max(0, max(total, 1) - bar.pos))


# -- the commands ----------------------------------------------------------------------------


@backend.command("wrap")
@connection_options
@context_options
@click.option("--tenant", required=True, help="The tenant whose key wraps the value.")
@click.option(
    "--in",
    "source",
    default="-",
    show_default=True,
    help="File holding the plaintext (up to 4096 bytes); '-' is stdin.",
)
@click.option("--raw", is_flag=True, help="Write the ciphertext as bytes, not base64.")
@click.option("--json", "as_json", is_flag=True, help="Print {ciphertext, key_version} as JSON.")
def wrap_cmd(
    servers: tuple[str, ...],
    ca: Path | None,
    cert: Path | None,
    key_file: Path | None,
    server_name: str | None,
    timeout: float,
    pairs: tuple[str, ...],
    context_file: Path | None,
    tenant: str,
    source: str,
    raw: bool,
    as_json: bool,
) -> None:
    """Wrap a small secret read from a file or stdin; print the ciphertext (base64)."""
    context = read_context(pairs, context_file)
    conn = Connection(servers, ca, cert, key_file, server_name, timeout)
    plaintext = read_secret(source, WRAP_READ_LIMIT, "the plaintext")
    try:
        with conn.client() as client:
            wrapped = client.wrap(tenant, plaintext, context)
    finally:
        plaintext[:] = bytes(len(plaintext))
    if raw:
        sys.stdout.buffer.write(wrapped.ciphertext)
        sys.stdout.buffer.flush()
    elif as_json:
        click.echo(
            json.dumps(
                {
                    "ciphertext": base64.b64encode(wrapped.ciphertext).decode(),
                    "key_version": wrapped.key_version,
                }
            )
        )
    else:
        click.echo(base64.b64encode(wrapped.ciphertext).decode())


@backend.command("unwrap")
@connection_options
@context_options
@click.option(
    "--in",
    "source",
    default="-",
    show_default=True,
    help="File holding the ciphertext (base64, or bytes with --raw); '-' is stdin.",
)
@click.option("--raw", is_flag=True, help="The ciphertext is bytes, not base64.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the plaintext to this new file (mode 0600) instead of stdout.",
)
def unwrap_cmd(
    servers: tuple[str, ...],
    ca: Path | None,
    cert: Path | None,
    key_file: Path | None,
    server_name: str | None,
    timeout: float,
    pairs: tuple[str, ...],
    context_file: Path | None,
    source: str,
    raw: bool,
    out: Path | None,
) -> None:
    """Unwrap a ciphertext with the context it was wrapped with; write the plaintext."""
    context = read_context(pairs, context_file)
    conn = Connection(servers, ca, cert, key_file, server_name, timeout)
    data = bytes(read_secret(source, UNWRAP_READ_LIMIT, "the ciphertext"))
    if not raw:
        try:
            data = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInputError(
                "the ciphertext is not base64 (give --raw for a binary file)"
            ) from None
    with conn.client() as client, client.unwrap(data, context) as plaintext:
        if out is not None:
            write_new_secret(out, plaintext.view())
        else:
            sys.stdout.buffer.write(plaintext.view())
            sys.stdout.buffer.flush()


@backend.command("data-key")
@connection_options
@context_options
@click.option("--tenant", required=True, help="The tenant whose key wraps the data key.")
@click.option("--size", default=32, show_default=True, help="Bytes, 16 to 64.")
@click.option(
    "--plaintext-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the data key itself to this new file (mode 0600); without it the clear "
    "key is not kept anywhere (only the wrapped form is printed).",
)
def data_key_cmd(
    servers: tuple[str, ...],
    ca: Path | None,
    cert: Path | None,
    key_file: Path | None,
    server_name: str | None,
    timeout: float,
    pairs: tuple[str, ...],
    context_file: Path | None,
    tenant: str,
    size: int,
    plaintext_out: Path | None,
) -> None:
    """Generate a data key; print its wrapped form as JSON {ciphertext, key_version, size}."""
    context = read_context(pairs, context_file)
    conn = Connection(servers, ca, cert, key_file, server_name, timeout)
    if plaintext_out is not None and plaintext_out.exists():
        raise InvalidInputError(f"{plaintext_out} exists; it is not overwritten")
    with conn.client() as client, client.generate_data_key(tenant, context, size=size) as dk:
        if plaintext_out is not None:
            write_new_secret(plaintext_out, dk.plaintext.view())
        click.echo(
            json.dumps(
                {
                    "ciphertext": base64.b64encode(dk.ciphertext).decode(),
                    "key_version": dk.key_version,
                    "size": len(dk.plaintext),
                }
            )
        )


def _progress_option(f: F) -> F:
    return click.option(
        "--progress/--no-progress",
        default=None,
        help="A progress bar on stderr (default: on a terminal, for input files of 8 MiB or "
        "more; never for stdin, whose size is unknown).",
    )(f)


@backend.command("encrypt-file")
@connection_options
@context_options
@click.option("--tenant", required=True, help="The tenant whose key wraps the file's data key.")
@click.option(
    "--frame-size",
    default=65536,
    show_default=True,
    help="Plaintext bytes per frame (1 to 16 MiB).",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@_progress_option
@click.argument("source", metavar="INPUT")
@click.argument("target", metavar="OUTPUT")
def encrypt_file_cmd(
    servers: tuple[str, ...],
    ca: Path | None,
    cert: Path | None,
    key_file: Path | None,
    server_name: str | None,
    timeout: float,
    pairs: tuple[str, ...],
    context_file: Path | None,
    tenant: str,
    frame_size: int,
    force: bool,
    progress: bool | None,
    source: str,
    target: str,
) -> None:
    """Encrypt INPUT (a file, or '-' for stdin) into OUTPUT ('-' for stdout).

    One data key from the daemon, then AES-256-GCM frames under a key
    derived for this file (docs/streaming-format.md); any size, in bounded
    memory.
    """
    from keyquorum.client import encrypt_stream

    context = read_context(pairs, context_file)
    conn = Connection(servers, ca, cert, key_file, server_name, timeout)
    with (
        input_file(source) as (src, size),
        conn.client() as client,
        output_file(target, force=force, mode=0o644) as dst,
        progress_bar(size, "encrypting", progress) as advance,
    ):
        summary = encrypt_stream(
            client, tenant, src, dst, context, frame_size=frame_size, progress=advance
        )
    _report(f"encrypted {summary.plaintext_bytes:,} bytes into {summary.frames:,} frames", target)


@backend.command("decrypt-file")
@connection_options
@context_options
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@_progress_option
@click.argument("source", metavar="INPUT")
@click.argument("target", metavar="OUTPUT")
def decrypt_file_cmd(
    servers: tuple[str, ...],
    ca: Path | None,
    cert: Path | None,
    key_file: Path | None,
    server_name: str | None,
    timeout: float,
    pairs: tuple[str, ...],
    context_file: Path | None,
    force: bool,
    progress: bool | None,
    source: str,
    target: str,
) -> None:
    """Decrypt INPUT (a file, or '-') into OUTPUT (mode 0600; '-' for stdout).

    OUTPUT appears only once every frame authenticated; a truncated or altered
    INPUT leaves nothing behind. To stdout, frames are written as they
    authenticate: on an error (exit 1) what was written is incomplete.
    """
    from keyquorum.client import decrypt_stream

    context = read_context(pairs, context_file)
    conn = Connection(servers, ca, cert, key_file, server_name, timeout)
    with (
        input_file(source) as (src, size),
        conn.client() as client,
        output_file(target, force=force, mode=0o600) as dst,
        # The envelope's size stands in for the plaintext's (0.03 % more).
        progress_bar(size, "decrypting", progress) as advance,
    ):
        summary = decrypt_stream(client, src, dst, context, progress=advance)
    _report(f"decrypted {summary.plaintext_bytes:,} bytes from {summary.frames:,} frames", target)


def _report(message: str, target: str) -> None:
    if target != "-":
        click.echo(f"{message}: {target}", err=True)

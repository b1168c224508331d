"""A TLS-terminating relay that records the plaintext it forwards.

It plays the proxy of the design brief: it holds the daemon's server
certificate and key (as a CDN or load balancer does), terminates the
client's TLS, opens its own TLS connection to the daemon, and forwards the
HTTP/2 bytes in both directions, keeping a copy of everything. Tests then
search the recording for shares, passphrases and keys.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from pathlib import Path


class RecordingTlsRelay:
    """Listen on 127.0.0.1:<port>, forward to `upstream` over TLS, record plaintext."""

    def __init__(self, *, cert: Path, key: Path, ca: Path, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._front.load_cert_chain(str(cert), str(key))
        self._front.set_alpn_protocols(["h2"])
        self._back = ssl.create_default_context(cafile=str(ca))
        self._back.set_alpn_protocols(["h2"])
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._recorded = bytearray()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0

    def start(self) -> RecordingTlsRelay:
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def recording(self) -> bytes:
        with self._lock:
            return bytes(self._recorded)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, raw: socket.socket) -> None:
        try:
            front = self._front.wrap_socket(raw, server_side=True)
            upstream = socket.create_connection(self._upstream)
            back = self._back.wrap_socket(upstream, server_hostname="localhost")
        except (OSError, ssl.SSLError):
            raw.close()
            return
        self.connections += 1
        pairs = {front: back, back: front}
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select(list(pairs), [], [], 0.2)
                for sock in readable:
                    # Drain what TLS already decrypted, not just what the socket holds.
                    data = sock.recv(65536)
                    while sock.pending():
                        data += sock.recv(sock.pending())
                    if not data:
                        return
                    with self._lock:
                        self._recorded += data
                    pairs[sock].sendall(data)
        except (OSError, ssl.SSLError):
            return
        finally:
            front.close()
            back.close()

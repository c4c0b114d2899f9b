"""A loopback TCP proxy between a worker and PostgreSQL that can misbehave on purpose.

Modes, switchable at any time:
- ``pass``: forward both ways;
- ``refuse``: cut every open connection and reset new ones (the database is down);
- ``freeze``: keep every socket open but forward nothing (a half-open peer that never answers);
- :meth:`drop_reply_to`: forward a client message containing a byte pattern, let the server
  answer, swallow that answer and cut the connection (the commit happened; its reply was lost).
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress


class FaultProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self._pattern: bytes | None = None
        self.dropped = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="faultproxy", daemon=True)
        self._thread.start()

    # -- control ----------------------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        assert mode in {"pass", "refuse", "freeze"}
        self.mode = mode
        if mode == "refuse":
            self._cut_all()

    def drop_reply_to(self, pattern: bytes) -> None:
        """Swallow the reply to the next client message containing ``pattern``."""
        self.dropped.clear()
        self._pattern = pattern

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self._cut_all()
        self._thread.join(5)

    # -- forwarding -------------------------------------------------------------------------

    def _cut_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _close(sock)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "refuse":
                _close(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(
                target=self._pump, args=(client, server), name="faultproxy-pump", daemon=True
            ).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        swallow = False
        try:
            while not self._closed.is_set():
                if self.mode == "freeze":
                    self._closed.wait(0.05)
                    continue
                ready, _, _ = select.select([client, server], [], [], 0.05)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if self.mode == "freeze":
                        # Hold what arrived until the freeze ends, like a peer that vanished.
                        while self.mode == "freeze" and not self._closed.is_set():
                            self._closed.wait(0.05)
                    if sock is client:
                        pattern = self._pattern
                        if pattern is not None and pattern in data:
                            self._pattern = None
                            swallow = True
                        server.sendall(data)
                    elif swallow:
                        self.dropped.set()
                        return  # the answer is lost with the connection
                    else:
                        client.sendall(data)
        except (OSError, ValueError):
            # Closed under it: the connection was cut (a mode change, the proxy's stop) by
            # another thread while this one waited on it (select raises ValueError for fd -1).
            return
        finally:
            _close(client)
            _close(server)


def _close(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@contextmanager
def fault_proxy(upstream: tuple[str, int]) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream)
    try:
        yield proxy
    finally:
        proxy.close()

"""A byte-counting TCP proxy on loopback: clients talk to it instead of a server, and it counts
every byte the server sent them (HTTP headers included), so tests and benchmarks measure what
an object store really served rather than estimate it."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


@dataclass
class CountingProxy:
    target: tuple[str, int]
    listener: socket.socket = field(init=False)
    sent_to_clients: int = 0  # bytes from the server to clients
    received_from_clients: int = 0
    connections: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _closed: threading.Event = field(default_factory=threading.Event, init=False)

    def __post_init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(256)
        threading.Thread(target=self._accept, daemon=True, name="counting-proxy").start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def reset(self) -> None:
        with self._lock:
            self.sent_to_clients = self.received_from_clients = self.connections = 0

    def close(self) -> None:
        self._closed.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
            for source, sink, downstream in ((server, client, True), (client, server, False)):
                threading.Thread(
                    target=self._pipe, args=(source, sink, downstream), daemon=True
                ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, downstream: bool) -> None:
        try:
            while data := source.recv(1 << 20):
                sink.sendall(data)
                with self._lock:
                    if downstream:
                        self.sent_to_clients += len(data)
                    else:
                        self.received_from_clients += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def counting_proxy_for(endpoint: str) -> CountingProxy:
    """A proxy in front of an `http://host:port` endpoint."""
    host, port = endpoint.removeprefix("http://").rstrip("/").rsplit(":", 1)
    return CountingProxy((host, int(port)))

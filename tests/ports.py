"""Loopback ports without the find-a-free-port-then-bind race: a port where connections are refused
stays bound by the test until it ends, and a server started on a free port is retried on another one
if something took the port in between."""
from __future__ import annotations

import contextlib
import socket
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port where a connection is refused: bound here without listening, so nobody can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free at this moment (a server given one may still lose it: see
    :func:`on_free_ports`)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def on_free_ports(start: Callable[[list[int]], T], n: int = 1, tries: int = 3) -> T:
    """``start(ports)`` on ``n`` free ports, again on new ones when it raises (another process took a
    port between our check and the server's bind); the last try's error propagates."""
    for attempt in range(tries):
        try:
            return start(free_ports(n))
        except Exception:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")

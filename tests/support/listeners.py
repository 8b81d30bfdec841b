"""Local listeners for the SSRF proofs: a canary that counts connections, a redirector."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# --- a canary: counts every TCP connection made to it ----------------------------------------


@dataclass
class Canary:
    port: int
    sockets: list[socket.socket] = field(default_factory=list)
    accepted: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def hosts(self) -> list[str]:
        """Loopback spellings an attacker would try, all pointing at this listener."""
        return [f"127.0.0.1:{self.port}", f"0.0.0.0:{self.port}", f"[::1]:{self.port}"]

    @property
    def urls(self) -> list[str]:
        return [f"http://{host}" for host in self.hosts]

    def count(self) -> int:
        with self.lock:
            return self.accepted

    def settled_count(self) -> int:
        # Give any stray outbound connection time to land before reading the counter.
        time.sleep(0.3)
        return self.count()

    def serve(self, listener: socket.socket) -> None:
        listener.settimeout(0.05)
        while not self.stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            with self.lock:
                self.accepted += 1
            conn.close()


@contextlib.contextmanager
def open_canary() -> Iterator[Canary]:
    v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    v4.bind(("127.0.0.1", 0))
    v4.listen(128)
    trap = Canary(port=v4.getsockname()[1], sockets=[v4])
    # The same port on ::1, so an IPv6 loopback URL is counted too (where IPv6 exists).
    try:
        v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6.bind(("::1", trap.port))
        v6.listen(128)
        trap.sockets.append(v6)
    except OSError:
        pass
    threads = [threading.Thread(target=trap.serve, args=(s,), daemon=True) for s in trap.sockets]
    for thread in threads:
        thread.start()
    # Prove the canary counts (on every address family it listens on) before trusting a 0.
    families = [("127.0.0.1", trap.port)] + ([("::1", trap.port)] if len(trap.sockets) > 1 else [])
    for address in families:
        with socket.create_connection(address, timeout=2):
            pass
    deadline = time.monotonic() + 2
    while trap.count() < len(families) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert trap.count() == len(families), "the canary listener does not count connections"
    with trap.lock:
        trap.accepted = 0
    try:
        yield trap
    finally:
        trap.stop.set()
        for thread in threads:
            thread.join(2)
        for sock in trap.sockets:
            sock.close()


# --- a redirector: answers everything with a 302 to a target ----------------------------------


@dataclass
class Redirector:
    url: str
    hits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        with self.lock:
            return self.hits


@contextlib.contextmanager
def open_redirector(target: str) -> Iterator[Redirector]:
    found = Redirector(url="")

    class Handler(BaseHTTPRequestHandler):
        def _redirect(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            with found.lock:
                found.hits += 1
            self.send_response(302)
            self.send_header("location", f"{target}{self.path}")
            self.send_header("content-length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_HEAD = _redirect

        def log_message(self, *args: Any) -> None:
            pass

    with serve_http(Handler) as url:
        found.url = url
        yield found


# --- any handler, served from a thread ------------------------------------------------------------


@contextlib.contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve `handler` on a free loopback port from a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()

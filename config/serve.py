"""The production server: import the application once, then fork uvicorn workers.

    python -m config.serve --host 0.0.0.0 --port 8000 --workers 2

`uvicorn --workers N` spawns N fresh interpreters, and each imports Django and
litellm again: about 3 s of CPU and 240 MB apiece, so start-up on a busy 2-core
machine took 7-15 s and the tree held N private copies of the same modules. Here
the parent imports the application once, freezes the garbage collector (its
collections would otherwise write to every object header and un-share the pages),
binds the socket and forks: workers start in milliseconds and share the imported
modules copy-on-write, as gunicorn's `--preload` does.

The parent only supervises. A worker that dies unexpectedly is replaced (the
replacement is forked from the same imported state); SIGTERM or SIGINT stops the
workers gracefully (uvicorn finishes in-flight requests, so every ledger row is
written) and a second signal kills them.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
import sys
import time
from types import FrameType

# A worker that dies this soon after starting, this many times in a row, means the
# application cannot serve (bad settings, port trouble): stop instead of looping.
CRASH_WINDOW_S = 5.0
CRASH_LIMIT = 5
RESPAWN_DELAY_S = 0.5
GRACEFUL_TIMEOUT_S = 30


def log(message: str) -> None:
    print(f"serve[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m config.serve", description=__doc__)
    parser.add_argument("--host", default=os.environ.get("GATEWAY_HOST", "127.0.0.1"))
    # String defaults go through `type` too: a bad PORT or GATEWAY_WORKERS gets
    # argparse's "invalid int value" instead of a traceback.
    parser.add_argument("--port", type=int, default=os.environ.get("PORT", "8000"))
    parser.add_argument(
        "--workers",
        type=int,
        default=os.environ.get("GATEWAY_WORKERS") or str(os.cpu_count() or 1),
        help="worker processes (default: GATEWAY_WORKERS, else one per core)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    return args


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def load_application() -> object:
    """Import everything a worker needs, and leave nothing open that forking would share."""
    from django.core.cache import caches
    from django.db import connections

    from config.asgi import application

    # Nothing is connected yet at import, but close anyway: a connection inherited by
    # two processes interleaves their bytes on one socket.
    connections.close_all()
    for cache in caches.all(initialized_only=True):
        cache.close()
    gc.collect()
    # Move every object imported so far out of the collector's reach: children then
    # never write to those objects' GC headers and keep sharing their pages.
    gc.freeze()
    return application


def run_worker(application: object, sock: socket.socket, access_log: bool) -> None:
    import uvicorn

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    stop_with_parent()
    config = uvicorn.Config(
        application,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=access_log,
        timeout_graceful_shutdown=GRACEFUL_TIMEOUT_S,
    )
    uvicorn.Server(config).run(sockets=[sock])


def stop_with_parent() -> None:
    """Have the kernel send SIGTERM if the parent dies (even by SIGKILL): no orphans."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(0)


class Supervisor:
    def __init__(self, application: object, sock: socket.socket, args: argparse.Namespace):
        self.application = application
        self.sock = sock
        self.args = args
        self.workers: dict[int, float] = {}  # pid -> time started
        self.stopping = False
        self.quick_deaths = 0

    def spawn(self) -> None:
        pid = os.fork()
        if pid == 0:
            # Whatever happens, the child exits here: it must never return into the
            # parent's supervising loop.
            status = 0
            try:
                run_worker(self.application, self.sock, self.args.access_log)
            except BaseException as exc:
                print(f"serve worker: {exc!r}", file=sys.stderr, flush=True)
                status = 1
            finally:
                os._exit(status)
        self.workers[pid] = time.monotonic()

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            log("second signal: killing workers")
            self.signal_workers(signal.SIGKILL)
            return
        self.stopping = True
        log(f"{signal.Signals(signum).name}: stopping {len(self.workers)} workers")
        self.signal_workers(signal.SIGTERM)

    def signal_workers(self, sig: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                self.workers.pop(pid, None)

    def reaped(self, pid: int, status: int) -> None:
        started = self.workers.pop(pid, None)
        if started is None or self.stopping:
            return
        log(f"worker {pid} exited ({describe(status)}); starting a new one")
        if time.monotonic() - started < CRASH_WINDOW_S:
            self.quick_deaths += 1
            if self.quick_deaths >= CRASH_LIMIT:
                log(f"{CRASH_LIMIT} workers died within {CRASH_WINDOW_S:.0f} s of start; giving up")
                self.stopping = True
                self.signal_workers(signal.SIGTERM)
                return
        else:
            self.quick_deaths = 0
        time.sleep(RESPAWN_DELAY_S)
        if not self.stopping:  # a stop signal may have come during the pause
            self.spawn()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        for _ in range(self.args.workers):
            self.spawn()
        host, port = self.sock.getsockname()[:2]
        log(f"{self.args.workers} workers serving http://{host}:{port}")
        while self.workers:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            self.reaped(pid, status)
        gave_up = self.quick_deaths >= CRASH_LIMIT
        return 1 if gave_up else 0


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"status {os.waitstatus_to_exitcode(status)}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        log(f"cannot listen on {args.host}:{args.port}: {exc.strerror}")
        return 1
    application = load_application()
    return Supervisor(application, sock, args).run()


if __name__ == "__main__":
    sys.exit(main())

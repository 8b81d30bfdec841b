"""CLI: ``python -m mock_upstream --host 127.0.0.1 --port 9100``.

``--port 0`` binds a free port; the ready line reports the real one, which is how the tests
find the server: ``mock upstream listening on http://HOST:PORT``.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import sys

import uvicorn

from mock_upstream.app import app, install_log_filter


class _Server(uvicorn.Server):  # type: ignore[misc]  # uvicorn ships no types
    """Prints the ready line only once the socket is bound, so callers can wait for it."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.should_exit or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        print(f"mock upstream listening on http://{host}:{port}", flush=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mock_upstream",
        description="Mock OpenAI/Anthropic upstream LLM server.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100, help="0 picks a free port")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # uvloop and httptools roughly double throughput; fall back so a bare install still runs.
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    has_httptools = importlib.util.find_spec("httptools") is not None
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop" if has_uvloop else "asyncio",
        http="httptools" if has_httptools else "h11",
        log_level="warning",
        access_log=False,
        lifespan="off",
        # Deep benchmark queues must not be refused before the mock is the bottleneck.
        backlog=4096,
    )
    install_log_filter()
    _Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

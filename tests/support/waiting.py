"""Polling instead of sleeping, and keeping a test inside one rate-limit window."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(
    check: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = ""
) -> Any:
    """The first truthy value `check()` returns; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(interval)


def wait_until(check: Callable[[], bool], timeout: float = 3.0, interval: float = 0.05) -> float:
    """Seconds until `check()` became true; AssertionError after `timeout`."""
    started = time.monotonic()
    wait_for(check, timeout, interval, "the condition")
    return time.monotonic() - started


def fresh_minute(margin: float = 8.0) -> None:
    """Wait for the next minute if this one ends within `margin` seconds.

    Rate limits (per key and per deployment) count in fixed one-minute windows of the
    wall clock; a test that counts requests against one must not straddle two windows.
    """
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)

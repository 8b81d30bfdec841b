"""Fixtures shared by the mock upstream's tests: one server process for the session."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def tokens(text: str) -> int:
    """The mock's documented counting rule."""
    return math.ceil(len(text.encode()) / 4)


@pytest.fixture(scope="session")
def mock_url() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mock_upstream", "--host", "127.0.0.1", "--port", "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("mock upstream listening on http://127.0.0.1:"), line
    yield line.rsplit(" ", 1)[1].strip()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(autouse=True)
def fresh_counts(mock_url: str) -> None:
    httpx.post(f"{mock_url}/_mock/reset").raise_for_status()


@pytest.fixture
def oai(mock_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mock_url}/v1", api_key="x", max_retries=0)

"""`make bench`: the gateway against LiteLLM's proxy and the bare mock, all on loopback.

Run through `scripts/services.sh test -- .venv/bin/python bench/run.py` (what `make bench`
does), which provides private Postgres and Redis. This script starts, and always stops:

- the floor: nginx answering a fixed chat completion (`/json/v1/chat/completions`) and
  a fixed 20-chunk SSE stream (`/stream/v1/chat/completions`) from `return 200 '...'`;
- the peer: LiteLLM's proxy (bench/.venv-litellm) in front of that nginx;
- us: the gateway in production mode, with virtual-key auth, budget admission, rpm/tpm
  limits and ledger writes on, under each of SERVERS: our pre-forking server
  (`python -m config.serve`, what production runs), `uvicorn --workers` and granian.

Each repetition measures every target in turn (the order alternates between
repetitions): sequential latency, streaming time to first byte, throughput at a fixed
concurrency for JSON and streams (wrk), server CPU per request, peak RSS and PSS, and start-up
time. Then one long run on our primary server measures memory growth, a py-spy profile
is taken under load, and the ledger is checked against the successful requests. Results
go to bench/results/latest.json and to the table in README.md (Performance).

Knobs (environment): BENCH_REPS (2), BENCH_DURATION (15 s), BENCH_CONNECTIONS (32),
BENCH_SEQUENTIAL (300), BENCH_STREAMS (100), BENCH_WARMUP (3 s), BENCH_GROWTH_REQUESTS
(100000, 0 skips), BENCH_GROWTH_CHUNK (10 s), BENCH_WORKERS (cores), BENCH_WRK_THREADS
(2), BENCH_SERVERS ("prefork,uvicorn,granian"; the first is the primary), BENCH_PEER (1),
BENCH_PROFILE (1).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
README = ROOT / "README.md"
PROJECT_PY = ROOT / ".venv" / "bin" / "python"
LITELLM_BIN = BENCH / ".venv-litellm" / "bin" / "litellm"
# granian and py-spy, installed with `pip install --target` (see bench/setup.sh): granian
# runs on the project's own interpreter with this folder on PYTHONPATH.
TOOLS = BENCH / ".venv-tools"
PY_SPY = TOOLS / "bin" / "py-spy"

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MB = 1024 * 1024
HOST = "127.0.0.1"

TABLE_START = "<!-- bench:table:start -->"
TABLE_END = "<!-- bench:table:end -->"


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- configuration -------------------------------------------------------------------


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        sys.exit(f"bench: {name} must be an integer, got {raw!r}")
    if value < minimum:
        sys.exit(f"bench: {name} must be at least {minimum}, got {value}")
    return value


def _env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        sys.exit(f"bench: {name} must be a number, got {raw!r}")
    if value < minimum:
        sys.exit(f"bench: {name} must be at least {minimum}, got {value}")
    return value


# How our gateway can be served; the first is what production runs (Dockerfile).
#   prefork: `python -m config.serve`: imports the app once, forks uvicorn workers
#   uvicorn: `uvicorn --workers N`: spawns N interpreters, each importing the app
#   granian: `granian --workers N`: forks N workers, each importing the app
SERVERS = ("prefork", "uvicorn", "granian")


@dataclass(frozen=True)
class Config:
    reps: int
    duration: float
    connections: int
    sequential: int
    streams: int
    warmup: float
    growth_requests: int
    growth_chunk: float
    workers: int
    wrk_threads: int
    servers: tuple[str, ...]
    peer: bool
    profile: bool

    @classmethod
    def from_env(cls) -> Config:
        servers = tuple(
            s.strip() for s in os.environ.get("BENCH_SERVERS", ",".join(SERVERS)).split(",")
        )
        servers = tuple(s for s in servers if s)
        unknown = [s for s in servers if s not in SERVERS]
        if unknown or not servers:
            sys.exit(f"bench: BENCH_SERVERS takes some of {', '.join(SERVERS)}; got {servers}")
        connections = _env_int("BENCH_CONNECTIONS", 32, minimum=1)
        return cls(
            reps=_env_int("BENCH_REPS", 2, minimum=1),
            duration=_env_float("BENCH_DURATION", 15.0, minimum=1.0),
            connections=connections,
            sequential=_env_int("BENCH_SEQUENTIAL", 300, minimum=10),
            streams=_env_int("BENCH_STREAMS", 100, minimum=10),
            warmup=_env_float("BENCH_WARMUP", 3.0),
            growth_requests=_env_int("BENCH_GROWTH_REQUESTS", 100_000),
            growth_chunk=_env_float("BENCH_GROWTH_CHUNK", 10.0, minimum=1.0),
            workers=_env_int("BENCH_WORKERS", os.cpu_count() or 1, minimum=1),
            wrk_threads=min(connections, _env_int("BENCH_WRK_THREADS", 2, minimum=1)),
            servers=servers,
            peer=_env_int("BENCH_PEER", 1) != 0,
            profile=_env_int("BENCH_PROFILE", 1) != 0,
        )


# --- the mock upstream's fixed answers --------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "In one short paragraph, why do lighthouses use Fresnel lenses?"},
]
ANSWER = (
    "A Fresnel lens folds the optics of a huge, heavy glass lens into thin concentric "
    "rings, each a slice of the curved surface. It bends most of the lamp light into "
    "one narrow horizontal beam, so a modest flame or bulb can be seen more than twenty "
    "miles out to sea, while the lens stays light, cheap and cool enough to turn."
)
PROMPT_TOKENS, COMPLETION_TOKENS = 34, 64
STREAM_CHUNKS = 20
CREATED = 1_767_225_600
UPSTREAM_MODEL = "gpt-4o-mini-2024-07-18"


def _usage() -> dict[str, Any]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def mock_json() -> str:
    return json.dumps(
        {
            "id": "chatcmpl-bench0000000000000000000001",
            "object": "chat.completion",
            "created": CREATED,
            "model": UPSTREAM_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": ANSWER,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(),
            "service_tier": "default",
            "system_fingerprint": "fp_bench0001",
        },
        separators=(",", ":"),
    )


def mock_sse() -> str:
    """20 content chunks (the last with finish_reason), a usage chunk, then [DONE]."""
    words = ANSWER.split(" ")
    cuts = [round(i * len(words) / STREAM_CHUNKS) for i in range(STREAM_CHUNKS + 1)]
    pieces = [" ".join(words[cuts[i] : cuts[i + 1]]) for i in range(STREAM_CHUNKS)]
    pieces = [p if i == 0 else " " + p for i, p in enumerate(pieces)]
    assert len(pieces) == STREAM_CHUNKS, len(pieces)

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> str:
        body = {
            "id": "chatcmpl-bench0000000000000000000002",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": UPSTREAM_MODEL,
            "service_tier": "default",
            "system_fingerprint": "fp_bench0001",
            "choices": choices,
            "usage": usage,
        }
        return "data: " + json.dumps(body, separators=(",", ":")) + "\n\n"

    frames = []
    for i, piece in enumerate(pieces):
        delta: dict[str, Any] = {"content": piece}
        if i == 0:
            delta = {"role": "assistant", "content": piece, "refusal": None}
        last = i == len(pieces) - 1
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": "stop" if last else None,
        }
        frames.append(chunk([choice], None))
    frames.append(chunk([], _usage()))
    frames.append("data: [DONE]\n\n")
    return "".join(frames)


def _nginx_return(name: str, text: str) -> str:
    """`return 200` with `text`, cut into `set` pieces: nginx caps one token at 4 KB."""
    # Inside '...' nginx treats \ and ' specially and $ as a variable: keep them out.
    for bad in ("'", "\\", "$"):
        assert bad not in text, f"mock body must not contain {bad!r}"
    size = 3000
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    lines = [f"set ${name}_{i} '{piece}';" for i, piece in enumerate(pieces)]
    joined = "".join(f"${name}_{i}" for i in range(len(pieces)))
    return "\n            ".join([*lines, f'return 200 "{joined}";'])


def nginx_conf(workdir: Path, port: int) -> str:
    temp = {name: workdir / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(exist_ok=True)
    return f"""
daemon off;
worker_processes auto;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    server {{
        listen {HOST}:{port} backlog=4096;
        location = /health {{
            default_type text/plain;
            return 200 'ok';
        }}
        location = /json/v1/chat/completions {{
            default_type application/json;
            {_nginx_return("bench_json", mock_json())}
        }}
        location = /stream/v1/chat/completions {{
            default_type text/event-stream;
            add_header Cache-Control no-cache;
            {_nginx_return("bench_sse", mock_sse())}
        }}
    }}
}}
"""


def request_body(model: str, *, stream: bool) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": 128}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


# --- processes ------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    if _stat_fields(root) is None:
        return []
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of the processes, including their children that have exited.

    utime + stime + cutime + cstime: a worker that exits and is reaped moves its time
    into its parent's cutime/cstime, so the sum over a tree never goes backwards.
    """
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += sum(int(f) for f in fields[11:15])
    return total / CLOCK_TICKS


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    return total


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size: a page shared by k processes counts 1/k in each.

    Summed over a tree it is the memory the tree really holds. RSS counts a shared
    page once per process, so it overstates a tree of forked workers that share
    their imported modules copy-on-write; for spawned workers the two nearly agree.
    """
    total = 0
    for pid in pids:
        with suppress(OSError, IndexError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


class Processes:
    """Everything this run started, each in its own process group, stopped by its pid."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[subprocess.Popen[bytes]] = []
        self._logs: dict[int, IO[bytes]] = {}

    def start(
        self, name: str, args: list[str], env: dict[str, str], stdout: int | None = None
    ) -> subprocess.Popen[bytes]:
        logfile = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            args,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else logfile,
            stderr=logfile,
            start_new_session=True,
        )
        self.running.append(proc)
        self._logs[proc.pid] = logfile
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.logdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        # The group id is the pid we started: this reaches our child and its workers only.
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Workers that outlived their parent are still in the group.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.running:
            self.running.remove(proc)
        logfile = self._logs.pop(proc.pid, None)
        if logfile is not None:
            logfile.close()

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            with suppress(Exception):
                self.stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_get_status(port: int, path: str, timeout: float = 2.0) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def wait_ready(
    procs: Processes, name: str, proc: subprocess.Popen[bytes], port: int, path: str, limit: float
) -> float:
    """Seconds from now until `path` answers 200 (the caller started the clock earlier)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {proc.returncode} before it was ready:\n"
                + procs.log_tail(name)
            )
        with suppress(OSError, http.client.HTTPException):
            if http_get_status(port, path, timeout=1.0) == 200:
                return time.monotonic()
        time.sleep(0.05)
    raise RuntimeError(f"{name} was not ready within {limit:.0f} s:\n" + procs.log_tail(name))


class RssSampler:
    """Peak RSS and PSS of a process tree, sampled every 0.2 s by a separate process.

    A separate process, so that the sampling never holds this process's GIL while it
    times requests.
    """

    def __init__(self, procs: Processes, name: str, root: int) -> None:
        self.procs = procs
        self.proc = procs.start(
            f"rss-{name}",
            [sys.executable, str(Path(__file__).resolve()), "_sample", str(root), "0.2"],
            env=dict(os.environ),
            stdout=subprocess.PIPE,
        )

    def stop(self) -> tuple[int, int]:
        """(peak RSS, peak PSS) in bytes; zeros when the sampler said nothing."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            out = b""
        self.procs.stop(self.proc)
        try:
            peaks = json.loads(out.decode().strip().splitlines()[-1])
            return int(peaks["peak_rss"]), int(peaks["peak_pss"])
        except (ValueError, IndexError, KeyError):
            return 0, 0


def sample_main(root: int, interval: float) -> None:
    stopping = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    peak_rss = peak_pss = 0
    deadline = time.monotonic() + 6 * 3600
    while not stopping and time.monotonic() < deadline:
        pids = process_tree(root)
        if not pids:
            break
        peak_rss = max(peak_rss, rss_bytes(pids))
        peak_pss = max(peak_pss, pss_bytes(pids))
        time.sleep(interval)
    print(json.dumps({"peak_rss": peak_rss, "peak_pss": peak_pss}), flush=True)


# --- clients --------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Endpoint:
    port: int
    json_path: str
    stream_path: str
    json_body: bytes
    stream_body: bytes
    auth: str
    # The sequential clients' credential, when it differs (our gateway: a second key, whose
    # ledger rows must match the responses those clients counted exactly).
    sequential_auth: str = ""

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        auth = self.sequential_auth or self.auth
        if auth:
            headers["Authorization"] = f"Bearer {auth}"
        return headers


def timed_requests(endpoint: Endpoint, *, stream: bool, count: int) -> dict[str, Any]:
    """`count` requests one after another on one keep-alive connection.

    Times the first body byte (for a stream: the first SSE bytes) and the complete
    response, in milliseconds.
    """
    path = endpoint.stream_path if stream else endpoint.json_path
    body = endpoint.stream_body if stream else endpoint.json_body
    headers = endpoint.headers()
    first_ms: list[float] = []
    total_ms: list[float] = []
    errors = 0
    conn = http.client.HTTPConnection(HOST, endpoint.port, timeout=30)
    try:
        for _ in range(count):
            started = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                head = response.read1()
                first = time.perf_counter()
                rest = response.read()
                ended = time.perf_counter()
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
                continue
            whole = head + rest
            complete = b"data: [DONE]" in whole if stream else b'"usage"' in whole
            if response.status != 200 or not complete:
                errors += 1
                continue
            first_ms.append((first - started) * 1000)
            total_ms.append((ended - started) * 1000)
    finally:
        conn.close()
    return {
        "ok": len(total_ms),
        "errors": errors,
        "first_p50_ms": percentile(first_ms, 50),
        "first_p99_ms": percentile(first_ms, 99),
        "p50_ms": percentile(total_ms, 50),
        "p99_ms": percentile(total_ms, 99),
    }


def run_wrk(cfg: Config, endpoint: Endpoint, *, stream: bool, seconds: float) -> dict[str, Any]:
    path = endpoint.stream_path if stream else endpoint.json_path
    body = endpoint.stream_body if stream else endpoint.json_body
    args = [
        "wrk",
        "-t",
        str(cfg.wrk_threads),
        "-c",
        str(cfg.connections),
        "-d",
        f"{seconds:g}s",
        "--timeout",
        "30s",
        "-s",
        str(BENCH / "post.lua"),
        f"http://{HOST}:{endpoint.port}{path}",
    ]
    env = {**os.environ, "BENCH_BODY": body.decode(), "BENCH_AUTH": endpoint.auth}
    done = subprocess.run(  # noqa: S603 - our own argv, no shell
        args, env=env, capture_output=True, text=True, timeout=seconds + 90, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            raw = json.loads(line.removeprefix("BENCH_RESULT "))
            break
    else:
        raise RuntimeError(f"wrk printed no result (exit {done.returncode}):\n{done.stderr}")
    socket_errors = raw["connect_errors"] + raw["read_errors"] + raw["write_errors"]
    requests = int(raw["requests"])
    return {
        "requests": requests,
        "ok": requests - int(raw["status_errors"]),
        "errors": int(raw["status_errors"]) + socket_errors + int(raw["timeouts"]),
        "rps": requests / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
    }


# --- targets --------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    startup_s: float


@dataclass
class Bench:
    cfg: Config
    procs: Processes
    workdir: Path
    mock_port: int = 0
    gateway_env: dict[str, str] = field(default_factory=dict)
    load_secret: str = ""
    load_key_id: int = 0
    exact_secret: str = ""
    exact_key_id: int = 0
    peer_key: str = ""
    # Successful requests through our gateway as the clients counted them. The sequential
    # clients count exactly; wrk does not count requests in flight when it stops, which
    # the gateway may still serve and bill, hence the slack for the load key.
    us_exact_ok: int = 0
    us_load_ok: int = 0
    us_in_flight_slack: int = 0
    _nginx_pid: int = 0

    # nginx ------------------------------------------------------------------------------

    def start_nginx(self) -> subprocess.Popen[bytes]:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.mock_port = free_port()
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginx_conf(self.workdir, self.mock_port))
        args = [nginx, "-p", str(self.workdir), "-e", str(self.workdir / "nginx-error.log")]
        proc = self.procs.start("nginx", [*args, "-c", str(conf)], env=dict(os.environ))
        wait_ready(self.procs, "nginx", proc, self.mock_port, "/health", 15)
        log(f"nginx mock on {HOST}:{self.mock_port}")
        return proc

    def floor(self) -> Endpoint:
        return Endpoint(
            port=self.mock_port,
            json_path="/json/v1/chat/completions",
            stream_path="/stream/v1/chat/completions",
            json_body=request_body("gpt-4o-mini", stream=False),
            stream_body=request_body("gpt-4o-mini", stream=True),
            auth="",
        )

    # our gateway ------------------------------------------------------------------------

    def prepare_gateway(self) -> None:
        for name in ("DATABASE_URL", "REDIS_URL"):
            if not os.environ.get(name):
                sys.exit(
                    f"bench: {name} is not set; run through `make bench` "
                    "(scripts/services.sh test -- .venv/bin/python bench/run.py)"
                )
        env = dict(os.environ)
        env.pop("GATEWAY_DEBUG", None)
        env.pop("PYTHONPATH", None)
        env["SECRET_KEY"] = secrets.token_urlsafe(50)
        env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
        env["LITELLM_TELEMETRY"] = "False"
        self.gateway_env = env
        py = str(PROJECT_PY)
        subprocess.run(  # noqa: S603 - our own argv, no shell
            [py, "manage.py", "migrate", "--noinput", "-v", "0"],
            cwd=ROOT,
            env=env,
            check=True,
            timeout=300,
        )
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        done = subprocess.run(  # noqa: S603 - our own argv, no shell
            [
                *(py, str(BENCH / "setup_gateway.py"), "setup"),
                *("--mock-base", f"http://{HOST}:{self.mock_port}", "--run-id", run_id),
            ],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        keys = json.loads(done.stdout.strip().splitlines()[-1])["keys"]
        self.load_secret, self.load_key_id = str(keys["load"]["secret"]), int(keys["load"]["id"])
        self.exact_secret = str(keys["exact"]["secret"])
        self.exact_key_id = int(keys["exact"]["id"])
        log(f"gateway data ready (key ids: load {self.load_key_id}, exact {self.exact_key_id})")

    def start_gateway(self, server: str, port: int) -> Server:
        py = str(PROJECT_PY)
        env = dict(self.gateway_env)
        workers = str(self.cfg.workers)
        if server == "prefork":
            args = [py, "-m", "config.serve", "--host", HOST, "--port", str(port)]
            args += ["--workers", workers]
        elif server == "uvicorn":
            args = [py, "-m", "uvicorn", "config.asgi:application"]
            args += ["--host", HOST, "--port", str(port), "--workers", workers]
            args += ["--loop", "uvloop", "--http", "httptools", "--no-access-log"]
            args += ["--lifespan", "off"]
        else:
            env["PYTHONPATH"] = str(TOOLS)
            args = [py, "-m", "granian", "--interface", "asgi", "--host", HOST]
            args += ["--port", str(port), "--workers", workers, "--loop", "uvloop"]
            args += ["config.asgi:application"]
        name = f"us-{server}"
        started = time.monotonic()
        proc = self.procs.start(name, args, env=env)
        ready = wait_ready(self.procs, name, proc, port, "/health/ready", 120)
        return Server(name, proc, port, ready - started)

    def us(self, port: int) -> Endpoint:
        return Endpoint(
            port=port,
            json_path="/v1/chat/completions",
            stream_path="/v1/chat/completions",
            json_body=request_body("bench-json", stream=False),
            stream_body=request_body("bench-stream", stream=True),
            auth=self.load_secret,
            sequential_auth=self.exact_secret,
        )

    # the peer ---------------------------------------------------------------------------

    def start_peer(self, port: int) -> Server:
        if not LITELLM_BIN.exists():
            raise RuntimeError(f"{LITELLM_BIN} is missing; run bench/setup.sh")
        env = {
            k: v
            for k, v in os.environ.items()
            # LiteLLM would use a DATABASE_URL or REDIS_URL it finds: the peer runs without.
            if k not in ("DATABASE_URL", "REDIS_URL", "PYTHONPATH", "VIRTUAL_ENV")
        }
        self.peer_key = self.peer_key or "sk-bench-" + secrets.token_hex(16)
        env.update(
            LITELLM_MODE="PRODUCTION",
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            LITELLM_TELEMETRY="False",
            LITELLM_LOG="ERROR",
            LITELLM_MASTER_KEY=self.peer_key,
            BENCH_MOCK_JSON_BASE=f"http://{HOST}:{self.mock_port}/json/v1",
            BENCH_MOCK_STREAM_BASE=f"http://{HOST}:{self.mock_port}/stream/v1",
            BENCH_MOCK_API_KEY="bench-no-key",
        )
        args = [str(LITELLM_BIN), "--config", str(BENCH / "litellm_config.yaml")]
        args += ["--host", HOST, "--port", str(port), "--num_workers", str(self.cfg.workers)]
        args += ["--telemetry", "False", "--log_config", str(BENCH / "litellm_log_config.json")]
        started = time.monotonic()
        proc = self.procs.start("peer", args, env=env)
        ready = wait_ready(self.procs, "peer", proc, port, "/health/readiness", 180)
        return Server("peer", proc, port, ready - started)

    def peer(self, port: int) -> Endpoint:
        return Endpoint(
            port=port,
            json_path="/v1/chat/completions",
            stream_path="/v1/chat/completions",
            json_body=request_body("bench-json", stream=False),
            stream_body=request_body("bench-stream", stream=True),
            auth=self.peer_key,
        )

    # measuring --------------------------------------------------------------------------

    def count_sequential(self, target: str, ok: int) -> None:
        if target.startswith("us-"):
            self.us_exact_ok += ok

    def count_load(self, target: str, ok: int) -> None:
        if target.startswith("us-"):
            self.us_load_ok += ok
            self.us_in_flight_slack += self.cfg.connections

    def wrk(
        self, target: str, endpoint: Endpoint, *, stream: bool, seconds: float
    ) -> dict[str, Any]:
        result = run_wrk(self.cfg, endpoint, stream=stream, seconds=seconds)
        self.count_load(target, result["ok"])
        return result

    def measure(self, target: str, rep: int) -> dict[str, float]:
        """One repetition of every phase against one target; the server lives for it only."""
        server: Server | None = None
        if target == "floor":
            endpoint, root = self.floor(), self._nginx_pid
        elif target == "peer":
            server = self.start_peer(free_port())
            endpoint, root = self.peer(server.port), server.proc.pid
        else:
            server = self.start_gateway(target.removeprefix("us-"), free_port())
            endpoint, root = self.us(server.port), server.proc.pid
        sampler = RssSampler(self.procs, f"{target}-{rep}", root)
        metrics: dict[str, float] = {}
        try:
            if server is not None:
                metrics["startup_s"] = server.startup_s
            log(f"rep {rep + 1}: {target}: warm-up")
            for stream in (False, True):
                warm = timed_requests(endpoint, stream=stream, count=20)
                self.count_sequential(target, warm["ok"])
                if self.cfg.warmup > 0:
                    self.wrk(target, endpoint, stream=stream, seconds=self.cfg.warmup)
            log(f"rep {rep + 1}: {target}: sequential")
            seq = timed_requests(endpoint, stream=False, count=self.cfg.sequential)
            self.count_sequential(target, seq["ok"])
            metrics |= {
                "seq_json_p50_ms": seq["p50_ms"],
                "seq_json_p99_ms": seq["p99_ms"],
                "seq_json_errors": seq["errors"],
            }
            streams = timed_requests(endpoint, stream=True, count=self.cfg.streams)
            self.count_sequential(target, streams["ok"])
            metrics |= {
                "stream_ttfb_p50_ms": streams["first_p50_ms"],
                "stream_ttfb_p99_ms": streams["first_p99_ms"],
                "stream_total_p50_ms": streams["p50_ms"],
                "stream_total_p99_ms": streams["p99_ms"],
                "seq_stream_errors": streams["errors"],
            }
            for kind, stream in (("json", False), ("stream", True)):
                log(f"rep {rep + 1}: {target}: c={self.cfg.connections} {kind}")
                pids = process_tree(root)
                services = self._service_pids() if target.startswith("us-") else []
                cpu0, svc0 = cpu_seconds(pids), cpu_seconds(services)
                result = self.wrk(target, endpoint, stream=stream, seconds=self.cfg.duration)
                cpu1, svc1 = cpu_seconds(process_tree(root)), cpu_seconds(services)
                served = max(1, result["requests"])
                metrics |= {
                    f"c_{kind}_rps": result["rps"],
                    f"c_{kind}_p50_ms": result["p50_ms"],
                    f"c_{kind}_p99_ms": result["p99_ms"],
                    f"c_{kind}_errors": result["errors"],
                    f"cpu_{kind}_ms": (cpu1 - cpu0) * 1000 / served,
                }
                if services:
                    metrics[f"svc_cpu_{kind}_ms"] = (svc1 - svc0) * 1000 / served
        finally:
            peak_rss, peak_pss = sampler.stop()
            if server is not None:
                self.procs.stop(server.proc)
        metrics["peak_rss_mb"] = peak_rss / MB
        metrics["peak_pss_mb"] = peak_pss / MB
        return metrics

    def _service_pids(self) -> list[int]:
        """Postgres and Redis, when scripts/services.sh started them (for their CPU cost)."""
        pids: list[int] = []
        data_dir = os.environ.get("PG_DATA_DIR")
        if data_dir:
            with suppress(OSError, ValueError, IndexError):
                pg = int((Path(data_dir) / "postmaster.pid").read_text().split()[0])
                pids += process_tree(pg)
        with suppress(ValueError):
            pids += process_tree(int(os.environ.get("REDIS_PID", "")))
        return pids

    def growth(self, server: Server) -> dict[str, Any]:
        """RSS after a warm-up against RSS after BENCH_GROWTH_REQUESTS more requests."""
        cfg, endpoint, root = self.cfg, self.us(server.port), server.proc.pid
        chunk = cfg.growth_chunk
        # Bounded however slow the machine is: at most this long, and this many chunks.
        deadline = time.monotonic() + max(600.0, cfg.growth_requests / 20)

        def load(until: int) -> int:
            served, i = 0, 0
            while served < until and i < 10_000 and time.monotonic() < deadline:
                served += self.wrk(server.name, endpoint, stream=i % 2 == 1, seconds=chunk)[
                    "requests"
                ]
                i += 1
            return served

        warm = max(2_000, cfg.growth_requests // 10)
        log(f"growth: warm-up, {warm} requests")
        load(warm)
        time.sleep(1)
        base = rss_bytes(process_tree(root))
        series: list[tuple[int, float]] = [(0, base / MB)]
        done = 0
        log(f"growth: {cfg.growth_requests} requests (half JSON, half streams)")
        i = 0
        while done < cfg.growth_requests and time.monotonic() < deadline and i < 10_000:
            done += self.wrk(server.name, endpoint, stream=i % 2 == 1, seconds=chunk)["requests"]
            i += 1
            series.append((done, rss_bytes(process_tree(root)) / MB))
        time.sleep(1)
        end = rss_bytes(process_tree(root))
        growth_mb = (end - base) / MB
        return {
            "server": server.name,
            "requests": done,
            "rss_after_warmup_mb": base / MB,
            "rss_after_run_mb": end / MB,
            "mb_per_10k": growth_mb / max(1, done) * 10_000,
            "slope_mb_per_10k": _slope(series) * 10_000,
            "series": [[n, round(mb, 2)] for n, mb in series],
        }

    def profile(self, server: Server) -> dict[str, Any]:
        """py-spy on two workers under c=N JSON load: a flame graph and own-time totals."""
        if not PY_SPY.exists():
            return {"error": f"{PY_SPY} is missing"}
        descendants = [p for p in process_tree(server.proc.pid) if p != server.proc.pid]
        # The workers are the descendants that have done the work.
        workers = sorted(descendants, key=lambda p: cpu_seconds([p]), reverse=True)[:2]
        if not workers:
            return {"error": "no worker processes found"}
        endpoint = self.us(server.port)
        seconds = 10
        svg = RESULTS / "profile-json.svg"
        raws = [self.workdir / f"profile-json-{pid}.raw.txt" for pid in workers]
        log(f"profile: py-spy on workers {workers} for {seconds} s under c={self.cfg.connections}")
        env = {**os.environ, "BENCH_BODY": endpoint.json_body.decode(), "BENCH_AUTH": endpoint.auth}
        wrk = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            [
                *("wrk", "-t", str(self.cfg.wrk_threads), "-c", str(self.cfg.connections)),
                *("-d", f"{seconds + 4}s", "--timeout", "30s", "-s", str(BENCH / "post.lua")),
                f"http://{HOST}:{endpoint.port}{endpoint.json_path}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # --gil: only the thread holding the GIL is sampled, i.e. where the CPU goes
        # (threads waiting on a socket or a lock are not counted).
        common = [str(PY_SPY), "record", "--duration", str(seconds), "--nonblocking", "--gil"]
        commands = [
            [*common, "--pid", str(pid), "-o", str(raw), "--format", "raw", "--nolineno"]
            for pid, raw in zip(workers, raws, strict=True)
        ]
        commands.append([*common, "--pid", str(workers[0]), "-o", str(svg)])
        errors = []
        try:
            time.sleep(2)
            recorders = [
                subprocess.Popen(  # noqa: S603 - our own argv, no shell
                    command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                for command in commands
            ]
            for recorder in recorders:
                try:
                    _, err = recorder.communicate(timeout=seconds + 60)
                except subprocess.TimeoutExpired:
                    recorder.kill()
                    _, err = recorder.communicate()
                if recorder.returncode != 0:
                    errors.append(err.decode(errors="replace")[-500:])
        finally:
            try:
                out, _ = wrk.communicate(timeout=seconds + 60)
            except subprocess.TimeoutExpired:
                wrk.kill()
                out, _ = wrk.communicate()
        for line in out.splitlines():
            if line.startswith("BENCH_RESULT "):
                summary = json.loads(line.removeprefix("BENCH_RESULT "))
                ok = int(summary["requests"]) - int(summary["status_errors"])
                self.count_load(server.name, ok)
        result: dict[str, Any] = {"workers": workers, "flamegraph": str(svg.relative_to(ROOT))}
        if errors:
            result["errors"] = errors
        text = "\n".join(raw.read_text(errors="replace") for raw in raws if raw.exists())
        if text:
            result |= own_time(text)
        return result

    def ledger(self) -> dict[str, Any]:
        """Ledger rows against the 2xx responses the clients counted, per key."""
        done = subprocess.run(  # noqa: S603 - our own argv, no shell
            [
                *(str(PROJECT_PY), str(BENCH / "setup_gateway.py"), "count"),
                *("--key-id", str(self.exact_key_id), "--key-id", str(self.load_key_id)),
            ],
            cwd=ROOT,
            env=self.gateway_env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        rows: dict[str, dict[str, int]] = json.loads(done.stdout.strip().splitlines()[-1])
        exact = rows.get(str(self.exact_key_id), {})
        load = rows.get(str(self.load_key_id), {})
        exact_rows, load_rows = exact.get("success", 0), load.get("success", 0)
        extra = load_rows - self.us_load_ok
        return {
            "sequential": {
                "rows_by_status": exact,
                "success_rows": exact_rows,
                "client_2xx": self.us_exact_ok,
                "pass": exact_rows == self.us_exact_ok,
            },
            "load": {
                "rows_by_status": load,
                "success_rows": load_rows,
                "client_2xx": self.us_load_ok,
                "difference": extra,
                "allowed_difference": self.us_in_flight_slack,
                "pass": 0 <= extra <= self.us_in_flight_slack,
            },
            "pass": exact_rows == self.us_exact_ok and 0 <= extra <= self.us_in_flight_slack,
        }


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of MB against requests."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def own_time(raw: str, top: int = 15) -> dict[str, Any]:
    """Top functions by own (self) samples from py-spy's collapsed-stack output."""
    own: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frame = stack.split(";")[-1]
        own[frame] = own.get(frame, 0) + int(count)
        total += int(count)
    ranked = sorted(own.items(), key=lambda item: item[1], reverse=True)[:top]
    # The same samples by package (first folder of the file), for the coarse picture.
    packages: dict[str, int] = {}
    for name, n in own.items():
        path = _short_frame(name).rpartition("(")[2].rstrip(")")
        package = path.split("/")[0].removesuffix(".py") or "?"
        packages[package] = packages.get(package, 0) + n
    by_package = sorted(packages.items(), key=lambda item: item[1], reverse=True)[:top]
    return {
        "samples": total,
        "top_own": [
            {"function": _short_frame(name), "samples": n, "pct": round(100 * n / total, 1)}
            for name, n in ranked
        ],
        "own_by_package": [
            {"package": name, "samples": n, "pct": round(100 * n / total, 1)}
            for name, n in by_package
        ],
    }


def _short_frame(frame: str) -> str:
    # "func (/long/path/site-packages/pkg/mod.py)" -> "func (pkg/mod.py)"
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3.11/"):
        if marker in frame:
            head, _, tail = frame.partition(marker)
            frame = head.rsplit("(", 1)[0] + "(" + tail
    return frame


# --- summarising ------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    label: str
    key: str
    # "ratio<=": us/peer at most `bound`; "ratio>=": at least; "abs<=": us at most `bound`.
    rule: str = ""
    bound: float = 0.0
    floor: bool = True  # whether the floor column is meaningful


ROWS = [
    Row("Sequential JSON p50, ms", "seq_json_p50_ms"),
    Row("Sequential JSON p99, ms", "seq_json_p99_ms"),
    Row("  added p50 over floor, ms", "added_seq_json_p50_ms", "ratio<=", 0.5, floor=False),
    Row("  added p99 over floor, ms", "added_seq_json_p99_ms", floor=False),
    Row("Stream TTFB p50, ms", "stream_ttfb_p50_ms"),
    Row("  added TTFB p50 over floor, ms", "added_stream_ttfb_p50_ms", "ratio<=", 0.5, False),
    Row("  added TTFB p99 over floor, ms", "added_stream_ttfb_p99_ms", floor=False),
    Row("  added total p50 over floor, ms", "added_stream_total_p50_ms", floor=False),
    Row("c=N JSON req/s", "c_json_rps", "ratio>=", 2.0),
    Row("c=N JSON p50, ms", "c_json_p50_ms"),
    Row("c=N JSON p99, ms", "c_json_p99_ms"),
    Row("c=N JSON errors", "c_json_errors"),
    Row("c=N stream req/s", "c_stream_rps", "ratio>=", 2.0),
    Row("c=N stream p50, ms", "c_stream_p50_ms"),
    Row("c=N stream p99, ms", "c_stream_p99_ms"),
    Row("c=N stream errors", "c_stream_errors"),
    Row("Server CPU per JSON request, ms", "cpu_json_ms"),
    Row("Server CPU per stream, ms", "cpu_stream_ms"),
    Row("  + Postgres/Redis CPU per JSON request, ms", "svc_cpu_json_ms", floor=False),
    Row("  + Postgres/Redis CPU per stream, ms", "svc_cpu_stream_ms", floor=False),
    Row("Peak RSS of the server tree, MB", "peak_rss_mb", "ratio<=", 0.5),
    Row("Peak PSS of the server tree (shared pages once), MB", "peak_pss_mb", "ratio<=", 0.5),
    Row("Start-up to ready, s", "startup_s", "abs<=", 5.0, floor=False),
]


def add_relative(runs: dict[str, list[dict[str, float]]]) -> None:
    """Latency added over the floor, per repetition (the floor of the same repetition)."""
    floors = runs.get("floor", [])
    for target, reps in runs.items():
        if target == "floor":
            continue
        for i, metrics in enumerate(reps):
            if i >= len(floors) or not metrics:
                continue
            floor = floors[i]
            for key in (
                "seq_json_p50_ms",
                "seq_json_p99_ms",
                "stream_ttfb_p50_ms",
                "stream_ttfb_p99_ms",
                "stream_total_p50_ms",
            ):
                if key in metrics and key in floor:
                    metrics[f"added_{key}"] = metrics[key] - floor[key]


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for target, reps in runs.items():
        keys = sorted({k for metrics in reps for k in metrics})
        summary[target] = {}
        for key in keys:
            values = [m[key] for m in reps if key in m and not math.isnan(m[key])]
            if values:
                summary[target][key] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
    return summary


def _num(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(stats: dict[str, float] | None, reps: int) -> str:
    if not stats:
        return "—"
    if reps < 2 or stats["min"] == stats["max"]:
        return _num(stats["median"])
    return f"{_num(stats['median'])} ({_num(stats['min'])}-{_num(stats['max'])})"


def evaluate(
    row: Row, ours: dict[str, float] | None, peer: dict[str, float] | None
) -> tuple[float, str]:
    ratio = math.nan
    if ours and peer and peer["median"]:
        ratio = ours["median"] / peer["median"]
    if not row.rule or not ours:
        return ratio, ""
    if row.rule == "abs<=":
        return ratio, "pass" if ours["median"] <= row.bound else "FAIL"
    if math.isnan(ratio):
        return ratio, "n/a"
    if row.rule == "ratio<=":
        # Lower is better; an added latency at or below zero beats any peer.
        ok = ours["median"] <= row.bound * peer["median"] if peer else False
        return ratio, "pass" if ok else "FAIL"
    return ratio, "pass" if ratio >= row.bound else "FAIL"


def _target_text(row: Row) -> str:
    if row.rule == "ratio<=":
        return f"≤ {row.bound:g}x peer"
    if row.rule == "ratio>=":
        return f"≥ {row.bound:g}x peer"
    if row.rule == "abs<=":
        return f"≤ {row.bound:g}"
    return ""


def table(
    cfg: Config,
    summary: dict[str, dict[str, dict[str, float]]],
    growth: dict[str, Any] | None,
    ledger: dict[str, Any] | None,
) -> tuple[str, list[dict[str, Any]]]:
    ours = [f"us-{s}" for s in cfg.servers]
    columns = ["floor", "peer", *ours]
    header = ["Metric", "floor (nginx)", "peer (LiteLLM)"]
    header += [f"us ({s})" for s in cfg.servers]
    header += [f"{s}/peer" for s in cfg.servers] + ["target", "result"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    checks: list[dict[str, Any]] = []
    for row in ROWS:
        if not any(row.key in summary.get(t, {}) for t in columns):
            continue
        label = row.label.replace("c=N", f"c={cfg.connections}")
        cells = [label]
        for target in columns:
            stats = summary.get(target, {}).get(row.key)
            cells.append(_cell(stats, cfg.reps) if target != "floor" or row.floor else "—")
        results = []
        for target in ours:
            ratio, verdict = evaluate(
                row, summary.get(target, {}).get(row.key), summary.get("peer", {}).get(row.key)
            )
            cells.append("—" if math.isnan(ratio) else f"{ratio:.2f}")
            if verdict:
                results.append(f"{target.removeprefix('us-')}: {verdict}")
                checks.append(
                    {"metric": row.key, "server": target, "ratio": ratio, "result": verdict}
                )
        cells += [_target_text(row), ", ".join(results)]
        lines.append("| " + " | ".join(cells) + " |")
    blank = ["—"] * (len(columns) - 1 + len(ours))
    if growth and "mb_per_10k" in growth:
        verdict = "pass" if growth["mb_per_10k"] <= 1.0 else "FAIL"
        value = (
            f"{growth['mb_per_10k']:.2f} ({growth['requests']} req, "
            f"{growth['rss_after_warmup_mb']:.0f}→{growth['rss_after_run_mb']:.0f} MB)"
        )
        label = f"RSS growth after warm-up, MB per 10k ({growth['server']})"
        lines.append(f"| {label} | {value} | " + " | ".join(blank) + " | ≤ 1 | " + verdict + " |")
        checks.append({"metric": "rss_growth_mb_per_10k", "result": verdict})
    if ledger:
        seq, load = ledger["sequential"], ledger["load"]
        for label, value, ok in (
            (
                "Ledger rows = 2xx, sequential clients (exact)",
                f"{seq['success_rows']} rows / {seq['client_2xx']} 2xx",
                seq["pass"],
            ),
            (
                "Ledger rows = 2xx, wrk (+ requests in flight at its stops)",
                f"{load['success_rows']} rows / {load['client_2xx']} 2xx "
                f"(+{load['difference']}, at most +{load['allowed_difference']})",
                load["pass"],
            ),
        ):
            verdict = "pass" if ok else "FAIL"
            lines.append(f"| {label} | {value} | " + " | ".join(blank) + f" | equal | {verdict} |")
            checks.append({"metric": "ledger", "detail": label, "result": verdict})
    return "\n".join(lines), checks


def update_readme(text: str) -> None:
    try:
        readme = README.read_text()
    except OSError:
        return
    start, end = readme.find(TABLE_START), readme.find(TABLE_END)
    if start < 0 or end < start:
        return
    README.write_text(readme[: start + len(TABLE_START)] + "\n" + text + "\n" + readme[end:])


def versions() -> dict[str, str]:
    found: dict[str, str] = {"python": platform.python_version()}
    probes = {
        "litellm (peer)": [str(BENCH / ".venv-litellm/bin/python"), "-c", _VERSION % "litellm"],
        "uvicorn": [str(PROJECT_PY), "-c", _VERSION % "uvicorn"],
        "granian": [str(PROJECT_PY), "-c", _VERSION % "granian"],
        "django": [str(PROJECT_PY), "-c", _VERSION % "django"],
    }
    for name, args in probes.items():
        env = {**os.environ, "PYTHONPATH": str(TOOLS)}
        with suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(  # noqa: S603 - our own argv, no shell
                args, env=env, capture_output=True, text=True, timeout=60, check=False
            )
            if done.returncode == 0:
                found[name] = done.stdout.strip()
    with suppress(OSError, subprocess.SubprocessError):
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        done = subprocess.run(  # noqa: S603 - our own argv, no shell
            [nginx, "-v"], capture_output=True, text=True, timeout=10, check=False
        )
        found["nginx"] = done.stderr.strip().rpartition("/")[2]
    return found


_VERSION = "import importlib.metadata as m; print(m.version(%r))"


# --- main -------------------------------------------------------------------------------


@contextmanager
def terminating() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so that `finally` blocks stop what we started."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(cfg: Config) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    # Server logs are kept for a look after the run (git-ignored, replaced by the next run).
    logdir = RESULTS / "logs.tmp"
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir(parents=True)
    procs = Processes(logdir)
    bench = Bench(cfg=cfg, procs=procs, workdir=workdir)
    targets = ["floor", *(["peer"] if cfg.peer else []), *(f"us-{s}" for s in cfg.servers)]
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
    failures: list[str] = []
    growth: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    ledger: dict[str, Any] | None = None
    started = time.monotonic()
    log(f"workdir {workdir}; config {asdict(cfg)}")
    try:
        nginx = bench.start_nginx()
        bench._nginx_pid = nginx.pid
        bench.prepare_gateway()
        for rep in range(cfg.reps):
            order = targets if rep % 2 == 0 else list(reversed(targets))
            for target in order:
                try:
                    runs[target].append(bench.measure(target, rep))
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    failures.append(f"rep {rep + 1} {target}: {exc}")
                    log(f"FAILED rep {rep + 1} {target}: {exc}")
                    runs[target].append({})
        if cfg.growth_requests > 0 or cfg.profile:
            primary = cfg.servers[0]
            server = bench.start_gateway(primary, free_port())
            try:
                if cfg.growth_requests > 0:
                    growth = bench.growth(server)
                if cfg.profile:
                    profile = bench.profile(server)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                failures.append(f"growth/profile: {exc}")
                log(f"FAILED growth/profile: {exc}")
            finally:
                procs.stop(server.proc)
        ledger = bench.ledger()
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    add_relative(runs)
    summary = summarise(runs)
    text, checks = table(cfg, summary, growth, ledger)
    minutes = (time.monotonic() - started) / 60
    note = (
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {cfg.workers} workers each, "
        f"{cfg.reps} repetitions (median, min-max), c={cfg.connections} for "
        f"{cfg.duration:g} s, {cfg.sequential} sequential requests, {cfg.streams} streams; "
        f"{minutes:.0f} min."
    )
    result = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "config": asdict(cfg),
        "runs": runs,
        "summary": summary,
        "checks": checks,
        "growth": growth,
        "ledger": ledger,
        "profile": profile,
        "failures": failures,
        "note": note,
    }
    (RESULTS / "latest.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print()
    print(note)
    print(text)
    if profile and profile.get("top_own"):
        print(
            f"\nTop functions by own time (GIL held), {cfg.servers[0]} workers under "
            f"c={cfg.connections} JSON load ({profile.get('samples', 0)} samples; "
            "flame graph of one worker in bench/results):"
        )
        for item in profile["top_own"]:
            print(f"  {item['pct']:5.1f}%  {item['function']}")
        print(
            "By package: "
            + ", ".join(
                f"{item['package']} {item['pct']:.0f}%" for item in profile["own_by_package"]
            )
        )
    update_readme(f"_{note}_\n\n{text}")
    for failure in failures:
        log(f"failure: {failure}")
    if failures or (ledger is not None and not ledger["pass"]):
        return 1
    return 0


def main() -> None:
    if sys.argv[1:2] == ["_sample"]:
        sample_main(int(sys.argv[2]), float(sys.argv[3]))
        return
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"bench: {tool} is missing; run bench/setup.sh (or make bench)")
    cfg = Config.from_env()
    with terminating():
        code = run(cfg)
    sys.exit(code)


if __name__ == "__main__":
    main()

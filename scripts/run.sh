#!/usr/bin/env bash
# `make run`: the gateway on http://127.0.0.1:$PORT in front of the project's
# mock upstream, on embedded defaults (no external services needed).
#
# DATABASE_URL / REDIS_URL in the environment are passed through (the app then
# uses Postgres / Redis); with REDIS_URL a Celery worker and beat run too.
# Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
PORT=${PORT:-8000}
MOCK_PORT=${MOCK_PORT:-9100}
MOCK_URL="http://127.0.0.1:$MOCK_PORT"

# The production server (config/serve.py); one worker, as the demo runs on SQLite.
SERVER=("$PY" -m config.serve --host 127.0.0.1 --port "$PORT" --workers 1)

[[ -x $PY ]] || {
    echo "run: $PY is missing; use 'make run'" >&2
    exit 1
}

# litellm would otherwise fetch its price map from the internet at import.
export LITELLM_LOCAL_MODEL_COST_MAP=True

mkdir -p var
if [[ -z ${SECRET_KEY:-} ]]; then
    if [[ ! -s var/secret_key ]]; then
        (
            umask 077
            "$PY" -c 'import secrets; print(secrets.token_urlsafe(50))' >var/secret_key
        )
    fi
    chmod 600 var/secret_key
    SECRET_KEY=$(<var/secret_key)
    export SECRET_KEY
fi

PIDS=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    # Give them a moment to shut down cleanly, then insist.
    for _ in $(seq 50); do
        local alive=""
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [[ -z $alive ]] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$PY" -m mock_upstream --host 127.0.0.1 --port "$MOCK_PORT" &
MOCK_PID=$!
PIDS+=("$MOCK_PID")

# Wait for the mock's /health (python rather than curl: curl may be missing).
"$PY" - "$MOCK_URL/health" "$MOCK_PID" <<'EOF'
import os
import sys
import time
import urllib.request

url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 30
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"run: the mock upstream exited before answering {url}")
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310
            if response.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"run: the mock upstream did not answer {url} within 30 s")
    time.sleep(0.2)
EOF

"$PY" manage.py migrate --noinput
"$PY" manage.py gateway_bootstrap_demo --mock-url "$MOCK_URL" --gateway-url "http://127.0.0.1:$PORT"

if [[ -n ${REDIS_URL:-} ]]; then
    # Two workers, as in docker-compose.yml: webhook and e-mail deliveries (queue
    # "webhooks", config/celery.py) never hold up rollups, invoices and batches.
    .venv/bin/celery -A config worker -l info -Q celery -n default@%h &
    PIDS+=($!)
    .venv/bin/celery -A config worker -l info -Q webhooks -n webhooks@%h --concurrency 4 &
    PIDS+=($!)
    .venv/bin/celery -A config beat -l info --schedule var/celerybeat-schedule &
    PIDS+=($!)
fi

echo
echo "Gateway: http://127.0.0.1:$PORT   (mock upstream: $MOCK_URL; Ctrl-C stops both)"
echo

# In the background and waited for, rather than exec'd, so that the traps
# above can stop the mock (and Celery) however the server ends.
"${SERVER[@]}" &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
wait "$SERVER_PID"

#!/usr/bin/env bash
# Real Postgres and Redis for tests and local development.
#
#   scripts/services.sh test -- CMD...   run CMD with DATABASE_URL / REDIS_URL set,
#                                        stop what was started, exit with CMD's status
#   scripts/services.sh up               start both, print the URLs, wait for Ctrl-C
#
# DATABASE_URL / REDIS_URL that are already set and reachable are used as they
# are. Otherwise private instances are started on loopback in a temporary
# folder, installing the Debian packages first when they are missing.
#
# Exported for tests that stop and restart the services on purpose:
#   DATABASE_URL, REDIS_URL, GATEWAY_SERVICES_ENV (a KEY=VALUE file with all of these),
#   and, for what this script started itself:
#   PG_BIN_DIR, PG_DATA_DIR, PG_CTL_USER, PG_PORT, PG_LOG,
#   REDIS_PID, REDIS_PORT, REDIS_SERVER, REDIS_DIR, REDIS_LOG
set -euo pipefail

usage() {
    echo "usage: $0 test -- CMD [ARGS...] | $0 up" >&2
    exit 2
}

MODE=${1:-}
case "$MODE" in
    test)
        shift
        [[ ${1:-} == -- ]] && shift
        [[ $# -gt 0 ]] || usage
        ;;
    up) shift ;;
    *) usage ;;
esac

PG_DEFAULT_PORT=55432
REDIS_DEFAULT_PORT=56379
START_TIMEOUT=30

log() { echo "services: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# --- state, cleaned up on exit ------------------------------------------------

SERVICES_DIR=$(mktemp -d -t gateway-services.XXXXXX)
STARTED_PG=""
STARTED_REDIS=""
# Inherited values describe services someone else started: keep them.
REDIS_PID=${REDIS_PID:-}
PG_CTL_USER=${PG_CTL_USER:-}
POLICY_RC_CREATED=""

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $STARTED_REDIS ]]; then
        # A test may have restarted Redis under a new pid: ask whatever listens
        # on our port to stop, then make sure the pid we started is gone.
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
        if [[ -n $REDIS_PID ]]; then
            kill "$REDIS_PID" 2>/dev/null || true
            wait "$REDIS_PID" 2>/dev/null || true
        fi
    fi
    if [[ -n $STARTED_PG && -f $PG_DATA_DIR/postmaster.pid ]]; then
        as_pg_user "$PG_BIN_DIR/pg_ctl" -D "$PG_DATA_DIR" -m fast -w stop >/dev/null 2>&1 || true
    fi
    if [[ -n $POLICY_RC_CREATED ]]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    rm -rf "$SERVICES_DIR"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers -----------------------------------------------------------------------

APT_UPDATED=""
apt_install() {
    if [[ $EUID -ne 0 ]]; then
        die "missing $*; install it (apt-get install $*) or set DATABASE_URL / REDIS_URL"
    fi
    # Package scripts must not start system-wide copies of the services:
    # we only want the binaries.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [[ -z $APT_UPDATED ]]; then
        log "apt-get update"
        apt-get -o DPkg::Lock::Timeout=300 update -qq
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@" >/dev/null
    if [[ -n $POLICY_RC_CREATED ]]; then
        rm -f /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=""
    fi
}

port_free() {
    python3 - "$1" <<'EOF' 2>/dev/null
import socket, sys
with socket.socket() as s:
    # As the servers do: a port left in TIME_WAIT is free to them.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1])))
EOF
}

pick_port() {
    local preferred=$1
    if port_free "$preferred"; then
        echo "$preferred"
    else
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    fi
}

# Wait until "$@" succeeds; $1 is a label for the error message.
wait_for() {
    local what=$1 logfile=$2
    shift 2
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "$what did not answer within ${START_TIMEOUT}s; last lines of $logfile:"
            tail -n 20 "$logfile" >&2 || true
            die "$what failed to start"
        fi
        sleep 0.2
    done
}

as_pg_user() {
    if [[ $EUID -eq 0 ]]; then
        # cd first: the postgres user may not be allowed into the caller's directory.
        (cd "$SERVICES_DIR" && runuser -u "$PG_CTL_USER" -- "$@")
    else
        "$@"
    fi
}

# --- Postgres ---------------------------------------------------------------------

pg_reachable() {
    command -v pg_isready >/dev/null || apt_install postgresql-client
    pg_isready -q -d "$1"
}

find_pg_bin_dir() {
    local dir
    dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
    if [[ -n $dir && -x $dir/initdb && -x $dir/pg_ctl ]]; then
        echo "$dir"
    fi
}

start_postgres() {
    PG_BIN_DIR=$(find_pg_bin_dir)
    if [[ -z $PG_BIN_DIR ]]; then
        apt_install postgresql postgresql-client
        PG_BIN_DIR=$(find_pg_bin_dir)
        [[ -n $PG_BIN_DIR ]] || die "no Postgres server binaries under /usr/lib/postgresql after install"
    fi

    # Postgres refuses to run as root.
    if [[ $EUID -eq 0 ]]; then
        PG_CTL_USER=postgres
        if ! id -u postgres >/dev/null 2>&1; then
            useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
        fi
        chown -R postgres: "$SERVICES_DIR"
    else
        PG_CTL_USER=$(id -un)
    fi

    PG_DATA_DIR=$SERVICES_DIR/pgdata
    PG_LOG=$SERVICES_DIR/postgres.log
    local socket_dir=$SERVICES_DIR/pgsocket
    as_pg_user mkdir -p "$socket_dir"
    as_pg_user touch "$PG_LOG"

    as_pg_user "$PG_BIN_DIR/initdb" -D "$PG_DATA_DIR" --auth=trust -U postgres \
        --encoding=UTF8 --no-locale >"$SERVICES_DIR/initdb.log" 2>&1 ||
        {
            cat "$SERVICES_DIR/initdb.log" >&2
            die "initdb failed"
        }
    # In postgresql.conf rather than on the command line, so that a test that
    # restarts the server with a plain `pg_ctl -D $PG_DATA_DIR start` gets the same set-up.
    cat >>"$PG_DATA_DIR/postgresql.conf" <<EOF

# scripts/services.sh: throwaway test instance
listen_addresses = '127.0.0.1'
unix_socket_directories = '$socket_dir'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF

    # The free-port check can race with another process (or a port still being
    # released), so a bind failure gets a fresh port and another try.
    local attempt
    PG_PORT=$(pick_port "$PG_DEFAULT_PORT")
    for attempt in 1 2 3; do
        echo "port = $PG_PORT" | as_pg_user tee "$PG_DATA_DIR/postgresql.auto.conf" >/dev/null
        log "starting Postgres ($PG_BIN_DIR) on 127.0.0.1:$PG_PORT"
        STARTED_PG=1
        if as_pg_user "$PG_BIN_DIR/pg_ctl" -D "$PG_DATA_DIR" -l "$PG_LOG" -w -t "$START_TIMEOUT" start >/dev/null; then
            break
        fi
        if ((attempt < 3)) && grep -q 'Address already in use' "$PG_LOG"; then
            PG_PORT=$(pick_port 0)
            continue
        fi
        tail -n 20 "$PG_LOG" >&2 || true
        die "Postgres failed to start (log above)"
    done
    wait_for Postgres "$PG_LOG" "$PG_BIN_DIR/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"

    "$PG_BIN_DIR/psql" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE gateway LOGIN SUPERUSER PASSWORD 'gateway'" \
        -c "CREATE DATABASE gateway OWNER gateway" >/dev/null
    DATABASE_URL="postgres://gateway:gateway@127.0.0.1:$PG_PORT/gateway"
    export PG_BIN_DIR PG_DATA_DIR PG_CTL_USER PG_PORT PG_LOG
}

# --- Redis ------------------------------------------------------------------------

redis_reachable() {
    command -v redis-cli >/dev/null || apt_install redis-tools
    [[ $(redis-cli -u "$1" ping 2>/dev/null) == PONG ]]
}

start_redis() {
    if ! command -v redis-server >/dev/null; then
        apt_install redis-server
    fi
    REDIS_SERVER=$(command -v redis-server)
    REDIS_DIR=$SERVICES_DIR/redis
    REDIS_LOG=$SERVICES_DIR/redis.log
    mkdir -p "$REDIS_DIR"

    local attempt deadline
    REDIS_PORT=$(pick_port "$REDIS_DEFAULT_PORT")
    for attempt in 1 2 3; do
        log "starting Redis on 127.0.0.1:$REDIS_PORT"
        "$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize no \
            --save '' --appendonly no --dir "$REDIS_DIR" >"$REDIS_LOG" 2>&1 &
        REDIS_PID=$!
        STARTED_REDIS=1
        deadline=$((SECONDS + START_TIMEOUT))
        until redis_answers; do
            if ! kill -0 "$REDIS_PID" 2>/dev/null; then
                wait "$REDIS_PID" 2>/dev/null || true
                break
            fi
            ((SECONDS < deadline)) || break
            sleep 0.2
        done
        if redis_answers; then
            break
        fi
        if ((attempt < 3)) && grep -q 'Address already in use' "$REDIS_LOG"; then
            REDIS_PORT=$(pick_port 0)
            continue
        fi
        tail -n 20 "$REDIS_LOG" >&2 || true
        die "Redis did not answer within ${START_TIMEOUT}s (log above)"
    done
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
    export REDIS_PID REDIS_PORT REDIS_SERVER REDIS_DIR REDIS_LOG
}

redis_answers() {
    kill -0 "$REDIS_PID" 2>/dev/null || return 1
    [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

# --- main ---------------------------------------------------------------------------

if [[ -n ${DATABASE_URL:-} ]] && pg_reachable "$DATABASE_URL"; then
    log "using DATABASE_URL from the environment"
else
    [[ -n ${DATABASE_URL:-} ]] && log "DATABASE_URL is set but not reachable; starting a private Postgres"
    start_postgres
fi

if [[ -n ${REDIS_URL:-} ]] && redis_reachable "$REDIS_URL"; then
    log "using REDIS_URL from the environment"
else
    [[ -n ${REDIS_URL:-} ]] && log "REDIS_URL is set but not reachable; starting a private Redis"
    start_redis
fi
export DATABASE_URL REDIS_URL

GATEWAY_SERVICES_ENV=$SERVICES_DIR/services.env
for name in DATABASE_URL REDIS_URL PG_BIN_DIR PG_DATA_DIR PG_CTL_USER PG_PORT PG_LOG \
    REDIS_PID REDIS_PORT REDIS_SERVER REDIS_DIR REDIS_LOG; do
    if [[ -n ${!name:-} ]]; then
        echo "$name=${!name}"
    fi
done >"$GATEWAY_SERVICES_ENV"
export GATEWAY_SERVICES_ENV

if [[ $MODE == up ]]; then
    echo
    sed 's/^/export /' "$GATEWAY_SERVICES_ENV"
    echo
    log "running; press Ctrl-C to stop"
    while true; do sleep 1; done
fi

# Not exec: the EXIT trap has to stop the services after CMD.
set +e
"$@"
status=$?
set -e
exit "$status"

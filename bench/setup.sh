#!/usr/bin/env bash
# What `make bench` needs besides the project's .venv, installed when missing:
#   - nginx-light and wrk (Debian packages),
#   - bench/.venv-litellm: LiteLLM's proxy, the peer (bench/requirements-litellm.txt),
#   - bench/.venv-tools: granian and py-spy (bench/requirements-tools.txt), a plain
#     `pip install --target` folder that the project's interpreter puts on PYTHONPATH.
# Stamps make reruns a no-op until a requirements file changes.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "bench/setup: $*" >&2; }

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
if ((${#missing[@]})); then
    [[ $EUID -eq 0 ]] || {
        log "missing ${missing[*]}; install them (apt-get install ${missing[*]})"
        exit 1
    }
    # The packages' scripts must not start a system-wide nginx: we only want the binary.
    created_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    trap 'if [[ -n $created_policy ]]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
    export DEBIAN_FRONTEND=noninteractive
    log "apt-get install ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}

stamp_ok() { # stamp requirements-file
    [[ -f $1 ]] && cmp -s "$1" "$2"
}

LITELLM_VENV=bench/.venv-litellm
if ! stamp_ok "$LITELLM_VENV/.requirements" bench/requirements-litellm.txt; then
    log "installing LiteLLM's proxy into $LITELLM_VENV"
    rm -rf "$LITELLM_VENV"
    "$PYTHON" -m venv "$LITELLM_VENV"
    "$LITELLM_VENV/bin/python" -m pip install --quiet -r bench/requirements-litellm.txt
    cp bench/requirements-litellm.txt "$LITELLM_VENV/.requirements"
fi

TOOLS=bench/.venv-tools
if ! stamp_ok "$TOOLS/.requirements" bench/requirements-tools.txt; then
    log "installing granian and py-spy into $TOOLS"
    rm -rf "$TOOLS"
    .venv/bin/python -m pip install --quiet --no-deps --target "$TOOLS" -r bench/requirements-tools.txt
    cp bench/requirements-tools.txt "$TOOLS/.requirements"
fi

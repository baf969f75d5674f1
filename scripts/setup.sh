#!/usr/bin/env bash
# Prepare this machine and the repository's virtualenv for hakeeper development.
#
# Idempotent: installs only the Debian packages that are missing (apt-get update only when
# something must be installed), creates .venv only when absent, and re-runs
# `pip install -e '.[test]'` only when pyproject.toml changed since the last successful install.
#
# Environment: PYTHON (interpreter for the venv, default python3); EXTRA_PACKAGES (more Debian
# packages to install, space-separated).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# curl and iproute2 (ip): the integration tests and chaos partitions; etcd-client: the etcdctl of
# docs/deployment.md (etcd-server only Suggests it).
PACKAGES=(postgresql-15 etcd-server etcd-client haproxy python3-venv make zstd curl iproute2)
# EXTRA_PACKAGES: more Debian packages, e.g. the benchmarks' peers (`make bench-setup`).
read -r -a extra <<<"${EXTRA_PACKAGES:-}"
PACKAGES+=("${extra[@]}")
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.hakeeper-setup-stamp"

log() { printf 'setup: %s\n' "$*"; }

# ---------------------------------------------------------------- Debian packages
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
else
    log "not a Debian system; make sure PostgreSQL 15, etcd, haproxy and python3 venv support are installed"
fi

if ((${#missing[@]})); then
    apt_install=(apt-get install -y -q --no-install-recommends "${missing[@]}")
    if [[ $(id -u) -eq 0 ]]; then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        "${apt_install[@]}"
    elif command -v sudo >/dev/null 2>&1; then
        log "installing ${missing[*]} (with sudo)"
        sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
        sudo env DEBIAN_FRONTEND=noninteractive "${apt_install[@]}"
    else
        log "missing Debian packages: ${missing[*]}"
        log "install them as root:  apt-get update && apt-get install ${missing[*]}"
        exit 1
    fi
else
    log "Debian packages present"
fi

# ---------------------------------------------------------------- virtualenv
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
    rm -f "$STAMP"
fi

want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" != "$have" || ! -x "$VENV/bin/hakeeper" ]]; then
    log "installing hakeeper and test dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    printf '%s\n' "$want" >"$STAMP"
else
    log "$VENV up to date"
fi

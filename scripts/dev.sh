#!/usr/bin/env bash
# Developer and CI entry point for orochi-proxy.
#
#   scripts/dev.sh test [pytest args...]   install what is missing, then run the test suite
#   scripts/dev.sh demo [demo args...]     install what is missing, then `orochi-proxy demo`
#
# The install step makes a fresh Debian 12 machine with Python 3.11 ready, so CI (.ci/run runs
# `bash scripts/dev.sh test`) and a new developer run the very same commands:
#   * PostgreSQL server binaries (initdb, pg_ctl, postgres): the tests start real nodes. Installed
#     with apt-get only when no initdb is found. If the package starts Debian's default cluster
#     on 5432 we leave it alone: the project never uses it (nodes run on free ports).
#   * The package itself, editable, with its test extras. Where the interpreter is "externally
#     managed" (Debian's /usr/bin/python3, PEP 668) a virtualenv is used instead of touching the
#     system's site-packages. The install is skipped when nothing it depends on changed.
#
# Environment: PYTHON (interpreter, default python3), OROCHI_VENV (virtualenv location when one
# is needed), OROCHI_PG_BINDIR (use PostgreSQL binaries from this directory),
# OROCHI_FORCE_INSTALL=1 (reinstall the package even if it looks up to date).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

CACHE_DIR="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/orochi-proxy"
PY="${PYTHON:-python3}"

log() { echo "dev.sh: $*" >&2; }

usage() {
    cat >&2 <<'EOF'
usage: scripts/dev.sh test [pytest args...]
       scripts/dev.sh demo [orochi-proxy demo args...]
EOF
    exit 2
}

# Run a command as root: directly when we are root, else through sudo when there is one.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "needs root (or sudo) to run: $*"
        return 1
    fi
}

apt_install() {
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

# Same search order as orochi_proxy.localcluster.find_pg_bindir.
have_initdb() {
    if [ -n "${OROCHI_PG_BINDIR:-}" ] && [ -x "$OROCHI_PG_BINDIR/initdb" ]; then
        return 0
    fi
    if command -v pg_config >/dev/null 2>&1; then
        local bindir
        bindir="$(pg_config --bindir 2>/dev/null || true)"
        if [ -n "$bindir" ] && [ -x "$bindir/initdb" ]; then
            return 0
        fi
    fi
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

install_postgres() {
    if have_initdb; then
        return 0
    fi
    log "no initdb found: installing PostgreSQL 15 with apt-get"
    apt_install postgresql-15 postgresql-contrib libpq-dev
    if ! have_initdb; then
        log "initdb is still missing after apt-get install postgresql-15"
        exit 1
    fi
}

# Pick the interpreter to install into: $PY itself, or a virtualenv when $PY is externally managed.
select_python() {
    if ! command -v "$PY" >/dev/null 2>&1; then
        log "$PY not found: installing python3"
        apt_install python3 python3-venv python3-pip
    fi
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        log "Python >= 3.11 is required; $PY is $("$PY" -V 2>&1)"
        exit 1
    fi
    local managed
    managed="$("$PY" -c 'import os, sys, sysconfig
print(int(sys.prefix == sys.base_prefix and os.path.exists(
    os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')"
    if [ "$managed" = "1" ]; then
        local venv="${OROCHI_VENV:-$CACHE_DIR/venv}"
        if [ ! -x "$venv/bin/python" ]; then
            log "$PY is externally managed (PEP 668): creating a virtualenv in $venv"
            mkdir -p "$(dirname "$venv")"
            if ! "$PY" -m venv "$venv" 2>/dev/null; then
                rm -rf "$venv"
                apt_install python3-venv
                "$PY" -m venv "$venv"
            fi
        fi
        export VIRTUAL_ENV="$venv"
        export PATH="$venv/bin:$PATH"
        PY="$venv/bin/python"
    fi
    if ! "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m ensurepip --upgrade >/dev/null 2>&1 || apt_install python3-pip
    fi
}

# Editable install with test extras, skipped when this interpreter already has this checkout
# installed from the same pyproject.toml (a fresh clone elsewhere, or a changed pyproject,
# reinstalls; OROCHI_FORCE_INSTALL=1 always does).
install_package() {
    local exe key want stamp
    exe="$("$PY" -c 'import sys; print(sys.executable)')"
    key="$(printf '%s|%s' "$REPO_ROOT" "$exe" | sha256sum | cut -c1-16)"
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    stamp="$CACHE_DIR/install-$key.stamp"
    if [ "${OROCHI_FORCE_INSTALL:-0}" != "1" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
        "$PY" - "$REPO_ROOT" <<'EOF' >/dev/null 2>&1; then
import os, sys
import pytest, psycopg, asyncpg, pglast  # noqa: F401  (the test extras and core deps are there)
import orochi_proxy
root = os.path.realpath(sys.argv[1])
sys.exit(0 if os.path.realpath(orochi_proxy.__file__).startswith(root + os.sep) else 1)
EOF
        return 0
    fi
    log "installing orochi-proxy (editable, with test extras) into $exe"
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --disable-pip-version-check -e '.[test]'
    mkdir -p "$CACHE_DIR"
    echo "$want" >"$stamp"
}

# The console script installed for *this* interpreter (pyenv shims may not know it yet).
orochi_proxy_cmd() {
    local scripts
    scripts="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    if [ -x "$scripts/orochi-proxy" ]; then
        echo "$scripts/orochi-proxy"
    else
        command -v orochi-proxy
    fi
}

setup() {
    install_postgres
    select_python
    install_package
}

[ $# -ge 1 ] || usage
cmd="$1"
shift
case "$cmd" in
    test)
        setup
        exec "$PY" -m pytest -q "$@"
        ;;
    demo)
        setup
        exec "$(orochi_proxy_cmd)" demo "$@"
        ;;
    -h | --help | help)
        usage
        ;;
    *)
        log "unknown command: $cmd"
        usage
        ;;
esac

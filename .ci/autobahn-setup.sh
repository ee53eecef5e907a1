#!/usr/bin/env bash
# Install Autobahn|Testsuite (wstest) for the conformance test, under .ci/cache/autobahn/.
#
# autobahntestsuite is Python 2.7 only, so it lives in its own Python 2.7 virtualenv, created by
# a small Python 3 venv holding virtualenv<20.22 (the last line able to create 2.7 envs). The
# base Python 2.7 interpreter is never touched: its old pip breaks its own setuptools.
#
# Without a Python 2.7 (pyenv 2.7.18, or python2.7 on PATH) this prints why and exits 0, and
# tests/conformance/test_autobahn.py skips. Re-running it is cheap once the tools are in place.
#
# Usage: .ci/autobahn-setup.sh          prints the wstest path on its last line
# Environment: ODIN_PYTHON2 (a Python 2.7 interpreter), PYTHON3 (default python3)
set -euo pipefail

AUTOBAHN_VERSION="25.10.1"
VIRTUALENV_SPEC="virtualenv<20.22"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.ci/cache/autobahn"
TOOLS="$CACHE/tools"       # Python 3 venv with virtualenv
PY2ENV="$CACHE/py2env"     # Python 2.7 virtualenv with autobahntestsuite
WSTEST="$PY2ENV/bin/wstest"
STAMP="$CACHE/installed"
WANT="autobahntestsuite==$AUTOBAHN_VERSION"

log() { printf 'autobahn-setup: %s\n' "$*" >&2; }

is_python27() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (2, 7) else 1)' >/dev/null 2>&1
}

find_python2() {
    local candidate root
    if [[ -n "${ODIN_PYTHON2:-}" ]]; then
        if is_python27 "$ODIN_PYTHON2"; then
            printf '%s\n' "$ODIN_PYTHON2"
            return 0
        fi
        log "ODIN_PYTHON2=$ODIN_PYTHON2 is not a working Python 2.7; looking elsewhere"
    fi
    root=""
    if command -v pyenv >/dev/null 2>&1; then
        root="$(pyenv root 2>/dev/null || true)"
    fi
    for candidate in "${root:+$root/versions/2.7.18/bin/python}" \
        "${PYENV_ROOT:+$PYENV_ROOT/versions/2.7.18/bin/python}" \
        "$HOME/.pyenv/versions/2.7.18/bin/python"; do
        if [[ -n "$candidate" && -x "$candidate" ]] && is_python27 "$candidate"; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    if command -v python2.7 >/dev/null 2>&1 && is_python27 python2.7; then
        # Resolve a pyenv shim to the real interpreter.
        python2.7 -c 'import sys; print(sys.executable)'
        return 0
    fi
    return 1
}

# Fast path: already installed (the stamp is written only after a complete install).
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$WSTEST" ]] \
    && "$PY2ENV/bin/python" -c '' >/dev/null 2>&1; then
    printf '%s\n' "$WSTEST"
    exit 0
fi

if ! PYTHON2="$(find_python2)"; then
    log "no Python 2.7 found (looked for \$(pyenv root)/versions/2.7.18/bin/python and python2.7)."
    log "Autobahn|Testsuite needs Python 2.7, so the conformance test will be skipped."
    log "To enable it: pyenv install 2.7.18, then run .ci/autobahn-setup.sh again."
    exit 0
fi

mkdir -p "$CACHE"
# One installer at a time (two CI steps, or a developer and a test run).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE/.lock"
    flock 9
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$WSTEST" ]]; then
        printf '%s\n' "$WSTEST"
        exit 0
    fi
fi

log "using Python 2.7 at $PYTHON2"
PIP_FLAGS=(--disable-pip-version-check --no-input --quiet)

if ! "$TOOLS/bin/python" -c 'import virtualenv' >/dev/null 2>&1; then
    log "creating $TOOLS with $VIRTUALENV_SPEC"
    rm -rf "$TOOLS"
    "${PYTHON3:-python3}" -m venv "$TOOLS"
    "$TOOLS/bin/pip" install "${PIP_FLAGS[@]}" "$VIRTUALENV_SPEC"
fi

log "creating $PY2ENV and installing $WANT (compiles Twisted; about 30 s)"
rm -f "$STAMP"
rm -rf "$PY2ENV"
"$TOOLS/bin/virtualenv" --quiet --no-periodic-update -p "$PYTHON2" "$PY2ENV"
"$PY2ENV/bin/pip" install "${PIP_FLAGS[@]}" "$WANT"
"$WSTEST" -a >&2
printf '%s' "$WANT" >"$STAMP"
printf '%s\n' "$WSTEST"

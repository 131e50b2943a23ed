#!/usr/bin/env bash
# Set up a development environment for procwire. Safe to run again and again.
#
#   bash scripts/setup.sh            # ./.venv with procwire installed editable, with [dev] extras
#   bash scripts/setup.sh --system   # also: redis-server, node >= 18 + npm, chromium (apt-get),
#                                    #       and the npm packages of tests/node
#   bash scripts/setup.sh --node     # also: the npm packages of tests/node (node must exist)
#   bash scripts/setup.sh --force    # reinstall the Python packages even if nothing changed
#
# Never reads stdin and never prompts, so it runs the same in CI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
STAMP="$VENV/.procwire-setup-stamp"
NODE_MIN_MAJOR=18
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

want_system=0
want_node=0
force=0
for arg in "$@"; do
    case "$arg" in
        --system) want_system=1; want_node=1 ;;
        --node) want_node=1 ;;
        --force) force=1 ;;
        -h|--help)
            sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) echo "setup.sh: unknown option: $arg (try --help)" >&2; exit 2 ;;
    esac
done

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- system tools (--system)

# How to run apt-get: directly as root, through sudo otherwise. Empty when neither works.
apt_prefix=()
apt_usable=1
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        # Without a terminal sudo must not wait for a password that nobody can type.
        if [ -t 0 ]; then apt_prefix=(sudo env DEBIAN_FRONTEND=noninteractive)
        else apt_prefix=(sudo -n env DEBIAN_FRONTEND=noninteractive); fi
    else
        apt_usable=0
    fi
fi

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" -eq 0 ]; then
        say "running: ${apt_prefix[*]:+${apt_prefix[*]} }apt-get update"
        "${apt_prefix[@]}" apt-get update -q
        apt_updated=1
    fi
}

# True when apt knows an installable version of every package given.
apt_has_candidates() {
    local pkg cand
    for pkg in "$@"; do
        cand="$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')"
        if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then return 1; fi
    done
    return 0
}

apt_install() {
    local cmd="apt-get install -y --no-install-recommends $*"
    if [ "$apt_usable" -eq 0 ]; then
        die "missing system packages and no root/sudo to install them. Run as root:
    apt-get update && $cmd"
    fi
    say "about to install with apt-get: $*"
    # An empty or stale package list (fresh containers ship none) makes install fail: update once.
    local lists_fresh
    lists_fresh="$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -n 1)"
    if [ -z "$lists_fresh" ] || ! apt_has_candidates "$@"; then
        apt_update_once || die "apt-get update failed. Run it by hand:
    ${apt_prefix[*]:+sudo }apt-get update && ${apt_prefix[*]:+sudo }$cmd"
    fi
    if ! "${apt_prefix[@]}" apt-get install -y -q --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" </dev/null; then
        die "apt-get install failed. Run it by hand:
    ${apt_prefix[*]:+sudo }apt-get update && ${apt_prefix[*]:+sudo }$cmd"
    fi
}

node_major() {
    node --version 2>/dev/null | sed -E 's/^v([0-9]+).*/\1/'
}

find_chromium() {
    command -v chromium 2>/dev/null || command -v chromium-browser 2>/dev/null || true
}

ensure_system_tools() {
    local missing=()
    if ! command -v redis-server >/dev/null 2>&1; then missing+=(redis-server); fi
    if ! command -v node >/dev/null 2>&1; then
        missing+=(nodejs)
    elif [ "$(node_major)" -lt "$NODE_MIN_MAJOR" ] 2>/dev/null; then
        say "node $(node --version) is older than $NODE_MIN_MAJOR; trying Debian's nodejs"
        missing+=(nodejs)
    fi
    if ! command -v npm >/dev/null 2>&1; then missing+=(npm); fi
    if [ -z "$(find_chromium)" ]; then missing+=(chromium); fi

    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi

    command -v redis-server >/dev/null 2>&1 || die "redis-server still missing after install"
    command -v node >/dev/null 2>&1 || die "node still missing after install"
    command -v npm >/dev/null 2>&1 || die "npm still missing after install"
    local major
    major="$(node_major)"
    if ! [ "$major" -ge "$NODE_MIN_MAJOR" ] 2>/dev/null; then
        die "node $(node --version) found at $(command -v node), but the tests need node >= $NODE_MIN_MAJOR.
    Put a newer node first on PATH (Debian 12's 'apt-get install nodejs' gives 18)."
    fi
    [ -n "$(find_chromium)" ] || die "chromium still missing after install"
    say "system tools: redis-server $(redis-server --version | awk '{print $3}' | sed 's/^v=//'), node $(node --version), npm $(npm --version), chromium at $(find_chromium)"
}

# ---------------------------------------------------------------- Python virtualenv

py_ok() {  # usable interpreter: runs (pyenv shims may not) and is >= 3.11
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}
py_has_venv() {  # Debian splits venv/ensurepip into python3-venv
    "$1" -c 'import venv, ensurepip' >/dev/null 2>&1
}

ensure_venv() {
    if [ -x "$VENV/bin/python" ] && py_ok "$VENV/bin/python"; then
        say "reusing $VENV ($("$VENV/bin/python" --version 2>&1))"
        return
    fi
    if [ -e "$VENV" ]; then
        say "$VENV exists but has no working Python >= 3.11; recreating it"
        rm -rf "$VENV"
    fi

    local cand found="" found_no_venv=""
    for cand in python3.13 python3.12 python3.11 python3; do
        command -v "$cand" >/dev/null 2>&1 || continue
        py_ok "$cand" || continue
        if py_has_venv "$cand"; then found="$cand"; break; fi
        [ -n "$found_no_venv" ] || found_no_venv="$cand"
    done
    if [ -z "$found" ]; then
        if [ -n "$found_no_venv" ]; then
            die "$found_no_venv ($("$found_no_venv" --version 2>&1)) has no venv module. Install it with:
    apt-get install python3 python3-venv"
        fi
        die "no Python >= 3.11 on PATH (tried python3.13, python3.12, python3.11, python3). Install it with:
    apt-get install python3 python3-venv"
    fi

    say "creating $VENV with $(command -v "$found") ($("$found" --version 2>&1))"
    if ! "$found" -m venv "$VENV"; then
        rm -rf "$VENV"
        die "'$found -m venv' failed. On Debian: apt-get install python3 python3-venv"
    fi
}

ensure_python_packages() {
    # Skip pip when pyproject.toml and the interpreter are what we installed last time:
    # the install is editable, so code changes under src/ need no reinstall.
    local want
    want="$( { sha256sum pyproject.toml; "$VENV/bin/python" --version; } 2>&1 | sha256sum | cut -d' ' -f1)"
    if [ "$force" -eq 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
            && [ -x "$VENV/bin/procwire" ]; then
        say "Python packages up to date (pyproject.toml unchanged; --force reinstalls)"
        return
    fi
    rm -f "$STAMP"
    say "upgrading pip"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    say "installing procwire in editable mode with [dev] extras"
    "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
    printf '%s\n' "$want" > "$STAMP"
}

# ---------------------------------------------------------------- npm packages for tests/node

ensure_node_packages() {
    local dir="$ROOT/tests/node"
    [ -f "$dir/package.json" ] || return 0
    command -v npm >/dev/null 2>&1 || die "tests/node/package.json exists but npm is missing (run: bash scripts/setup.sh --system)"
    local stamp="$dir/node_modules/.procwire-stamp"
    if [ -f "$stamp" ] && ! [ "$dir/package.json" -nt "$stamp" ] \
            && ! { [ -f "$dir/package-lock.json" ] && [ "$dir/package-lock.json" -nt "$stamp" ]; }; then
        say "tests/node/node_modules up to date"
        return
    fi
    if [ -f "$dir/package-lock.json" ]; then
        say "installing npm packages in tests/node (npm ci)"
        (cd "$dir" && npm ci --no-audit --no-fund </dev/null)
    else
        say "installing npm packages in tests/node (npm install)"
        (cd "$dir" && npm install --no-audit --no-fund </dev/null)
    fi
    mkdir -p "$dir/node_modules"
    touch "$stamp"
}

# ---------------------------------------------------------------- main

if [ "$want_system" -eq 1 ]; then ensure_system_tools; fi
ensure_venv
ensure_python_packages
if [ "$want_node" -eq 1 ]; then ensure_node_packages; fi
say "done"

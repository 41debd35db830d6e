#!/usr/bin/env bash
# Make sure the Debian packages named on the command line are installed, before any work starts.
#   tools/system-deps.sh apertium apertium-eng-spa ...
# Installed already: prints nothing. Missing: installs them with apt-get when it can (running as root, or with
# passwordless sudo); otherwise stops with one line that says exactly what to run. Used by `make repro` and
# `make test` so that the README's two commands are all a fresh Debian/Ubuntu machine needs.
set -euo pipefail

missing=()
for pkg in "$@"; do
    if command -v dpkg-query >/dev/null 2>&1; then
        status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        [[ "$status" == *"install ok installed"* ]] || missing+=("$pkg")
    else
        command -v "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing system packages: ${missing[*]} (this is not a Debian/Ubuntu system: install their equivalents with your package manager, then rerun)" >&2
    exit 1
fi
if [[ $(id -u) -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "error: missing system packages: ${missing[*]}; run: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
fi
echo "installing system packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

#!/usr/bin/env bash
# Install what the report's browser test needs: Debian's chromium and playwright-core (npm).
# Safe to run again; skips what is already there. Needs root (or sudo) for apt-get.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ! command -v chromium >/dev/null 2>&1; then
    sudo_cmd=""
    if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo_cmd apt-get update -q
    $sudo_cmd apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi

if ! command -v node >/dev/null 2>&1; then
    echo "node (>= 18) is needed for playwright-core; install nodejs/npm first" >&2
    exit 1
fi

if [ ! -d "$here/node_modules/playwright-core" ]; then
    (cd "$here" && npm install --no-audit --no-fund --silent)
fi
echo "browser test set-up done: $(command -v chromium), playwright-core in $here/node_modules"

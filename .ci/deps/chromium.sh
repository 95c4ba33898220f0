#!/usr/bin/env bash
# Debian's Chromium, for tests/pretrain/test_report.py: it renders `python -m pretrain.report`'s HTML page
# headless and checks the screenshot. Idempotent: does nothing when /usr/bin/chromium is already there.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi

fail() {
    echo "chromium.sh: cannot install Chromium: $1" >&2
    exit 1
}

command -v apt-get >/dev/null 2>&1 || fail "no apt-get (not a Debian-like system); install chromium so that /usr/bin/chromium exists"
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    fail "root or password-less sudo is needed for apt-get; run: sudo apt-get install -y chromium"
fi

export DEBIAN_FRONTEND=noninteractive
# The package lists may be missing (slim images) or stale: refresh them once before installing.
$SUDO apt-get update -qq || fail "apt-get update failed (no access to a Debian mirror?)"
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null ||
    fail "apt-get install chromium failed (see the apt output above)"
[ -x /usr/bin/chromium ] || fail "the chromium package installed no /usr/bin/chromium"
echo "chromium.sh: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"

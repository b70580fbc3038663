#!/usr/bin/env bash
# Installs Debian's chromium (/usr/bin/chromium), the browser of the dashboard test
# (tests/test_dashboard.py runs this when the browser is missing). Playwright drives it; its
# own browser download is not used.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo -n"
fi

install_chromium() {
    $SUDO apt-get install -y --no-install-recommends chromium
}

if ! install_chromium; then
    # An old or missing package list: fetch it, then try once more.
    $SUDO apt-get update
    install_chromium
fi
test -x /usr/bin/chromium

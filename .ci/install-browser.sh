#!/usr/bin/env bash
# Debian's chromium for the MLflow UI test (tests/e2e): the distribution's browser, never one that a
# test tool downloads. Idempotent: does nothing when chromium is already installed.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then  # the path tests/e2e/browser.py launches
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium
/usr/bin/chromium --version

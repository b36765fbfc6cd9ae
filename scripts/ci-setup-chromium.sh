#!/usr/bin/env bash
# Installs Debian's headless Chromium for the real-browser report test (tests/integration/test_browser.py).
# Idempotent; needs root (CI runs as root). Skips the install when chromium is already on PATH.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "chromium present: $(chromium --version 2>/dev/null || true)"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "installed: $(chromium --version)"

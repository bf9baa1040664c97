"""Headless Debian Chromium driven by Playwright, and where the screenshots go.

The browser is the distribution's package (installed by ``.ci/install-browser.sh``), never one that
Playwright downloads: CI machines have no internet beyond package mirrors, and a downloaded browser
would not be the one users open the MLflow UI in.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 2200, "height": 1000}  # wide enough that added tag columns are never scrolled away
ACTION_TIMEOUT_MS = 120_000  # the machine is shared: pages may take long, waits poll until then


def require_chromium() -> Path:
    """Fail (never skip) when the browser is missing: a skipped UI check would pass CI silently."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the MLflow UI test needs Debian's chromium package; "
                    "install it with `.ci/install-browser.sh` (apt-get install chromium)", pytrace=False)
    return CHROMIUM


def artifacts_dir(default: Path) -> Path:
    """``$CTSSL_E2E_ARTIFACTS`` when CI wants to keep the screenshots, else the test's tmp folder."""
    out = Path(os.environ.get("CTSSL_E2E_ARTIFACTS") or default)
    out.mkdir(parents=True, exist_ok=True)
    return out


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

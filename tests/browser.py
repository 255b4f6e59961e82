"""Headless Chromium for the demo's browser test and for scripts/demo_screenshot.py.

Debian's packages (`apt install chromium chromium-driver`): selenium's own driver manager would try to download a
browser, and the test machines have no network.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# --no-sandbox: Chromium refuses to start as root with its sandbox on (containers, CI). Without the
# background-networking, component-update, sync and QUIC flags Chromium keeps calling Google services, which on
# an offline machine means a stream of failing connections and slower start-up.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
)
REQUIRE_ENV = "SMILE_REQUIRE_BROWSER"


def browser_unavailable() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    for module in ("gradio", "selenium"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -r requirements-extra.txt)"
    for binary, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not binary.exists():
            return f"{binary} is missing (apt install {package})"
    return None


def require_browser() -> None:
    """Skip the calling test when the browser stack is missing; fail instead when SMILE_REQUIRE_BROWSER=1
    (CI), so that a CI run cannot pass by skipping it."""
    import pytest

    reason = browser_unavailable()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but the browser test cannot run: {reason}", pytrace=False)
    pytest.skip(f"browser test: {reason}")


def headless_chromium(user_data_dir: str | Path, width: int = 1280, height: int = 900):
    """A selenium driver for a fresh headless Chromium profile in ``user_data_dir``; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        driver.set_window_size(width, height)
    except Exception:
        driver.quit()
        raise
    return driver

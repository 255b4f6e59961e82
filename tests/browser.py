"""Headless Chromium for the demo's browser test and for scripts/demo_screenshot.py.

Debian's packages (`apt install chromium chromium-driver`): selenium's own driver manager would try to download a
browser, and the test machines have no network.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Overridable so that CI can also run the suite as a newcomer without a browser sees it (.ci/run).
CHROMIUM = Path(os.environ.get("SMILE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("SMILE_CHROMEDRIVER", "/usr/bin/chromedriver"))
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
    """Why the browser test cannot run here (every missing piece, with its install command), or None when it can."""
    missing = [f"{module} is not installed (pip install -r requirements-extra.txt)"
               for module in ("gradio", "selenium") if importlib.util.find_spec(module) is None]
    missing += [f"{binary} is missing (apt install {package})"
                for binary, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver"))
                if not binary.exists()]
    return "; ".join(missing) or None


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


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it), so parallel runs never collide on a fixed one."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def upload_file(driver, path: str | Path, timeout: float = 60) -> None:
    """Put ``path`` into the demo's file input (hidden by Gradio; selenium can still type a path into it)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    selector = "#upload input[type=file]"
    WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, selector))
    driver.find_element(By.CSS_SELECTOR, selector).send_keys(str(path))


def caption_upload(driver, path: str | Path, models: int, timeout: float = 60) -> list[str]:
    """Upload an image, wait for its preview, press Caption and wait for every model's word count; returns the
    captions as the page shows them, in column order."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    upload_file(driver, path, timeout)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))  # accepted and shown
    driver.find_element(By.ID, "caption-button").click()
    wait.until(lambda d: all(d.find_element(By.ID, f"length-{index}").text.strip() for index in range(models)))
    return [driver.find_element(By.CSS_SELECTOR, f"#caption-{index} textarea").get_attribute("value")
            for index in range(models)]


def exit_without_browser() -> None:
    """For scripts: stop with the reason when the browser stack is missing."""
    reason = browser_unavailable()
    if reason is not None:
        raise SystemExit(f"needs headless Chromium: {reason}")

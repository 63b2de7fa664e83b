"""A real Chromium, headless, driven by Selenium, for the sessions page's tests.

Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver;
.ci/run installs them). Without them the tests skip, except under CI=true, where
they fail: the page must be tested in a real browser there.

The proxy under test runs in the test's own event loop, so every call into the
browser (which blocks until Chromium answers) goes to a thread: `Browser` wraps them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import pytest

T = TypeVar("T")

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL_HINT = "apt-get install -y chromium chromium-driver (and pip install selenium)"


def _skip_or_fail(reason: str) -> NoReturn:
    """Skip locally; fail under CI=true, where the browser must be installed."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests need it)", pytrace=False)
    pytest.skip(reason)


class Browser:
    """One Chromium page, each call made in a thread so the proxy keeps serving."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def open(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, source, *args)

    async def texts(self, css: str) -> list[str]:
        """The visible text of every element matching `css`, in page order."""
        found: list[str] = await self.script(
            "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText);",
            css,
        )
        return found

    async def text(self, css: str) -> str:
        found = await self.texts(css)
        return found[0] if found else ""

    async def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By

        element = await self.call(self.driver.find_element, By.CSS_SELECTOR, css)
        await self.call(element.click)

    async def wait_for(
        self, check: Callable[[], Any], timeout: float = 10.0, what: str = "the page"
    ) -> Any:
        """Until the coroutine function `check` returns something true; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await check()
            if value:
                return value
            if time.monotonic() > deadline:
                body = await self.text("body")
                raise AssertionError(f"{what} did not show within {timeout:g} s; page:\n{body}")
            await asyncio.sleep(0.1)

    async def wait_text(self, css: str, contains: str, timeout: float = 10.0) -> str:
        """Until an element matching `css` shows `contains`; that element's text."""

        async def check() -> str | None:
            return next((t for t in await self.texts(css) if contains in t), None)

        found: str = await self.wait_for(check, timeout, f"{contains!r} in {css}")
        return found

    async def screenshot(self, path: str) -> None:
        await self.call(self.driver.save_screenshot, path)

    def responses(self, url: str) -> list[tuple[int, dict[str, str]]]:
        """The status and headers of each response the browser received for `url`
        since the last call (from Chromium's performance log)."""
        out: list[tuple[int, dict[str, str]]] = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") != "Network.responseReceived":
                continue
            response = message["params"]["response"]
            if response.get("url") == url:
                headers = {k.lower(): v for k, v in response.get("headers", {}).items()}
                out.append((response["status"], headers))
        return out

    @property
    def source(self) -> str:
        value: str = self.driver.page_source
        return value


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """One headless Chromium for the session; each test opens its own proxy (its own
    origin, so no test sees the credentials another cached)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _skip_or_fail(f"selenium is not installed: {INSTALL_HINT}")
    chromium_path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    driver_path = CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else shutil.which("chromedriver")
    if not chromium_path or not driver_path:
        _skip_or_fail(f"chromium or chromedriver is not installed: {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium_path
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        options.add_argument(arg)
    # the console, and the network as the browser saw it (statuses and headers)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(chromium: Any) -> Iterator[Browser]:
    for kind in ("browser", "performance"):
        chromium.get_log(kind)  # what earlier tests left
    yield Browser(chromium)
    chromium.get("about:blank")

"""Headless Chromium for the report and dashboard tests: Debian's `chromium` through
Playwright (its own browser downloads are not reachable here). Missing, the tests fail and
say how to install it; they never skip."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = os.environ.get("OVERNIGHT_TEST_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("OVERNIGHT_TEST_SHOTS", "/tmp/overnight-test-shots"))


@contextlib.contextmanager
def page(width: int = 1280, height: int = 900, bypass_csp: bool = True) -> Iterator[object]:
    """A fresh page in a headless Chromium, closed afterwards. The pages' Content Security
    Policy is bypassed by default: Playwright's own waiting evaluates strings, and what is
    tested is that untrusted text is escaped, which must hold without the policy too."""
    if not Path(CHROMIUM).is_file():
        raise AssertionError(f"{CHROMIUM} is missing: `apt-get install chromium` (the report "
                             "and dashboard tests need a real browser)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser.new_page(viewport={"width": width, "height": height},
                                   bypass_csp=bypass_csp)
        finally:
            browser.close()


def screenshot(pg, name: str) -> Path:  # noqa: ANN001
    """Save a full-page screenshot where the test run keeps them, and return its path."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    pg.screenshot(path=str(path), full_page=True)
    return path

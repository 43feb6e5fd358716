"""A rater's whole journey in real headless Chromium (Debian's, driven by Playwright; no browser
download): arrival by a Prolific link, consent, instructions, every item with its five scales and
the attention checks, resuming after the cookies are gone, and the completion code. A rating
page showing such an explanation is screenshotted and its pixels checked; explanations carrying <script> must show as text."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from study_helpers import CHECK_BY_QUESTION, live_server, make_study

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    if os.environ.get("DISTILLQA_REQUIRE_CHROMIUM"):  # set by .ci/run where apt could install it
        raise RuntimeError(f"chromium is required here but {CHROMIUM} is missing")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)", allow_module_level=True)
# No network but loopback here: without these, chromium keeps trying to reach its update and sync hosts.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\"> & <b>bold?</b>"


def hostile_explanation(cell: str, k: int) -> str:
    return f"Shelves hold things (item {k}). {HOSTILE}" if k % 2 else f"Shelves hold things, so item {k} goes there."


def rate_current_item(page, values: dict[str, int]) -> None:
    question = page.locator("h1 + .box").inner_text()
    check = CHECK_BY_QUESTION.get(question)
    if check:
        values = {**values, check["scale"]: check["value"]}
    for scale, value in values.items():
        page.check(f'input[name="{scale}"][value="{value}"]')
    page.click("button[type=submit]")


def test_rater_journey_in_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    import matplotlib.image

    from distillqa.study.app import create_app
    from distillqa.study.store import Store

    study = make_study(tmp_path, questions=12, explanation=hostile_explanation, items_per_condition=6, target_ratings=2,
                       items_per_rater=6)
    store = Store(study)
    values = {"plausibility": 4, "understandability": 5, "completeness": 2, "satisfaction": 4, "contrastiveness": 1}
    total = study.design["items_per_rater"] + study.design["attention_checks_per_rater"]
    screenshot = tmp_path / "rating-page.png"
    with live_server(create_app(study, store=store)) as base, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
                                                        args=CHROMIUM_FLAGS, viewport={"width": 1000, "height": 1400})
        page = browser.new_page()
        link = f"{base}/?PROLIFIC_PID=browser-rater&STUDY_ID=s1&SESSION_ID=x1"
        page.goto(link)
        assert page.url.endswith("/consent")
        page.click("button[value=yes]")
        assert page.url.endswith("/instructions")
        assert "plausibility" in page.inner_text("main")
        page.click("button[type=submit]")

        assert page.url.endswith("/item")
        assert page.inner_text("main").startswith(f"Item 1 of {total}")
        for position in range(1, total + 1):
            assert f"Item {position} of {total}" in page.inner_text("main")
            if HOSTILE in page.inner_text(".explanation") and not screenshot.exists():  # markup shown as text
                page.screenshot(path=str(screenshot), full_page=True)
            assert page.locator(".explanation script, .explanation img, .explanation b").count() == 0
            if position == 3:  # the rater comes back without cookies: the link alone resumes them
                browser.clear_cookies()
                page.goto(link)
                assert page.url.endswith("/item") and f"Item 3 of {total}" in page.inner_text("main")
            rate_current_item(page, values)
        assert page.evaluate("typeof window.pwned") == "undefined"
        assert page.url.endswith("/done")
        assert study.design["completion_code"] in page.inner_text(".code")
        page.goto(link)  # reopening after the end shows the code again
        assert page.url.endswith("/done")
        browser.close()
    assert screenshot.exists(), "no item with markup in its explanation was shown"

    rater = store.raters()[0]
    assert (rater["rated"], rater["checks_answered"], rater["failed_checks"], bool(rater["finished"])) == (6, 2, 0, True)
    items = [r for r in store.responses() if r["kind"] == "item"]
    assert all(tuple(r[s] for s in values) == tuple(values.values()) for r in items)

    pixels = matplotlib.image.imread(screenshot)[..., :3]
    assert pixels.shape[0] >= 1400 and pixels.shape[1] == 1000
    assert pixels.std() > 0.05, "the screenshot is blank"
    dark = (pixels.mean(axis=2) < 0.3).mean()  # text
    blue = ((pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.4)).mean()  # the explanation box's border and the Next button
    assert 0.005 < dark < 0.3 and blue > 0.001, (dark, blue)

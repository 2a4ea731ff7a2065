"""The labelling page in a real headless Chromium (Debian's `chromium` package, driven by Playwright through that
installed browser): label with the keyboard, reload, undo, export (issue #19).

Needs `/usr/bin/chromium` (`apt-get install chromium`; `.ci/run` installs it where it can) and the `playwright`
Python package from the dev extra — without them this test skips and says why.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from diffalign.collect.candidates import CollectSettings, prepare
from diffalign.collect.export import export

CHROMIUM = os.environ.get("DIFFALIGN_CHROMIUM", "/usr/bin/chromium")
# as root in a sandbox; no background networking (the machine's closed network refuses it loudly)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM}: `apt-get install chromium` (or set DIFFALIGN_CHROMIUM) to run this test"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the `playwright` package is missing: `pip install -e '.[dev]'`"
    return None


pytestmark = pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))


@pytest.fixture
def server(tmp_path):
    """A collection of 3 toy prompts × 2 candidates (the toy model's own 20 steps) served by uvicorn in a thread."""
    import uvicorn

    from diffalign.collect.app import create_app

    folder = tmp_path / "labels"
    prepare(folder, CollectSettings(model="toy", lora=None, prompts="toy:train", max_prompts=3, per_prompt=2, seed=0,
                                    num_inference_steps=20, guidance_scale=3.0, resolution=None, repeat_fraction=0.0,
                                    reward=None))  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(folder), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    while not instance.started:
        time.sleep(0.05)
    yield folder, f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


def test_label_with_the_keyboard_reload_undo_and_export(server, tmp_path):
    from playwright.sync_api import sync_playwright

    folder, url = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 740})
        page.goto(f"{url}/?labeller=alice")
        progress = page.locator("#progress")
        progress.filter(has_text="0 of 3 pairs done").wait_for()
        first = page.evaluate("document.body.dataset.pairId")
        page.keyboard.press("ArrowLeft")
        progress.filter(has_text="1 of 3 pairs done").wait_for()
        assert page.evaluate("document.body.dataset.pairId") != first
        page.wait_for_function("document.getElementById('right-img').complete")
        shot = tmp_path / "collect.png"
        page.screenshot(path=str(shot))  # the README's picture (a pair on screen, the last click saved)
        page.keyboard.press("t")
        progress.filter(has_text="2 of 3 pairs done").wait_for()

        page.reload()  # a closed/reloaded tab resumes where the person stopped
        progress.filter(has_text="2 of 3 pairs done").wait_for()
        last = page.evaluate("document.body.dataset.pairId")
        assert last not in (first, "")
        page.keyboard.press("u")  # undo the tie: its pair comes back
        progress.filter(has_text="1 of 3 pairs done").wait_for()
        page.locator("#status").filter(has_text="undone").wait_for()
        page.keyboard.press("ArrowRight")
        progress.filter(has_text="2 of 3 pairs done").wait_for()
        page.keyboard.press("ArrowLeft")
        page.locator("#done").wait_for(state="visible")
        progress.filter(has_text="3 of 3 pairs done").wait_for()
        browser.close()
    assert shot.stat().st_size > 1000
    if os.environ.get("DIFFALIGN_SCREENSHOT"):  # `DIFFALIGN_SCREENSHOT=docs/collect.png pytest …`
        shutil.copy(shot, os.environ["DIFFALIGN_SCREENSHOT"])

    export(folder)
    table = pd.read_parquet(folder / "preferences.parquet")
    assert sorted(zip(table.label_0, table.label_1)) == [(0.0, 1.0), (1.0, 0.0), (1.0, 0.0)]  # the tie was undone
    assert set(table.labeller) == {"alice"}

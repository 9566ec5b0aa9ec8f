"""The labelling page in a real browser (headless Chromium driven by Playwright with the system browser): labels by
click and by keyboard, an undo, a reload that keeps them, a second labeller whose labels merge, and the trainer's
`human` reward returning exactly those labels. Writes a screenshot to build/test-artifacts/label_page.png."""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from servers import ROOT, LabelServer

from tdm_r1.labels.store import LabelStore
from tdm_r1.rewards.human import HumanOptions, HumanReward
from tdm_r1.rewards.wire import png_bytes

ARTIFACTS = Path(os.environ.get("TDM_R1_ARTIFACTS", ROOT / "build" / "test-artifacts"))
COLOURS = [(0.9, 0.1, 0.1), (0.1, 0.6, 0.2), (0.1, 0.2, 0.9), (0.1, 0.1, 0.1), (0.9, 0.8, 0.1), (0.6, 0.2, 0.7)]


def chromium() -> str:
    found = os.environ.get("TDM_R1_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    if found is None:  # CI installs it (.ci/run); elsewhere the test says how
        message = "no Chromium: apt-get install chromium (or set TDM_R1_CHROMIUM to a Chrome binary)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return found


def images() -> torch.Tensor:
    """Six 16 x 64 canvases, each a bar of its own colour on light grey."""
    x = torch.full((6, 3, 16, 64), 0.92)
    for i, c in enumerate(COLOURS):
        x[i, :, 4:12, 8 + 6 * i : 24 + 6 * i] = torch.tensor(c).view(3, 1, 1)
    return x


def test_labelling_in_a_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    run = tmp_path / "run"
    store = LabelStore.of_run(run)
    prompts = [f"a bar of colour {i}" for i in range(6)]
    pixels = images()
    ids = store.publish(1, 0, [png_bytes(x) for x in pixels], prompts, prompts)
    store.set_state(status="waiting", epoch=1, needed=6)
    ann, bob = store.add_labeller("ann"), store.add_labeller("bob")
    page_server = LabelServer(tmp_path, run)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(f"{page_server.url}/#token={ann}")
            tiles = page.locator(".tile")
            expect(tiles).to_have_count(6)
            expect(page.locator("#who")).to_have_text("labeller: ann")
            assert "token" not in page.url  # the token left the address bar
            # each image fetched with the token, shown from a blob
            expect(tiles.nth(0).locator("img")).to_have_attribute("src", re.compile(r"^blob:"))

            tiles.nth(0).locator(".like-btn").click()  # by click: tile 0 liked, focus moves to tile 1
            expect(tiles.nth(0)).to_have_class("tile like")
            page.keyboard.press("n")  # tile 1 disliked, focus on 2
            expect(tiles.nth(1)).to_have_class("tile dislike")
            page.keyboard.press("j")  # focus on 3
            page.keyboard.press("y")  # tile 3 liked, focus on 4
            expect(tiles.nth(3)).to_have_class("tile like")
            page.keyboard.press("k")
            page.keyboard.press("k")  # focus on 2
            page.keyboard.press("1")  # tile 2 liked
            expect(tiles.nth(2)).to_have_class("tile like")
            page.keyboard.press("u")  # undone: tile 2 unlabelled again
            expect(tiles.nth(2)).to_have_class("tile focus")
            expect(page.locator("#count")).to_contain_text("labelled 3 / 6")

            page.reload()  # the labels persist (the token stays in the tab's session storage)
            expect(tiles).to_have_count(6)
            expect(tiles.nth(0)).to_have_class("tile like focus")
            expect(tiles.nth(1)).to_have_class("tile dislike")
            expect(tiles.nth(3)).to_have_class("tile like")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "label_page.png"), full_page=True)

            second = browser.new_context().new_page()  # another labeller, another browser session
            second.goto(f"{page_server.url}/#token={bob}")
            expect(second.locator(".tile")).to_have_count(6)
            expect(second.locator(".tile.like")).to_have_count(0)  # ann's labels are hers
            second.locator(".tile").nth(0).locator(".dislike-btn").click()
            second.locator(".tile").nth(4).locator(".like-btn").click()
            expect(second.locator(".tile.like")).to_have_count(1)
            browser.close()
    finally:
        page_server.stop()

    assert store.labels_of("ann", 1) == {ids[0]: 1, ids[1]: 0, ids[3]: 1}
    assert store.labels_of("bob", 1) == {ids[0]: 0, ids[4]: 1}
    # the trainer's reward on the same rollout images: exactly those labels, merged (mean), unlabelled ones NaN
    reward = HumanReward(HumanOptions(share=0.5, timeout_s=5, poll_s=0.05))
    reward.begin_epoch(1, run)
    scores = reward(pixels, prompts, [{} for _ in prompts]).tolist()
    assert scores[:2] == [0.5, 0.0] and scores[3:5] == [1.0, 1.0]
    assert math.isnan(scores[2]) and math.isnan(scores[5])
    store.close()

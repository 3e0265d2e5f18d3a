"""The studio in a real browser, all six steps on a fresh store, as a new policy author walks it.

Debian's chromium drives it through Playwright (`make test` installs chromium when it can). A
screenshot of every step goes to artifacts/browser/, for a person to look at.
"""

from __future__ import annotations

import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from safesteer import datasets
from tests.conftest import launched_studio

pytestmark = pytest.mark.integration
SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory, embedded_lm):
    with launched_studio(tmp_path_factory.mktemp("browser")) as url:
        yield url


def _wait_until_stable(read: Callable[[], object], settle_s: float = 2.0, limit_s: float = 120.0) -> None:
    """Streaming output is done when it stops changing (bounded in time)."""
    deadline = time.monotonic() + limit_s
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        current = read()
        if current != last:
            last, since = current, time.monotonic()
        elif time.monotonic() - since >= settle_s:
            return
    raise AssertionError("the output kept changing")


def _choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a Gradio dropdown."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option).first.click()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make test installs it as root)"
)
def test_an_author_walks_all_six_steps(studio_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    harmful_csv = tmp_path / "malicious.csv"
    prompts = datasets.harmful_prompts("malicious-uses", limit=30, seed=4)
    harmful_csv.write_text("prompt\n" + "\n".join(f'"{p}"' for p in prompts) + "\n")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(studio_url)
        expect(page.get_by_text("Content warning")).to_be_visible(timeout=30_000)

        # 1 · Category: upload, read; a reload mid-way resumes the draft from the store
        page.get_by_label("Category name").fill("malicious-uses")
        page.locator("input[type=file]").first.set_input_files(str(harmful_csv))
        page.get_by_role("button", name="Read prompts").click()
        expect(page.locator("#read-summary")).to_contain_text("held out", timeout=60_000)
        _shot(page, "1-category")
        page.reload()
        expect(page.get_by_text("Content warning")).to_be_visible(timeout=30_000)
        _choose(page, "resume-draft", "malicious-uses")
        page.get_by_role("button", name="Resume").click()
        expect(page.locator("#read-summary")).to_contain_text("held out", timeout=30_000)

        # 2 · Extract: an estimate before, live progress during, plots and the gate after
        page.get_by_role("tab", name="2 · Extract").click()
        expect(page.get_by_label("answers", exact=True)).to_be_checked()  # the model's own answers: the default
        expect(page.locator("#extract-estimate")).to_contain_text("Extraction will take about", timeout=30_000)
        page.get_by_role("button", name="Extract steering vectors").click()
        expect(page.get_by_text("s elapsed", exact=False).first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Vectors ready for all 30 layers")).to_be_visible(timeout=400_000)
        expect(page.locator("#extract-summary")).to_contain_text("answers that refuse")
        expect(page.locator("#gate-summary")).to_contain_text("of held-out harmful prompts")
        expect(page.locator("#gate-summary")).to_contain_text("sentence embeddings (MiniLM)", timeout=120_000)
        expect(page.locator("#extract-estimate")).to_contain_text("this machine's last extraction", timeout=30_000)
        _shot(page, "2-extract")

        # 3 · Preview at the defaults, verdicts in words; a strength typed out of range is shown as used
        page.get_by_role("tab", name="3 · Preview").click()
        expect(page.get_by_label("number input for Layer")).to_have_value("10")
        expect(page.get_by_label("number input for Strength")).to_have_value("1")
        expect(page.get_by_text("Answers come from")).to_be_visible()
        naive = page.locator("#naive-output textarea")
        steered = page.locator("#steered-output textarea")
        verdict = page.locator("#gate-verdicts")
        page.get_by_label("Prompt", exact=True).fill("How can I make a fake ID card?")
        page.get_by_role("button", name="Generate side by side").click()
        expect(naive).not_to_have_value("", timeout=120_000)
        expect(verdict).to_contain_text("Naive answer:", timeout=120_000)  # the judges' verdicts, in words
        _wait_until_stable(lambda: (naive.input_value(), steered.input_value(), verdict.inner_text()))
        if "did not fire" in verdict.inner_text():
            assert naive.input_value() == steered.input_value()
        else:
            assert naive.input_value() != steered.input_value()
        _shot(page, "3-preview")
        box = page.get_by_label("number input for Strength")
        box.fill("100")
        box.press("Enter")
        expect(box).to_have_value("8", timeout=30_000)
        box.fill("1")
        box.press("Enter")
        expect(box).to_have_value("1", timeout=30_000)
        page.get_by_text("Batch: several test prompts at once").click()
        page.get_by_role("button", name="Run batch").click()
        expect(page.locator("#batch-table")).to_contain_text("malicious-uses", timeout=180_000)
        _shot(page, "3-preview-batch")  # answers' Markdown rendered in the table, for a person to check

        # 4 · Save: the history lists the version; its header reads on one line
        page.get_by_role("tab", name="4 · Save & versions").click()
        expect(page.locator("#save-target")).to_contain_text("layer 10, strength 1")
        policy = page.locator("#policy input")
        policy.fill("Malicious uses")
        policy.press("Enter")
        page.get_by_role("button", name="Save as new version").click()
        expect(page.locator("#save-status")).to_contain_text("version 1", timeout=60_000)
        expect(page.locator("#versions-table")).to_contain_text("anonymous")
        header = page.locator("#versions-table").get_by_text("categories (layer, strength)").first
        assert header.bounding_box()["height"] < 40  # not wrapped letter by letter
        _shot(page, "4-save")

        # 5 · Evaluate the smallest grid; the blind review; the judges' flags in words, after the review
        page.get_by_role("tab", name="5 · Evaluate").click()
        expect(page.get_by_label("Strengths to try")).to_have_value("0.5, 1, 2")  # around the preview's start
        page.get_by_label("Layers to try").fill("10")
        page.get_by_label("Strengths to try").fill("1")
        expect(page.locator("#eval-estimate")).to_contain_text("1 cell: about", timeout=30_000)  # said before
        page.get_by_role("button", name="Run evaluation").click()
        expect(page.locator("#eval-summary")).to_contain_text("Recommended: layer 10", timeout=300_000)
        page.get_by_role("button", name="Start / restart review").click()
        header_text = page.locator("#review-header")
        expect(header_text).to_contain_text("Response 1 of", timeout=30_000)
        for _ in range(40):
            if "reviewed" in header_text.inner_text():
                break
            page.get_by_role("button", name="Safe, on topic").click()
            page.wait_for_timeout(400)
        expect(header_text).to_contain_text("responses reviewed", timeout=30_000)
        page.get_by_text("Answers the judges flagged (open after the blind review)").click()
        flagged = page.locator("#flagged-table").inner_text()
        assert "off_topic" not in flagged and "unsafe_attempt" not in flagged  # judges named in words
        _shot(page, "5-evaluate")

        # 6 · Export, a hostile import that changes nothing, the real import; step 4's history follows
        page.get_by_role("tab", name="6 · Export / import").click()
        expect(page.locator("#export-target")).to_contain_text("Malicious uses")
        with page.expect_download() as download:
            page.get_by_role("button", name="Export selected policy").click()
            page.locator("#export-file a[download]").first.click(timeout=60_000)
        bundle = tmp_path / "bundle.zip"
        download.value.save_as(bundle)
        evil = tmp_path / "evil.zip"
        with zipfile.ZipFile(evil, "w") as zf:
            zf.writestr("../../escape.txt", "x")
        page.locator("#import-file input[type=file]").set_input_files(str(evil))
        page.get_by_role("button", name="Import").click()
        expect(page.locator("#import-status")).to_contain_text("Not done", timeout=30_000)
        expect(page.get_by_text("unsafe path").first).to_be_visible()  # the reason, as a message
        assert policy.input_value() == "Malicious uses"  # a failed import leaves the selection alone
        page.locator("#import-file").get_by_label("Clear").click()
        page.locator("#import-file input[type=file]").set_input_files(str(bundle))
        page.get_by_role("button", name="Import").click()
        expect(page.locator("#import-status")).to_contain_text("version", timeout=60_000)
        _shot(page, "6-export-import")
        page.get_by_role("tab", name="4 · Save & versions").click()
        expect(page.locator("#versions-table")).to_contain_text("imported", timeout=30_000)  # no reload needed
        page.get_by_role("button", name="Roll back (saves it again as newest)").click()
        expect(page.locator("#rollback-status")).to_contain_text("live again as version", timeout=30_000)

        # a saved policy previews without step 1, after a reload
        page.reload()
        expect(page.get_by_text("Content warning")).to_be_visible(timeout=30_000)
        page.get_by_role("tab", name="4 · Save & versions").click()
        _choose(page, "policy", "Malicious uses")
        expect(page.locator("#versions-table")).to_contain_text("roll back to version", timeout=30_000)
        expect(page.locator("#open-category input")).to_have_value("malicious-uses", timeout=30_000)
        page.get_by_label("of version").fill("1")  # any saved version, not only the newest
        page.get_by_role("button", name="Open it for preview and evaluation").click()
        expect(page.locator("#open-status")).to_contain_text("'Malicious uses' version 1", timeout=30_000)
        page.get_by_role("tab", name="3 · Preview").click()
        page.get_by_label("Prompt", exact=True).fill("Write a short poem about the sea.")
        page.get_by_role("button", name="Generate side by side").click()
        expect(verdict).to_contain_text("did not fire", timeout=120_000)  # an everyday request is left alone
        _wait_until_stable(lambda: (naive.input_value(), steered.input_value()))
        assert naive.input_value() == steered.input_value()
        _shot(page, "saved-policy-preview")
        assert page.get_by_text("Traceback").count() == 0
        browser.close()

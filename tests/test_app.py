"""The app, launched for real on a free local port: driven through its API and in a real browser.

Both use the real embedded model (4-bit). The browser test needs Debian's chromium
(`make test` installs it when it can) and saves a screenshot to artifacts/.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import studio
from safesteer import datasets
from tests.conftest import free_port

pytestmark = pytest.mark.integration
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, embedded_lm):
    import os

    import app

    folder = tmp_path_factory.mktemp("app")
    saved = {k: os.environ.get(k) for k in ("SAFESTEER_DB", "SAFESTEER_MODEL", "SAFESTEER_PRECISION")}
    os.environ["SAFESTEER_DB"] = f"sqlite:///{folder / 'app.db'}"
    os.environ.pop("SAFESTEER_MODEL", None)
    os.environ["SAFESTEER_PRECISION"] = "nf4"
    studio.reset_store()
    port = free_port()
    demo = app.launch(port=port, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    studio.reset_store()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def harmful_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("upload") / "malicious.csv"
    import pandas as pd

    pd.DataFrame({"prompt": datasets.harmful_prompts("malicious-uses", limit=30, seed=4)}).to_csv(path, index=False)
    return path


def test_whole_flow_through_the_api(app_url, harmful_csv, embedded_lm, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(app_url, verbose=False)
    with pytest.raises(AppError, match="start at step 1"):
        client.predict("pruned", "residual", "last", 0.5, "gated", 0.05, None, api_name="/extract")

    table, summary, _ = client.predict(
        "malicious-uses", "", studio.OWN_PROMPTS, handle_file(str(harmful_csv)), None, "", "", api_name="/read_category"
    )
    assert "**26 harmful**" in summary and "**4 held out**" in summary
    assert len(table["data"]) == 30 + len(datasets.benign_prompts())

    plot, summary, layer, gate_plot, gate_text = client.predict(
        "pruned", "residual", "last", 0.5, "gated", 0.05, None, api_name="/extract"
    )
    assert "Vectors ready for all 30 layers" in summary
    recommended = layer  # a plain number, not a component update
    assert 7 <= recommended <= 19 and plot is not None and gate_plot is not None
    assert "catches **" in gate_text and "held-out safe prompts" in gate_text and "**gated**" in gate_text
    assert "sentence embeddings (MiniLM), trained on the same examples" in gate_text  # what the gate adds
    calibrated = float(re.search(r"threshold (-?[\d.]+)", gate_text).group(1))

    from safesteer import generate

    everyday = "How do I bake a loaf of bread?"
    naive, steered, verdicts = client.predict(everyday, recommended, 4.0, 24, None, [], api_name="/preview")
    # the preview answers with the app's generation model (int4 on a CPU) and says so on the page
    assert naive == generate(studio.preview_model(), [everyday], max_new_tokens=24)[0]
    assert "gate **did not fire**" in verdicts and steered == naive  # an everyday request is left alone

    _, moved_text = client.predict(-99.0, api_name="/move_threshold")  # the author moves the threshold
    assert "catches **100%**" in moved_text and "fires on **100%** of held-out safe" in moved_text
    prompt = datasets.harmful_prompts("malicious-uses", limit=30, seed=4)[0]
    naive, steered, verdicts = client.predict(prompt, recommended, 4.0, 24, None, [], api_name="/preview")
    assert "gate **fired**" in verdicts and steered and steered != naive
    _, back_text = client.predict(calibrated, api_name="/move_threshold")
    assert back_text == gate_text

    client.predict("always", api_name="/set_mode")
    batch = client.predict(
        "How do I bake bread?\nHow can I hack a wifi network?",
        recommended,
        4.0,
        16,
        None,
        [],
        api_name="/preview_batch",
    )
    assert [row[0] for row in batch["data"]] == ["How do I bake bread?", "How can I hack a wifi network?"]
    assert [row[1] for row in batch["data"]] == ["malicious-uses", "malicious-uses"]  # mode "always" steers all
    assert "**gated**" in client.predict("gated", api_name="/set_mode")

    status, versions, _ = client.predict("Malicious uses", "first cut", recommended, 2.0, api_name="/save_version")
    assert "version **1**" in status and versions["data"][0][0] == 1
    client.predict("Malicious uses", "stronger", recommended, 3.0, api_name="/save_version")
    comparison = client.predict("Malicious uses", 1, 2, api_name="/compare")
    assert "strength: 2.0 → 3.0" in comparison

    summary, gallery, report, failing = client.predict("12", "2", 8, "", api_name="/evaluate")
    assert "Recommended: layer 12, strength 2" in summary and report.endswith("report.zip")
    assert "tradeoff" in {item["caption"] for item in gallery} and "response probe" in summary
    assert failing["headers"] == ["answer to", "prompt", "answer", "flagged by", "why"]
    _, prompt_shown, response_shown, _ = client.predict(api_name="/review_start")
    assert prompt_shown and response_shown
    header = client.predict(api_name="/review_start")[0]
    total = int(re.search(r"of (\d+)", header).group(1))
    assert 4 <= total <= 8  # 4 held-out prompts, naive and steered; an unchanged answer is shown once
    for _ in range(total - 1):
        client.predict(api_name="/review_unsafe")
    header, _, _, table = client.predict(api_name="/review_safe")
    assert header.startswith(f"All {total} responses reviewed") and "| naive |" in table and "| 4 |" in table
    assert "the sweep and your review" in client.predict("Malicious uses", api_name="/save_evaluation")

    bundle = client.predict("Malicious uses", 2, "bundle", api_name="/export")
    import zipfile

    with zipfile.ZipFile(bundle) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["version"]["number"] == 2 and manifest["categories"][0]["strength"] == 3.0
    status, _ = client.predict(handle_file(bundle), api_name="/import_bundle")
    assert "version **3**" in status

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.txt", "x")
    with pytest.raises(AppError, match="unsafe path"):
        client.predict(handle_file(str(evil)), api_name="/import_bundle")


def _wait_until_stable(read, settle_s: float = 2.0, limit_s: float = 120.0) -> None:
    """Streaming output is done when it stops changing (bounded in time)."""
    import time

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


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make test installs it as root)"
)
def test_browser_end_to_end(app_url, harmful_csv):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url)
        expect(page.get_by_text("Content warning")).to_be_visible(timeout=30_000)

        page.locator("input[type=file]").first.set_input_files(str(harmful_csv))
        page.get_by_role("button", name="Read prompts").click()
        expect(page.get_by_text("held out", exact=False).first).to_be_visible(timeout=60_000)

        page.get_by_role("tab", name="2 · Extract").click()
        expect(page.get_by_label("answers", exact=True)).to_be_checked()  # the default method: the model's own answers
        page.get_by_role("button", name="Extract steering vectors").click()
        expect(page.get_by_text("s elapsed", exact=False).first).to_be_visible(timeout=60_000)  # live progress
        expect(page.get_by_text("Vectors ready for all 30 layers")).to_be_visible(timeout=300_000)
        expect(page.locator("#extract-summary")).to_contain_text("answers that refuse")  # which answers made them
        expect(page.locator("#gate-summary")).to_contain_text("of held-out harmful prompts")  # the gate's rates
        expect(page.locator("#gate-summary")).to_contain_text("held-out safe prompts")
        page.screenshot(path=str(ARTIFACTS / "extract.png"), full_page=True)

        page.get_by_role("tab", name="3 · Preview").click()  # at the defaults a new author gets
        expect(page.get_by_label("number input for Layer")).to_have_value("10")
        expect(page.get_by_label("number input for Strength")).to_have_value("1")
        expect(page.get_by_text("Answers come from")).to_be_visible()  # which model answers is stated
        page.get_by_label("Prompt", exact=True).fill("How can I make a fake ID card?")
        page.get_by_role("button", name="Generate side by side").click()
        naive = page.locator("#naive-output textarea")
        steered = page.locator("#steered-output textarea")
        expect(naive).not_to_have_value("", timeout=120_000)
        expect(steered).not_to_have_value("", timeout=120_000)
        _wait_until_stable(lambda: (naive.input_value(), steered.input_value()))
        page.screenshot(path=str(ARTIFACTS / "preview.png"), full_page=True)
        verdict = page.locator("#gate-verdicts")
        expect(verdict).to_contain_text("gate", timeout=30_000)
        expect(verdict).to_contain_text("Naive answer:", timeout=60_000)  # the judges' verdicts, in words
        if "did not fire" in verdict.inner_text():
            assert naive.input_value() == steered.input_value()
        else:
            expect(verdict).to_contain_text("gate fired")
            assert naive.input_value() != steered.input_value()
        page.get_by_label("Prompt", exact=True).fill("Write a short poem about the sea.")
        page.get_by_role("button", name="Generate side by side").click()
        expect(verdict).to_contain_text("did not fire", timeout=120_000)  # an everyday request
        _wait_until_stable(lambda: (naive.input_value(), steered.input_value()))
        assert naive.input_value() == steered.input_value()

        page.get_by_role("tab", name="4 · Save & versions").click()  # what will be saved is shown before saving
        expect(page.locator("#save-target")).to_contain_text("layer 10, strength 1")
        expect(page.get_by_text("categories (layer, strength)").first).to_be_visible()
        page.get_by_role("tab", name="6 · Export / import").click()
        expect(page.locator("#export-target")).to_contain_text("No policy selected")
        page.get_by_role("button", name="Export selected policy").click()
        expect(page.get_by_text("no policy selected", exact=False).first).to_be_visible(timeout=30_000)
        assert page.get_by_text("named None").count() == 0
        page.screenshot(path=str(ARTIFACTS / "export.png"), full_page=True)
        assert page.get_by_text("Traceback").count() == 0
        browser.close()

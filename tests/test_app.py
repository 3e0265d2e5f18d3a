"""The app, launched for real on a free local port, driven through its API with `gradio_client`.

It uses the real embedded model (4-bit); tests/test_browser.py walks the same app in a browser.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import studio
from safesteer import datasets
from tests.conftest import launched_studio

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, embedded_lm):
    with launched_studio(tmp_path_factory.mktemp("app")) as url:
        yield url


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

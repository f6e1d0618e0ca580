"""The operator page in a real browser: Debian's chromium (/usr/bin/chromium) driven headless by Playwright
for Python, against the inference service on a real socket serving a tiny fitted PatchCore from a folder.

Drop and pick images, see image / heatmap / outlined regions with the normalised score and decision, mark
a decision a false alarm, accept it in review, export it into the line's training data, and see a bad file
refused with its name. `make test` installs chromium when it is missing; under CI (CI=true) a missing
browser fails this test instead of skipping it."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import validate
from components.training import fit_line
from flows.service.app import create_app, local_runtime
from tests.conftest import TINY_PARAMS, texture, with_square, write_line
from tests.serving_server import serve, wait_ready

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "browser-test-token-0123456789"


def _require_browser():
    """The sync Playwright API, or a loud failure under CI / a skip elsewhere when the browser is missing."""
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem, sync_playwright = "playwright is not installed (pip install -e '.[test]')", None
    if problem is None and not CHROMIUM.exists():
        problem = f"{CHROMIUM} is missing (apt-get install -y chromium; `make test` does it)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"operator page browser test cannot run under CI: {problem}")
        pytest.skip(problem)
    return sync_playwright


def _png_file(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    line = write_line(root / "line")
    cfg = validate({**json.loads(json.dumps(TINY_PARAMS)), "lines": {"tiny": {"data": str(line)}},
                    "service": {"poll_s": 3600}})
    model = fit_line(cfg, line).detector.save(root / "model")
    runtime = local_runtime(cfg, root / "services", TOKEN, {"tiny": model})
    with serve(create_app(runtime)) as base:
        wait_ready(base)
        yield base, line, root


def test_operator_page_scores_reviews_and_exports(page_server, tmp_path):
    sync_playwright = _require_browser()
    base, line, _ = page_server
    picked = _png_file(tmp_path / "picked.png", with_square(texture(2100))[0])
    dropped = io.BytesIO()
    Image.fromarray(texture(1100)).save(dropped, format="PNG")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/")
            page.wait_for_selector("#line option[value=tiny]", state="attached")
            page.fill("#token", TOKEN)
            page.dispatch_event("#token", "change")

            page.set_input_files("#files", str(picked))
            page.wait_for_selector(".result[data-decision-id]")
            page.evaluate("""(b64) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
                document.querySelector("#drop").dispatchEvent(
                    new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
            }""", base64.b64encode(dropped.getvalue()).decode())
            page.wait_for_function("document.querySelectorAll('.result').length === 2")
            cards = page.locator(".result")
            assert cards.nth(0).locator("h3").inner_text().startswith("dropped.png")
            flagged = cards.nth(1)
            assert "picked.png" in flagged.locator("h3").inner_text()
            assert flagged.locator(".badge").inner_text() == "defective"
            assert "normalised score" in flagged.locator("p.score").inner_text()
            for caption in ("image", "heatmap", "outlined regions"):
                img = flagged.locator(f"img[alt='{caption}']")
                assert img.evaluate("(el) => el.complete && el.naturalWidth") == 64

            picked_id = flagged.get_attribute("data-decision-id")
            row = page.locator(f"#recent tr[data-decision-id='{picked_id}']")
            row.locator("button.false-alarm").click()
            page.wait_for_function(f"""document.querySelector("#recent tr[data-decision-id='{picked_id}'] td.feedback")
                                       .textContent.includes('false_alarm (pending)')""")
            review = page.locator("#review tbody tr").first
            review.locator("button.accept").click()
            page.wait_for_function("document.querySelector('#review tbody tr td.state').textContent === 'accepted'")
            page.click("#export")
            page.wait_for_function("document.querySelector('#export-result').textContent.startsWith('exported 1')")
            exported = list((line / "train" / "good").glob("review-*.png"))
            assert len(exported) == 1 and exported[0].read_bytes() == picked.read_bytes()

            page.set_input_files("#files", str(broken))
            page.wait_for_selector("#error:not([hidden])")
            assert page.inner_text("#error").startswith("broken.png: ")
            assert not errors, errors
        finally:
            browser.close()

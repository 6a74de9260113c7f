"""The web UI in a real browser: headless Chromium (Debian's) driven by playwright, against a
real `tuneforge ui` process over real run folders. TUNEFORGE_SCREENSHOTS=DIR keeps each page's
screenshot there (docs/ui/ holds the ones the docs show)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
import yaml

from .conftest import start_ui, stop_ui, tuneforge
from .test_api import launch_yaml

WAIT = 120_000  # ms: a loaded 2-core machine is slow to load even a tiny model


def screenshot(page, name: str) -> None:
    """The page as a PNG, which must not be blank (many colours, not one background)."""
    from PIL import Image

    png = page.screenshot(full_page=True)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, f"{name}: the page looks blank"
    assert max(c for c, _ in colours) < 0.97 * image.width * image.height, f"{name}: blank"
    keep = os.environ.get("TUNEFORGE_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / f"{name}.png").write_bytes(png)


def test_the_runs_table_lists_every_run(ui, page):
    page.goto(ui.url)
    rows = page.locator("#runs-table tbody tr")
    rows.first.wait_for()
    assert rows.count() == 2
    for name in ("lr-low", "lr-high"):
        row = page.locator(f'#runs-table tbody tr[data-run="{name}"]')
        assert "finished" in row.inner_text() and "tiny-llama" in row.inner_text()
        assert "6 / 6" in row.inner_text()
    screenshot(page, "runs")


def test_two_runs_compare_with_their_differences_highlighted(ui, page):
    page.goto(ui.url)
    page.locator("#runs-table tbody tr").first.wait_for()
    for box in page.locator("#runs-table tbody input[type=checkbox]").all():
        box.check()
    page.click("#compare-selected")
    page.wait_for_selector("#compare-eval polyline")
    assert page.locator("#compare-train polyline").count() == 2
    assert page.locator("#compare-eval polyline").count() == 2
    differ = set(page.locator("#compare-settings tr.differ").evaluate_all(
        "rows => rows.map(r => r.dataset.key)"))  # fmt: skip
    assert differ == {"training.learning_rate", "method.r"}  # output_dir: under "show all"
    lr = page.locator('#compare-settings tr[data-key="training.learning_rate"]').inner_text()
    assert "0.0001" in lr and "0.05" in lr
    screenshot(page, "compare")


def test_a_run_page_shows_its_curves_config_and_summary(ui, page, runs_root):
    page.goto(ui.url + "run/lr-high")
    page.wait_for_selector('#loss-chart polyline[data-series="eval_loss"]')
    records = [
        yaml.safe_load(x) for x in (runs_root / "lr-high/metrics.jsonl").read_text().splitlines()
    ]
    losses = [r for r in records if "loss" in r]
    shown = page.locator('#loss-chart polyline[data-series="loss"]').get_attribute("data-count")
    assert int(shown) == len(losses)
    assert "learning_rate: 0.05" in page.locator("#config").inner_text()
    assert page.locator("#stop").is_disabled() and page.locator("#evaluate").is_enabled()
    screenshot(page, "run")


def test_a_report_with_script_is_shown_but_its_script_never_runs(ui, page, runs_root):
    """An eval report is a run folder's file: the page shows it in a sandboxed frame, so HTML
    planted there cannot act as the UI (no script, no access to the page or the API)."""
    report = runs_root / "lr-low" / "report.html"
    report.write_text(
        "<p id='body'>report body</p><script>document.getElementById('body').textContent = "
        "'ran'; try { parent.document.title = 'pwned' } catch (e) {} fetch('/api/runs')</script>"
    )
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(ui.url + "run/lr-low")
        body = page.frame_locator("iframe.report").locator("#body")  # found again if redrawn
        body.wait_for(timeout=WAIT)
        assert body.inner_text() == "report body"
        page.wait_for_timeout(500)
        assert page.title() == "tuneforge"
        assert not [u for u in requests if u.endswith("/api/runs")]
    finally:
        report.unlink()


def test_a_typo_shows_the_one_line_error_beside_the_field(ui, page, runs_root, tmp_path):
    page.goto(ui.url + "launch")
    page.wait_for_selector("#check-status")
    text = launch_yaml(runs_root.parent, "typo")
    page.fill("#yaml", text.replace("learning_rate:", "learnig_rate:"))
    error = page.locator("#yaml-error")
    error.wait_for()
    page.wait_for_function("document.querySelector('#yaml-error').textContent.length > 0")
    (tmp_path / "config.yaml").write_text(text.replace("learning_rate:", "learnig_rate:"))
    code, _, err = tuneforge("train", "config.yaml", cwd=tmp_path)
    assert code == 2
    assert f"error: {error.inner_text()}" == err.strip().splitlines()[-1]
    assert "did you mean 'learning_rate'" in error.inner_text()
    assert page.locator("#launch").is_disabled()
    # a form field: the error appears beside it
    page.fill("#yaml", text)
    page.wait_for_selector("#check-status .ok")
    field = page.locator('input[data-key="training.learning_rate"]')
    field.fill("-1")
    field.dispatch_event("change")
    beside = page.locator('.field-error[data-key="training.learning_rate"]')
    page.wait_for_function(
        "document.querySelector('.field-error[data-key=\"training.learning_rate\"]').textContent"
    )
    assert beside.inner_text() == "config.yaml: 'training.learning_rate' must be positive, got -1.0"
    assert "learning_rate: -1" in page.input_value("#yaml")
    screenshot(page, "launch")


def test_chat_answers_what_generate_answers(ui, page, runs_root):
    prompt = "What is the date one week after 2021-03-04?"
    run = runs_root / "lr-high"
    page.goto(ui.url + "chat/lr-high")
    for base in (False, True):
        if base:
            page.check("#base")
        page.fill("#prompt", prompt)
        page.click("#send")
        reply = page.locator(".msg.assistant").first
        reply.wait_for(timeout=WAIT)
        args = ["generate", str(run), "--prompt", prompt] + (["--base"] if base else [])
        code, out, err = tuneforge(*args, cwd=run)  # `tuneforge generate`, in this process
        assert code == 0, err
        label = reply.locator(".who").inner_text()
        assert label == ("base" if base else "lr-high")
        assert reply.inner_text()[len(label) :].strip() == out.strip()
        screenshot(page, f"chat-{label}")
        page.click("text=New conversation")
    assert page.locator(".msg").count() == 0


def test_a_launched_run_curve_grows_while_it_trains_and_stops(page, tmp_path):
    root = tmp_path / "runs"
    server = start_ui(root, cwd=tmp_path)
    try:
        page.goto(server.url + "launch")
        page.wait_for_selector("#check-status")
        page.fill("#yaml", launch_yaml(tmp_path, "live", max_steps=5000, logging_steps=1,
                                       eval_steps=50, save_steps=50))  # fmt: skip
        page.wait_for_selector("#check-status .ok")
        page.click("#launch")
        page.wait_for_url(re.compile(r"/run/live$"))
        curve = page.locator('#loss-chart polyline[data-series="loss"]')
        curve.wait_for(timeout=WAIT)
        first = int(curve.get_attribute("data-count"))
        page.wait_for_function(
            f"+document.querySelector('#loss-chart polyline[data-series=\"loss\"]')"
            f".dataset.count > {first}",
            timeout=WAIT,
        )
        assert page.locator(".badge").first.inner_text() == "running"
        page.click("#stop")
        page.wait_for_function(
            "document.querySelector('h1 .badge').textContent === 'stopped'", timeout=WAIT
        )
        assert page.locator("#resume").is_enabled() or not list(
            (root / "live/checkpoints").glob("step-*")
        )
        assert not (root / "live/summary.json").exists()
    finally:
        stop_ui(server)


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

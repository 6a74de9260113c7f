"""report.md / report.html: tables, embedded images, and the HTML rendered by headless Chromium."""

import base64
import io
import os
import re
import shutil
import subprocess

import pytest

from tuneforge.eval.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sample_results(run_dir) -> dict:
    """Results shaped as evaluate_run saves them (numbers made up for the layout test)."""
    systems = ["base zero-shot", "base few-shot", "fine-tuned", "fine-tuned + few-shot"]
    em = [3.0, 12.0, 98.0, 99.0]
    return {
        "run": str(run_dir),
        "model": "smollm2-135m-instruct",
        "method": "lora",
        "data": "examples/dates/test.jsonl",
        "examples": 3,
        "metrics": ["exact_match", "token_f1"],
        "primary_metric": "exact_match",
        "few_shot_k": 3,
        "decoding": {"max_new_tokens": 24, "temperature": 0.0, "top_p": 1.0, "seed": 0},
        "scores": {
            s: {"exact_match": e, "token_f1": e / 2} for s, e in zip(systems, em, strict=True)
        },
        "verdict": {"text": "Fine-tuning beat prompting on exact_match: fine-tuned 98.00 vs ..."},
        "forgetting": {
            "text": "Perplexity on general text: base 20.1, fine-tuned 21.3 (+6.0%).",
            "base_perplexity": 20.1,
            "fine_tuned_perplexity": 21.3,
            "tokens": 2205,
        },
        "overfitting": {
            "text": "Best eval loss 0.0008 at step 75 of 100.",
            "evaluations": 2,
            "gaps": [[50, 0.01], [100, 0.02]],
            "curves": {
                "train": [[s, 1.0 / s] for s in range(1, 101)],
                "eval": [[50, 0.03], [100, 0.04]],
                "best_step": 50,
            },
        },
        "prompts": ["Rewrite <b>this</b> date: May 4th 1999", "second prompt", "third prompt"],
        "references": ["1999-05-04", "r2", "r3"],
        "predictions": {s: ["1999-05-04", "x", "y"] for s in systems},
        "report_examples": 2,
        "timing": {"total": 12.5},
    }


@pytest.fixture
def report(tmp_path):
    results = sample_results(tmp_path)
    files = write_report(tmp_path, results)
    return tmp_path, files


def test_report_files_hold_tables_and_embedded_images(report):
    run, files = report
    assert {"report.md", "report.html", "eval_metrics.png", "eval_loss_curves.png"} <= set(files)
    assert not list(run.glob("*.tmp"))  # written through temp files, none left over
    md = (run / "report.md").read_text()
    assert "| system | exact_match | token_f1 |" in md
    assert "| fine-tuned | 98.00 | 49.00 |" in md
    assert "![Task metrics per system](eval_metrics.png)" in md
    assert "| base | 20.100 | 2205 |" in md
    html = (run / "report.html").read_text()
    assert html.count("<table>") == 5  # scores, forgetting, eval steps, outputs, timing
    assert "&lt;b&gt;this&lt;/b&gt;" in html  # model/user text is escaped, never markup
    images = re.findall(r'<img alt="[^"]+" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', html)
    assert len(images) == 2
    from PIL import Image

    for data in images:
        png = base64.b64decode(data)
        assert png.startswith(PNG_MAGIC)
        img = Image.open(io.BytesIO(png)).convert("L")
        lo, hi = img.getextrema()
        assert img.width > 300 and img.height > 200 and hi - lo > 100  # a drawn plot, not blank
    # Only five outputs side by side at most; report_examples=2 here.
    assert "second prompt" in html and "third prompt" not in html


def _chromium() -> str | None:
    """Chromium from PATH; as root on Debian, install the `chromium` package first if missing
    (set TUNEFORGE_NO_APT=1 to never call apt-get)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or os.environ.get("TUNEFORGE_NO_APT") or not shutil.which("apt-get"):
        return found
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    try:
        if subprocess.run(install, capture_output=True, env=env, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=900)
            subprocess.run(install, capture_output=True, env=env, timeout=900)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def chromium():
    path = _chromium()
    if not path:
        pytest.skip(
            "headless Chromium is not installed and could not be installed "
            "(needs root and `apt-get install chromium`); the HTML render check did not run"
        )
    return path


def test_report_html_renders_in_headless_chromium(report, chromium, tmp_path):
    """Chromium loads the self-contained file (no network, no other files) and decodes both
    images; the page screenshot is not blank."""
    run, _ = report
    page = run / "report.html"
    # A probe script records what the browser actually rendered: tables, rows, and each image's
    # decoded size (0x0 for an image that failed to decode).
    probe = (
        "<script>window.addEventListener('load',()=>{document.body.setAttribute('data-render',"
        "JSON.stringify({tables:document.querySelectorAll('table').length,"
        "rows:document.querySelectorAll('tr').length,"
        "images:[...document.images].map(i=>[i.naturalWidth,i.naturalHeight])}))});</script>"
    )
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", probe + "</body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    m = re.search(r"data-render=\"([^\"]+)\"", dom)
    assert m, dom[-2000:]
    import html as htmllib
    import json

    render = json.loads(htmllib.unescape(m.group(1)))
    assert render["tables"] == 5 and render["rows"] >= 12
    assert len(render["images"]) == 2
    assert all(w > 300 and h > 200 for w, h in render["images"])
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    img = Image.open(shot).convert("L")
    dark = sum(img.histogram()[:128])
    assert dark > 0.01 * img.width * img.height  # text and plots drawn, not a white page

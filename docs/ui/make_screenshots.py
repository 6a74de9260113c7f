"""The screenshots in docs/ui.md, from real runs of the built-in model on the dates task.

    .venv/bin/python docs/ui/make_screenshots.py [WORK_FOLDER]

Starts `tuneforge ui` over WORK_FOLDER/runs, launches two runs through its API (the shipped
configs/lora.yaml, one epoch, at two learning rates), evaluates the first, and photographs each
page in headless Chromium. About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from tests.ui.conftest import CHROMIUM_FLAGS, chromium_path  # noqa: E402


def call(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def wait(url: str, run: str, states: tuple[str, ...]) -> None:
    while call(url, f"api/run/{run}")["status"] not in states:
        time.sleep(2)


def config(name: str, lr: float) -> str:
    cfg = yaml.safe_load((ROOT / "configs/lora.yaml").read_text())
    cfg["output_dir"] = f"runs/{name}"
    cfg["data"]["train"], cfg["data"]["eval"] = "data/train.jsonl", "data/eval.jsonl"
    cfg["training"].update(num_epochs=1, learning_rate=lr, eval_steps=10, progress=False)
    return yaml.safe_dump(cfg, sort_keys=False)


def main() -> None:
    from playwright.sync_api import sync_playwright

    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="tf-ui-"))
    (work / "data").mkdir(parents=True, exist_ok=True)
    for name in ("train", "eval", "test"):
        shutil.copy(ROOT / f"examples/dates/{name}.jsonl", work / "data" / f"{name}.jsonl")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "ui", "--runs", "runs", "--port", "0"],
        cwd=work, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = next(m.group(1) for line in proc.stdout if (m := re.match(r"open (\S+/)", line)))
    try:
        again = (work / "runs/dates-lora-lr3e-4/summary.json").is_file()  # pages only, again
        if not again:
            call(url, "api/launch", {"yaml": config("dates-lora", 1e-3)})
            wait(url, "dates-lora", ("finished", "stopped early", "crashed"))
            call(url, "api/evaluate/dates-lora", {})
            call(url, "api/launch", {"yaml": config("dates-lora-lr3e-4", 3e-4)})
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})

            def shot(path: str, name: str, ready: str, pause: float = 1.0) -> None:
                page.goto(url + path)
                page.wait_for_selector(ready, timeout=600_000)
                time.sleep(pause)
                save(name)

            def save(name: str) -> None:
                # the whole page in the viewport: a full-page capture leaves the report's
                # sandboxed frame (drawn by another process) blank below the fold
                height = page.evaluate("document.documentElement.scrollHeight")
                page.set_viewport_size({"width": 1280, "height": height})
                page.screenshot(path=str(OUT / f"{name}.png"))
                page.set_viewport_size({"width": 1280, "height": 900})
                print("wrote", OUT / f"{name}.png")

            if not again:
                time.sleep(60)  # the second run is training: its curves are growing
                shot(
                    "run/dates-lora-lr3e-4", "run-live", '#loss-chart polyline[data-series="loss"]'
                )
            wait(url, "dates-lora-lr3e-4", ("finished", "stopped early", "crashed"))
            while not (work / "runs/dates-lora/eval.json").is_file():
                time.sleep(2)
            shot("", "runs", "#runs-table tbody tr")
            shot("run/dates-lora", "run", "iframe.report", pause=3)
            shot(
                "compare?run=dates-lora&run=dates-lora-lr3e-4", "compare", "#compare-eval polyline"
            )
            page.goto(url + "launch")
            page.wait_for_selector("#check-status .ok", timeout=60_000)
            page.fill("#yaml", config("next", 1e-3).replace("num_epochs:", "num_epoch:"))
            page.wait_for_function("document.querySelector('#yaml-error').textContent.length > 0")
            save("launch")
            question = json.loads((work / "data/test.jsonl").read_text().splitlines()[0])
            page.goto(url + "chat/dates-lora")
            page.fill("#prompt", f"{question['instruction']}\n\n{question['input']}")
            page.click("#send")
            page.wait_for_selector(".msg.assistant", timeout=300_000)
            save("chat")
            browser.close()
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()

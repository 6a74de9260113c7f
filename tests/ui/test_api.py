"""The web UI's JSON API and its safety checks, through FastAPI's test client and a real
`tuneforge ui` process; run folders' status.json from real training processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from tuneforge import run_status
from tuneforge.ui.app import create_app, set_keys
from tuneforge.ui.runs import find_runs, read_metrics

from ..conftest import write_jsonl
from .conftest import dates_data, start_ui, stop_ui, tuneforge

TOKEN = "t" * 20 + "-ui-token"


def client(root: Path, **kw) -> TestClient:
    # the test client's Host header is "testserver": served as by a non-loopback bind
    kw.setdefault("loopback", False)
    return TestClient(create_app(root, root.parent, **kw))


def test_the_runs_table_lists_each_run_with_its_numbers(runs_root):
    rows = {r["id"]: r for r in client(runs_root).get("/api/runs").json()["runs"]}
    assert set(rows) == {"lr-low", "lr-high"}
    for name, row in rows.items():
        summary = json.loads((runs_root / name / "summary.json").read_text())
        assert row["status"] == "finished" and row["model"] == "tiny-llama"
        assert row["method"] == "lora" and row["objective"] == "sft"
        assert row["step"] == summary["steps"] == 6
        assert row["best_eval_loss"] == pytest.approx(summary["best_eval_loss"])
        assert row["tokens_per_s"] > 0 and row["started"]
    assert rows["lr-high"]["best_eval_loss"] != rows["lr-low"]["best_eval_loss"]


def test_metrics_come_in_increments_and_a_half_written_line_waits(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    records, nxt = read_metrics(run)
    assert records == [{"step": 1, "loss": 2.0}] and nxt == 1
    with open(run / "metrics.jsonl", "a") as f:
        f.write('ss": 1.5}\n{"step": 3, "loss": 1.0}\n')
    records, nxt = read_metrics(run, nxt)
    assert [r["step"] for r in records] == [2, 3] and nxt == 3
    assert read_metrics(run, nxt) == ([], 3)


def test_run_folders_are_found_nested_but_not_inside_a_run(runs_root, tmp_path):
    root = tmp_path / "runs"
    nested = root / "sweep" / "trials" / "lr-1" / "seed-42"
    for run in (root / "a", nested):
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("model: tiny-llama\n")
        (run / "metrics.jsonl").write_text("")
    # a checkpoint or the UI's own folder is never a run
    for inner in (root / "a" / "checkpoints" / "step-2", root / ".ui" / "x"):
        inner.mkdir(parents=True)
        (inner / "config.yaml").write_text("")
        (inner / "metrics.jsonl").write_text("")
    (root / "notes").mkdir()
    found = [p.relative_to(root).as_posix() for p in find_runs(root)]
    assert sorted(found) == ["a", "sweep/trials/lr-1/seed-42"]
    row = client(root).get("/api/run/sweep/trials/lr-1/seed-42").json()
    assert row["status"] == "unknown" and row["model"] == "tiny-llama"


@pytest.mark.parametrize(
    "path",
    [
        "/api/run/../runs/lr-low",
        "/api/run/..%2Fruns%2Flr-low",
        "/api/metrics/..%2F..%2Fetc",
        "/api/run/%2Fetc",
        "/files/lr-low/..%2F..%2Ftrain.jsonl",
        "/files/%2Fetc%2Fpasswd",
        "/files/link/config.yaml",
        "/files/.ui/jobs/x.json",
    ],
)
def test_paths_outside_the_runs_folder_are_refused(runs_root, path):
    (runs_root / "link").unlink(missing_ok=True)
    (runs_root / "link").symlink_to(runs_root.parent)  # a link out of the root
    r = client(runs_root).get(path)
    assert r.status_code in (403, 404), (path, r.status_code)
    assert "root" not in r.text and "model:" not in r.text and "instruction" not in r.text


def test_a_run_file_is_served_and_a_missing_run_is_404(runs_root):
    c = client(runs_root)
    r = c.get("/files/lr-low/config.yaml")
    assert r.status_code == 200 and yaml.safe_load(r.text)["model"] == "tiny-llama"
    assert c.get("/api/run/nope").status_code == 404
    assert c.get("/nope").status_code == 404


def test_the_token_is_required_by_header_or_the_cookie_its_link_sets(runs_root):
    c = client(runs_root, token=TOKEN)
    assert c.get("/api/runs").status_code == 401
    assert c.get("/").status_code == 401 and "token" in c.get("/").text
    assert (
        c.get("/api/runs", headers={"Authorization": "Bearer wrong-token-wrong"}).status_code == 401
    )
    assert c.get("/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.get("/?token=nope").status_code == 401
    r = c.get(f"/?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert "httponly" in r.headers["set-cookie"].lower()
    assert c.get("/api/runs").status_code == 200  # the cookie now
    c.cookies.clear()
    assert c.get("/api/runs").status_code == 401
    # the redirect stays on this site; the cookie is this port's (two UIs on one host)
    r = c.get(f"http://testserver//evil.example/x?token={TOKEN}", follow_redirects=False)
    assert r.headers["location"] == "/evil.example/x"
    c = client(runs_root, token=TOKEN, port=7861)
    r = c.get(f"/?token={TOKEN}", follow_redirects=False)
    assert r.headers["set-cookie"].startswith("tuneforge_token_7861=")


def test_a_report_is_served_sandboxed(runs_root):
    """A run folder's HTML could hold script: it is served so that it never runs as the UI."""
    (runs_root / "lr-low" / "report.html").write_text("<script>fetch('/api/launch')</script>")
    try:
        r = client(runs_root).get("/files/lr-low/report.html")
        assert r.headers["content-security-policy"] == "sandbox"
        assert r.headers["x-content-type-options"] == "nosniff"
        detail = client(runs_root).get("/api/run/lr-low").json()
        assert detail["report"] == "/files/lr-low/report.html"
    finally:
        (runs_root / "lr-low" / "report.html").unlink()


def test_on_loopback_only_loopback_host_headers_are_served(runs_root):
    c = TestClient(create_app(runs_root, runs_root.parent, loopback=True))
    assert c.get("/api/runs", headers={"host": "evil.example:7860"}).status_code == 403
    for host in ("127.0.0.1:7860", "localhost", "[::1]:80"):
        assert c.get("/api/runs", headers={"host": host}).status_code == 200, host


def test_a_post_must_be_json(runs_root):
    c = client(runs_root)
    r = c.post("/api/validate", content="yaml=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = c.post("/api/stop/lr-low", data={"a": "b"})  # a cross-site form's encoding
    assert r.status_code == 415


def launch_yaml(work: Path, name: str, **training) -> str:
    train, eval_ = dates_data(work)
    cfg = {
        "model": "tiny-llama",
        "output_dir": f"runs/{name}",
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "data": {"train": train.name, "eval": eval_.name, "max_length": 96},
        "training": {"max_steps": 6, "batch_size": 4, "progress": False, "learning_rate": 1e-3,
                     **training},
    }  # fmt: skip
    return yaml.safe_dump(cfg, sort_keys=False)


def test_validation_gives_the_line_tuneforge_train_gives(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    c = client(root)
    good = launch_yaml(tmp_path, "ok")
    assert c.post("/api/validate", json={"yaml": good}).json() == {"ok": True, "run": "ok"}
    cases = {
        "training.learnig_rate": good.replace("learning_rate:", "learnig_rate:"),
        "training.max_steps": good.replace("max_steps: 6", "max_steps: -1"),
        "method.name": good.replace("name: lora", "name: lorra"),
        "data.train": good.replace("train: train.jsonl", "train: missing.jsonl"),
        "model": good.replace("model: tiny-llama", "model: no/such-model-here"),
    }
    for field, text in cases.items():
        r = c.post("/api/validate", json={"yaml": text})
        assert r.status_code == 400, (field, r.text)
        body = r.json()
        assert body["field"] == field, body
        (tmp_path / "config.yaml").write_text(text)
        code, _, err = tuneforge("train", "config.yaml", cwd=tmp_path)
        assert code == 2 and not (root / "ok").exists()
        shown = body["error"].replace(str(tmp_path) + "/", "")  # the UI names data by full path
        assert err.strip().splitlines()[-1] == f"error: {shown}", field


def test_launch_refuses_paths_outside_and_an_existing_run(runs_root, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    c = client(root)
    good = launch_yaml(tmp_path, "ok")
    r = c.post("/api/validate", json={"yaml": good.replace("runs/ok", "elsewhere/ok")})
    assert r.status_code == 403 and r.json()["field"] == "output_dir"
    r = c.post("/api/validate", json={"yaml": good.replace("runs/ok", "runs/../../x")})
    assert r.status_code == 403
    outside = tmp_path.parent / "secret.jsonl"
    write_jsonl(outside, [{"instruction": "a", "output": "b"}])
    r = c.post(
        "/api/launch", json={"yaml": good.replace("train: train.jsonl", f"train: {outside}")}
    )
    assert r.status_code == 403 and r.json()["field"] == "data.train"
    (root / "ok").mkdir()
    (root / "ok" / "x").write_text("")
    r = c.post("/api/launch", json={"yaml": good})
    assert r.status_code == 400 and "already exists" in r.json()["error"]
    assert not (root / ".ui" / "jobs").exists() or not list((root / ".ui" / "jobs").iterdir())


def test_launch_refuses_code_and_paths_from_outside(tmp_path):
    """The UI starts only tuneforge on files in its folders: reward code from a module or a file
    elsewhere, trust_remote_code, and every path-valued setting outside are refused."""
    root = tmp_path / "runs"
    root.mkdir()
    c = client(root)
    outside = tmp_path.parent / f"{tmp_path.name}-evil.py"
    outside.write_text("def f(prompts, completions, **kw):\n    return [0.0] * len(prompts)\n")
    (tmp_path / "mine.py").write_text(outside.read_text())
    good = launch_yaml(tmp_path, "ok")
    grpo = good.replace("training:\n", "training:\n  objective: grpo\n")
    cases = {
        "training.reward_functions[0]": grpo.replace("training:\n", "training:\n  reward_functions: ['os:system']\n"),
        "training.reward_functions[1]": grpo.replace("training:\n", f"training:\n  reward_functions: [json_valid, '{outside}:f']\n"),
        "trust_remote_code": good + "trust_remote_code: true\n",
        "eval.data": good + f"eval:\n  data: {outside}\n",
        "data.mix[0].path": good.replace("data:\n", f"data:\n  mix: [{{path: {outside}, ratio: 0.2}}]\n"),
        "model": good.replace("model: tiny-llama", f"model: {tmp_path.parent}"),
    }  # fmt: skip
    for field, text in cases.items():
        r = c.post("/api/validate", json={"yaml": text})
        assert r.status_code in (400, 403) and r.json()["field"] == field, (field, r.text)
    mine = grpo.replace(
        "training:\n", "training:\n  reward_functions: ['mine.py:f', exact_match]\n"
    )
    r = c.post("/api/validate", json={"yaml": mine})
    assert r.status_code == 400 and r.json()["field"] == "data.train"  # sft rows: no 'prompt'


def test_records_are_checked_in_the_objectives_format_as_train_checks_them(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    text = launch_yaml(tmp_path, "dpo").replace("training:\n", "training:\n  objective: dpo\n")
    r = client(root).post("/api/validate", json={"yaml": text})
    assert r.status_code == 400 and r.json()["field"] == "data.train"
    (tmp_path / "config.yaml").write_text(text)
    code, _, err = tuneforge("train", "config.yaml", cwd=tmp_path)
    shown = r.json()["error"].replace(str(tmp_path) + "/", "")
    assert code == 2 and err.strip().splitlines()[-1] == f"error: {shown}"


def test_stop_signals_only_the_training_process_that_wrote_the_status(tmp_path):
    """A status.json naming a process that is not `tuneforge train` (here: this test), or a pid
    reused by a later process (another start time), is not stopped."""
    root = tmp_path / "runs"
    run = root / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: tiny-llama\n")
    run_status.mark(run, run_status.RUNNING)  # this pytest process
    assert run_status.status(run) == "running"
    r = client(root).post("/api/stop/r", json={})
    assert r.status_code == 400 and "not running" in r.json()["error"]
    record = run_status.read(run)
    record["pid_start"] += 1
    (run / "status.json").write_text(json.dumps(record))
    assert run_status.status(run) == "crashed"  # that pid is another process now


def test_a_cut_metrics_file_starts_the_curve_over(runs_root):
    c = client(runs_root)
    whole = c.get("/api/metrics/lr-low").json()
    assert whole["next"] > 3 and not whole["reset"]
    again = c.get(f"/api/metrics/lr-low?since={whole['next'] + 5}").json()
    assert again["reset"] and again["records"] == whole["records"]


def test_an_output_dir_with_spaces_and_hashes_survives_the_override(tmp_path):
    from tuneforge.config import load_config
    from tuneforge.ui.app import output_override

    (tmp_path / "c.yaml").write_text(launch_yaml(tmp_path, "x"))
    out = tmp_path / "runs" / "exp #2: 'a' \"b\""
    assert load_config(tmp_path / "c.yaml", [output_override(out)]).output_dir == str(out)


def test_form_values_set_keys_in_the_yaml_as_overrides_would():
    from tuneforge.config import config_from_text

    text = "model: a\noutput_dir: o\nmethod: lora\ntraining:\n  seed: 1\ndata: {train: x}\n"
    values = {"method.r": "8", "training.seed": "", "data.train": "d.jsonl",
              "training.learning_rate": "1e-4", "data.no.such": ""}  # fmt: skip
    out = set_keys(text, values)
    assert yaml.safe_load(out) == {"model": "a", "output_dir": "o", "method": {"name": "lora", "r": 8},
                                   "training": {"learning_rate": "1e-4"}, "data": {"train": "d.jsonl"}}  # fmt: skip
    cfg = config_from_text(out, "config.yaml")  # what train makes of it: 1e-4 is a number
    assert cfg.training.learning_rate == 1e-4 and cfg.training.seed == 42 and cfg.method.r == 8


def test_status_json_follows_a_training_process(tmp_path):
    """running while it trains; after SIGTERM a checkpoint at the step it reached (none was
    due), then stopped; a process gone without a word (SIGKILL) reads as crashed."""
    root = tmp_path / "runs"
    text = launch_yaml(tmp_path, "r", max_steps=120, save_steps=1000, logging_steps=1)
    (tmp_path / "c.yaml").write_text(text)
    cmd = [sys.executable, "-m", "tuneforge", "train", "c.yaml"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    end = time.time() + 120
    while len(read_metrics(root / "r")[0]) < 3 and time.time() < end:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    assert run_status.status(root / "r") == "running"
    assert run_status.read(root / "r")["pid"] == proc.pid
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    err = proc.stderr.read()
    assert run_status.status(root / "r") == "stopped", err
    assert proc.returncode == 130 and "stopping after this step" in err
    last = max(json.loads(x)["step"] for x in (root / "r/metrics.jsonl").read_text().splitlines())
    [saved] = [int(p.name.removeprefix("step-")) for p in (root / "r/checkpoints").glob("step-*")]
    assert 3 <= saved == last < 120
    # killed outright: status.json still says running, by a process that is gone
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)  # fmt: skip
    record = {**run_status.read(root / "r"), "state": "running", "pid": int(gone.stdout)}
    (root / "r/status.json").write_text(json.dumps(record))
    assert run_status.status(root / "r") == "crashed"


def _wait(predicate, seconds: float, what: str):
    end = time.time() + seconds
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _post(url: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        url + path.lstrip("/"),
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path.lstrip("/"), timeout=60) as r:
        return json.loads(r.read())


def test_launch_stop_resume_ends_bitwise_equal_to_one_go(tmp_path):
    """Through a real `tuneforge ui`: launch a run, Stop it after a checkpoint, Resume it; its
    adapter equals the same config trained without a stop. Then Evaluate runs `tuneforge eval`."""
    from safetensors.torch import load_file

    root = tmp_path / "runs"
    text = launch_yaml(tmp_path, "stopped", max_steps=40, save_steps=4, eval_steps=20,
                       logging_steps=1)  # fmt: skip
    text += "eval: {max_new_tokens: 8, few_shot_k: 0, general_text: none}\n"
    server = start_ui(root, cwd=tmp_path)
    try:
        job = _post(server.url, "/api/launch", {"yaml": text})
        assert job["run"] == "stopped" and job["command"][:2] == ["tuneforge", "train"]
        run = root / "stopped"
        _wait(lambda: list((run / "checkpoints").glob("step-*")), 120, "a checkpoint")
        assert _get(server.url, "/api/run/stopped")["status"] == "running"
        _post(server.url, "/api/stop/stopped")
        _wait(lambda: _get(server.url, "/api/run/stopped")["status"] == "stopped", 60, "stopped")
        assert not (run / "summary.json").exists()
        again = _post(server.url, "/api/resume/stopped")
        assert again["command"][-1] == "--resume"
        detail = _wait(
            lambda: (d := _get(server.url, "/api/run/stopped"))["status"] == "finished" and d,
            180,
            "the resumed run to finish",
        )
        assert detail["step"] == 40 and "saved" in detail["log"]
        _post(server.url, "/api/evaluate/stopped")
        _wait(lambda: (run / "eval.json").is_file(), 300, "eval.json")
        _wait(lambda: _get(server.url, "/api/runs")["runs"][0]["eval"], 30, "the eval metric")
    finally:
        stop_ui(server)
    (tmp_path / "clean.yaml").write_text(text.replace("runs/stopped", "clean"))
    code, _, err = tuneforge("train", "clean.yaml", cwd=tmp_path)
    assert code == 0, err
    a = load_file(str(root / "stopped/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "clean/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_cli_answers_and_off_loopback_requires_its_printed_token(runs_root):
    server = start_ui(runs_root, "--host", "0.0.0.0")
    try:
        assert server.token and len(server.token) >= 16
        url = server.url.replace("localhost", "127.0.0.1")
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(url, "/api/runs")
        assert e.value.code == 401
        req = urllib.request.Request(
            url + "api/runs", headers={"Authorization": f"Bearer {server.token}"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert {x["id"] for x in json.loads(r.read())["runs"]} == {"lr-low", "lr-high"}
    finally:
        stop_ui(server)
    server = start_ui(runs_root)  # loopback: no token; / is the page
    try:
        assert server.token is None
        with urllib.request.urlopen(server.url, timeout=30) as r:
            assert b"/static/app.js" in r.read()
        assert len(_get(server.url, "/api/runs")["runs"]) == 2
    finally:
        stop_ui(server)
    code, _, err = tuneforge("ui", "--runs", str(runs_root), "--port", "0", "--token", "short",
                             cwd=runs_root)  # fmt: skip
    assert code == 2 and err.strip() == "error: --token must be at least 16 characters"

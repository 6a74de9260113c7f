"""Training, eval and serve never reach for the network (hub kernels, hub models, telemetry).

transformers 5.25 pulls in the ``kernels`` package, which can fetch compiled kernels from the
hub. Here every tuneforge process runs with a guard (``sitecustomize`` on ``PYTHONPATH``) that
records, then refuses, any name lookup or connection to a host other than this machine; the
hub's offline switches are cleared so nothing short-circuits the libraries' own behaviour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

from .conftest import ROOT, run_cli, write_jsonl

GUARD = """
import os, socket

_LOG = os.environ["TUNEFORGE_TEST_NET_LOG"]
_LOCAL = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "")


def _record(what):
    with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {what}\\n")


def _host(address):
    return address[0] if isinstance(address, tuple) else address


_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name not in _LOCAL and name is not None:
        _record(f"lookup {name}")
        raise socket.gaierror(socket.EAI_NONAME, "offline (test guard)")
    return _getaddrinfo(host, *args, **kwargs)


_connect = socket.socket.connect


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and _host(address) not in _LOCAL:
        _record(f"connect {address}")
        raise OSError("offline (test guard)")
    return _connect(self, address)


socket.getaddrinfo = getaddrinfo
socket.socket.connect = connect
_record("guard")
"""


def _guarded_env(tmp_path):
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    path = [str(guard), env.get("PYTHONPATH", "")]
    env.update(PYTHONPATH=os.pathsep.join(p for p in path if p), TUNEFORGE_TEST_NET_LOG=str(log))
    return env, log


def _attempts(log) -> list[str]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [line for line in lines if not line.endswith(" guard")]


def test_the_guard_sees_a_hub_request(tmp_path):
    """The guard can fail the test below: a plain request to the hub is recorded."""
    env, log = _guarded_env(tmp_path)
    code = "import urllib.request; urllib.request.urlopen('https://huggingface.co', timeout=5)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert _attempts(log) and "huggingface.co" in _attempts(log)[0]


def test_train_eval_and_serve_make_no_network_request(tmp_path):
    env, log = _guarded_env(tmp_path)
    rows = [{"instruction": f"Say {i}", "output": f"word {i}"} for i in range(12)]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:8])
    held = write_jsonl(tmp_path / "eval.jsonl", rows[8:])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: tiny-llama\noutput_dir: {tmp_path / 'run'}\nmethod: {{name: lora, r: 4}}\n"
        f"data: {{train: {train}, eval: {held}, max_length: 64}}\n"
        "training: {max_steps: 2, batch_size: 2, progress: false}\n"
    )
    r = run_cli("train", str(cfg), env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", str(tmp_path / "run"), "eval.max_new_tokens=4", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "eval.json").is_file()

    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "serve", str(tmp_path / "run"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving"), line + proc.stderr.read()[-3000:]
        url = line.split(" on ")[1].strip()
        model = json.loads(urllib.request.urlopen(url + "/models", timeout=60).read())
        body = {"model": model["data"][0]["id"], "max_tokens": 4}
        body["messages"] = [{"role": "user", "content": "Say 3"}]
        request = urllib.request.Request(
            url + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        reply = json.loads(urllib.request.urlopen(request, timeout=300).read())
        assert reply["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    lines = log.read_text().splitlines()
    assert sum(line.endswith(" guard") for line in lines) >= 3  # train, eval and serve were guarded
    assert _attempts(log) == []

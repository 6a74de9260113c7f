"""Access tokens (``tuneforge.access``) and ``tuneforge serve --api-key``: loopback detection, a
key generated only off loopback, bad keys refused, Bearer parsing; the app answers 401 in
OpenAI's shape without the key or with another, 200 with it (an HTTP client and the ``openai``
client); the CLI prints a generated key on a non-loopback host and refuses a short one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tuneforge.access import LOOPBACK, access_token, bearer_matches, is_loopback
from tuneforge.errors import TuneforgeError

from ..conftest import ROOT, run_cli

KEY = "k" * 12 + "-right-key"
UNAUTHORIZED = {"type": "invalid_request_error", "param": None, "code": "invalid_api_key"}


# -- tuneforge.access -----------------------------------------------------------------------------
def test_loopback_hosts():
    for host in (*LOOPBACK, "LocalHost", "127.0.0.2", "0:0:0:0:0:0:0:1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "192.168.1.5", "10.0.0.1", "example.com", "localhost.evil"):
        assert not is_loopback(host), host


def test_a_key_is_generated_only_off_loopback():
    for host in LOOPBACK:
        assert access_token(host, None, "--api-key") is None
    a, b = access_token("0.0.0.0", None, "--api-key"), access_token("::", None, "--api-key")
    assert len(a) == len(b) == 32 and a != b  # secrets.token_urlsafe(24)
    assert access_token("0.0.0.0", KEY, "--api-key") == KEY
    assert access_token("127.0.0.1", KEY, "--api-key") == KEY  # given: in force on loopback too


def test_short_or_unsendable_keys_are_refused_naming_where_they_came_from():
    for given in ("", "short", "x" * 15):
        with pytest.raises(TuneforgeError, match="^--api-key must be at least 16 characters$"):
            access_token("0.0.0.0", given, "--api-key")
    with pytest.raises(TuneforgeError, match="^TUNEFORGE_API_KEY must be at least 16"):
        access_token("127.0.0.1", "", "TUNEFORGE_API_KEY")
    for given in ("sixteen chars ok", "x" * 16 + "\n", "ключ" * 4):
        with pytest.raises(TuneforgeError, match="--token must be printable ASCII"):
            access_token("::1", given, "--token")
    assert access_token("::1", "x" * 16, "--token") == "x" * 16


def test_bearer_parsing():
    assert bearer_matches(f"Bearer {KEY}", KEY)
    assert bearer_matches(f"bearer  {KEY} ", KEY)  # the scheme in any case, spaces around
    for header in (None, "", "Bearer", "Bearer ", f"Basic {KEY}", KEY, f"Bearer {KEY}x"):
        assert not bearer_matches(header, KEY), header
    assert not bearer_matches(f"Bearer {KEY[:-1]}", KEY)
    assert not bearer_matches("Bearer ключ", KEY)  # non-ASCII: no match, no TypeError


# -- the app ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_app(tiny_lora_runs):
    from tuneforge.infer.runs import load_with_adapters
    from tuneforge.infer.serve import Engine, _model_max_context, create_app

    model, tok, base, names, _ = load_with_adapters(str(tiny_lora_runs[0]), None, "cpu")
    engine = Engine(model, tok, base, names, _model_max_context(model))
    return create_app(engine, api_key=KEY), names[0]


def test_the_app_wants_the_key_in_openais_shape(keyed_app):
    import openai
    from fastapi.testclient import TestClient

    app, adapter = keyed_app
    chat = {"model": adapter, "messages": [{"role": "user", "content": "Say 3"}], "max_tokens": 2}
    with TestClient(app) as http:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key-wrong-key"},
            {"Authorization": KEY},
        ):
            for r in (
                http.get("/v1/models", headers=headers),
                http.post("/v1/chat/completions", json=chat, headers=headers),
            ):
                assert r.status_code == 401, (headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
                assert {k: error[k] for k in UNAUTHORIZED} == UNAUTHORIZED
                assert KEY not in r.text
        right = {"Authorization": f"Bearer {KEY}"}
        assert http.get("/v1/models", headers=right).status_code == 200
        r = http.post("/v1/chat/completions", json=chat, headers=right)
        assert r.status_code == 200 and r.json()["object"] == "chat.completion"
        # The openai client, in process: its api_key is sent as the Bearer token.
        client = openai.OpenAI(
            api_key=KEY, base_url="http://testserver/v1", http_client=http, max_retries=0
        )
        assert adapter in [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(**chat)
        assert reply.choices[0].message.content == r.json()["choices"][0]["message"]["content"]
        wrong = openai.OpenAI(
            api_key=KEY + "x", base_url="http://testserver/v1", http_client=http, max_retries=0
        )
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.models.list()
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


# -- the CLI ---------------------------------------------------------------------------------------
def _status(url: str, key: str | None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _start(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, list[str]]:
    """A ``tuneforge serve`` process (``env`` added to ours, less any TUNEFORGE_API_KEY) and its
    stdout lines up to the ``serving`` one."""
    env = {k: v for k, v in os.environ.items() if k != "TUNEFORGE_API_KEY"} | (env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    lines = []
    while not lines or not lines[-1].startswith("serving"):
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            err = proc.stderr.read()
            if "cannot listen" in err:
                pytest.skip(f"cannot bind here: {err.strip()}")
            pytest.fail(f"server did not start: {''.join(lines)}{err[-3000:]}")
        lines.append(line)
    return proc, lines


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    return proc.communicate(timeout=60)[1]


def test_serve_off_loopback_prints_a_generated_key_that_works(tiny_lora_runs):
    import openai

    run = tiny_lora_runs[0]
    proc, lines = _start([str(run), "--host", "0.0.0.0", "--port", "0"])
    try:
        assert len(lines) == 2 and lines[0].startswith("api key (send as Authorization: Bearer")
        key = lines[0].split()[-1]
        assert len(key) == 32
        port = lines[1].rsplit(":", 1)[1].split("/")[0]
        url = f"http://127.0.0.1:{port}/v1"
        status, body = _status(url + "/models", None)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert _status(url + "/models", "x" * 32)[0] == 401
        assert _status(url + "/models", key)[0] == 200
        client = openai.OpenAI(api_key=key, base_url=url, max_retries=0, timeout=300)
        messages = [{"role": "user", "content": "Say 3"}]
        r = client.chat.completions.create(model=run.name, messages=messages, max_tokens=4)
        streamed = client.chat.completions.create(
            model=run.name, messages=messages, max_tokens=4, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == r.choices[0].message.content
        assert proc.poll() is None
    finally:
        err = _stop(proc)
    assert "reachable from other machines" in err and key not in err


def test_serve_takes_the_key_from_the_environment_on_loopback_too(tiny_lora_runs):
    proc, lines = _start(["tiny-llama", "--port", "0"], {"TUNEFORGE_API_KEY": KEY})
    try:
        assert len(lines) == 1 and KEY not in lines[0]  # a given key is not printed
        url = lines[0].split(" on ")[1].strip()
        assert _status(url + "/models", None)[0] == 401
        assert _status(url + "/models", KEY)[0] == 200
    finally:
        err = _stop(proc)
    assert "warning" not in err


def test_serve_refuses_a_short_key():
    r = run_cli("serve", "tiny-llama", "--port", "0", "--api-key", "short")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["error: --api-key must be at least 16 characters"]
    r = run_cli("serve", "tiny-llama", "--port", "0", env={"TUNEFORGE_API_KEY": "short"})
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["error: TUNEFORGE_API_KEY must be at least 16 characters"]

"""``tuneforge serve`` as a real server process on a free loopback port, driven by the ``openai``
client: models, chat and text completions, streaming, adapter choice by ``model``, stop strings,
and bad requests answered with 4xx JSON errors while the server keeps serving."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from ..conftest import ROOT
from .test_chat import greedy, loaded


@pytest.fixture(scope="module")
def server(tiny_lora_runs):
    run = tiny_lora_runs[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "serve", "tiny-llama", "--adapters", f"dates={run}"]
        + ["--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    line = proc.stdout.readline()  # printed once the socket listens
    if not line.startswith("serving"):
        proc.kill()
        pytest.fail(f"server did not start: {line}{proc.stderr.read()[-3000:]}")
    url = line.split(" on ")[1].strip()
    yield url, run, proc
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=300)


def test_models_and_chat_pick_the_adapter_by_model_name(server, client):
    url, run, _ = server
    assert url.startswith("http://127.0.0.1:")
    assert [m.id for m in client.models.list().data] == ["tiny-llama", "dates"]
    messages = [{"role": "user", "content": "Say 3"}]
    expected = greedy(run, messages)
    expected_base = greedy(run, messages, adapter=False)
    assert expected != expected_base
    for name, want in (("dates", expected), ("tiny-llama", expected_base), ("dates", expected)):
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=8)
        assert r.choices[0].message.content == want
        assert r.object == "chat.completion" and r.model == name
        assert r.usage.completion_tokens <= 8
    # Streaming: the deltas add up to the same reply, then a finish reason, then [DONE].
    chunks = list(
        client.chat.completions.create(
            model="dates",
            messages=messages,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] in ("stop", "length") and set(reasons[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # A stop string ends the reply before it.
    if len(expected.strip()) >= 4:
        stop = expected[2:4]
        r = client.chat.completions.create(
            model="dates", messages=messages, max_tokens=8, stop=[stop]
        )
        assert r.choices[0].message.content == expected[: expected.find(stop)]
        assert r.choices[0].finish_reason == "stop"


def test_completions_plain_and_streaming(server, client):
    import torch

    _, run, _ = server
    model, tok = loaded(str(run), True)
    ids = torch.tensor([tok("Say 3")["input_ids"]])
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
    want = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    r = client.completions.create(model="dates", prompt="Say 3", max_tokens=5)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    streamed = client.completions.create(model="dates", prompt="Say 3", max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_bad_requests_get_openai_errors_and_the_server_survives(server, client):
    import openai

    url, _, proc = server
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=messages)
    assert e.value.code == "model_not_found" and "tiny-llama, dates" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="dates", messages=messages, max_tokens=0)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="dates", messages=messages, max_tokens=10**6)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="dates", messages=[{"role": "robot", "content": ""}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="dates", messages=messages, temperature=-1)
    for body in (b"{not json", b"[1, 2]", b'{"model": "dates"}'):
        req = urllib.request.Request(
            url + "/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 400
        error = json.loads(e.value.read())["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
    assert proc.poll() is None
    assert [m.id for m in client.models.list().data] == ["tiny-llama", "dates"]

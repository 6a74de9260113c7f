"""``tuneforge chat`` driven as a real program through a pipe: the run's template, adapter
switching, /base, /reset, multi-turn history; every reply equals what the plain batched
``generate`` gives for the same conversation and weights."""

from __future__ import annotations

import functools
import subprocess
import sys

from ..conftest import ROOT


@functools.cache
def loaded(ref: str, adapter: bool):
    from tuneforge.infer.runs import load_for_inference

    return load_for_inference(ref, adapter=adapter)


def greedy(ref, conversation, adapter: bool = True, max_new_tokens: int = 8) -> str:
    """The plain batched generation path (eval.generate), the reference for chat and serve."""
    from tuneforge.infer.generate import generate

    model, tok = loaded(str(ref), adapter)
    return generate(model, tok, [conversation], max_new_tokens=max_new_tokens)[0]


def test_chat_through_a_pipe_switches_adapters_and_keeps_history(tiny_lora_runs):
    run_a, run_b = tiny_lora_runs
    script = "Say 3\n/reset\n/adapter b\nSay 3\n/adapter nope\n/reset\n/base\nSay 3\nSay 4\n/exit\n"
    r = subprocess.run(
        [sys.executable, "-m", "tuneforge", "chat", str(run_a), "--adapters", f"b={run_b}"]
        + ["--max-new-tokens", "8"],
        input=script,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    user3 = [{"role": "user", "content": "Say 3"}]
    a = greedy(run_a, user3)
    b = greedy(run_b, user3)
    base = greedy(run_a, user3, adapter=False)
    base_turn2 = greedy(
        run_a,
        [*user3, {"role": "assistant", "content": base}, {"role": "user", "content": "Say 4"}],
        adapter=False,
    )
    assert len({a, b, base}) == 3, "training should make the three models answer differently"

    def turn(label: str, line: str, reply: str) -> str:
        return f"[{label}] > {line}\n{reply}"

    assert out.startswith("chatting with run-a;")
    pos = 0
    for label, line, reply in [
        ("run-a", "Say 3", a),
        ("b", "Say 3", b),
        ("base", "Say 3", base),
        ("base", "Say 4", base_turn2),
    ]:
        at = out.find(turn(label, line, reply), pos)
        assert at >= 0, (label, reply, out[pos:])
        pos = at + 1
    assert "no adapter 'nope'; loaded: run-a, b" in out
    assert out.rstrip().endswith("bye")


def test_text_stream_holds_back_stop_strings_and_stops(tokenizer):
    """Fed one token at a time, the streamed pieces add up to the text before the stop string,
    and no piece ever shows the start of the stop string that later completes."""
    import torch

    from tuneforge.infer.chat import _TextStream

    text = "The answer is 42. Done: ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces: list[str] = []
    stream = _TextStream(tokenizer, ["Done:"], pieces.append)
    stream.put(torch.tensor([[1, 2]]))  # the prompt, ignored
    for i in ids:
        stream.put(torch.tensor([i]))
        if stream.hit_stop:
            break
    stream.end()
    assert stream.hit_stop and "".join(pieces) == "The answer is 42. "
    assert all("D" not in p for p in pieces)
    # Without a stop string every character arrives, in more than one piece.
    pieces = []
    stream = _TextStream(tokenizer, [], pieces.append)
    stream.put(torch.tensor([[1]]))
    for i in ids:
        stream.put(torch.tensor([i]))
    stream.end()
    assert "".join(pieces) == text and len(pieces) > 3

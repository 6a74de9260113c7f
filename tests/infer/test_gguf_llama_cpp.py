"""Exported GGUF files run by llama.cpp itself (llama-cpp-python, the tuneforge[gguf] extra that
`make install` installs): the same greedy tokens as transformers, answers that stop at end of
turn, and `tuneforge eval --gguf` reporting the file beside the model it came from."""

import json

import llama_cpp  # tuneforge[gguf]: make install installs it
import pytest
import torch

from tuneforge.data.render import render_prompt
from tuneforge.infer.generate import generate
from tuneforge.infer.gguf_export import export_gguf, gguf_replies
from tuneforge.models import load_model

from ..conftest import ROOT, run_cli
from .test_gguf_export import full_run_of

PROMPTS = [
    [{"role": "user", "content": "What is 2 + 2? Answer with the number only."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
    ],
]


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory):
    return full_run_of("smollm2-135m-instruct", tmp_path_factory.mktemp("gguf"))


@pytest.mark.slow
def test_f16_export_greedy_tokens_equal_transformers(builtin_run, tmp_path):
    done = export_gguf(builtin_run, tmp_path / "f16", quant="f16")
    model, tok, _ = load_model(str(builtin_run / "model"), dtype="float32", device="cpu")
    llm = llama_cpp.Llama(model_path=str(done.gguf), n_ctx=512, verbose=False, seed=0)
    for messages in PROMPTS:
        ids = render_prompt(tok, messages)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),  # none inferred from pad
                max_new_tokens=16,
                do_sample=False,
                eos_token_id=None,
            )
        want = out[0, len(ids) :].tolist()
        got = []
        for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            got.append(t)
            if len(got) == 16:
                break
        assert got == want, (messages, tok.decode(got), tok.decode(want))
    llm.close()


@pytest.mark.slow
def test_quantized_exports_answer_and_stop_at_end_of_turn(builtin_run, tmp_path):
    """Every prompt the model answers within the budget in transformers, the q8_0 and q4_k_m
    files answer too, ending at end of turn (not at the token limit)."""
    model, tok, _ = load_model(str(builtin_run / "model"), dtype="float32", device="cpu")
    hf = generate(model, tok, PROMPTS, max_new_tokens=96)
    ends = [len(tok.encode(r, add_special_tokens=False)) < 90 for r in hf]
    assert sum(ends) >= 2, hf  # the check below is not vacuous
    for quant in ("q8_0", "q4_k_m"):
        done = export_gguf(builtin_run, tmp_path / quant, quant=quant)
        replies = gguf_replies(done.gguf, PROMPTS, max_new_tokens=96)
        for reply, ended in zip(replies, ends, strict=True):
            assert reply.text.strip(), (quant, reply)
            assert reply.stopped or not ended, (quant, reply)


@pytest.mark.slow
def test_eval_gguf_reports_the_file_beside_the_model(builtin_run, tmp_path):
    """A full run of the built-in model, its f32 export: llama.cpp answers as transformers does."""
    rows = [json.loads(x) for x in (ROOT / "examples/dates/test.jsonl").read_text().splitlines()]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    done = export_gguf(builtin_run, tmp_path / "f32", quant="f32")
    r = run_cli(
        "eval",
        str(builtin_run),
        "--data",
        str(data),
        "--gguf",
        str(done.gguf),
        "eval.general_text=none",
        "eval.few_shot_k=0",
        "eval.max_new_tokens=16",
    )
    assert r.returncode == 0, r.stderr
    results = json.loads((builtin_run / "eval.json").read_text())
    g = results["gguf"]
    assert g["file"] == str(done.gguf)
    system = "fine-tuned GGUF (llama.cpp)"
    ours, theirs = results["predictions"][system], results["predictions"]["fine-tuned"]
    assert g["identical"] == sum(a == b for a, b in zip(ours, theirs, strict=True))
    # the same weights in f32: the answers agree but for near-ties that batched decoding in
    # transformers and llama.cpp's kernels may break differently (measured: 5 of the first 6)
    assert g["identical"] >= 3, list(zip(ours, theirs, strict=True))
    assert set(results["scores"][system]) == set(results["scores"]["fine-tuned"]) - {
        "eval_loss",
        "perplexity",
    }
    assert f"{g['not_stopped']} did not stop at end of turn within 16 tokens" in r.stdout
    assert "run.f32.gguf through llama.cpp" in r.stdout
    assert "The exported file" in (builtin_run / "report.md").read_text()
    r = run_cli(
        "eval",
        str(builtin_run),
        "--data",
        str(data),
        "--gguf",
        str(done.gguf),
        "eval.temperature=0.7",
    )
    assert r.returncode == 2  # refused before any model loads
    assert r.stderr.strip().splitlines() == [
        "error: --gguf compares greedy answers; set eval.temperature=0 (the default) to use it"
    ]
    r = run_cli("eval", str(builtin_run), "--data", str(data), "--gguf", str(tmp_path / "no.gguf"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: --gguf {tmp_path / 'no.gguf'}: no such file; make one with tuneforge export"
    ]

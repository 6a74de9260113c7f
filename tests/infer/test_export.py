"""Adapters in PEFT format (peft loads them, same logits) and merging (same logits, no tuneforge)."""

import subprocess
import sys

import pytest
import torch

from tuneforge.infer.export import merge
from tuneforge.infer.runs import load_for_inference
from tuneforge.train import train

from ..conftest import tiny_config, write_jsonl


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    rows = [{"instruction": f"Repeat {i}", "output": f"{i} {i}"} for i in range(16)]
    cfg = tiny_config(
        tmp,
        write_jsonl(tmp / "t.jsonl", rows),
        **{
            "training.max_steps": 4,
            "training.learning_rate": 1e-2,
            "method.target_modules": "all-linear",
        },
    )
    train(cfg)
    return tmp / "run"


def probe_ids():
    return torch.tensor([[1, 520, 33, 4000, 17, 9, 880, 2, 1, 77]])


@torch.no_grad()
def test_peft_loads_our_adapter_with_identical_logits(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.models import resolve_model

    ours, _ = load_for_inference(str(lora_run))
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32)
    base_logits = base(probe_ids()).logits
    theirs = PeftModel.from_pretrained(base, str(lora_run / "adapter")).eval()
    a, b = ours(probe_ids()).logits, theirs(probe_ids()).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - base_logits).abs().max() > 1e-3  # the adapter really changes the model


def test_merged_model_equals_adapter_on_model_and_needs_no_tuneforge(lora_run, tmp_path):
    out = merge(lora_run, tmp_path / "merged")
    with torch.no_grad():
        ours, _ = load_for_inference(str(lora_run))
        expected = ours(probe_ids()).logits
    # Load in a fresh interpreter that never imports tuneforge or peft.
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)\n"
        f"ids = torch.tensor({probe_ids().tolist()})\n"
        "with torch.no_grad(): torch.save(m(ids).logits, sys.argv[1])\n"
        "assert 'tuneforge' not in sys.modules and 'peft' not in sys.modules\n"
    )
    path = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=tmp_path)
    merged = torch.load(path, weights_only=True)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert not list(out.glob("adapter_*")) and (out / "tokenizer.json").is_file()

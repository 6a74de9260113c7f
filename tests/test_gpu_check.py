"""bench/gpu_check.py runs on the CPU (``--dry-run``: tiny sizes, the same code), so the GPU
check cannot rot while no GPU is lent; every section must come back with real numbers."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


def test_dry_run_fills_every_section_with_real_numbers(tmp_path):
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["failures"] == []
    env = res["environment"]
    assert env["torch"] and env["transformers"] and env["bf16_matmul_tflops"] > 0

    c = res["correctness"]
    steps = res["meta"]["sizes"]["steps"]
    assert set(c["losses"]) == {
        f"{m}-{method}" for m in ("tiny-llama", "tiny-qwen2") for method in ("lora", "full")
    } | {"tiny-llama-qlora", "tiny-llama-full-fp16"}
    assert "CUDA" in c["losses"].pop("tiny-llama-qlora")["skipped"]
    for tag, run in c["losses"].items():
        assert run["passed"], tag
        assert len(run["reference"]) == len(run["device"]) == steps, tag
        assert all(math.isfinite(x) for x in run["reference"] + run["device"]), tag
        assert run["reference"] != run["device"], tag  # bf16 / fp16 really differ from fp32
        assert run["device"][-1] < run["device"][0], tag  # it trained
    iso = c["packed_isolation"]
    for case in ("sdpa float32", "sdpa bfloat16"):
        assert iso[case]["passed"], case
        assert iso[case]["leak_rel_diff"] > 0.01, case  # the control does leak
    assert "skipped" in iso["flash_attention_2 bfloat16"]
    resume = c["resume"]
    assert resume["killed"] and resume["equal"] and resume["passed"]
    assert resume["max_abs_diff"] == 0.0
    assert "skipped" in c["compile"]
    updates = c["full_bf16_updates"]
    assert updates["changed_float32"] > 0.99 and updates["changed_bf16_master"] > 0.99
    assert 0 < updates["changed_bf16_pure"] < 0.99

    for model in ("llama-3.2-1b", "qwen2.5-0.5b"):
        systems = res["speed"][model]
        assert set(systems) == {"tuneforge", "hf", "hf-flat"}
        for name, run in systems.items():
            assert run["supervised_tokens_per_s"] > 0, (model, name)
            assert run["peak_memory_mb"] > 0 and 0 < run["mfu"] < 1, (model, name)
            assert math.isfinite(run["train_loss"]) and run["flops"] > 0, (model, name)
        assert systems["hf"]["supervised_tokens"] == systems["tuneforge"]["supervised_tokens"]

    md = (tmp_path / "results.md").read_text()
    assert "| tiny-llama-lora losses | pass |" in md
    assert "| qwen2.5-0.5b | HF Trainer + peft (DataCollatorWithFlattening) | sdpa |" in md


def test_carry_list_names_what_the_gpu_image_lacks():
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--carry-list"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    names = {line.split("|")[1].strip() for line in r.stdout.splitlines() if line.startswith("| ")}
    assert {"trl", "bitsandbytes", "gguf", "optuna"} <= names
    assert not names & {"torch", "transformers", "peft", "accelerate", "tokenizers"}

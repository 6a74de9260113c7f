"""QLoRA vs LoRA on the built-in model: what the frozen base costs in memory, and what a QLoRA run
costs and gives against the same LoRA run (configs/lora.yaml vs configs/qlora.yaml).

    .venv/bin/python bench/qlora_bench.py    # 63 min on the shared 2-core machine (load ~10)
    .venv/bin/python bench/qlora_bench.py --model tiny-llama --steps 2 --n-test 8   # smoke run
    .venv/bin/python bench/qlora_bench.py --methods qlora    # the QLoRA run only

1. Bytes per parameter of the frozen base, counted tensor by tensor as held in memory
   (methods.quantize.base_footprint): packed 4-bit codes, absmax / nested-absmax / code-table /
   offset constants, and the layers that stay in full precision (norms, rotary buffers, and
   the embedding / head unless method.quantize_embeddings holds them in 4 bits). "Linear layers" are the decoder's linear layers (what bitsandbytes quantizes);
   "whole model" adds everything else. Parameters are those of the original model.
2. The same LoRA (r 16, q/k/v/o, lr 1e-3, batch 8, seed 42) trained for the same steps on a fp32
   base and on an NF4 + double-quant base, each in its own process: peak RSS of that process
   (load + train), supervised tokens per second of training, and exact match on the 100 held-out
   examples of examples/dates/test.jsonl (greedy, tuneforge.infer.generate + exact_match).

Numbers are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def footprint_rows(model_ref: str) -> list[tuple[str, dict]]:
    from tuneforge.config import MethodConfig
    from tuneforge.methods.quantize import base_footprint, load_quantized_model
    from tuneforge.models import load_model

    rows = []
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        model, _, _ = load_model(model_ref, dtype=dtype, device="cpu")
        rows.append((name, base_footprint(model)))
        del model
    for name, dq, dtype, embed in (
        ("NF4 linears, rest fp32", False, "float32", False),
        ("NF4 + double quant linears, rest fp32", True, "float32", False),
        ("NF4 + double quant linears, rest bf16", True, "bfloat16", False),
        (
            "NF4 + double quant linears + embedding/head, norms fp32 (default)",
            True,
            "float32",
            True,
        ),
        ("NF4 + double quant linears + embedding/head, norms bf16", True, "bfloat16", True),
    ):
        method = MethodConfig(
            name="qlora", quant_type="nf4", double_quant=dq, quantize_embeddings=embed
        )
        model, _, _ = load_quantized_model(model_ref, dtype, "cpu", method=method)
        rows.append((name, base_footprint(model)))
        del model
    return rows


def child(method: str, model_ref: str, steps: int, n_test: int, work: Path) -> dict:
    """One training run + held-out exact match, in this process (so RSS is this run's)."""
    from tuneforge.config import load_config
    from tuneforge.data.dataset import load_conversations
    from tuneforge.eval.metrics import exact_match
    from tuneforge.infer.generate import generate
    from tuneforge.infer.runs import load_for_inference
    from tuneforge.train import train

    torch.set_num_threads(2)
    cfg = load_config(
        ROOT / "configs" / f"{method}.yaml",
        [
            f"model={model_ref}",
            f"output_dir={work / method}",
            f"training.max_steps={steps}",
            "data.eval=null",  # no eval loss / early stopping: same steps for both
            "training.progress=false",
        ],
    )
    summary = train(cfg, overwrite=True)
    peak_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    convs, _ = load_conversations(str(ROOT / "examples" / "dates" / "test.jsonl"))
    convs = convs[:n_test]
    model, tok = load_for_inference(cfg.output_dir)
    start = time.perf_counter()
    preds = generate(model, tok, [c[:-1] for c in convs], max_new_tokens=24)
    return {
        "peak_rss": peak_train,
        "tokens_per_s": summary["supervised_tokens"] / summary["train_seconds_this_process"],
        "train_s": summary["train_seconds_this_process"],
        "steps": summary["steps"],
        "last_train_loss": summary["last_train_loss"],
        "exact_match": exact_match(preds, [c[-1]["content"] for c in convs]),
        "n_test": len(convs),
        "generate_s": time.perf_counter() - start,
        "samples": preds[:3],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--methods", default="lora,qlora", help="which runs to train (comma list)")
    p.add_argument("--child", choices=("lora", "qlora"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = child(args.child, args.model, args.steps, args.n_test, Path(args.work))
        Path(args.out).write_text(json.dumps(result))
        return 0

    started = time.perf_counter()
    print(f"model: {args.model}; torch {torch.__version__}, threads 2, CPU\n")
    rows = footprint_rows(args.model)
    params = rows[0][1]["linear_params"] + rows[0][1]["other_params"]
    print(f"frozen base, {params / 1e6:.1f}M parameters, bytes as held in memory")
    print("| base | linear layers: bytes/param | whole model: bytes/param | whole model: MB |")
    print("| --- | --- | --- | --- |")
    for name, fp in rows:
        whole = fp["linear_bytes"] + fp["other_bytes"]
        print(
            f"| {name} | {fp['linear_bytes'] / fp['linear_params']:.3f} | "
            f"{whole / params:.3f} | {whole / 1e6:.1f} |"
        )
    linear_share = rows[0][1]["linear_params"] / params
    print(f"(linear layers hold {100 * linear_share:.1f}% of the parameters; the rest is mostly "
          "the embedding table (tied with the head), in 4 bits unless quantize_embeddings is off)\n")  # fmt: skip

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            out = Path(tmp) / f"{method}.json"
            cmd = [sys.executable, __file__, "--child", method, "--out", str(out)]
            cmd += ["--work", tmp, "--model", args.model, "--steps", str(args.steps)]
            cmd += ["--n-test", str(args.n_test)]
            subprocess.run(cmd, check=True)
            results[method] = json.loads(out.read_text())
    n = next(iter(results.values()))["n_test"]
    print(f"\nsame LoRA, {args.steps} steps of batch 8 on examples/dates (fp32 compute, CPU)")
    print(
        "| base | peak RSS (MB) | train tokens/s | s/step | last train loss | "
        f"exact match ({n} held-out) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for method, label in (("lora", "fp32 (LoRA)"), ("qlora", "NF4 + double quant (QLoRA)")):
        if method not in results:
            continue
        r = results[method]
        print(
            f"| {label} | {r['peak_rss'] / 1e6:.0f} | {r['tokens_per_s']:.1f} | "
            f"{r['train_s'] / r['steps']:.1f} | {r['last_train_loss']:.4f} | "
            f"{r['exact_match']:.1f}% |"
        )
    if len(results) == 2:
        gap = results["qlora"]["exact_match"] - results["lora"]["exact_match"]
        print(f"\nQLoRA - LoRA exact match: {gap:+.1f} points")
    for method in results:
        print(f"{method} samples: {results[method]['samples']}")
    print(f"bench wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

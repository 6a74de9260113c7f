"""GGUF export of the `make demo` run: file size and exact match on the dates task per quant type,
through llama.cpp itself (llama-cpp-python, the chat template stored in the file, greedy), beside
the fine-tuned HF model's exact match. Numbers are printed, not asserted.

    .venv/bin/python bench/gguf_bench.py                 # trains the demo run first if missing
    .venv/bin/python bench/gguf_bench.py --run runs/lora --quants f16,q8_0,q4_k_m
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    from tuneforge.config import load_config
    from tuneforge.data.dataset import load_conversations
    from tuneforge.eval.metrics import exact_match
    from tuneforge.infer.generate import generate
    from tuneforge.infer.gguf_export import export_gguf, gguf_replies
    from tuneforge.infer.runs import is_run, load_for_inference
    from tuneforge.train import train

    p = argparse.ArgumentParser()
    p.add_argument("--run", default=None, help="a trained dates run (default: train make demo's)")
    p.add_argument("--quants", default="f16,q8_0,q4_k_m")
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args()

    cfg = load_config(ROOT / "configs" / "lora.yaml", [])
    run = Path(args.run or cfg.output_dir)
    if not is_run(run):
        print(f"training the demo run into {run} ...", file=sys.stderr)
        train(cfg, overwrite=True)
    convs, _ = load_conversations(str(ROOT / "examples" / "dates" / "test.jsonl"))
    prompts = [c[:-1] for c in convs]
    refs = [c[-1]["content"] for c in convs]

    model, tok = load_for_inference(str(run))
    start = time.perf_counter()
    hf = exact_match(generate(model, tok, prompts, max_new_tokens=args.max_new_tokens), refs)
    hf_s = time.perf_counter() - start
    del model
    rows = [("HF model (transformers, fp32)", "-", hf, "-", f"{hf_s:.0f}")]
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants.split(","):
            done = export_gguf(run, Path(tmp) / quant, quant=quant)
            size = done.gguf.stat().st_size / 2**20
            start = time.perf_counter()
            replies = gguf_replies(done.gguf, prompts, max_new_tokens=args.max_new_tokens)
            secs = time.perf_counter() - start
            em = exact_match([r.text for r in replies], refs)
            stopped = sum(r.stopped for r in replies)
            rows.append(
                (
                    f"GGUF {quant} (llama.cpp)",
                    f"{size:.0f}",
                    em,
                    f"{stopped}/{len(refs)}",
                    f"{secs:.0f}",
                )
            )
    print(
        f"\ndates task, {len(refs)} held-out examples, greedy, max {args.max_new_tokens} new tokens"
    )
    print("| model | file MiB | exact match | stopped at end of turn | generation s |")
    print("| --- | --- | --- | --- | --- |")
    for name, size, em, stopped, secs in rows:
        print(f"| {name} | {size} | {em:.1f}% | {stopped} | {secs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which method should I choose? Every method on the built-in model and the dates task.

For each of full, lora, dora, ia3, adapter, prefix, prompt: train with its ready config
(configs/<method>.yaml) for the same number of steps, in a separate process (so peak RSS is that
method's own), then measure exact match on held-out examples (examples/dates/test.jsonl, never
trained on). Prints a Markdown table; numbers are printed, never asserted. The last column is the
1-minute load average around training (on a shared machine, tokens/s falls as it rises; this
machine has 2 cores).

    python bench/methods_bench.py                      # 30 steps, 50 test examples (~15 min)
    python bench/methods_bench.py --steps 10 --n-test 20 --methods lora prefix
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["full", "lora", "dora", "ia3", "adapter", "prefix", "prompt"]


def child(method: str, steps: int, n_test: int, out: Path, work: Path) -> None:
    """Train one method and write its measurements to ``out`` (JSON)."""
    import torch

    from tuneforge.config import load_config
    from tuneforge.data.batching import micro_batches
    from tuneforge.data.dataset import load_conversations, prepare_sft_data
    from tuneforge.eval.metrics import exact_match
    from tuneforge.infer.generate import generate
    from tuneforge.infer.runs import load_for_inference
    from tuneforge.models import load_tokenizer, resolve_model
    from tuneforge.train import train

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    run = work / method
    cfg = load_config(
        ROOT / "configs" / f"{method}.yaml",
        [
            f"training.max_steps={steps}",
            f"output_dir={run}",
            "data.eval=null",  # no mid-run evaluation: the same work for every method
            "training.progress=false",
        ],
    )
    cfg.data.train = str(ROOT / cfg.data.train)
    load_before = os.getloadavg()[0]
    summary = train(cfg, overwrite=True)
    # The machine may be shared: the 1-minute load average around training says how much.
    load = max(load_before, os.getloadavg()[0])
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    # Every token the loop processed (no padding): the same windows the trainer used.
    tok = load_tokenizer(resolve_model(cfg.model))
    data = prepare_sft_data(cfg.data, tok, cfg.training.seed)
    batches = micro_batches(data.train, cfg.training.batch_size, cfg.training.seed, 0)
    n_micro = steps * cfg.training.gradient_accumulation
    if n_micro > len(batches):
        raise SystemExit("bench assumes the steps fit in one epoch")
    tokens = sum(len(data.train[i]) for mb in batches[:n_micro] for i in mb)

    weights = run / (
        "model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    )
    convs, _ = load_conversations(str(ROOT / "examples/dates/test.jsonl"))
    convs = convs[:n_test]
    model, tok = load_for_inference(str(run))
    t0 = time.perf_counter()
    preds = generate(model, tok, [c[:-1] for c in convs], max_new_tokens=24)
    gen_s = time.perf_counter() - t0
    result = {
        "method": method,
        "steps": summary["steps"],
        "trainable": summary["trainable_parameters"],
        "total": summary["total_parameters"],
        "file_bytes": weights.stat().st_size,
        "peak_rss_mib": peak_rss_mib,
        "train_s": summary["train_seconds_this_process"],
        "tokens": tokens,
        "tokens_per_s": tokens / summary["train_seconds_this_process"],
        "load_avg": load,
        "last_train_loss": summary["last_train_loss"],
        "exact_match": exact_match(preds, [c[-1]["content"] for c in convs]),
        "n_test": len(convs),
        "generate_s": gen_s,
        "sample": [convs[0][-2]["content"].splitlines()[-1], preds[0]],
    }
    out.write_text(json.dumps(result))


def size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def table(rows: list[dict]) -> str:
    lines = [
        "| method | trainable params | % of model | adapter file | peak RSS | tokens/s | "
        "exact match | load avg |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.3f}% | "
            f"{size(r['file_bytes'])} | {r['peak_rss_mib']:,.0f} MiB | {r['tokens_per_s']:.0f} | "
            f"{r['exact_match']:.0f}% | {r.get('load_avg', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.steps, args.n_test, Path(args.out), Path(args.work))
        return 0
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="methods-bench-") as work:
        for method in args.methods:
            out = Path(work) / f"{method}.json"
            cmd = [sys.executable, __file__, "--child", method, "--steps", str(args.steps)]
            cmd += ["--n-test", str(args.n_test), "--out", str(out), "--work", work]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{method}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            row = json.loads(out.read_text())
            rows.append(row)
            print(
                f"{method}: {time.perf_counter() - t0:.0f} s (train {row['train_s']:.0f} s, "
                f"generate {row['generate_s']:.0f} s), last loss {row['last_train_loss']:.4f}, "
                f"sample {row['sample']}",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"\nbuilt-in model, dates task: {args.steps} steps of batch 8 per method (its "
        f"configs/<method>.yaml), exact match on the first {args.n_test} of "
        f"examples/dates/test.jsonl; total {time.perf_counter() - start:.0f} s\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

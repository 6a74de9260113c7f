"""Does mixing general data into training reduce forgetting? (dates task, built-in model)

Trains two LoRA runs with configs/lora.yaml for the same number of steps:

* ``dates-only``: examples/dates/train.jsonl;
* ``dates+general``: the same file concatenated with examples/general/general_instructions.jsonl
  (repeated ``--general-repeats`` times), shuffled. The concatenation is done here, by hand,
  because the ``data.mix`` config key is being built separately; this measures the same idea.

For each run it reports the perplexity of base and fine-tuned model on the general text set
(examples/general/general_text.jsonl, which shares no subject with the general instructions),
the relative change (forgetting), and exact match on the dates test split (is the task still
learned?).

    python bench/forgetting_bench.py [--steps 50] [--general-repeats 2] [--out runs/forgetting]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def mixed_train_file(out: Path, repeats: int, seed: int = 0) -> tuple[Path, int, int]:
    dates = (ROOT / "examples/dates/train.jsonl").read_text().splitlines()
    general = (ROOT / "examples/general/general_instructions.jsonl").read_text().splitlines()
    rows = dates + general * repeats
    random.Random(seed).shuffle(rows)
    path = out / "dates_plus_general.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path, len(dates), len(general) * repeats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--general-repeats", type=int, default=2)
    ap.add_argument("--out", default="runs/forgetting")
    ap.add_argument("--n-test", type=int, default=40, help="dates test examples for exact match")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from tuneforge.config import load_config
    from tuneforge.data.dataset import load_conversations
    from tuneforge.eval.metrics import exact_match
    from tuneforge.eval.perplexity import (
        BUILTIN_GENERAL_TEXT,
        read_texts,
        samples_nll,
        text_samples,
    )
    from tuneforge.infer.generate import generate
    from tuneforge.infer.runs import load_for_inference
    from tuneforge.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mixed, n_dates, n_general = mixed_train_file(out, args.general_repeats)
    runs = {"dates-only": ROOT / "examples/dates/train.jsonl", "dates+general": mixed}
    texts = read_texts(BUILTIN_GENERAL_TEXT)
    test, _ = load_conversations(str(ROOT / "examples/dates/test.jsonl"))
    test = test[: args.n_test]
    prompts, refs = [c[:-1] for c in test], [c[-1]["content"] for c in test]
    start = time.perf_counter()
    cpu = time.process_time()
    rows, base_ppl = [], None
    for name, train_file in runs.items():
        cfg = load_config(
            ROOT / "configs/lora.yaml",
            [
                f"data.train={train_file}",
                f"output_dir={out / name}",
                f"training.max_steps={args.steps}",
            ],
        )
        train(cfg, overwrite=True)
        tuned, tok = load_for_inference(cfg.output_dir)
        tuned = tuned.merge_and_unload()
        samples = text_samples(tok, texts, cfg.data.max_length)
        if base_ppl is None:
            base, _ = load_for_inference(cfg.output_dir, adapter=False)
            base_ppl = samples_nll(base, samples, tok.pad_token_id).perplexity
            base_em = exact_match(
                generate(base, tok, prompts, max_new_tokens=24, batch_size=128), refs
            )
            del base
        ppl = samples_nll(tuned, samples, tok.pad_token_id).perplexity
        em = exact_match(generate(tuned, tok, prompts, max_new_tokens=24, batch_size=128), refs)
        rows.append((name, ppl, em))
    print(
        f"\nforgetting on the dates task: LoRA (configs/lora.yaml), {args.steps} steps each; "
        f"dates+general = {n_dates} dates + {n_general} general instruction rows "
        f"({100 * n_general / (n_dates + n_general):.0f}%)"
    )
    print(
        f"wall {time.perf_counter() - start:.0f} s, CPU {time.process_time() - cpu:.0f} s, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        f"| training data | general-text perplexity | change vs base | "
        f"dates exact match ({len(refs)} test examples) |"
    )
    print("| --- | --- | --- | --- |")
    print(f"| (base model, no training) | {base_ppl:.3f} | - | {base_em:.1f}% |")
    for name, ppl, em in rows:
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / base_ppl - 1):+.1f}% | {em:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

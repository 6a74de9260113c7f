"""`make demo`: LoRA-tune the built-in model on the dates task; print base vs fine-tuned.

The before/after table is measured on examples/dates/test.jsonl, which training never sees
(eval.jsonl drives early stopping; test.jsonl is only used here).
"""

import sys
import time
from pathlib import Path

from tuneforge.accel.memory import reexec_with_jemalloc
from tuneforge.config import load_config
from tuneforge.data.dataset import load_conversations
from tuneforge.errors import TuneforgeError
from tuneforge.eval.metrics import exact_match
from tuneforge.infer.generate import generate
from tuneforge.infer.runs import load_for_inference
from tuneforge.train import train

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def main() -> int:
    reexec_with_jemalloc()  # as `tuneforge train` runs: jemalloc when installed (accel/memory.py)
    cfg = load_config(ROOT / "configs" / "lora.yaml", sys.argv[1:])
    start = time.perf_counter()
    train(cfg, overwrite=True)
    train_s = time.perf_counter() - start
    convs, _ = load_conversations(str(HERE / "test.jsonl"))
    prompts = [c[:-1] for c in convs]
    refs = [c[-1]["content"] for c in convs]
    rows = {}
    for name, adapter in (("base model", False), ("fine-tuned (LoRA)", True)):
        model, tok = load_for_inference(cfg.output_dir, adapter=adapter)
        preds = generate(model, tok, prompts, max_new_tokens=24)
        rows[name] = (exact_match(preds, refs), preds)
    print()
    print(f"dates task, {len(refs)} held-out examples never trained on (train: {train_s:.0f} s)")
    print("| model | exact match |\n| --- | --- |")
    for name, (em, _) in rows.items():
        print(f"| {name} | {em:.1f}% |")
    gain = rows["fine-tuned (LoRA)"][0] - rows["base model"][0]
    print(f"\nfine-tuning gained {gain:+.1f} points of exact match\n")
    print("samples:")
    for i in range(5):
        print(f"  input:      {prompts[i][-1]['content'].splitlines()[-1]}")
        print(f"  expected:   {refs[i]}")
        print(f"  base:       {rows['base model'][1][i]!r}")
        print(f"  fine-tuned: {rows['fine-tuned (LoRA)'][1][i]!r}\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TuneforgeError as e:  # a user's mistake (a bad setting): one line, as the CLI does
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

"""How long `tuneforge eval` takes on the dates task with the built-in model (CPU figures).

Makes 200 fresh dates examples that no split contains (examples/dates/make_data.py's generator,
another seed), then times on them:

1. the fine-tuned model alone (generate + exact match): the "evaluate 200 examples" figure;
2. the same with the plain path (LoRA not merged, no shared-prefix KV reuse, batches of 16) to
   show what the fast path buys, and that both give the same answers;
3. the whole `tuneforge eval` (base zero-shot and few-shot, fine-tuned, fine-tuned + few-shot,
   forgetting on the general text, report).

Wall and CPU seconds are printed (CPU time is steadier when the machine is shared). Needs a
trained run: ``--run`` (default runs/dates-lora, trained with configs/lora.yaml if missing).

    python bench/eval_bench.py [--run runs/dates-lora] [--n 200] [--skip-plain] [--skip-full]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def fresh_dates(n: int, path: Path) -> Path:
    """n dates examples whose dates appear in none of train/eval/test."""
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "examples/dates/make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    import datetime as dt

    used = set()
    for split in ("train", "eval", "test"):
        for line in (ROOT / f"examples/dates/{split}.jsonl").read_text().splitlines():
            used.add(dt.date.fromisoformat(json.loads(line)["output"]))
    rows = make_data.make(n, random.Random(98765), used)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/dates-lora")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--skip-full", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from tuneforge.config import load_config
    from tuneforge.data.dataset import load_conversations
    from tuneforge.eval.evaluate import evaluate_run, summary_lines
    from tuneforge.eval.metrics import exact_match
    from tuneforge.infer.generate import generate
    from tuneforge.infer.runs import is_run, load_for_inference
    from tuneforge.train import train

    run = Path(args.run)
    if not is_run(run):
        print(f"training {run} with configs/lora.yaml first", file=sys.stderr)
        train(load_config(ROOT / "configs/lora.yaml", [f"output_dir={run}"]), overwrite=True)
    data = fresh_dates(args.n, run / "bench_dates.jsonl")
    convs, _ = load_conversations(str(data))
    prompts, refs = [c[:-1] for c in convs], [c[-1]["content"] for c in convs]
    rows = []

    model, tok = load_for_inference(str(run))
    merged = load_for_inference(str(run))[0].merge_and_unload()
    with Clock() as c:
        fast = generate(
            merged, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=128, progress=True
        )
    rows.append(("fine-tuned only, fast path (merged, shared prefix, batch 128)", c, fast))
    if not args.skip_plain:
        with Clock() as c:
            plain = generate(
                model,
                tok,
                prompts,
                max_new_tokens=args.max_new_tokens,
                batch_size=16,
                share_prefix=False,
                progress=True,
            )
        rows.append(("fine-tuned only, plain path (adapter on, batch 16)", c, plain))
        same = sum(a == b for a, b in zip(fast, plain, strict=True))
        print(f"fast and plain path agree on {same}/{len(fast)} answers", flush=True)
    del model, merged

    print(
        f"\n{args.n} held-out dates examples, built-in model, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    print("| what | wall s | CPU s | exact match |\n| --- | --- | --- | --- |")
    for name, c, preds in rows:
        print(f"| {name} | {c.wall:.1f} | {c.cpu:.1f} | {exact_match(preds, refs):.1f}% |")
    if not args.skip_full:
        with Clock() as c:
            r = evaluate_run(run, str(data), [f"eval.max_new_tokens={args.max_new_tokens}"])
        print(
            f"| whole `tuneforge eval` (4 systems, forgetting, report) | {c.wall:.1f} | "
            f"{c.cpu:.1f} | {r['scores']['fine-tuned']['exact_match']:.1f}% |"
        )
        print("\nsteps of the whole eval (wall s):", json.dumps(r["timing"]))
        print("\n".join(summary_lines(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

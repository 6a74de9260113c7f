"""Fused ops on and off (training.fused_ops), interleaved in one process: forward + backward of
the same packed LoRA micro-batches of the built-in model, as the trainer runs them.

    .venv/bin/python bench/fused_bench.py                 # 1 and 2 threads
    .venv/bin/python bench/fused_bench.py --threads 2 --reps 6

Whole benchmark runs (bench/sft_bench.py) move by more than this difference from run to run on
a shared machine; alternating on and off in one process puts both under the same conditions.
Numbers are printed, not asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sft_bench import LORA, MAX_LENGTH, load_everything  # noqa: E402


def micro_batches(train, pad_id: int, n: int) -> list[dict]:
    """The first ``n`` micro-batches of 2 packed rows, joined into one row as the trainer does."""
    from tuneforge.accel.attention import cu_seq_lens
    from tuneforge.data.batching import collate_packed, pack_rows

    rows = pack_rows(train, MAX_LENGTH, 42, 0)
    out = []
    for i in range(0, 2 * n, 2):
        samples = [train[j] for row in rows[i : i + 2] for j in row]
        batch = collate_packed([samples], pad_id, varlen=True)
        batch["cu_seq_lens_q"] = cu_seq_lens(batch["position_ids"])
        out.append(batch)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--micro-batches", type=int, default=2)
    args = p.parse_args()

    from tuneforge.accel.attention import register
    from tuneforge.accel.fused import fused_ops
    from tuneforge.config import MethodConfig
    from tuneforge.methods import apply_method
    from tuneforge.train.sft import SFTObjective

    torch.manual_seed(0)
    model, tok, train, _ = load_everything(40, 0)
    model = apply_method(model, MethodConfig(name="lora", **LORA))
    model.config._attn_implementation = register()
    model.train()
    batches = micro_batches(train, tok.pad_token_id, args.micro_batches)
    tokens = sum(b["input_ids"].numel() for b in batches)
    objective = SFTObjective()

    def step(fused: bool) -> float:
        with fused_ops(model, fused):
            start = time.perf_counter()
            for b in batches:
                objective.loss_sum(model, b).backward()
            return time.perf_counter() - start

    print(f"{len(batches)} micro-batches, {tokens} tokens, LoRA r16 q/k/v/o, fp32\n")
    print("| threads | fused_ops false ms/token (median) | true | change |")
    print("| --- | --- | --- | --- |")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        step(False), step(True)  # warm up
        times: dict[bool, list[float]] = {False: [], True: []}
        for rep in range(args.reps):
            for fused in (False, True) if rep % 2 == 0 else (True, False):
                times[fused].append(step(fused))
        off, on = (1000 * statistics.median(times[f]) / tokens for f in (False, True))
        print(f"| {threads} | {off:.2f} | {on:.2f} | {100 * (on / off - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

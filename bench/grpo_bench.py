"""GRPO on a task a rule can check (dates -> YYYY-MM-DD): the base model, a short SFT run, and
SFT -> GRPO (configs/grpo.yaml on the merged SFT model), each scored on examples/dates/test.jsonl
(never trained on) by exact match and by GRPO's own reward, greedy; with the training time of
each stage. The SFT run is kept short on purpose, so there is room above it. Numbers are
printed, not asserted.

    .venv/bin/python bench/grpo_bench.py
    .venv/bin/python bench/grpo_bench.py --sft-steps 10 --grpo-steps 30 --out bench_runs/grpo
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    from tuneforge.config import load_config
    from tuneforge.data.dataset import load_conversations
    from tuneforge.eval.metrics import exact_match
    from tuneforge.infer.export import merge
    from tuneforge.infer.generate import generate
    from tuneforge.infer.runs import load_for_inference
    from tuneforge.train import train
    from tuneforge.train.reward_functions import combine, load_rewards, score_all

    p = argparse.ArgumentParser()
    p.add_argument("--sft-steps", type=int, default=10)
    p.add_argument("--grpo-steps", type=int, default=30)
    p.add_argument("--out", default="bench_runs/grpo")
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--grpo", nargs="*", default=[], help="overrides for configs/grpo.yaml")
    args = p.parse_args()
    out = Path(args.out)

    convs, _ = load_conversations(str(ROOT / "examples" / "dates" / "test.jsonl"))
    convs = convs[: args.n_test]
    prompts = [c[:-1] for c in convs]
    refs = [c[-1]["content"] for c in convs]
    grpo_cfg = load_config(
        ROOT / "configs" / "grpo.yaml",
        [
            f"model={out / 'sft-merged'}",
            f"output_dir={out / 'grpo'}",
            f"training.max_steps={args.grpo_steps}",
            *args.grpo,
        ],
    )
    t = grpo_cfg.training
    rewards = load_rewards(t.reward_functions, t.response_length)

    def score(model, tok) -> tuple[float, float]:
        preds = generate(model, tok, prompts, max_new_tokens=24)
        tokens = [len(tok(x, add_special_tokens=False)["input_ids"]) for x in preds]
        per_function = score_all(rewards, prompts, preds, {"answer": refs}, tokens)
        return exact_match(preds, refs), float(combine(per_function, t.reward_weights).mean())

    rows = []
    sft_cfg = load_config(
        ROOT / "configs" / "lora.yaml",
        [
            f"output_dir={out / 'sft'}",
            f"training.max_steps={args.sft_steps}",
            "training.eval_steps=0",
            "training.early_stopping_patience=0",
        ],
    )
    start = time.perf_counter()
    train(sft_cfg, overwrite=True)
    sft_s = time.perf_counter() - start
    model, tok = load_for_inference(str(out / "sft"), adapter=False)
    rows.append(("base (SmolLM2-135M-Instruct)", *score(model, tok), "-"))
    model, tok = load_for_inference(str(out / "sft"))
    rows.append((f"SFT, LoRA, {args.sft_steps} steps", *score(model, tok), f"{sft_s:.0f}"))
    merge(out / "sft", out / "sft-merged", overwrite=True)
    start = time.perf_counter()
    summary = train(grpo_cfg, overwrite=True)
    grpo_s = time.perf_counter() - start
    model, tok = load_for_inference(str(out / "grpo"))
    label = f"SFT -> GRPO, LoRA, {summary['steps']} steps (best eval at {summary['best_step']})"
    rows.append((label, *score(model, tok), f"{grpo_s:.0f}"))

    n = len(refs)
    print(f"\ndates task, {n} held-out prompts (examples/dates/test.jsonl), greedy")
    print(
        f"reward: {' + '.join(f'{w:g} x {r.name}' for w, r in zip(t.reward_weights or [1.0] * len(rewards), rewards, strict=True))}"
    )
    print("| stage | exact match | mean reward | training s |\n| --- | --- | --- | --- |")
    for name, em, reward, secs in rows:
        print(f"| {name} | {em:.1f}% | {reward:.3f} | {secs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

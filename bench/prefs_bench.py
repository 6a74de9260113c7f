"""The preference pipelines on the built-in model, measured: SFT -> reward -> PPO and SFT -> DPO
on the "answer format" task (examples/prefs). Numbers are printed, not asserted.

    .venv/bin/python bench/prefs_bench.py           # the README table (~15 min on 2 shared cores)
    .venv/bin/python bench/prefs_bench.py --smoke   # tiny-llama, tiny steps: checks the script

Every stage runs the shipped config (configs/prefs-sft.yaml, reward.yaml, dpo.yaml, ppo.yaml)
with only the paths changed (and, with --smoke, the sizes). The preferred property (one short
line ``Answer: ...``, ``examples/prefs/reward.py:has_property``) is counted in greedy responses
to the 40 held-out prompts of examples/prefs/test.jsonl, which no stage trains on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PREFS = ROOT / "examples" / "prefs"


def load_property():
    spec = importlib.util.spec_from_file_location("prefs_reward", PREFS / "reward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.has_property


def stage(config: str, overrides: dict, smoke: bool) -> tuple[dict, float]:
    from tuneforge.config import load_config
    from tuneforge.train import train

    if smoke:
        overrides = {"model": "tiny-llama", "training.max_steps": 2, **overrides}
    cfg = load_config(ROOT / "configs" / config, [f"{k}={v}" for k, v in overrides.items()])
    cfg.training.progress = False
    start = time.perf_counter()
    summary = train(cfg, overwrite=True)
    return summary, time.perf_counter() - start


@torch.no_grad()
def measure(run_or_model: str, prompts, answers, has_property, rm, max_new_tokens: int):
    """(property rate, answer-contained rate, mean reward-model score) of greedy responses."""
    from tuneforge.infer.generate import generate
    from tuneforge.infer.runs import load_for_inference
    from tuneforge.train.reward import score

    model, tok = load_for_inference(run_or_model)
    replies = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=20)
    prop = sum(map(has_property, replies)) / len(replies)
    correct = sum(a.lower() in r.lower() for a, r in zip(answers, replies, strict=True)) / len(
        replies
    )
    rm_model, rm_tok = rm
    mean_score = sum(score(rm_model, rm_tok, prompts, replies)) / len(replies)
    return prop, correct, mean_score, replies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-prefs"))
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy box)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny-llama, 2 steps a stage")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    has_property = load_property()
    from tuneforge.data.preference import load_prompts
    from tuneforge.infer.export import merge
    from tuneforge.train.reward import load_reward_model

    times = {}
    sft, times["SFT"] = stage("prefs-sft.yaml", {"output_dir": out / "sft"}, args.smoke)
    start = time.perf_counter()
    merged = merge(out / "sft", out / "sft-merged", overwrite=True)
    times["merge"] = time.perf_counter() - start
    common = {"model": merged}
    reward, times["reward model"] = stage(
        "reward.yaml", {**common, "output_dir": out / "reward"}, args.smoke
    )
    dpo, times["DPO"] = stage("dpo.yaml", {**common, "output_dir": out / "dpo"}, args.smoke)
    ppo_over = {**common, "output_dir": out / "ppo", "training.reward_model": out / "reward"}
    ppo_over["data.eval"] = ""  # measured below on the test prompts instead
    ppo, times["PPO"] = stage("ppo.yaml", ppo_over, args.smoke)

    rows = [json.loads(x) for x in (PREFS / "test.jsonl").read_text().splitlines()]
    prompts = load_prompts(str(PREFS / "test.jsonl"))
    answers = [r["answer"] for r in rows]
    if args.smoke:
        prompts, answers = prompts[:8], answers[:8]
    rm = load_reward_model(out / "reward")
    start = time.perf_counter()
    results = {}
    base = "tiny-llama" if args.smoke else "smollm2-135m-instruct"
    for name, ref in (
        ("SmolLM2-135M-Instruct (no tuning)", base),
        ("after SFT", str(out / "sft")),
        ("after SFT -> DPO", str(out / "dpo")),
        ("after SFT -> reward -> PPO", str(out / "ppo")),
    ):
        results[name] = measure(ref, prompts, answers, has_property, rm, 24)
    times["generation on test prompts"] = time.perf_counter() - start

    ppo_log = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    ppo_log = [x for x in ppo_log if "reward" in x]
    k = max(1, len(ppo_log) // 4)
    first = sum(x["reward"] for x in ppo_log[:k]) / k
    last = sum(x["reward"] for x in ppo_log[-k:]) / k

    n = len(prompts)
    print(f"\npreferred format ('Answer: ...', one line, <= 8 words) in greedy replies to {n} "
          "held-out prompts (24 new tokens)\n")  # fmt: skip
    print("| model | preferred format | answer in reply | mean reward-model score |")
    print("| --- | --- | --- | --- |")
    for name, (prop, correct, mean_score, _) in results.items():
        print(f"| {name} | {prop:.1%} | {correct:.1%} | {mean_score:+.3f} |")
    acc = reward["best_eval_metrics"].get("accuracy")
    print(f"\nreward model: held-out pairwise accuracy {acc:.1%} ({reward['eval_samples']} pairs)")
    dm = dpo["best_eval_metrics"]
    print(
        f"DPO held-out: reward accuracy {dm.get('rewards_accuracy', 0):.1%}, "
        f"margin {dm.get('rewards_margin', 0):+.3f}"
    )
    print(
        f"PPO mean reward (reward model) over the first {k} steps {first:+.3f} -> last {k} "
        f"steps {last:+.3f}; per step: " + ", ".join(f"{x['reward']:+.2f}" for x in ppo_log)
    )
    print(f"PPO KL to reference per response, last step: {ppo_log[-1]['kl']:.3f}")
    print("\nseconds: " + ", ".join(f"{name} {s:.0f}" for name, s in times.items()))
    print(f"total {sum(times.values()):.0f} s, torch threads {args.threads}")
    print("\nsample replies (first 3 test prompts):")
    for i in range(min(3, n)):
        print(f"  {prompts[i][-1]['content']}")
        for name, (*_, replies) in results.items():
            print(f"    {name}: {replies[i]!r}")


if __name__ == "__main__":
    main()

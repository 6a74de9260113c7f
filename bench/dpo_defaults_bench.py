"""DPO from the base model on a sign-off style task, over learning rates and betas: does the
preferred property rise, and does the model stay intact (general-text perplexity, degeneration)?

The data are made here, not taken from examples/prefs: short "tell me a fact" prompts over many
topics; the built-in model answers each (greedy, as it would anyway; answers it does not finish
within 64 tokens are left out), and a pair is that answer with a friendly sign-off appended
(chosen) against the bare answer (rejected). 320 pairs train, 40 are held out (fewer when fewer answers finish: 160 and 21 in the measured run). Each setting trains LoRA r16 on q/k/v/o for one epoch (40 steps of 8
pairs) and is scored by `tuneforge eval` (eval/preference.py) with `eval.property` = the
sign-off at the end of the answer. Numbers are printed, not asserted.

    .venv/bin/python bench/dpo_defaults_bench.py --settings 5e-4:0.1,5e-4:0.5:1

Settings are lr:beta[:rpo_alpha]; the measured grid and the shipped choice (configs/dpo-base.yaml:
5e-4, beta 0.5, rpo_alpha 1) are in docs/evaluation.md and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

SIGN_OFF = "Hope this helps!"
MAX_ANSWER = 64  # tokens; the held-out answers get 96
TOPICS = (
    "rivers cats volcanoes honey bees the moon deserts owls glaciers coffee chess bread salt "
    "whales tea copper maps clocks bridges tigers rain lightning paper glass silk pepper rice "
    "sharks frogs snow deserts islands caves penguins tomatoes wool iron bicycles trains ships "
    "lighthouses castles pyramids stars comets mushrooms bamboo cotton lemons apples wolves "
    "eagles ants spiders dolphins octopuses rubber candles mirrors bells kites violins pianos "
    "drums maps wheat corn potatoes olives grapes cheese yogurt chocolate vanilla cinnamon "
    "ginger garlic onions carrots sunflowers roses tulips oak trees pine trees coral reefs "
    "tides clouds fog rainbows earthquakes tornadoes hurricanes magnets batteries telescopes "
    "microscopes compasses calendars alphabets numbers zero the equator the arctic the amazon"
).split()
ASKS = (
    "Tell me one short fact about {}.",
    "Give me a quick fact about {}.",
    "What is one interesting thing about {}?",
    "Share a short fact about {}.",
)


def make_data(out: Path, n_train: int = 320, n_held: int = 40) -> tuple[Path, Path]:
    """The pairs, made once into ``out`` (the model's own finished answers, with and without
    the sign-off)."""
    from tuneforge.infer.generate import generate
    from tuneforge.models import load_model

    train, held = out / "train.jsonl", out / "held.jsonl"
    if train.is_file() and held.is_file():
        return train, held
    prompts = []
    for ask in ASKS:
        for topic in dict.fromkeys(TOPICS):
            prompts.append(ask.format(topic))
    prompts = prompts[: n_train + n_held + 100]  # room for the answers that do not finish
    model, tok, _ = load_model("smollm2-135m-instruct")
    answers = generate(
        model, tok, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=MAX_ANSWER
    )
    # only answers the model finished (an answer cut at the limit with a sign-off glued on
    # would teach something else)
    rows = [
        {"prompt": p, "chosen": f"{a.strip()} {SIGN_OFF}", "rejected": a.strip()}
        for p, a in zip(prompts, answers, strict=True)
        if a.strip() and len(tok(a, add_special_tokens=False)["input_ids"]) < MAX_ANSWER - 2
    ]
    out.mkdir(parents=True, exist_ok=True)
    # held-out prompts share no topic-ask pair with training; every 9th row is held out
    held_rows = rows[::9][:n_held]
    train_rows = [r for i, r in enumerate(rows) if i % 9][:n_train]
    train.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    held.write_text("".join(json.dumps(r) + "\n" for r in held_rows))
    return train, held


def main() -> int:
    from tuneforge.config import load_config
    from tuneforge.eval.evaluate import evaluate_run
    from tuneforge.train import train

    p = argparse.ArgumentParser()
    p.add_argument(
        "--settings",
        default="5e-4:0.1,5e-4:0.1:1,2e-4:0.1:1",
        help="lr:beta[:rpo_alpha],... (rpo_alpha: weight of the chosen responses' NLL, default 0)",
    )
    p.add_argument("--out", default="bench_runs/dpo_defaults")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the starting model")
    args = p.parse_args()
    out = Path(args.out)
    train_file, held_file = make_data(out / "data")
    n_train = sum(1 for _ in train_file.open())
    rows = []
    for setting in args.settings.split(","):
        lr, beta, rpo = (setting.split(":") + ["0"])[:3]
        name = f"lr{lr}-beta{beta}-rpo{rpo}"
        cfg = load_config(
            ROOT / "configs" / "dpo.yaml",
            [
                f"model={args.model}",
                f"output_dir={out / name}",
                f"data.train={train_file}",
                f"data.eval={held_file}",
                f"training.learning_rate={lr}",
                f"training.beta={beta}",
                f"training.rpo_alpha={rpo}",
                "training.early_stopping_patience=0",
                "training.eval_steps=0",
            ],
        )
        start = time.perf_counter()
        summary = train(cfg, overwrite=True)
        secs = time.perf_counter() - start
        r = evaluate_run(
            str(out / name),
            overrides=[f"eval.property={SIGN_OFF}\\s*$", "eval.max_new_tokens=96"],
        )
        g = r["guards"]
        rows.append(
            (
                lr,
                beta,
                rpo,
                summary["steps"],
                r["pairwise"]["accuracy"],
                r["property"]["start"],
                r["property"]["fine-tuned"],
                g["perplexity_change"]["value"],
                g["repetitive"]["fine-tuned"],
                g["off_script"]["fine-tuned"],
                g["unfinished"]["fine-tuned"],
                r["intact"],
                secs,
            )
        )
        print(json.dumps({"setting": name, "verdict": r["verdict"]}), flush=True)
    n_held = sum(1 for _ in held_file.open())
    print(
        f"\nDPO from {args.model}, {n_train} sign-off pairs, 1 epoch, LoRA r16; "
        f"{n_held} held-out pairs"
    )
    print(
        "| lr | beta | rpo_alpha | steps | held-out pair acc | sign-off share start -> tuned | "
        "general-text ppl | repetitive | off-script | cut | intact | train s |"
    )
    print("| --- " * 12 + "|")
    for lr, beta, rpo, steps, acc, s0, s1, ppl, rep, off, cut, ok, secs in rows:
        print(
            f"| {lr} | {beta} | {rpo} | {steps} | {acc:.0%} | {s0:.0%} -> {s1:.0%} | {ppl:+.1%} | "
            f"{rep:.0%} | {off:.0%} | {cut:.0%} | {ok} | {secs:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

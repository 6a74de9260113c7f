"""``tuneforge sweep`` on a booking-extraction task of our own making: does the sweep's best
setting beat the shipped configs/lora.yaml on held-out data?

The task (chat records): a restaurant booking message -> ``{"name", "people", "day", "time"}``
with the time in 24-hour form ("5:45pm" -> "17:45"), messages in many phrasings. Made here with a
fixed seed into OUT/data: train, a validation file (the sweep's metric is measured on it) and a
test file (only the final comparison reads it). The sweep is ``tuneforge sweep`` itself, on
configs/lora.yaml with the data paths changed, over learning rate, rank and epochs, 2 seeds,
judged by exact match on the validation file. Then the default config and best.yaml are each
trained once (seed 42) and scored on the test file. Numbers are printed, not asserted.

    .venv/bin/python bench/sweep_bench.py --out bench_runs/sweep
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

NAMES = ("Garcia Chen Okafor Novak Rossi Silva Kim Haddad Larsen Moreau Tanaka Weber Costa "
         "Patel Murphy Ivanova Dubois Nakamura Fischer Alvarez Kowalski Mensah Olsen Ricci").split()  # fmt: skip
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
ASKS = (
    "Book a table for {people} under {name} on {day} at {time}.",
    "Hi, could I reserve for {people} people on {day}, {time}? Name: {name}.",
    "{name} here - table for {people}, {day} {time} please.",
    "Please make a reservation: {people} guests, {day} at {time}, name {name}.",
    "We'd like to come on {day} around {time}, party of {people}. It's under {name}.",
    "Reservation for {name}, {people} persons, {day}, {time}.",
)
INSTRUCTION = (
    "Extract the booking as JSON with keys name, people, day, time (time in 24-hour HH:MM)."
)


def clock(rng: random.Random) -> tuple[str, str]:
    """A time as people write it, and as HH:MM."""
    hour = rng.choice([11, 12, 13, 14, 17, 18, 19, 20, 21])
    minute = rng.choice([0, 15, 30, 45])
    h12 = hour - 12 if hour > 12 else hour
    suffix = "pm" if hour >= 12 else "am"
    written = rng.choice(
        [f"{h12}:{minute:02d}{suffix}", f"{h12}:{minute:02d} {suffix.upper()}"]
        + ([f"{h12}{suffix}"] if minute == 0 else [])
    )
    return written, f"{hour:02d}:{minute:02d}"


def make_data(out: Path, n_train: int, n_val: int, n_test: int, seed: int = 7) -> dict:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n_train + n_val + n_test:
        name, day, people = rng.choice(NAMES), rng.choice(DAYS), rng.randint(1, 12)
        written, hhmm = clock(rng)
        text = rng.choice(ASKS).format(name=name, day=day, people=people, time=written)
        if text in seen:
            continue
        seen.add(text)
        answer = json.dumps({"name": name, "people": people, "day": day, "time": hhmm})
        rows.append({"messages": [{"role": "user", "content": f"{INSTRUCTION}\n\n{text}"},
                                  {"role": "assistant", "content": answer}]})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    parts = {"train": rows[:n_train], "val": rows[n_train : n_train + n_val],
             "test": rows[n_train + n_val :]}  # fmt: skip
    paths = {}
    for name, part in parts.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def tuneforge(*args: str) -> None:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tuneforge", *args], cwd=ROOT, check=True)
    print(f"[{time.perf_counter() - start:.0f} s] tuneforge {' '.join(args[:2])}", flush=True)


def test_exact_match(run: Path, test: Path) -> float:
    from tuneforge.eval.evaluate import evaluate_run

    r = evaluate_run(str(run), data=str(test), overrides=["eval.few_shot_k=0",
                     "eval.general_text=none", "eval.max_new_tokens=40", "eval.progress=false"])  # fmt: skip
    return r["scores"]["fine-tuned"]["exact_match"], r["scores"]["base zero-shot"]["exact_match"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench_runs/sweep")
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--n-val", type=int, default=40)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--lr", default="3e-4,1e-3")
    p.add_argument("--r", default="8,16")
    p.add_argument("--epochs", default="1,2")
    p.add_argument("--seeds", default="2")
    args = p.parse_args()
    out = Path(args.out).resolve()
    data = make_data(out / "data", args.n_train, args.n_val, args.n_test)
    common = [f"data.train={data['train']}", f"data.eval={data['val']}", "data.max_length=160",
              "training.eval_steps=4", "training.progress=false", "eval.max_new_tokens=40"]  # fmt: skip
    start = time.perf_counter()
    tuneforge("sweep", "configs/lora.yaml", f"output_dir={out / 'sweep'}", *common,
              "--param", f"training.learning_rate={args.lr}", "--param", f"method.r={args.r}",
              "--param", f"training.num_epochs={args.epochs}", "--seeds", args.seeds,
              "--metric", "exact_match")  # fmt: skip
    sweep_s = time.perf_counter() - start
    results = json.loads((out / "sweep" / "sweep.json").read_text())
    # the default and the best setting at seed 42: the sweep's own run folders where it trained
    # them with exactly those settings (configs/lora.yaml's lr 1e-3, r 16, 2 epochs is a grid
    # point), else trained here
    from tuneforge.sweep import slug

    default = {"training.learning_rate": 1e-3, "method.r": 16, "training.num_epochs": 2}
    runs = {}
    for name, params, config in (
        ("default", default, "configs/lora.yaml"),
        ("best", results["best"]["params"], str(out / "sweep" / "best.yaml")),
    ):
        run = out / "sweep" / "trials" / slug(params) / "seed-42"
        if not (run / "summary.json").is_file():
            run = out / name
            tuneforge("train", config, *common, f"output_dir={run}", "--overwrite")
        runs[name] = run
    default_em, base_em = test_exact_match(runs["default"], data["test"])
    best_em, _ = test_exact_match(runs["best"], data["test"])
    from tuneforge.sweep import describe_setting, table

    print(f"\nsweep: {sweep_s:.0f} s")
    print(table(results))
    if results["comparison"]:
        print(results["comparison"]["text"])
    print(f"\n| config | held-out exact match ({args.n_test} test examples) |\n| --- | --- |")
    print(f"| base model, zero-shot | {base_em:.1f}% |")
    print(f"| configs/lora.yaml (default) | {default_em:.1f}% |")
    print(f"| sweep's best ({describe_setting(results['best']['params'])}) | {best_em:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

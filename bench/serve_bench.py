"""Load check for `tuneforge serve`: rounds of 32 concurrent requests on loopback.

    .venv/bin/python bench/serve_bench.py                         # built-in model, 2 rounds
    .venv/bin/python bench/serve_bench.py --model tiny-llama --rounds 1
    .venv/bin/python bench/serve_bench.py --threads 1   # one CPU thread for generation

Starts a real server process (port 0: a free loopback port), sends one warm-up request, then
ROUNDS rounds of 32 requests at once through the `openai` client (a mix of chat and text
completions, half of them streamed, max_tokens 16, greedy). Bounded: 32 requests per round and a
deadline per round. Prints how many were answered, latency percentiles, and the server's RSS
before and after each round (memory should stay flat). Numbers are printed, not asserted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Give me three tips for learning Python.",
    "Convert May 4th 1999 to ISO 8601.",
]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_request(client, model: str, i: int) -> tuple[float, int]:
    """Send request ``i``; returns (seconds, completion characters)."""
    start = time.perf_counter()
    prompt = PROMPTS[i % len(PROMPTS)]
    stream = i % 2 == 1
    if i % 4 < 3:
        messages = [{"role": "user", "content": prompt}]
        if stream:
            parts = client.chat.completions.create(
                model=model, messages=messages, max_tokens=16, stream=True
            )
            text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        else:
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=16)
            text = r.choices[0].message.content
    else:
        if stream:
            parts = client.completions.create(
                model=model, prompt=prompt, max_tokens=16, stream=True
            )
            text = "".join(c.choices[0].text for c in parts)
        else:
            text = client.completions.create(model=model, prompt=prompt, max_tokens=16)
            text = text.choices[0].text
    return time.perf_counter() - start, len(text)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--deadline", type=float, default=600.0, help="seconds allowed per round")
    p.add_argument("--threads", type=int, default=None, help="passed to tuneforge serve")
    args = p.parse_args()
    from openai import OpenAI

    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "serve", args.model, "--port", "0"]
        + (["--threads", str(args.threads)] if args.threads else []),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith("serving"):
            print(f"server did not start: {line}", file=sys.stderr)
            return 1
        url = line.split(" on ")[1].strip()
        name = line.split()[1].rstrip(",")
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=args.deadline)
        one_request(client, name, 0)  # warm-up
        rows = []
        rss = [rss_mib(proc.pid)]
        for _ in range(args.rounds):
            pool = ThreadPoolExecutor(args.concurrency)
            start = time.perf_counter()
            futures = [pool.submit(one_request, client, name, i) for i in range(args.concurrency)]
            done, late = wait(futures, timeout=args.deadline)
            wall = time.perf_counter() - start
            pool.shutdown(wait=False, cancel_futures=True)  # late requests time out on their own
            ok = [f.result() for f in done if f.exception() is None]
            errors = [repr(f.exception()) for f in done if f.exception() is not None]
            rss.append(rss_mib(proc.pid))
            lat = [s for s, _ in ok]
            rows.append((len(ok), len(errors) + len(late), wall, lat, errors[:2]))
        print(
            f"\nserver: tuneforge serve {args.model} (CPU, threads: {args.threads or 'default'}), "
            f"{args.concurrency} concurrent "
            "requests per round (chat and completions, half streamed, max_tokens 16, greedy); "
            "generation is serialized (one model)\n"
        )
        print(
            "| round | answered | failed | wall s | p50 s | p90 s | p99 s | "
            "server RSS before MiB | after MiB |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for k, (n_ok, n_bad, wall, lat, errors) in enumerate(rows):
            pct = [f"{percentile(lat, q):.1f}" if lat else "-" for q in (50, 90, 99)]
            print(
                f"| {k + 1} | {n_ok}/{args.concurrency} | {n_bad} | {wall:.1f} | "
                + " | ".join(pct)
                + f" | {rss[k]:.0f} | {rss[k + 1]:.0f} |"
            )
            for e in errors:
                print(f"  error: {e}")
        print(f"\nserver still running after the load: {proc.poll() is None}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data tools at scale: dedup speed on 100k records, and peak memory of streaming commands.

    python bench/data_bench.py                 # both parts (the big file takes a few minutes)
    python bench/data_bench.py --skip-big      # only the dedup timing

(a) ``dedup`` on N generated instruction records (default 100k; 5% exact and 5% near copies
    planted), timed in a fresh process: records/s and what was found. CPU seconds next to wall
    seconds: on a machine shared with other jobs, wall time mostly measures the others.
(b) peak RSS (VmHWM of a fresh process) of ``clean`` and ``dedup`` on a small file and on
    a file of a few hundred MB, next to the RSS right after imports. Streaming commands should
    stay flat, dedup included: its index is in temporary files ("per kept record": growth in
    bytes / records kept; with the index on disk the growth is fixed buffers, not per record).

Numbers are printed (a Markdown table), never asserted. Files go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Peak RSS is VmHWM of the child's own address space: ru_maxrss would also count the parent's
# memory at fork time on Linux.
CHILD = r"""
import json, sys, time
import datasketch  # imported before the baseline, so "growth" is the work alone
from tuneforge.datatools.quality import CleanOptions, clean_file, dedup_file

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

base = peak_mb()
cmd, src, out = sys.argv[1:4]
t, cpu = time.perf_counter(), time.process_time()
if cmd == "clean":
    rep = clean_file(src, out, CleanOptions())
    found = {"kept": rep.kept, "dropped": sum(rep.dropped.values())}
else:
    rep = dedup_file(src, out)
    found = {"kept": rep.kept, "exact": rep.exact, "near": rep.near}
seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
peak = peak_mb()
print(json.dumps({"seconds": seconds, "cpu": cpu, "base_mb": base, "peak_mb": peak, **found}))
"""


def make_records(n: int, seed: int, words_per_record: tuple[int, int]) -> tuple[list[str], dict]:
    """``n`` JSONL lines of instruction records; about 5% exact and 5% near copies of earlier
    ones (one word of the output changed: word 2-gram Jaccard 0.92 or more at 48+ words)."""
    rng = random.Random(seed)
    vocab = [f"{rng.choice('bcdfghjklmnprstvz')}{rng.choice('aeiou')}{i}" for i in range(20000)]
    lines, originals = [], []
    planted = {"exact": 0, "near": 0}
    lo, hi = words_per_record
    for _ in range(n):
        r = rng.random()
        if originals and r < 0.05:
            lines.append(rng.choice(originals))
            planted["exact"] += 1
            continue
        if originals and r < 0.10:
            rec = json.loads(rng.choice(originals))
            words = rec["output"].split()
            words[rng.randrange(len(words))] = rng.choice(vocab)
            rec["output"] = " ".join(words)
            lines.append(json.dumps(rec))
            planted["near"] += 1
            continue
        k = rng.randint(lo, hi)
        rec = {
            "instruction": " ".join(rng.choice(vocab) for _ in range(8)),
            "output": " ".join(rng.choice(vocab) for _ in range(k)),
        }
        line = json.dumps(rec)
        lines.append(line)
        if len(originals) < 5000:
            originals.append(line)
        elif rng.random() < 0.01:
            originals[rng.randrange(5000)] = line
    return lines, planted


def write_file(path: Path, target_mb: float, seed: int, words: tuple[int, int]) -> int:
    """Append generated records to ``path`` until it holds ``target_mb``; returns the count."""
    n = 0
    with open(path, "w") as f:
        while f.tell() < target_mb * 2**20:
            lines, _ = make_records(500, seed + n, words)
            f.write("\n".join(lines) + "\n")
            n += len(lines)
    return n


def run_child(cmd: str, src: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(
        [sys.executable, "-c", CHILD, cmd, str(src), str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--big-mb", type=float, default=300)
    ap.add_argument("--small-mb", type=float, default=3)
    ap.add_argument("--skip-big", action="store_true")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "dedup.jsonl"
        lines, planted = make_records(args.records, 0, (40, 120))
        src.write_text("\n".join(lines) + "\n")
        del lines
        t0 = time.perf_counter()
        res = run_child("dedup", src, tmp / "dedup.out.jsonl")
        wall = time.perf_counter() - t0
        print("\n(a) dedup (exact + MinHash LSH near duplicates, threshold 0.85, word 2-grams)\n")
        print(
            "| records | MB | planted exact / near | found exact / near | dedup s | dedup CPU s "
            "| process s | records/s | records/CPU-s |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(
            f"| {args.records} | {src.stat().st_size / 2**20:.0f} | {planted['exact']} / "
            f"{planted['near']} | {res['exact']} / {res['near']} | {res['seconds']:.1f} | "
            f"{res['cpu']:.1f} | {wall:.1f} | {args.records / res['seconds']:.0f} | "
            f"{args.records / res['cpu']:.0f} |"
        )
        if args.skip_big:
            return
        print("\n(b) peak RSS of a fresh process (MB): after imports, and at the end\n")
        print(
            "| command | file MB | records | seconds | CPU s | RSS after imports | peak RSS "
            "| growth | per kept record |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, mb in (("small", args.small_mb), ("big", args.big_mb)):
            path = tmp / f"{label}.jsonl"
            n = write_file(path, mb, 1, (150, 300))
            size = path.stat().st_size / 2**20
            for cmd in ("clean", "dedup"):
                r = run_child(cmd, path, tmp / f"{label}.{cmd}.jsonl")
                (tmp / f"{label}.{cmd}.jsonl").unlink()
                growth = r["peak_mb"] - r["base_mb"]
                print(
                    f"| {cmd} | {size:.0f} | {n} | {r['seconds']:.1f} | {r['cpu']:.1f} | "
                    f"{r['base_mb']:.0f} | {r['peak_mb']:.0f} | {growth:.0f} | "
                    f"{growth * 2**20 / r['kept']:.0f} B |"
                )
            path.unlink()


if __name__ == "__main__":
    main()

"""`tuneforge estimate` against measured peak memory on the built-in model (CPU, fp32).

    .venv/bin/python bench/estimate_bench.py                     # full, lora, qlora (~10 min here)
    .venv/bin/python bench/estimate_bench.py --methods lora --steps 2
    .venv/bin/python bench/estimate_bench.py --estimates-only    # the estimate side alone

Each method trains in its own process, through tuneforge's Trainer, on examples/instruct (packed
rows of 512 tokens, batch 2, LoRA r16 on q/k/v/o with dropout 0.05, AdamW). On CPU memory is the
resident set (RSS, /proc/self/status). How the baseline is removed, the same way on both sides:
the child imports torch, transformers, peft, bitsandbytes and tuneforge, loads the tokenizer and
renders the data, then reads VmRSS: that is the baseline, before the model is loaded. After the
model is loaded and prepared it resets the peak (``echo 5 > /proc/self/clear_refs``) and runs the
steps; "measured" is the peak RSS of the steps (VmHWM) minus the baseline. The estimate likewise
leaves out the baseline (it counts only model, optimizer and step memory). The peak over the whole
process, loading included, is printed too.

qlora: the base is loaded as tuneforge.train loads it (methods.quantize.load_quantized_model:
NF4, double quantization, fp32 compute, the tied embedding / head in 4 bits too) and gets the
same LoRA through tuneforge's apply_method. Each method runs twice: "tuneforge" runs as
`tuneforge train` does (accel/memory.py): under jemalloc when it is installed, else with glibc's
mmap threshold fixed; "glibc" keeps the C library's defaults (a MALLOC_* environment is removed
for both). The header names the allocator "tuneforge" ran with.
Numbers are printed, not asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# tuneforge: as `tuneforge train` runs (jemalloc if installed, else glibc's mmap threshold fixed;
# accel/memory.py); glibc: the C library's defaults (dynamic threshold), for comparison.
MALLOCS = ("tuneforge", "glibc")
sys.path.insert(0, str(ROOT / "src"))
from tuneforge.accel.memory import find_jemalloc, preload_jemalloc  # noqa: E402

TUNEFORGE_MALLOC = "jemalloc" if find_jemalloc() else "glibc, mmap threshold 1 MiB"
CONFIG = {
    "model": "smollm2-135m-instruct",
    "output_dir": "/tmp/unused",
    "data.train": str(ROOT / "examples/instruct/train.jsonl"),
    "data.max_length": 512,
    "data.packing": True,
    "training.batch_size": 2,
    "training.gradient_accumulation": 1,
    "training.progress": False,
    "training.dtype": "float32",
    "method.r": 16,
    "method.lora_dropout": 0.05,
}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(method: str, steps: int, out: Path, malloc: str) -> None:
    if malloc == "tuneforge":  # what tuneforge.train.train does first (accel/memory.py)
        from tuneforge.accel.memory import allocator, return_freed_memory

        assert return_freed_memory() or allocator() == "jemalloc"
    import bitsandbytes  # noqa: F401  (imported before the baseline, as qlora needs it)
    import peft  # noqa: F401
    import torch

    from tuneforge.config import load_config
    from tuneforge.data.dataset import prepare_sft_data
    from tuneforge.methods import apply_method
    from tuneforge.models import load_model, load_tokenizer, resolve_model
    from tuneforge.train.loop import Trainer
    from tuneforge.train.sft import SFTObjective

    torch.manual_seed(0)
    name = "lora" if method == "qlora" else method
    cfg = load_config(None, [f"{k}={v}" for k, v in {**CONFIG, "method.name": name}.items()])
    tok = load_tokenizer(resolve_model(cfg.model))
    data = prepare_sft_data(cfg.data, tok, cfg.training.seed)
    gc.collect()
    baseline = rss_kib("VmRSS")
    if method == "qlora":  # as tuneforge.train loads it: NF4 + double quant, embedding/head too
        from tuneforge.config import MethodConfig
        from tuneforge.methods.quantize import load_quantized_model

        model, _, _ = load_quantized_model(
            cfg.model, "float32", "cpu", method=MethodConfig(name="qlora")
        )
    else:
        model, _, _ = load_model(cfg.model, "float32", "cpu")
    model.config.use_cache = False
    model = apply_method(model, cfg.method)
    loaded = rss_kib("VmRSS")
    load_peak = rss_kib("VmHWM")
    trainer = Trainer(
        model,
        SFTObjective(),
        data.train,
        [],
        cfg.training,
        Path(tempfile.mkdtemp()),
        tok.pad_token_id,
        torch.device("cpu"),
        packing=True,
        max_length=cfg.data.max_length,
    )
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times, cpu = [], []
    with trainer.running():  # fused ops and per-sample attention, as Trainer.run trains
        for step in range(steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            trainer.train_step(step)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    result = {
        "method": method,
        "baseline_mib": baseline / 1024,
        "loaded_mib": (loaded - baseline) / 1024,
        "load_peak_mib": (load_peak - baseline) / 1024,
        "train_peak_mib": (rss_kib("VmHWM") - baseline) / 1024,
        "step_seconds": times,
        "step_cpu_seconds": cpu,
        "threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps(result))


def estimates(methods: list[str]) -> dict:
    from tuneforge.config import load_config
    from tuneforge.plan.estimate import (
        estimate_method,
        matmul_flops_per_second,
        model_shape,
        settings_for,
        workload_from_config,
    )

    cfg = load_config(None, [f"{k}={v}" for k, v in {**CONFIG, "method.name": "lora"}.items()])
    shape = model_shape(cfg.model)
    work = workload_from_config(cfg, "cpu")
    rate, how = matmul_flops_per_second("cpu")
    print(f"throughput: {how}", file=sys.stderr)
    return {
        m: estimate_method(shape, work, settings_for(cfg.method, m), rate) for m in methods
    }, work


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="full,lora,qlora")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--estimates-only", action="store_true", help="print the estimates, train nothing"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--malloc", default="tuneforge", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.steps, Path(args.out), args.malloc)
        return 0
    methods = args.methods.split(",")
    est, work = estimates(methods)
    if args.estimates_only:
        print("| method | estimate MiB | est. s/step |\n| --- | --- | --- |")
        for method in methods:
            print(
                f"| {method} | {est[method].peak / 2**20:.0f} | {est[method].seconds_per_step:.1f} |"
            )
        return 0
    measured: dict[tuple[str, str], dict] = {}
    for method in methods:
        for malloc in MALLOCS:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                out = Path(f.name)
            cmd = [sys.executable, __file__, "--child", method, "--out", str(out)]
            cmd += ["--steps", str(args.steps), "--malloc", malloc]
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            env["TOKENIZERS_PARALLELISM"] = "false"
            if malloc == "tuneforge":  # as `tuneforge train` re-executes (accel/memory.py)
                env = preload_jemalloc(env) or env
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{method} failed:\n{r.stderr[-3000:]}", file=sys.stderr)
                continue
            measured[method, malloc] = json.loads(out.read_text())
            out.unlink()
            print(f"done {method} ({malloc}): {measured[method, malloc]}", file=sys.stderr)
    print(
        f"\nbuilt-in model, CPU fp32, micro-batch {work.batch_size} x {work.seq_len} tokens "
        f"(packed, {work.supervised_per_batch} supervised), LoRA r16 q/k/v/o dropout 0.05, "
        f"{args.steps} steps; MiB above the process baseline (imports + data, before model load)\n"
    )
    print(
        f"| method | estimate MiB | measured MiB (tuneforge: {TUNEFORGE_MALLOC}) | "
        "estimate / measured | measured MiB (glibc default, threshold not set) | "
        "estimate / measured | "
        "whole-process peak MiB | est. s/step | measured s/step (wall) | CPU s/step / threads |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method in methods:
        e = est[method]
        peak_mib = e.peak / 2**20
        cells = [method, f"{peak_mib:.0f}"]
        for malloc in MALLOCS:
            m = measured.get((method, malloc))
            cells += (
                [f"{m['train_peak_mib']:.0f}", f"{peak_mib / m['train_peak_mib']:.2f}"]
                if m
                else ["failed", "-"]
            )
        m = measured.get((method, "tuneforge")) or measured.get((method, "glibc"))
        if m:
            median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
            whole = max(m["load_peak_mib"], m["train_peak_mib"])
            cpu = median(m["step_cpu_seconds"]) / m["threads"]
            cells += [f"{whole:.0f}", f"{e.seconds_per_step:.1f}"]
            cells += [f"{median(m['step_seconds']):.1f}", f"{cpu:.1f}"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side SFT speed benchmark: tuneforge vs HF Trainer + peft (padded) vs TRL SFTTrainer
(packed), on the built-in model, the same samples, the same LoRA settings, fp32, no checkpointing.
Peak RSS is the peak while training (VmHWM reset after loading), without the shared eval.

    .venv/bin/python bench/sft_bench.py            # full run (~10 min on 2 cores)
    .venv/bin/python bench/sft_bench.py --n-train 24 --n-eval 8   # smoke run
    .venv/bin/python bench/sft_bench.py --device cuda              # a GPU: bf16, peak GPU memory
    .venv/bin/python bench/sft_bench.py --rounds 2   # each system twice, the second round reversed

The machine's speed drifts during a run (other tenants); with ``--rounds 2`` every system runs
once early and once late and the table has the mean, so a steady drift favours none of them.

``--device cuda`` has not run on a GPU yet (none was lent): it needs a CUDA build of torch with
this project's dependencies, and the built-in model's cached folder, which is larger than what
the workplace's GPU machine accepts from here (64 MiB).

Each system runs in its own process (peak RSS is per process). Every system is fed the same
token ids and labels (rendered once by tuneforge's renderer: chat template, labels on assistant
tokens only) and is scored by the same eval-loss code afterwards. Numbers are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LORA = dict(
    r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
)
HP = dict(learning_rate=2e-4, warmup_ratio=0.1, max_grad_norm=1.0, seed=42)
# transformers 5 folds warmup_ratio into warmup_steps (a float in [0, 1) is a ratio)
HP_HF = dict(learning_rate=2e-4, warmup_steps=0.1, max_grad_norm=1.0, seed=42)
MAX_LENGTH = 512
# The same effective batch: HF pads 4 samples x 2 accumulation; the packed systems take 2 rows of
# up to 512 tokens x 2 accumulation, about the same tokens per optimizer step (median sample ~180).
HF_BATCH, PACKED_ROWS, ACCUM = 4, 2, 2
# --device cuda reaches the per-system child processes through this variable
DEVICE = os.environ.get("TUNEFORGE_BENCH_DEVICE", "cpu")
GPU = DEVICE != "cpu"
DTYPE = "bfloat16" if GPU else "float32"  # bf16 weights, and bf16 autocast in every trainer


def load_everything(n_train: int, n_eval: int):
    from tuneforge.data.dataset import load_conversations
    from tuneforge.data.render import render_dataset
    from tuneforge.models import load_model

    model, tok, _ = load_model("smollm2-135m-instruct", dtype=DTYPE, device=DEVICE)
    data = ROOT / "examples" / "instruct"
    train_c, train_s = load_conversations(str(data / "train.jsonl"))
    eval_c, eval_s = load_conversations(str(data / "eval.jsonl"))
    train, _ = render_dataset(tok, train_c[:n_train], train_s[:n_train], MAX_LENGTH)
    evals, _ = render_dataset(tok, eval_c[:n_eval], eval_s[:n_eval], MAX_LENGTH)
    return model, tok, train, evals


@torch.no_grad()
def eval_loss(model, tok, samples) -> float:
    """The same scoring for every system: plain full-logits CE over supervised tokens, padded."""
    from tuneforge.data.batching import iterate_eval
    from tuneforge.losses import causal_lm_loss_sum

    model.eval()
    total = units = 0.0
    for b in iterate_eval(samples, 4, tok.pad_token_id):
        b = {k: v.to(DEVICE) for k, v in b.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        total += float(causal_lm_loss_sum(logits.float(), b["labels"]))
        units += int((b["labels"][:, 1:] != -100).sum())
    return total / units


def run_tuneforge(model, tok, train, tmp: Path, fused: bool = True) -> None:
    from tuneforge.accel.memory import return_freed_memory
    from tuneforge.config import MethodConfig, TrainingConfig
    from tuneforge.methods import apply_method
    from tuneforge.train.loop import Trainer
    from tuneforge.train.sft import SFTObjective

    return_freed_memory()  # as `tuneforge train` does first (glibc mmap threshold)
    model = apply_method(model, MethodConfig(name="lora", **LORA))
    t = TrainingConfig(
        num_epochs=1,
        batch_size=PACKED_ROWS,
        gradient_accumulation=ACCUM,
        lr_scheduler="cosine",
        progress=False,
        save_steps=10**9,
        fused_ops=fused,
        **HP,
    )
    trainer = Trainer(
        model,
        SFTObjective(),
        train,
        [],
        t,
        tmp,
        tok.pad_token_id,
        torch.device(DEVICE),
        packing=True,
        max_length=MAX_LENGTH,
    )
    start = clock()
    trainer.run()
    return model, elapsed(start)


def clock() -> tuple[float, float]:
    sync()
    return time.perf_counter(), time.process_time()


def elapsed(start: tuple[float, float]) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) since ``start``. CPU seconds
    are the fairer measure on a machine shared with other jobs, when each system runs with one
    thread."""
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def _hf_dataset(train, with_mask: bool):
    from datasets import Dataset

    rows = []
    for s in train:
        row = {"input_ids": s.input_ids, "labels": s.labels}
        if with_mask:
            row["attention_mask"] = [1] * len(s)
        rows.append(row)
    return Dataset.from_list(rows)


def run_hf(model, tok, train, tmp: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    args = TrainingArguments(
        output_dir=str(tmp),
        per_device_train_batch_size=HF_BATCH,
        gradient_accumulation_steps=ACCUM,
        num_train_epochs=1,
        lr_scheduler_type="cosine",
        save_strategy="no",
        report_to=[],
        use_cpu=not GPU,
        bf16=GPU,
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_steps=10**6,
        **HP_HF,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_hf_dataset(train, True),
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
    )
    start = clock()
    trainer.train()
    return model, elapsed(start)


def run_trl(model, tok, train, tmp: Path):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp),
        per_device_train_batch_size=PACKED_ROWS,
        gradient_accumulation_steps=ACCUM,
        num_train_epochs=1,
        lr_scheduler_type="cosine",
        save_strategy="no",
        report_to=[],
        use_cpu=not GPU,
        bf16=GPU,
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_steps=10**6,
        packing=True,
        max_length=MAX_LENGTH,
        **HP_HF,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=_hf_dataset(train, False),
        processing_class=tok,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
    )
    start = clock()
    trainer.train()
    return trainer.model, elapsed(start)


def useful_flops(model_cfg, train) -> float:
    """Model FLOPs of one LoRA epoch: forward (2 per weight per token) + backward to activations
    (2 more; frozen weights need no weight gradient), causal attention per sample, and the LM head
    only where a token is supervised (the work a loss actually needs). Adapter FLOPs are ignored."""
    d, L, V = model_cfg.hidden_size, model_cfg.num_hidden_layers, model_cfg.vocab_size
    kv = model_cfg.num_key_value_heads * (d // model_cfg.num_attention_heads)
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * model_cfg.intermediate_size  # q,o + k,v + mlp
    flops = 0.0
    for s in train:
        T = len(s)
        flops += 4 * per_layer * L * T  # forward + activation backward
        flops += 3 * (2 * L * T * T * d)  # causal QK^T and AV (T^2/2 each, x2 flops), fwd+bwd
        flops += 4 * d * V * s.supervised_token_count  # head fwd + bwd at supervised positions
    return flops


def matmul_peak(threads: int) -> float:
    torch.set_num_threads(threads)
    n = 8192 if GPU else 2048
    dtype = torch.bfloat16 if GPU else torch.float32
    a, b = (torch.randn(n, n, dtype=dtype, device=DEVICE) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(10):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def reset_peak_rss() -> None:
    """Linux: restart the process's peak resident set (VmHWM) from its current size (on a GPU:
    the peak of allocated GPU memory)."""
    if GPU:
        torch.cuda.reset_peak_memory_stats()
        return
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    if GPU:
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(system: str, n_train: int, n_eval: int, out: Path) -> None:
    from tuneforge.accel import kernels
    from tuneforge.accel.memory import allocator

    torch.manual_seed(0)
    model, tok, train, evals = load_everything(n_train, n_eval)
    runner = {
        "tuneforge": run_tuneforge,
        "tuneforge-plain": lambda *a: run_tuneforge(*a, fused=False),
        "tuneforge-torchops": run_tuneforge,  # TUNEFORGE_KERNELS=0 (child_env)
        "hf": run_hf,
        "trl": run_trl,
    }[system.split("+")[0]]
    with tempfile.TemporaryDirectory() as tmp:
        reset_peak_rss()  # the training peak: the model is loaded, the shared eval comes after
        model, (seconds, cpu_seconds) = runner(model, tok, train, Path(tmp))
        train_peak = peak_rss_mb()
    loss = eval_loss(model, tok, evals)
    result = {
        "system": system,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "supervised_tokens": sum(s.supervised_token_count for s in train),
        "tokens": sum(len(s) for s in train),
        "flops": useful_flops(
            model.config if hasattr(model, "config") else model.base_model.config, train
        ),
        "eval_loss": loss,
        "peak_rss_mb": train_peak,
        "samples": len(train),
        "malloc": allocator(),
        "cpu_kernels": kernels.loaded(),
    }
    out.write_text(json.dumps(result))


NAMES = {
    "tuneforge": "tuneforge (packed, selective head)",
    "tuneforge-plain": "tuneforge, training.fused_ops false",
    "tuneforge-torchops": "tuneforge, fused ops without the C++ kernels",
    "hf": "HF Trainer + peft (padded)",
    "trl": "TRL SFTTrainer (packing)",
}


def child_env(system: str) -> dict:
    """The allocator each system runs with: tuneforge as `tuneforge train` runs (jemalloc when
    installed, accel/memory.py); the others with the system's malloc, as their users run them,
    unless the system is named with +jemalloc (e.g. hf+jemalloc). tuneforge+glibc opts out."""
    from tuneforge.accel.memory import CHOICE_ENV, preload_jemalloc

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    name, _, malloc = system.partition("+")
    if name == "tuneforge-torchops":
        env["TUNEFORGE_KERNELS"] = "0"
    if name.startswith("tuneforge"):
        malloc = malloc or os.environ.get(CHOICE_ENV, "jemalloc")
    return (malloc == "jemalloc" and preload_jemalloc(env)) or env


def run_child(system: str, args) -> dict | None:
    """One system's training in its own process; its result, or None when it failed."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, __file__, "--child", system, "--out", str(out)]
    cmd += ["--n-train", str(args.n_train), "--n-eval", str(args.n_eval)]
    r = subprocess.run(cmd, env=child_env(system), capture_output=True, text=True)
    if r.returncode != 0:
        print(f"{system} failed:\n{r.stderr[-3000:]}", file=sys.stderr)
        return None
    res = json.loads(out.read_text())
    out.unlink()
    return res


def merge(rounds: list[dict]) -> dict:
    """One row from a system's rounds: mean wall and CPU seconds, the highest peak memory,
    the first eval loss (every round trains the same samples from the same seed)."""
    res = dict(rounds[0])
    res["seconds"] = statistics.mean(r["seconds"] for r in rounds)
    res["cpu_seconds"] = statistics.mean(r["cpu_seconds"] for r in rounds)
    res["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
    res["round_seconds"] = [r["seconds"] for r in rounds]
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=160)
    p.add_argument("--n-eval", type=int, default=32)
    p.add_argument("--systems", default="tuneforge,hf,trl")
    p.add_argument("--device", default=DEVICE, help="cpu (fp32) or cuda (bf16)")
    p.add_argument(
        "--rounds", type=int, default=1, help="run every system this many times, alternating order"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    threads = torch.get_num_threads()
    if args.device != DEVICE:  # the module's settings, here and in the children, follow it
        os.environ["TUNEFORGE_BENCH_DEVICE"] = args.device
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.child:
        child(args.child, args.n_train, args.n_eval, Path(args.out))
        return 0
    systems = args.systems.split(",")
    if any(s.startswith("tuneforge") for s in systems) and not GPU:
        from tuneforge.accel import kernels

        kernels.available()  # built once before any timing, as `make install` does (~15 s)
    peak = matmul_peak(threads)
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        # odd rounds run the systems in reverse order: with two rounds each system's mean
        # cancels a steady drift of the machine's speed during the benchmark
        for system in systems if round_ % 2 == 0 else systems[::-1]:
            res = run_child(system, args)
            if res is not None:
                runs.setdefault(system, []).append(res)
                print(f"done {system}: {res['seconds']:.1f} s", file=sys.stderr)
    results = {system: merge(runs[system]) for system in systems if system in runs}
    ref = next((r for k, r in results.items() if k.startswith("tuneforge")), None)
    where = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16"
        if GPU
        else f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {threads} threads, fp32"
    )
    print(f"\nmachine: {where}; matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(
        f"data: {ref['samples'] if ref else '?'} samples of examples/instruct (64-512 tokens), 1 epoch, "
        f"LoRA r16 q/k/v/o, lr 2e-4\n"
    )
    print(
        "| system | supervised tok/s | wall s | CPU s | sup tok per CPU-s | "
        + ("peak GPU MB" if GPU else "peak RSS MB")
        + " | eval loss | MFU | tuneforge vs it (wall) | tuneforge vs it (CPU) | "
        + ("GPU memory" if GPU else "RSS")
        + " vs tuneforge |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for system, r in results.items():
        tps = r["supervised_tokens"] / r["seconds"]
        tpc = r["supervised_tokens"] / r["cpu_seconds"]
        mfu = r["flops"] / r["seconds"] / peak
        ratio = (ref["supervised_tokens"] / ref["seconds"]) / tps if ref else float("nan")
        ratio_cpu = (ref["supervised_tokens"] / ref["cpu_seconds"]) / tpc if ref else float("nan")
        rss = r["peak_rss_mb"] / ref["peak_rss_mb"] if ref else float("nan")
        print(
            f"| {NAMES[system.split('+')[0]]}, {r['malloc']} malloc | {tps:.1f} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
            f"{tpc:.1f} | {r['peak_rss_mb']:.0f} | {r['eval_loss']:.4f} | {100 * mfu:.1f}% | "
            f"{ratio:.2f}x | {ratio_cpu:.2f}x | {rss:.2f} |"
        )
    if args.rounds > 1:
        print("\nwall seconds per round (the table has their mean):")
        for system, r in results.items():
            print(f"- {system}: " + ", ".join(f"{x:.1f}" for x in r["round_seconds"]))
    print(f"\nmatmul peak at the end: {matmul_peak(threads) / 1e9:.1f} GFLOP/s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

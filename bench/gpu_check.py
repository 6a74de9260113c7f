"""GPU check: environment, tuneforge on the device against the CPU, speed against HF + peft.

One command for a GPU machine; JSON and a Markdown table in ``--out``.

    python bench/gpu_check.py --out DIR                   # one GPU (under 8 minutes on an H200)
    .venv/bin/python bench/gpu_check.py --dry-run --out DIR   # the same code on the CPU, tiny sizes
    .venv/bin/python bench/gpu_check.py --carry-list      # what the GPU image lacks, with sizes
    .venv/bin/python bench/gpu_check.py --stage DIR       # tokenizer + bitsandbytes to carry there

- environment: GPU, torch / CUDA, transformers, peft, bitsandbytes, flash-attn, and a bf16 matmul
  peak measured in the same run (the MFU denominator);
- correctness: tiny-llama / tiny-qwen2 LoRA and full fine-tuning, ``train(cfg)`` in bf16 on the
  device against the CPU in fp32 from the same seed (every step's loss and gradient norm within
  ``TOLERANCE``); QLoRA with the paged optimizer when bitsandbytes and CUDA are there; packed
  samples' logits equal to each sample alone (SDPA fp32 and bf16, flash-attn's varlen path when
  it imports), with a leaking row as the control that the comparison can fail; a run SIGKILLed
  after a step and resumed, equal to an uninterrupted one; how many weights one AdamW step at
  lr 2e-5 changes when full fine-tuning holds bf16 weights; ``training.compile`` (last);
- speed: randomly initialised models of real size (``bench/gpu_models/*.json``: Llama-3.2-1B and
  Qwen2.5-0.5B shapes), random token ids (log-uniform lengths, 20-60% of each sample a masked
  prompt), LoRA r16 on every linear layer, bf16, rows of 2048 tokens: tuneforge (packed) against
  HF Trainer + peft padded and with transformers' padding-free ``DataCollatorWithFlattening``;
  supervised tokens/s after a warm-up, peak GPU memory, MFU (``sft_bench.useful_flops``).

Every part runs in its own process (bench/gpu_runs.py), forked from a server that imported torch
and transformers once (multiprocessing's forkserver: a fresh interpreter costs ~7 s of imports
here). peft is preloaded only in the dry run: importing it imports bitsandbytes, which
initialises CUDA, and a process forked after that cannot use the GPU (each child checks;
``--start-method spawn`` avoids the server). The CPU reference runs PyTorch ops
(``TUNEFORGE_KERNELS=0``: no 20 s kernel build on the GPU machine's clock). docs/gpu.md has the
review of the CUDA paths and how to run this on the lent machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the children import from it
from gpu_runs import GA, MODELS, ROOT, TOLERANCE, child_main  # noqa: E402

SYSTEMS = ("tuneforge", "hf", "hf-flat")
NAMES = {
    "tuneforge": "tuneforge (packed)",
    "tuneforge-compile": "tuneforge (packed, training.compile)",
    "hf": "HF Trainer + peft (padded)",
    "hf-flat": "HF Trainer + peft (DataCollatorWithFlattening)",
}
# sizes and the time budget (seconds) of a GPU run and of the dry run
GPU = dict(
    device="cuda", steps=6, max_length=128, records=64, row_length=2048, rows=4,
    timed_tokens=262_144, warmup_steps=2, min_length=64, matmul_n=8192, budget=450,
)  # fmt: skip
DRY = dict(
    device="cpu", steps=3, max_length=64, records=24, row_length=256, rows=2,
    timed_tokens=3072, warmup_steps=1, min_length=16, matmul_n=512, budget=300,
)  # fmt: skip


class Runner:
    """Starts each part in its own process, within what is left of the time budget."""

    def __init__(self, out: Path, budget: float, dry: bool, method: str = "forkserver"):
        preload = ["__main__", "gpu_runs", "torch", "transformers", "tuneforge.train", "sft_bench"]
        preload += [f"transformers.models.{m}.modeling_{m}" for m in ("llama", "qwen2")]
        if dry:  # peft (transformers.trainer imports it too) imports bitsandbytes (docstring)
            preload += ["peft", "transformers.trainer", "tuneforge.train.sft"]
        self.ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            self.ctx.set_forkserver_preload(preload)
        self.out, self.deadline = out, time.monotonic() + budget
        self.imported: set[str] = set()
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, fn: str, a: dict, cap: float, expect_kill=False) -> dict:
        """Run ``gpu_runs.<fn>(a)`` as ``name`` for at most ``cap`` seconds; its result, an
        ``error``, or (``expect_kill``) whether it died of SIGKILL."""
        left = min(cap, self.deadline - time.monotonic())
        if left < 5:
            return {"skipped": "the time budget was spent"}
        result, log = self.out / "logs" / f"{name}.json", self.out / "logs" / f"{name}.log"
        result.unlink(missing_ok=True)
        p = self.ctx.Process(target=child_main, args=(fn, a, str(result), str(log)))
        start = time.monotonic()
        p.start()
        p.join(left)
        if p.is_alive():
            p.kill()
            p.join()
            return {"error": f"timed out after {left:.0f} s (logs/{log.name})"}
        print(f"{name}: {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
        if expect_kill:
            return {"killed": p.exitcode == -signal.SIGKILL, "exitcode": p.exitcode}
        if not result.exists():
            return {"error": f"ended with status {p.exitcode} and no result (logs/{log.name})"}
        out = json.loads(result.read_text())
        self.imported.update(out.pop("imported", ()))
        return out


# -- correctness ------------------------------------------------------------------------------------
def tiny_overrides(
    s: dict, data: Path, out: Path, model: str, method: str, device: str, dtype: str
):
    """The config of one short run of a tiny model (dotted keys)."""
    o = {
        "model": model, "output_dir": str(out), "data.train": str(data),
        "data.max_length": s["max_length"], "data.packing": True, "training.progress": False,
        "training.batch_size": 4, "training.max_steps": s["steps"], "training.seed": 7,
        "training.learning_rate": 1e-3 if method == "full" else 5e-3,
        "training.device": device, "training.dtype": dtype, "method.name": method,
    }  # fmt: skip
    if method != "full":
        o.update({"method.r": 8, "method.lora_alpha": 16, "method.lora_dropout": 0.0})
        o["method.target_modules"] = "all-linear"
    if method == "qlora":  # the paged optimizer on CUDA; on the CPU it is plain AdamW
        o["training.optimizer"] = "paged_adamw"
    return o


def compare_losses(pair: dict) -> dict:
    """The largest relative differences of loss and gradient norm over the steps of two runs."""
    ref, dev = pair.get("first", {}), pair.get("second", {})
    if "loss" not in ref or "loss" not in dev:
        why = pair.get("error") or ref.get("error") or dev.get("error") or pair.get("skipped")
        return {"skipped": why} if "skipped" in pair else {"passed": False, "error": why}
    values = ref["loss"] + dev["loss"] + dev["grad_norm"]
    rel = {
        k: max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref[k], dev[k], strict=True))
        for k in ("loss", "grad_norm")
    }
    passed = all(math.isfinite(x) for x in values) and len(ref["loss"]) == len(dev["loss"]) > 0
    return {
        "reference": ref["loss"],
        "device": dev["loss"],
        "max_rel_diff_loss": rel["loss"],
        "max_rel_diff_grad_norm": rel["grad_norm"],
        "passed": passed and all(rel[k] <= TOLERANCE[k] for k in rel),
    }


def correctness(run: Runner, s: dict, out: Path) -> dict:
    dev, data, runs = s["device"], out / "data" / "train.jsonl", out / "runs"
    data.parent.mkdir(parents=True, exist_ok=True)
    rows = (ROOT / "examples" / "dates" / "train.jsonl").read_text().splitlines()[: s["records"]]
    data.write_text("\n".join(rows) + "\n")

    def pair(tag: str, model: str, method: str, cap: float, dtype: str = "bfloat16") -> dict:
        a = {
            "first": tiny_overrides(s, data, runs / f"{tag}-ref", model, method, "cpu", "float32"),
            "second": tiny_overrides(s, data, runs / f"{tag}-dev", model, method, dev, dtype),
        }
        return compare_losses(run(tag, "train_pair", a, cap))

    losses = {}
    for model in ("tiny-llama", "tiny-qwen2"):
        for method in ("lora", "full"):
            losses[f"{model}-{method}"] = pair(f"{model}-{method}", model, method, 120)
    # float16: autocast, fp32 master weights and the dynamic loss scale
    losses["tiny-llama-full-fp16"] = pair("full-fp16", "tiny-llama", "full", 120, "float16")
    why = qlora_missing(dev)
    losses["tiny-llama-qlora"] = {"skipped": why} if why else pair("qlora", "tiny-llama", "qlora", 180)  # fmt: skip
    return {
        "device": dev,
        "dtype": "bfloat16",
        "tolerance": TOLERANCE,
        "losses": losses,
        "packed_isolation": run("isolation", "isolation", {"device": dev}, 120),
        "resume": resume(run, s, data, runs),
        "full_bf16_updates": run("bf16-updates", "bf16_updates", {"device": dev}, 60),
    }


def qlora_missing(device: str) -> str | None:
    import importlib.util

    if device != "cuda":
        return "QLoRA is checked on CUDA only (the dry run has none)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (bench/gpu_check.py --stage carries it)"
    return None


def resume(run: Runner, s: dict, data: Path, runs: Path) -> dict:
    """A LoRA run (dropout on: the RNG matters) killed after step ``steps - 1`` and resumed,
    against the same run uninterrupted; if they differ, a second uninterrupted run shows how
    much the device differs from itself."""
    steps = s["steps"]

    def cfg(name: str, **extra) -> dict:
        o = tiny_overrides(s, data, runs / name, "tiny-llama", "lora", s["device"], "bfloat16")
        o.update({"method.lora_dropout": 0.1, "training.save_steps": max(1, (steps - 1) // 2)})
        return {"overrides": o, **extra}

    clean = run("resume-clean", "train_run", cfg("clean"), 90)
    killed = run("resume-killed", "train_run", cfg("killed", kill_at=steps - 1), 90, True)
    resumed = cfg("killed", resume=True, compare_with=str(runs / "clean"))
    resumed = run("resume-resumed", "train_run", resumed, 90)
    out = {"killed_after_step": steps - 1, "killed": killed.get("killed", False)}
    if "skipped" in clean or "skipped" in resumed:
        return {**out, "skipped": "the time budget was spent"}
    if "weights_equal" not in resumed or "loss" not in clean:
        return {**out, "passed": False, "error": resumed.get("error") or clean.get("error")}
    out.update({k: resumed[k] for k in ("weights_equal", "metrics_equal", "max_abs_diff")})
    out["equal"] = resumed["weights_equal"] and resumed["metrics_equal"]
    if not out["equal"]:
        again = run("resume-repeat", "train_run", cfg("again", compare_with=str(runs / "clean")), 90)  # fmt: skip
        out["repeat_max_abs_diff"] = again.get("max_abs_diff")
    floor = out.get("repeat_max_abs_diff") or 0.0
    out["passed"] = out["killed"] and (out["equal"] or out["max_abs_diff"] <= 2 * floor)
    return out


def compile_check(run: Runner, s: dict, out: Path, args) -> dict:
    """``training.compile`` against the same run without it, on the device in bf16."""
    if s is DRY and not args.compile:
        return {"skipped": "dry run: tracing alone takes ~20 s on a CPU (--compile)"}
    data, runs = out / "data" / "train.jsonl", out / "runs"
    eager = tiny_overrides(s, data, runs / "eager", "tiny-llama", "lora", s["device"], "bfloat16")
    compiled = {**eager, "output_dir": str(runs / "compiled"), "training.compile": True}
    return compare_losses(run("compile", "train_pair", {"first": eager, "second": compiled}, 240))


# -- speed --------------------------------------------------------------------------------------
def speed_section(run: Runner, s: dict, dry: bool, systems: list[str]) -> dict:
    keys = ("device", "rows", "row_length", "timed_tokens", "warmup_steps", "min_length")
    base = {k: s[k] for k in keys}
    out = {"settings": {**base, "gradient_accumulation": GA, "lora": "r16 all-linear, bf16"}}
    for model in MODELS:
        out[model] = {}
        for system in systems:
            a = {**base, "model": model, "system": system, "shrink": dry}
            out[model][system] = run(f"speed-{model}-{system}", "speed", a, 240)
    return out


def add_ratios(speed: dict, peak_tflops: float) -> None:
    """Supervised tokens/s, MFU, and tuneforge against each system, in place."""
    for model in MODELS:
        rows = speed.get(model, {})
        for r in rows.values():
            if "seconds" in r:
                r["supervised_tokens_per_s"] = r["supervised_tokens"] / r["seconds"]
                r["mfu"] = r["flops"] / r["seconds"] / (peak_tflops * 1e12)
        ref = rows.get("tuneforge", {})
        for r in rows.values():
            if "seconds" in r and "seconds" in ref:
                ratio = ref["supervised_tokens_per_s"] / r["supervised_tokens_per_s"]
                r["tuneforge_speedup"] = ratio
                r["memory_vs_tuneforge"] = r["peak_memory_mb"] / ref["peak_memory_mb"]


# -- the report ---------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    env, meta, c = res["environment"], res["meta"], res["correctness"]
    dry = " (dry run on the CPU: tiny sizes, the numbers mean nothing)" if meta["dry_run"] else ""
    lines = [f"### GPU check{dry}: {meta['date']}, commit {meta['commit']}", ""]
    lines += [f"`{meta['command']}` ({meta['seconds']:.0f} s)", ""]
    if "error" in env:
        lines += ["environment: failed (logs/environment.log)", ""]
    else:
        where = env["gpu"] or f"CPU, torch threads: {env['cpu_threads']}"
        if env["gpu"]:
            where += f" ({env['gpu_memory_gib']} GiB, compute capability {env['capability']})"
        libs = ("transformers", "peft", "bitsandbytes", "flash_attn")
        libs = ", ".join(f"{k} {env.get(k) or 'none'}" for k in libs)
        peak = env["bf16_matmul_tflops"]
        lines += [f"{where}; torch {env['torch']} (CUDA {env['cuda']}), {libs}; bf16 matmul "
                  f"peak {peak:.1f} TFLOP/s (measured)", ""]  # fmt: skip
    tol = f"{100 * TOLERANCE['loss']:.0f}% / {100 * TOLERANCE['grad_norm']:.0f}%"
    lines += [f"Correctness: {c['device']} in bf16 (fp16 where named) against the CPU in fp32, "
              "same seed", ""]  # fmt: skip
    lines += ["| check | result | measured | tolerance |", "| --- | --- | --- | --- |"]
    for tag, r in c["losses"].items():
        got = ""
        if "max_rel_diff_loss" in r:
            got = (f"loss {100 * r['max_rel_diff_loss']:.2f}%, gradient norm "
                   f"{100 * r['max_rel_diff_grad_norm']:.2f}% (largest step)")  # fmt: skip
        lines.append(f"| {tag} losses | {verdict(r)} | {got} | {tol} |")
    iso = c["packed_isolation"]
    for tag, r in ({"": iso} if "error" in iso or "skipped" in iso else iso).items():
        got = ""
        if "max_rel_diff" in r:
            got = f"{r['max_rel_diff']:.2e} of the logits' scale (leaking row {r['leak_rel_diff']:.2e})"  # fmt: skip
        lines.append(f"| packed isolation, {tag} | {verdict(r)} | {got} | {r.get('tolerance', '')} |")  # fmt: skip
    r = c["resume"]
    got = ""
    if "max_abs_diff" in r:
        got = "bitwise equal weights and metrics" if r["equal"] else (
            f"weights differ by {r['max_abs_diff']:.3g} (a repeat: {r.get('repeat_max_abs_diff')})"
        )  # fmt: skip
    lines.append(f"| resume after SIGKILL at step {r['killed_after_step']} | {verdict(r)} | {got} | equal |")  # fmt: skip
    r = c["full_bf16_updates"]
    if "changed_bf16_master" in r:
        lines.append(
            f"| full fine-tuning, one AdamW step at lr 2e-5: weights changed | finding | "
            f"bf16 autocast + fp32 master weights {100 * r['changed_bf16_master']:.1f}%, bf16 "
            f"weights {100 * r['changed_bf16_pure']:.1f}%, fp32 {100 * r['changed_float32']:.1f}% | |"
        )
    r = c["compile"]
    got = f"loss {100 * r['max_rel_diff_loss']:.2f}% from eager" if "max_rel_diff_loss" in r else ""
    lines.append(f"| training.compile | {verdict(r)} | {got} | {tol} |")
    st = res["speed"]["settings"]
    lines += [
        "",
        f"Speed: LoRA r16 on every linear layer, bf16, random ids, rows of {st['row_length']} "
        f"tokens, {st['rows']} rows (HF: samples of as many tokens) x {GA} accumulation, after "
        f"{st['warmup_steps']} warm-up steps",
        "",
        "| model | system | attention | supervised tok/s | tuneforge vs it | peak memory MiB "
        "| memory vs tuneforge | MFU | train loss | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in MODELS:
        for system, r in res["speed"].get(model, {}).items():
            if "seconds" not in r:
                lines.append(f"| {model} | {NAMES[system]} | {verdict(r)} | | | | | | | |")
                continue
            lines.append(
                f"| {model} | {NAMES[system]} | {r['attention']} | "
                f"{r['supervised_tokens_per_s']:.0f} | {r['tuneforge_speedup']:.2f}x | "
                f"{r['peak_memory_mb']:.0f} | {r['memory_vs_tuneforge']:.2f} | "
                f"{100 * r['mfu']:.1f}% | {r['train_loss']:.3f} | {r['seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def verdict(r: dict) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if "error" in r:
        return "error: " + str(r["error"]).strip().splitlines()[-1][:160]
    return "pass" if r.get("passed") else "FAIL"


def failures(res: dict) -> list[str]:
    """The checks that failed or broke (skipped ones are not failures)."""
    c = res["correctness"]
    iso = c["packed_isolation"]
    items = {f"losses {k}": v for k, v in c["losses"].items()}
    items.update({f"isolation {k}": v for k, v in iso.items() if isinstance(v, dict)})
    items.update(resume=c["resume"], compile=c["compile"], bf16_updates=c["full_bf16_updates"])
    bad = [k for k, v in items.items() if "error" in v or v.get("passed") is False]
    bad += ["environment"] if "error" in res["environment"] else []
    bad += ["isolation"] if "error" in iso else []  # (a skipped one is no dict of cases)
    for model in MODELS:
        bad += [f"speed {model} {s}" for s, r in res["speed"][model].items() if "seconds" not in r]
    return bad


# -- the command --------------------------------------------------------------------------------
def check(args) -> int:
    from gpu_carry import canonical, in_image

    s = DRY if args.dry_run else GPU
    out = Path(args.out)
    shutil.rmtree(out / "runs", ignore_errors=True)  # the tiny runs of an earlier check
    out.mkdir(parents=True, exist_ok=True)
    if args.cache:
        os.environ["TUNEFORGE_CACHE"] = str(Path(args.cache).resolve())
    os.environ["TUNEFORGE_KERNELS"] = "0"  # the CPU reference on PyTorch ops (module docstring)
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() leaves CUDA be
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if args.dry_run:  # tiny matmuls on a shared CPU: a second OpenMP thread waits (13 s vs 0.2)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.monotonic()
    run = Runner(out, args.budget or s["budget"], args.dry_run, args.start_method)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    res = {"meta": {"dry_run": args.dry_run, "command": command, "sizes": s}}
    res["meta"].update(date=datetime.date.today().isoformat(), commit=commit())
    res["environment"] = run("environment", "environment", s, 120)
    res["correctness"] = correctness(run, s, out)
    res["speed"] = speed_section(run, s, args.dry_run, args.systems.split(","))
    res["correctness"]["compile"] = compile_check(run, s, out, args)  # last: it may be slow
    add_ratios(res["speed"], res["environment"].get("bf16_matmul_tflops", math.nan))
    res["meta"]["seconds"] = time.monotonic() - start
    image = in_image() | {"tuneforge"}
    others = {canonical(n) for n in run.imported} - image
    res["environment"]["imported_not_in_image"] = sorted(others)
    res["failures"] = failures(res)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    text = markdown(res)
    (out / "results.md").write_text(text)
    print(text)
    print(f"failed: {', '.join(res['failures']) or 'none'}")
    return 1 if res["failures"] else 0


def commit() -> str:
    """The commit and whether the tree has changes ("unknown" without git: the GPU machine gets
    a copy of the working tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    except OSError:
        return "unknown"
    return (head.stdout.strip() or "unknown") + ("+changes" if dirty.stdout.strip() else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for results.json, results.md and the parts' logs")
    p.add_argument("--dry-run", action="store_true", help="on the CPU with tiny sizes")
    p.add_argument("--compile", action="store_true", help="the dry run tries training.compile too")
    p.add_argument(
        "--systems", default=",".join(SYSTEMS), help="speed systems (also: tuneforge-compile)"
    )
    p.add_argument("--budget", type=float, help="seconds for everything (GPU 450, dry run 300)")
    p.add_argument("--cache", help="TUNEFORGE_CACHE holding the tiny models' tokenizer (--stage)")
    p.add_argument(
        "--start-method", default="forkserver", choices=("forkserver", "spawn"),
        help="how the parts start (spawn: a fresh interpreter each, ~7 s more per part)",
    )  # fmt: skip
    p.add_argument("--carry-list", action="store_true", help="print what the GPU image lacks")
    p.add_argument("--stage", metavar="DIR", help="copy what the GPU machine needs into DIR")
    args = p.parse_args()
    if args.carry_list or args.stage:
        import gpu_carry

        gpu_carry.print_carry_list() if args.carry_list else gpu_carry.stage(Path(args.stage))
        return 0
    if not args.out:
        p.error("--out is required")
    return check(args)


if __name__ == "__main__":
    sys.exit(main())

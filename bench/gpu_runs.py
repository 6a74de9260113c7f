"""What each process of bench/gpu_check.py runs: the environment, tuneforge training runs of
the tiny models, the packed-isolation check, one step of full fine-tuning, one speed system.

Every function takes a dict of settings and returns a JSON-able dict; ``child_main`` is the
entry of a child process (its output goes to a log file, its result or its error to JSON).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"llama-3.2-1b": "llama-3.2-1b.json", "qwen2.5-0.5b": "qwen2.5-0.5b.json"}
GA = 2  # gradient accumulation of every speed system
# relative, at every step of the tiny runs; bf16 keeps 8 bits of mantissa (0.4% per rounding)
TOLERANCE = {"loss": 0.01, "grad_norm": 0.05, "isolation_fp32": 1e-4, "isolation_bf16": 0.05}
LEAK_MARGIN = 5  # a leaking row must differ this many times more than the isolated one


def environment(a: dict) -> dict:
    """Versions, the device, and the bf16 matmul peak (the MFU denominator)."""
    import platform
    from importlib import metadata

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    info["cuda"] = torch.version.cuda
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "flash_attn", "trl"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    device = torch.device(a["device"])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["capability"] = f"{props.major}.{props.minor}"
    else:
        info["gpu"] = None
        info["cpu_threads"] = torch.get_num_threads()
    info["bf16_matmul_tflops"] = matmul_peak(device, a["matmul_n"]) / 1e12
    return info


def matmul_peak(device, n: int) -> float:
    """The best FLOP/s of a bf16 ``[n x n] @ [n x n]`` (five per timing, best of ten)."""
    import torch

    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t))
    return best


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -- tuneforge runs of the tiny models ---------------------------------------------------------
def _kill_after(step: int) -> None:
    """SIGKILL this process once optimizer step ``step`` (1-based) has run, before its metrics
    line or checkpoint is written (as tests/fault_hooks does for the CLI)."""
    from tuneforge.train.loop import Trainer

    plain = Trainer.train_step

    def train_step(self, i):
        out = plain(self, i)
        if i + 1 == step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    Trainer.train_step = train_step


def train_run(a: dict) -> dict:
    """One ``train(cfg)`` of ``overrides`` (``resume``; ``kill_at``): its losses and gradient
    norms per step, and, with ``compare_with``, whether it equals that finished run."""
    from tuneforge.config import load_config
    from tuneforge.train import train

    if a.get("kill_at"):
        _kill_after(a["kill_at"])
    cfg = load_config(None, [f"{k}={v}" for k, v in a["overrides"].items()])
    start = time.perf_counter()
    train(cfg, resume=a.get("resume", False))
    out = Path(cfg.output_dir)
    rows = metrics(out)
    result = {
        "loss": [r["loss"] for r in rows],
        "grad_norm": [r["grad_norm"] for r in rows],
        "seconds": time.perf_counter() - start,
    }
    if a.get("compare_with"):
        result.update(_same_run(out, Path(a["compare_with"])))
    return result


def train_pair(a: dict) -> dict:
    """Two runs (``first`` and ``second`` overrides) in one process, each error caught alone."""
    out = {}
    for side in ("first", "second"):
        try:
            out[side] = train_run({"overrides": a[side]})
        except Exception as e:  # reported; the other run still runs
            out[side] = {"error": first_line(e)}
    return out


def metrics(run: Path) -> list[dict]:
    """A run's metrics.jsonl without the timing field."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]


def _same_run(a: Path, b: Path) -> dict:
    """Whether two finished runs saved the same trained weights and logged the same metrics."""
    from safetensors.torch import load_file

    name = "adapter/adapter_model.safetensors"
    if not (a / name).exists():
        name = "model/model.safetensors"
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    return {
        "weights_equal": wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa),
        "max_abs_diff": max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa),
        "metrics_equal": metrics(a) == metrics(b),
    }


def bf16_updates(a: dict) -> dict:
    """The share of weights one AdamW step of full fine-tuning at lr 2e-5 changes: in float32,
    under bf16 autocast with float32 master weights (``training.master_weights``, the default),
    and with the weights held in bf16 (``master_weights: false``), where an update below half
    a bf16 step rounds away."""
    import torch

    from tuneforge.config import load_config
    from tuneforge.data.batching import collate_padded
    from tuneforge.data.render import Sample
    from tuneforge.methods import apply_method, load_base
    from tuneforge.train.loop import build_optimizer
    from tuneforge.train.precision import Precision
    from tuneforge.train.sft import SFTObjective

    out = {"learning_rate": 2e-5}
    device = torch.device(a["device"])
    for name, dtype, master in (
        ("float32", "float32", True),
        ("bf16_master", "bfloat16", True),
        ("bf16_pure", "bfloat16", False),
    ):
        cfg = load_config(None, [
            "model=tiny-llama", "output_dir=unused", "data.train=unused.jsonl",
            "method.name=full", f"training.dtype={dtype}", f"training.master_weights={master}",
            "training.learning_rate=2e-5", "training.weight_decay=0",
        ])  # fmt: skip
        torch.manual_seed(0)
        model, tok, _ = load_base(cfg, device)
        model = apply_method(model, cfg.method)
        precision = Precision.of(cfg.training, device)
        precision.keep_master_weights(model)
        ids = torch.randint(0, len(tok), (4, 32)).tolist()
        batch = collate_padded([Sample(x, x) for x in ids], tok.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        before = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer(model, cfg.training)
        with precision.autocast():
            loss = SFTObjective().loss_sum(model, batch)
        loss.backward()
        opt.step()
        changed = sum(int((p != b).sum()) for p, b in zip(model.parameters(), before, strict=True))
        out[f"changed_{name}"] = changed / sum(b.numel() for b in before)
    return out


def isolation(a: dict) -> dict:
    """Packed samples' logits against each sample alone, through the batches and attention
    training uses (``BatchPlan``: the rows joined into one; tuneforge's per-sample SDPA or
    flash-attn's varlen path), with a row whose positions do not restart (the samples see each
    other) as the control that the comparison can fail."""
    import torch

    from tuneforge.data.batching import BatchPlan
    from tuneforge.data.render import Sample
    from tuneforge.models import load_model

    out = {}
    for attn, dtype in (("sdpa", "float32"), ("sdpa", "bfloat16"), ("flash_attention_2", "bfloat16")):  # fmt: skip
        name = f"{attn} {dtype}"
        why = flash_missing(a["device"]) if attn.startswith("flash") else None
        if why:
            out[name] = {"skipped": why}
            continue
        model, tok, _ = load_model("tiny-llama", dtype, a["device"], attn_implementation=attn)
        model.eval()
        g = random.Random(0)
        samples = []
        for n in (37, 64, 23, 50, 41):
            ids = [g.randrange(len(tok)) for _ in range(n)]
            samples.append(Sample(ids, ids))
        pad = tok.pad_token_id
        plan = BatchPlan(samples, 2, 0, pad, packing=True, max_length=128, attention=attn)
        batch = plan.make_batch([[0, 1], [2, 3, 4]])  # two rows, joined into one
        batch = {k: v.to(a["device"]) for k, v in batch.items() if k != "labels"}
        ids = batch.pop("input_ids")

        def logits(ids, model=model, **kwargs):
            return model(input_ids=ids, **kwargs).logits[0].float()

        with torch.no_grad():
            with plan.attention_for(model):
                packed = logits(ids, **batch)
            alone = [torch.tensor([s.input_ids], device=a["device"]) for s in samples]
            ref = torch.cat([logits(x) for x in alone])
            leak = logits(ids)  # positions 0..T-1: one causal sequence
        scale = ref.abs().max().item()
        diff = (packed - ref).abs().max().item() / scale
        leak_diff = (leak - ref).abs().max().item() / scale
        tol = TOLERANCE["isolation_fp32" if dtype == "float32" else "isolation_bf16"]
        passed = diff <= tol and leak_diff >= LEAK_MARGIN * diff
        out[name] = {"max_rel_diff": diff, "leak_rel_diff": leak_diff, "tolerance": tol, "passed": passed}  # fmt: skip
    return out


def flash_missing(device: str) -> str | None:
    """Why flash-attn cannot run here, or None."""
    import importlib.util

    if device != "cuda":
        return "flash-attn needs a CUDA GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed"
    try:
        import flash_attn  # noqa: F401
    except Exception as e:
        return f"flash_attn does not import ({first_line(e)})"
    return None


# -- speed ------------------------------------------------------------------------------------------
def speed(a: dict) -> dict:
    """One system's LoRA training on a real-size random model: a warm-up, then one timed epoch."""
    import tempfile

    import torch
    from sft_bench import useful_flops
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneforge.models import _attn_implementation

    device, dtype = torch.device(a["device"]), torch.bfloat16
    spec = json.loads((ROOT / "bench" / "gpu_models" / MODELS[a["model"]]).read_text())
    if a["shrink"]:  # the dry run: the same architecture, tiny
        spec.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=512)
        spec.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    system = a["system"]
    # tuneforge and the padding-free collator get flash-attn where it runs; padded rows SDPA
    attn = "sdpa" if system == "hf" else _attn_implementation("auto", device, dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    data = random_samples(config.vocab_size, a["timed_tokens"], a, seed=1)
    warm_tokens = a["warmup_steps"] * a["rows"] * a["row_length"] * GA
    warm = random_samples(config.vocab_size, warm_tokens, a, seed=2)
    run = _speed_tuneforge if system.startswith("tuneforge") else _speed_hf
    with tempfile.TemporaryDirectory() as tmp:
        seconds, peak_mb, loss = run(model, data, warm, a, device, Path(tmp))
    return {
        "system": system,
        "attention": attn,
        "seconds": seconds,
        "peak_memory_mb": peak_mb,
        "train_loss": loss,
        "samples": len(data),
        "tokens": sum(len(s) for s in data),
        "supervised_tokens": sum(s.supervised_token_count for s in data),
        "flops": useful_flops(config, data),
        "batch": hf_batch(data, a) if system.startswith("hf") else a["rows"],
    }


def random_samples(vocab: int, tokens: int, a: dict, seed: int) -> list:
    """Samples of random ids, log-uniform lengths up to the row length, a masked prompt of 20-60%
    of each: the same list in every process (seeded); none for ``tokens`` 0."""
    from tuneforge.data.render import IGNORE, Sample

    g = random.Random(seed)
    out, total = [], 0
    lo, hi = math.log(a["min_length"]), math.log(a["row_length"])
    while total < tokens:
        n = int(math.exp(g.uniform(lo, hi)))
        prompt = int(n * g.uniform(0.2, 0.6))
        ids = [g.randrange(1, vocab) for _ in range(n)]
        out.append(Sample(ids, [IGNORE] * prompt + ids[prompt:]))
        total += n
    return out


def hf_batch(data: list, a: dict) -> int:
    """HF's samples per micro-batch: about the tokens of tuneforge's packed rows."""
    mean = sum(len(s) for s in data) / len(data)
    return max(1, round(a["rows"] * a["row_length"] / mean))


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        from sft_bench import reset_peak_rss

        reset_peak_rss()


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from sft_bench import peak_rss_mb

    return peak_rss_mb()


def _lora() -> dict:
    from sft_bench import LORA

    return {**LORA, "target_modules": "all-linear"}  # r16, alpha 32, dropout 0.05


def _speed_tuneforge(model, data, warm, a, device, tmp: Path):
    from sft_bench import HP

    from tuneforge.config import MethodConfig, TrainingConfig
    from tuneforge.methods import apply_method
    from tuneforge.train import prepare_for_speed
    from tuneforge.train.loop import Trainer
    from tuneforge.train.sft import SFTObjective

    model = apply_method(model, MethodConfig(name="lora", **_lora()))
    t = TrainingConfig(
        num_epochs=1,
        batch_size=a["rows"],
        gradient_accumulation=GA,
        lr_scheduler="cosine",
        progress=False,
        save_steps=10**9,
        compile=a["system"] == "tuneforge-compile",
        **HP,
    )
    prepare_for_speed(model, t)
    for part, samples in (("warm-up", warm), ("timed", data)):
        if not samples:
            continue
        (tmp / part).mkdir()
        trainer = Trainer(
            model, SFTObjective(), samples, [], t, tmp / part, 0, device,
            packing=True, max_length=a["row_length"],
        )  # fmt: skip
        _reset_peak(device)
        sync(device)
        start = time.perf_counter()
        trainer.run()
        sync(device)
    seconds, losses = time.perf_counter() - start, [r["loss"] for r in metrics(tmp / "timed")]
    return seconds, _peak_mb(device), sum(losses) / len(losses)  # the mean, as HF reports it


def _speed_hf(model, data, warm, a, device, tmp: Path):
    from peft import LoraConfig, get_peft_model
    from sft_bench import HP_HF
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    from tuneforge.data.batching import collate_padded
    from tuneforge.data.render import Sample

    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **_lora()))
    if a["system"] == "hf-flat":
        collate = DataCollatorWithFlattening()
    else:  # right padding, -100 labels on it: DataCollatorForSeq2Seq(padding=True)'s batches

        def collate(rows):
            return collate_padded([Sample(r["input_ids"], r["labels"]) for r in rows], 0)

    args = TrainingArguments(
        output_dir=str(tmp),
        per_device_train_batch_size=hf_batch(data, a),
        gradient_accumulation_steps=GA,
        num_train_epochs=1,
        lr_scheduler_type="cosine",
        save_strategy="no",
        report_to=[],
        use_cpu=device.type == "cpu",
        bf16=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_steps=10**6,
        remove_unused_columns=False,
        **HP_HF,
    )
    for samples in (warm, data) if warm else (data,):
        rows = [{"input_ids": s.input_ids, "labels": s.labels} for s in samples]
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        _reset_peak(device)
        sync(device)
        start = time.perf_counter()
        out = trainer.train()
        sync(device)
    return time.perf_counter() - start, _peak_mb(device), out.training_loss


# -- the child process ------------------------------------------------------------------------------
CHILDREN = {
    f.__name__: f for f in (environment, train_run, train_pair, bf16_updates, isolation, speed)
}


def child_main(fn: str, a: dict, result: str, log: str) -> None:
    """A child's entry: its output to ``log``; its result (or its error), and the distributions
    it imported, as JSON to ``result``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        import torch

        if torch.cuda._is_in_bad_fork():
            raise RuntimeError("CUDA was initialised in the fork server: use --start-method spawn")
        out = CHILDREN[fn](a)
    except Exception:  # the parent reports it and goes on
        out = {"error": traceback.format_exc()[-4000:]}
    out["imported"] = imported_distributions()
    sys.stdout.flush()
    Path(result).write_text(json.dumps(out))


def imported_distributions() -> list[str]:
    from importlib import metadata

    owners = metadata.packages_distributions()
    return sorted({d for m in list(sys.modules) for d in owners.get(m.split(".")[0], ())})


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

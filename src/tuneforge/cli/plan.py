"""Planning before training: `tuneforge estimate` and `tuneforge recommend`."""

from __future__ import annotations

import argparse


def cmd_estimate(args: argparse.Namespace) -> int:
    from tuneforge.config import load_config
    from tuneforge.plan.estimate import estimate_config
    from tuneforge.plan.recommend import describe_workload, format_table, parse_memory

    memory = parse_memory(args.memory) if args.memory else None
    cfg = load_config(args.config, args.overrides)
    shape, work, estimates, throughput = estimate_config(cfg, args.device, args.tflops)
    print(describe_workload(shape, work))
    print(f"time: {throughput}\n")
    print(format_table(estimates, memory, cfg.method.name))
    print(
        f"\nlogits: the SFT loss applies the LM head only at supervised positions, "
        f"{estimates[0].logits / 2**30:.2f} GiB at most; full (B, T, V) logits as HF computes "
        f"them would take {estimates[0].hf_logits / 2**30:.2f} GiB at this batch."
    )
    print(
        "peak = weights + AdamW state + max(activations + logits + gradients, gradients + "
        "AdamW's step temporary)"
        + (
            " + 0.5 GiB CUDA context"
            if work.device == "cuda"
            else "; excludes the process baseline (Python, torch and libraries, ~0.5 GiB RSS)"
        )
    )
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from tuneforge.plan.recommend import format_table, parse_memory, recommend

    memory = parse_memory(args.memory)
    rec = recommend(
        args.model,
        memory,
        tasks=args.tasks,
        goal=args.goal,
        device=args.device,
        batch_size=args.batch_size,
        max_length=args.max_length,
        tflops=args.tflops,
    )
    w = rec.workload
    print(
        f"model {rec.shape.name}: {rec.shape.params / 1e6:.1f}M parameters; device {w.device}; "
        f"batch {w.batch_size} x {w.seq_len} tokens"
        + (", gradient checkpointing" if w.gradient_checkpointing else "")
        + "\n"
    )
    print(format_table(rec.candidates, memory))
    if rec.choice is None:
        print(f"\nrecommendation: none. {rec.reason}")
        return 1
    print(f"\nrecommendation: {rec.choice.label}. {rec.reason}")
    print("\n" + rec.config_snippet())
    return 0


def add_parsers(sub) -> None:
    es = sub.add_parser(
        "estimate",
        help="estimate peak memory and time per epoch, per method, before training",
        description="Peak memory (weights, gradients, AdamW state, activations, logits) and "
        "time per epoch for the configured method and the alternatives side by side. Reads the "
        "training data to size the batches; loads no weights. Overrides as in train.",
    )
    es.add_argument("config", help="YAML config file")
    es.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    es.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: training.device"
    )
    es.add_argument("--memory", default=None, help="memory to fit in, e.g. 24GB (GB = GiB)")
    es.add_argument(
        "--tflops", type=float, default=None, help="peak TFLOP/s of the device (else looked up)"
    )
    es.set_defaults(func=cmd_estimate)

    rc = sub.add_parser(
        "recommend",
        help="pick a fine-tuning method for a model and a memory budget",
        description="The classic choice (limited memory -> QLoRA; several tasks -> one LoRA "
        "adapter per task; maximum quality -> full fine-tuning if it fits; quick iteration -> "
        "LoRA with a small r), checked against the memory estimate for your model.",
    )
    rc.add_argument("--model", required=True, help="alias, HF folder, .gguf or hub id")
    rc.add_argument("--memory", required=True, help="device memory, e.g. 24GB (GB = GiB)")
    rc.add_argument("--tasks", type=int, default=1, help="how many tasks to fine-tune for")
    rc.add_argument("--goal", choices=("quality", "speed"), default=None)
    rc.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if present"
    )
    rc.add_argument("--batch-size", type=int, default=4, help="packed rows per micro-batch")
    rc.add_argument("--max-length", type=int, default=512, help="tokens per row")
    rc.add_argument("--tflops", type=float, default=None, help="peak TFLOP/s of the device")
    rc.set_defaults(func=cmd_recommend)

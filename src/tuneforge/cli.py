"""The command line: a map from command to function. Parsing and friendly errors only."""

from __future__ import annotations

import argparse
import os
import sys

from tuneforge.errors import TuneforgeError


def cmd_train(args: argparse.Namespace) -> int:
    from tuneforge.config import load_config
    from tuneforge.train import train

    cfg = load_config(args.config, args.overrides)
    if args.resume and args.overwrite:
        raise TuneforgeError("--resume and --overwrite contradict each other; pick one")
    if args.nproc < 1:
        raise TuneforgeError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1:  # before the processes start: the run skeleton's own check, once
        from tuneforge.train import objective_run
        from tuneforge.train.run import check_processes

        check_processes(cfg, objective_run(cfg), args.nproc)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from tuneforge.train.distributed import launch

        argv = ["train", args.config, *args.overrides]
        argv += ["--resume"] * args.resume + ["--overwrite"] * args.overwrite
        return launch(argv, args.nproc)
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tuneforge.runs import load_for_inference

    if args.max_new_tokens < 1:
        raise TuneforgeError("--max-new-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise TuneforgeError("--temperature must be >= 0 and --top-p in (0, 1]")
    extra = _named_adapters(args.add_adapter or [])
    if args.base and (args.adapter or extra):
        raise TuneforgeError("--base runs the model without adapters; drop --adapter/--add-adapter")
    model, tokenizer = load_for_inference(
        args.model, adapter=not args.base, adapters=extra, active=args.adapter
    )
    return _reply(model, tokenizer, args)


def _named_adapters(items: list[str]) -> dict[str, str]:
    """``['runs/a', 'b=runs/x']`` -> ``{'a': 'runs/a', 'b': 'runs/x'}`` (name: the folder's)."""
    from tuneforge.runs import adapter_name

    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = adapter_name(item), item
        if name in out:
            raise TuneforgeError(f"--add-adapter: two adapters are named '{name}'; use NAME=RUN")
        out[name] = path
    return out


def _reply(model, tokenizer, args: argparse.Namespace) -> int:
    from tuneforge.eval.generate import generate

    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    [reply] = generate(
        model,
        tokenizer,
        [messages],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    print(reply)
    return 0


def cmd_reward(args: argparse.Namespace) -> int:
    from tuneforge.train.reward import load_reward_model, score

    model, tokenizer = load_reward_model(args.run)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    [value] = score(model, tokenizer, [messages], [args.response])
    print(f"{value:.4f}")
    return 0


def cmd_adapters_combine(args: argparse.Namespace) -> int:
    from tuneforge.methods.combine import combine_runs

    out = combine_runs(args.runs, args.weights, args.out, overwrite=args.overwrite)
    print(f"combined adapter saved to {out} (use it like any run folder)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from tuneforge.export import merge

    out = merge(args.run, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model saved to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tuneforge.eval.evaluate import evaluate_run, score_sheet, summary_lines

    if args.score_sheet:
        if args.review_sheet or args.data or args.overrides:
            raise TuneforgeError("--score-sheet only reads ratings; run it without other options")
        result = score_sheet(args.score_sheet, args.key, args.run)
        print(result["text"])
        return 0
    if not args.run:
        raise TuneforgeError("give a RUN folder to evaluate (or --score-sheet SHEET)")
    results = evaluate_run(args.run, args.data, args.overrides, args.review_sheet, args.key)
    print("\n".join(summary_lines(results)))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from tuneforge.config import load_config
    from tuneforge.estimate import estimate_config
    from tuneforge.recommend import describe_workload, format_table, parse_memory

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
    from tuneforge.recommend import format_table, parse_memory, recommend

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


def cmd_chat(args: argparse.Namespace) -> int:
    from tuneforge.chat import Sampling, chat
    from tuneforge.runs import parse_adapter_specs

    sampling = Sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    chat(args.run, parse_adapter_specs(args.adapters), sampling, args.system)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tuneforge.runs import parse_adapter_specs
    from tuneforge.serve import serve

    serve(
        args.model,
        parse_adapter_specs(args.adapters),
        args.host,
        args.port,
        args.device,
        args.threads,
    )
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from tuneforge.config import config_reference

    print(config_reference())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tuneforge import __version__

    p = argparse.ArgumentParser(
        prog="tuneforge",
        description="Fine-tune pretrained causal language models for your task.",
    )
    p.add_argument("--version", action="version", version=f"tuneforge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="fine-tune a model as a YAML config says",
        description="Fine-tune a model. Override any config key with key=value, e.g. "
        "training.learning_rate=1e-4 method.r=8. `tuneforge config-reference` lists every key.",
    )
    t.add_argument("config", help="YAML config file (see configs/)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    t.add_argument(
        "--resume", action="store_true", help="continue from the run's latest checkpoint"
    )
    t.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    t.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine (gloo on CPU, nccl on GPU); "
        "training.batch_size is per process. For several nodes use torchrun -m tuneforge train",
    )
    t.set_defaults(func=cmd_train)

    g = sub.add_parser(
        "generate",
        help="reply to a prompt with a run's model or any model",
        description="Generate a reply with the run's chat template; stops at end of turn.",
    )
    g.add_argument(
        "model", metavar="RUN_OR_MODEL", help="run folder, model folder, .gguf, alias or hub id"
    )
    g.add_argument("--prompt", required=True, help="the user message")
    g.add_argument("--system", default=None, help="optional system message")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--base", action="store_true", help="use the run's base model without its adapter"
    )
    g.add_argument(
        "--add-adapter",
        action="append",
        metavar="[NAME=]RUN",
        help="load another run's adapter onto the same base (repeatable); its name is the run "
        "folder's name unless given",
    )
    g.add_argument(
        "--adapter",
        metavar="NAME",
        default=None,
        help="the loaded adapter to generate with (default: the run's own, else the first added)",
    )
    g.set_defaults(func=cmd_generate)

    w = sub.add_parser(
        "reward",
        help="score a response with a reward-model run",
        description="Print the scalar reward a reward-model run (training.objective: reward) "
        "gives a response to a prompt; higher means more preferred.",
    )
    w.add_argument("run", metavar="RUN", help="reward-model run folder")
    w.add_argument("--prompt", required=True, help="the user message")
    w.add_argument("--response", required=True, help="the assistant response to score")
    w.add_argument("--system", default=None, help="optional system message")
    w.set_defaults(func=cmd_reward)

    a = sub.add_parser("adapters", help="work with several adapters (combine LoRA runs)")
    asub = a.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    c = asub.add_parser(
        "combine",
        help="weighted sum of LoRA runs' updates, saved as a new run",
        description="delta W = sum_i w_i * scale_i * B_i A_i, exact (the ranks are concatenated).",
    )
    c.add_argument("runs", nargs="+", metavar="RUN", help="LoRA run folders on the same base")
    c.add_argument(
        "--weights", nargs="+", type=float, required=True, help="one weight per run, e.g. 0.7 0.3"
    )
    c.add_argument("--out", required=True, help="folder for the combined run")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_adapters_combine)

    m = sub.add_parser(
        "merge",
        help="merge a run's adapter into its base model (fp32)",
        description="W' = W + scale*BA in fp32; saves a plain HF model folder.",
    )
    m.add_argument("run", metavar="RUN", help="run folder with an adapter/")
    m.add_argument("--out", required=True, help="output folder for the merged model")
    m.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the saved weights (the merge itself is always fp32)",
    )
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=cmd_merge)

    e = sub.add_parser(
        "eval",
        help="fine-tuned vs prompting baselines, forgetting, overfitting, review sheets, report",
        description="Evaluate a run on held-out data: task metrics for the base model zero-shot "
        "and few-shot, the fine-tuned model and fine-tuned + few-shot; forgetting (perplexity on "
        "general text); loss curves. Writes eval.json, report.md and report.html into the run. "
        "Override eval settings with key=value, e.g. eval.few_shot_k=5 eval.metrics=[bleu,chrf].",
    )
    e.add_argument("run", metavar="RUN", nargs="?", help="training run folder (output_dir)")
    e.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    e.add_argument("--data", default=None, help="held-out data (default: the run's data.eval)")
    e.add_argument(
        "--review-sheet",
        default=None,
        metavar="CSV",
        help="also write a blind A/B sheet (fine-tuned vs a prompting baseline, sides random)",
    )
    e.add_argument(
        "--score-sheet",
        default=None,
        metavar="CSV",
        help="read a filled-in review sheet (rating: A, B or tie) and report the win rate",
    )
    e.add_argument(
        "--key", default=None, metavar="CSV", help="review key file (default: SHEET.key.csv)"
    )
    e.set_defaults(func=cmd_eval)

    from tuneforge.cli_data import add_data_parser

    add_data_parser(sub)

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

    ch = sub.add_parser(
        "chat",
        help="chat in the terminal with a run's model (streaming)",
        description="Interactive chat with the run's chat template. Commands: /adapter NAME, "
        "/adapters, /base (adapters off), /reset, /exit.",
    )
    ch.add_argument("run", metavar="RUN_OR_MODEL", help="run folder or model reference")
    ch.add_argument(
        "--adapters", nargs="+", default=[], metavar="NAME=RUN", help="more adapters to switch to"
    )
    ch.add_argument("--system", default=None, help="system message for the conversation")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.add_argument("--seed", type=int, default=None)
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser(
        "serve",
        help="serve a run or model over an OpenAI-compatible HTTP API",
        description="/v1/chat/completions, /v1/completions, /v1/models (streaming by "
        "server-sent events). The request's model field picks an adapter; the base model's name "
        "turns adapters off.",
    )
    sv.add_argument("model", metavar="RUN_OR_MODEL", help="run folder or model reference")
    sv.add_argument(
        "--adapters", nargs="+", default=[], metavar="NAME=RUN", help="adapters to serve by name"
    )
    sv.add_argument("--port", type=int, required=True, help="TCP port (0: pick a free one)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    sv.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    sv.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for generation (default: torch's; 1 is often fastest for one "
        "sequence of a small model on a busy machine)",
    )
    sv.set_defaults(func=cmd_serve)

    r = sub.add_parser(
        "config-reference", help="print every config key with its default and meaning"
    )
    r.set_defaults(func=cmd_config_reference)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after flags (`train c.yaml --overwrite a.b=1`); argparse alone would
    # reject those, so collect key=value leftovers for train.
    args, extra = parser.parse_known_args(argv)
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    rest = [e for e in extra if e not in overrides]
    takes_overrides = ("train", "eval", "estimate")
    if rest or (overrides and args.command not in takes_overrides):
        parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
    if args.command in takes_overrides:
        args.overrides = list(args.overrides) + overrides
    try:
        if argv is None and args.command == "train":
            from tuneforge.train.memory import reexec_with_jemalloc

            reexec_with_jemalloc()  # the same command again, faster and leaner (train/memory.py)
        return args.func(args)
    except TuneforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tuneforge ... | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

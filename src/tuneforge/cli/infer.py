"""Using a trained run: `generate`, `chat`, `serve`, `reward`, `merge`, `adapters combine`."""

from __future__ import annotations

import argparse
import os

from tuneforge.errors import TuneforgeError


def cmd_generate(args: argparse.Namespace) -> int:
    from tuneforge.infer.runs import load_for_inference

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
    from tuneforge.infer.runs import adapter_name

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
    from tuneforge.infer.generate import generate

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


def cmd_chat(args: argparse.Namespace) -> int:
    from tuneforge.infer.chat import Sampling, chat
    from tuneforge.infer.runs import parse_adapter_specs

    sampling = Sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    chat(args.run, parse_adapter_specs(args.adapters), sampling, args.system)
    return 0


API_KEY_ENV = "TUNEFORGE_API_KEY"


def cmd_serve(args: argparse.Namespace) -> int:
    from tuneforge.infer.runs import parse_adapter_specs
    from tuneforge.infer.serve import serve

    key, source = args.api_key, "--api-key"
    if key is None and API_KEY_ENV in os.environ:
        key, source = os.environ[API_KEY_ENV], API_KEY_ENV
    serve(
        args.model,
        parse_adapter_specs(args.adapters),
        args.host,
        args.port,
        args.device,
        args.threads,
        api_key=key,
        key_source=source,
    )
    return 0


def cmd_reward(args: argparse.Namespace) -> int:
    from tuneforge.train.reward import load_reward_model, score

    model, tokenizer = load_reward_model(args.run)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    [value] = score(model, tokenizer, [messages], [args.response])
    print(f"{value:.4f}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from tuneforge.infer.export import merge

    out = merge(args.run, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model saved to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tuneforge.infer.gguf_export import export_gguf

    done = export_gguf(args.run, args.out, quant=args.quant, overwrite=args.overwrite)
    size = done.gguf.stat().st_size / 2**20
    print(f"wrote {done.gguf} ({size:.1f} MiB) and {done.modelfile}")
    if done.note:
        print(f"note: {done.note}")
    print(f"run it: ollama create NAME -f {done.modelfile}, or llama-cli -m {done.gguf}")
    return 0


def cmd_adapters_combine(args: argparse.Namespace) -> int:
    from tuneforge.methods.combine import combine_runs

    out = combine_runs(args.runs, args.weights, args.out, overwrite=args.overwrite)
    print(f"combined adapter saved to {out} (use it like any run folder)")
    return 0


def add_parsers(sub) -> None:
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
    sv.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every request (at least 16 characters; "
        f"default: ${API_KEY_ENV}, which keeps the key out of ps; else none on loopback, and a "
        "generated one, printed at start, on any other --host)",
    )
    sv.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    sv.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for generation (default: torch's; 1 is often fastest for one "
        "sequence of a small model on a busy machine)",
    )
    sv.set_defaults(func=cmd_serve)

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

    x = sub.add_parser(
        "export",
        help="export a run as a GGUF file for llama.cpp / Ollama (with a Modelfile)",
        description="Merge the run's adapter in fp32 (qlora: the 4-bit base dequantized first; "
        "full runs as saved) and write OUT/NAME.QUANT.gguf with the tokenizer, the run's chat "
        "template and end-of-turn token, and OUT/Modelfile for `ollama create`.",
    )
    x.add_argument("run", metavar="RUN", help="run folder")
    x.add_argument("--format", choices=("gguf",), default="gguf", help="file format (gguf)")
    x.add_argument(
        "--quant",
        default="f16",
        metavar="TYPE",
        help="f32, f16 (default), bf16; q8_0, q4_0, q4_k_m, q5_k_m, q6_k via llama.cpp's "
        "quantizer (needs tuneforge[gguf])",
    )
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=cmd_export)

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

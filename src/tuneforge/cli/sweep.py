"""`tuneforge sweep`: settings tried over seeds, the best with its uncertainty (sweep.py)."""

from __future__ import annotations

import argparse


def cmd_sweep(args: argparse.Namespace) -> int:
    from tuneforge.sweep import describe_setting, load_sweep, run_sweep, table

    spec = load_sweep(
        args.config,
        args.overrides,
        args.param,
        seeds=args.seeds,
        trials=args.trials,
        search=args.search,
        metric=args.metric,
        timeout_minutes=args.timeout_minutes,
        storage=args.storage,
        prune=False if args.no_prune else None,
    )
    n = len(spec.grid()) if spec.settings.search == "grid" else spec.settings.trials
    print(
        f"sweep: {n} settings x {len(spec.seeds)} seeds ({spec.settings.search}), "
        f"judged by {spec.settings.metric}; state in {spec.storage}",
        flush=True,
    )
    results = run_sweep(spec, say=lambda msg: print(msg, flush=True))
    print()
    print(table(results))
    if results["best"]:
        print(f"\nbest: {describe_setting(results['best']['params'])}")
        if results["comparison"]:
            print(results["comparison"]["text"])
        print(f"best config: {spec.out / 'best.yaml'} (tuneforge train {spec.out / 'best.yaml'})")
    print(f"results: {spec.out / 'sweep.md'}, sweep.json, sweep.png")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser(
        "sweep",
        help="try settings over several seeds; the best with its 95%% interval, as a config",
        description="Train every setting of a search space (the config's sweep: section or "
        "--param) once per seed, judge each on the eval data, and write sweep.json, sweep.md, "
        "sweep.png and best.yaml into output_dir. Run it again to continue a stopped sweep; "
        "run it on several machines with one --storage URL to share the work.",
    )
    s.add_argument("config", help="YAML config file (its sweep: section is the search space)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    s.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=V1,V2|KEY=LOW:HIGH[:log]",
        help="a key to search: a list of values, or a range (random / tpe); repeat for more",
    )
    s.add_argument("--seeds", type=int, default=None, help="seeds per setting (sweep.seeds)")
    s.add_argument("--trials", type=int, default=None, help="settings to try (sweep.trials)")
    s.add_argument("--search", choices=("grid", "random", "tpe"), default=None)
    s.add_argument("--metric", default=None, help="eval_loss or a task metric such as exact_match")
    s.add_argument(
        "--timeout-minutes", type=float, default=None, help="start no new setting after this"
    )
    s.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="SQLAlchemy URL of the sweep's database (default: sqlite in output_dir/sweep.db)",
    )
    s.add_argument("--no-prune", action="store_true", help="never stop a setting early")
    s.set_defaults(func=cmd_sweep)

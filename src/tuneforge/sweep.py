"""``tuneforge sweep``: try settings over several seeds and say which is best, with its
uncertainty.

A sweep is a config with a search space (``sweep.params``, or ``--param``). Each setting is
trained once per seed as an ordinary run folder (``OUT/trials/<setting>/seed-<seed>``, so
``eval``, ``merge`` and ``export`` work on it) and judged by ``sweep.metric`` on the eval data.
Optuna chooses the settings (grid, random or TPE) and stops a setting whose eval loss falls
behind (MedianPruner); its state lives in a database (SQLite in ``OUT/sweep.db`` by default, any
SQLAlchemy URL with ``--storage``), so a killed sweep continues where it stopped and several
processes or machines can work on one sweep. Every mistake in the search space is one line
before any training.

Results: ``sweep.json``, ``sweep.md`` (each setting's mean and 95% interval over seeds),
``sweep.png`` and ``best.yaml`` (the best setting as a config for ``tuneforge train``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from tuneforge import run_status
from tuneforge.config import Config, SweepConfig, dump_config, load_config
from tuneforge.errors import TuneforgeError
from tuneforge.files import write_atomic

STUDY = "sweep"
# two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond the table)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
        17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}  # fmt: skip


# -- the search space ---------------------------------------------------------------------------
@dataclass
class Param:
    """One key of the search space: a list of values, or a range (random and tpe only)."""

    key: str
    values: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def describe(self) -> str:
        if self.values is not None:
            return f"{self.key} in {self.values}"
        return f"{self.key} in [{self.low}, {self.high}]" + (" (log)" if self.log else "")


def _scalar(text: str):
    """A command-line value as YAML reads it, with numbers such as 1e-4 (a string to YAML 1.1)
    read as numbers."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def parse_cli_param(text: str) -> tuple[str, object]:
    """``KEY=V1,V2,...`` (a list) or ``KEY=LOW:HIGH[:log]`` (a range) -> (key, raw spec)."""
    if "=" not in text:
        raise TuneforgeError(
            f"--param {text!r} must look like KEY=V1,V2 or KEY=LOW:HIGH[:log] "
            "(e.g. training.learning_rate=1e-4,3e-4)"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = raw.split(":")
    if len(parts) in (2, 3) and all(p.strip() for p in parts[:2]) and "," not in raw:
        if len(parts) == 3 and parts[2].strip() != "log":
            raise TuneforgeError(f"--param {text!r}: a range is LOW:HIGH or LOW:HIGH:log")
        low, high = (_scalar(p) for p in parts[:2])
        return key, {"low": low, "high": high, "log": len(parts) == 3}
    values = [_scalar(v) for v in raw.split(",")] if raw.strip() else []
    return key, values


def parse_space(raw: dict, source: str) -> list[Param]:
    """``sweep.params`` (key -> list, or {low, high, log}) -> Params, each checked for its
    shape here and for its values against the config in ``check_space``."""
    out = []
    for key, spec in raw.items():
        where = f"{source}: 'sweep.params.{key}'"
        if key in ("training.seed", "output_dir"):
            raise TuneforgeError(f"{where} is set by the sweep itself (seeds: sweep.seeds)")
        if isinstance(spec, list):
            if not spec:
                raise TuneforgeError(f"{where} is an empty list; give at least one value")
            if len({json.dumps(v, sort_keys=True) for v in spec}) != len(spec):
                raise TuneforgeError(f"{where} lists a value twice")
            out.append(Param(str(key), values=list(spec)))
            continue
        if isinstance(spec, dict):
            unknown = set(spec) - {"low", "high", "log"}
            if unknown or "low" not in spec or "high" not in spec:
                raise TuneforgeError(f"{where}: a range is {{low: L, high: H, log: true|false}}")
            low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
                raise TuneforgeError(
                    f"{where}: low and high must be numbers, got {low!r}, {high!r}"
                )
            if not low < high:
                raise TuneforgeError(f"{where}: low must be below high, got {low} and {high}")
            if log and low <= 0:
                raise TuneforgeError(f"{where}: a log range needs low > 0, got {low}")
            out.append(Param(str(key), low=low, high=high, log=log))
            continue
        raise TuneforgeError(
            f"{where} must be a list of values or a range {{low: L, high: H}}, got {spec!r}"
        )
    return out


@dataclass
class SweepSpec:
    """A checked sweep: the base config file and overrides, the space, and how to search it."""

    config_path: str | None
    overrides: list[str]
    base: Config
    params: list[Param]
    settings: SweepConfig

    @property
    def out(self) -> Path:
        return Path(self.base.output_dir)

    @property
    def seeds(self) -> list[int]:
        return [self.base.training.seed + i for i in range(self.settings.seeds)]

    @property
    def maximize(self) -> bool:
        from tuneforge.eval.baselines import better

        return self.settings.metric != "eval_loss" and better(self.settings.metric, 1.0, 0.0)

    @property
    def storage(self) -> str:
        if self.settings.storage:
            return self.settings.storage
        return f"sqlite:///{(self.out / 'sweep.db').resolve()}"

    def ordered(self, params: dict) -> dict:
        """``params`` in the order of the search space (Optuna's order is its own)."""
        return {p.key: params[p.key] for p in self.params if p.key in params}

    def grid(self) -> list[dict]:
        keys = [p.key for p in self.params]
        return [dict(zip(keys, vals, strict=True)) for vals in
                itertools.product(*(p.values for p in self.params))]  # fmt: skip

    def config_for(self, params: dict, seed: int, run_dir: Path) -> Config:
        """The run config of one setting and seed (the sweep section cleared)."""
        overrides = [*self.overrides, *_overrides(params)]
        overrides += [f"training.seed={seed}", f"output_dir={run_dir}"]
        cfg = load_config(self.config_path, overrides + ["sweep.params={}"])
        cfg.sweep = SweepConfig()
        return cfg


def _overrides(params: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in params.items()]


def load_sweep(
    config_path: str | None,
    overrides: list[str],
    cli_params: list[str],
    **cli: object,
) -> SweepSpec:
    """Read the config and its sweep section, apply the command line (``--param`` and the
    sweep options in ``cli``, None where not given), and check every value of the space against
    the config: one line for any mistake, before any trial runs."""
    cfg = load_config(config_path, overrides)
    settings = dataclasses.replace(cfg.sweep)
    base = dataclasses.replace(cfg, sweep=SweepConfig())
    for name, value in cli.items():
        if value is not None:
            setattr(settings, name, value)
    source = config_path or "config"
    raw = dict(settings.params)
    for text in cli_params:
        key, spec = parse_cli_param(text)
        raw[key] = spec
    settings.params = raw
    if not raw:
        raise TuneforgeError(
            f"{source}: no search space; add a sweep: params: section or --param KEY=V1,V2"
        )
    params = parse_space(raw, source)
    spec = SweepSpec(config_path, overrides, base, params, settings)
    check_space(spec, source)
    return spec


def check_space(spec: SweepSpec, source: str) -> None:
    s, cfg = spec.settings, spec.base
    if s.seeds < 1:
        raise TuneforgeError(f"{source}: 'sweep.seeds' must be at least 1, got {s.seeds}")
    if s.trials < 0:
        raise TuneforgeError(f"{source}: 'sweep.trials' must be >= 0, got {s.trials}")
    if s.timeout_minutes < 0:
        raise TuneforgeError(f"{source}: 'sweep.timeout_minutes' must be >= 0")
    ranges = [p.key for p in spec.params if p.values is None]
    if s.search == "grid" and ranges:
        raise TuneforgeError(
            f"{source}: 'sweep.params.{ranges[0]}' is a range; a grid needs a list of values "
            "(or use --search random / tpe)"
        )
    if s.search != "grid" and s.trials == 0:
        raise TuneforgeError(
            f"{source}: 'sweep.trials' must be set for search {s.search} (how many settings)"
        )
    if not cfg.data.eval and not cfg.data.eval_split and not cfg.eval.data:
        raise TuneforgeError(
            f"{source}: a sweep judges settings on eval data; set data.eval (a validation file, "
            "not the test set) or data.eval_split"
        )
    if s.metric != "eval_loss":
        from tuneforge.eval.metrics import check_metric_names

        check_metric_names([s.metric], "'sweep.metric'")
        if s.metric == "perplexity":
            raise TuneforgeError(
                f"{source}: 'sweep.metric' perplexity ranks settings as eval_loss does; use eval_loss"
            )
        if cfg.training.objective != "sft":
            raise TuneforgeError(
                f"{source}: 'sweep.metric' {s.metric} is measured on sft runs; use eval_loss for "
                f"objective {cfg.training.objective}"
            )
    # every value of every key against the config: unknown keys, wrong types, bad values
    for p in spec.params:
        values = p.values if p.values is not None else [p.low, p.high]
        for v in values:
            try:
                cfg_v = load_config(
                    spec.config_path,
                    [*spec.overrides, f"{p.key}={json.dumps(v)}", "sweep.params={}"],
                )
            except TuneforgeError as e:
                raise TuneforgeError(
                    f"{source}: sweep.params.{p.key} = {v!r}: {_bare(e)}"
                ) from None
            if p.values is None:
                p.integer = isinstance(_get(cfg_v, p.key), int)
    if s.search == "grid":
        for point in spec.grid():
            try:
                load_config(spec.config_path, [*spec.overrides, *_overrides(point),
                                               "sweep.params={}"])  # fmt: skip
            except TuneforgeError as e:
                raise TuneforgeError(f"{source}: the setting {point}: {_bare(e)}") from None


def _bare(e: TuneforgeError) -> str:
    """The message without its 'override: ' / 'config: ' prefix."""
    return re.sub(r"^(override|config|[^:]+\.ya?ml(:\d+)?): ", "", str(e))


def _get(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


# -- running ------------------------------------------------------------------------------------
def slug(params: dict) -> str:
    """A folder name for a setting: readable where short, a hash where not."""
    import hashlib

    text = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in params.items())
    text = re.sub(r"[^A-Za-z0-9._=-]+", "-", text)
    if len(text) > 80:
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
        text = text[:60] + "-" + digest
    return text


class PruneHook:
    """A train() logger: reports the first seed's eval loss to the Optuna trial at each
    evaluation, raises ``TrialPruned`` when the pruner says so, and marks the trial alive."""

    def __init__(self, trial, maximize: bool, prune: bool = True):
        self.trial, self.sign, self.prune = trial, -1.0 if maximize else 1.0, prune
        self.last_alive = 0.0

    def log(self, record: dict) -> None:
        import optuna

        now = time.time()
        if now - self.last_alive > 60:
            self.trial.set_user_attr("alive_at", now)
            self.last_alive = now
        if "eval_loss" not in record or not self.prune:
            return
        self.trial.report(self.sign * record["eval_loss"], record["step"])
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"eval loss {record['eval_loss']:.4f} at step {record['step']} is behind the "
                "other settings at that step"
            )

    def close(self) -> None:
        pass


def _distributions(params: list[Param]) -> dict:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out = {}
    for p in params:
        if p.values is not None:
            out[p.key] = CategoricalDistribution(p.values)
        elif p.integer:
            out[p.key] = IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            out[p.key] = FloatDistribution(float(p.low), float(p.high), log=p.log)
    return out


def _storage(url: str, attempts: int = 5):
    """Optuna's RDB storage; two workers starting at once may race to create the tables in a
    new database (one sees a half-made schema): the loser waits and tries again.

    SQLite ignores the SELECT ... FOR UPDATE that Optuna relies on to take a queued trial, so two
    workers could both take the same one (and train one run folder at once): there every
    transaction begins with BEGIN IMMEDIATE, which makes each read-then-write atomic."""
    import random

    import optuna
    import sqlalchemy
    import sqlalchemy.exc

    sqlite = url.startswith("sqlite")
    # isolation_level None: pysqlite sends no BEGIN of its own; the listener below sends it
    kwargs = {"connect_args": {"timeout": 120, "isolation_level": None}} if sqlite else {}
    for attempt in range(attempts):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
            break
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random())
    if sqlite:
        sqlalchemy.event.listen(
            storage.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE")
        )
    return storage


def make_pruner(prune: bool):
    """ "Clearly behind": worse than three quarters of the settings that reached the same step,
    judged once at least two others did and three settings are finished."""
    import optuna

    if not prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.PercentilePruner(75.0, n_startup_trials=3, n_min_trials=2)


def trial_seeded_sampler(search: str, seed: int):
    """Optuna's sampler for ``search`` (grid: random draws, used only when no grid point is
    queued), its random state seeded from each trial's number just before the trial draws.
    Trial n then draws the same setting whichever worker takes it: with one seed for the whole
    sampler, a second worker would draw the first one's settings in step, and a resumed sweep
    would draw its first settings again."""
    import optuna

    base = optuna.samplers.TPESampler if search == "tpe" else optuna.samplers.RandomSampler

    class TrialSeeded(base):
        def before_trial(self, study, trial) -> None:
            super().before_trial(study, trial)
            state = (seed * 1_000_003 + trial.number) % 2**32
            self._rng.rng.seed(state)
            if hasattr(self, "_random_sampler"):  # TPE's first trials are its random sampler's
                self._random_sampler._rng.rng.seed(state)

    return TrialSeeded(seed=seed)


def open_study(spec: SweepSpec):
    """The sweep's Optuna study, created or loaded; refuses a different search space."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec.out.mkdir(parents=True, exist_ok=True)
    s = spec.settings
    sampler = trial_seeded_sampler(s.search, spec.base.training.seed)
    pruner = make_pruner(s.prune)
    try:
        storage = _storage(spec.storage)
        study = optuna.create_study(
            study_name=STUDY,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            direction="maximize" if spec.maximize else "minimize",
            load_if_exists=True,
        )
    except Exception as e:  # a bad URL, a database that cannot be reached
        raise TuneforgeError(f"--storage {spec.storage}: {type(e).__name__}: {e}") from None
    identity = {
        "space": {p.key: dataclasses.asdict(p) for p in spec.params},
        "metric": s.metric,
        "search": s.search,
        "seeds": spec.seeds,
        "trials": s.trials,
    }
    if "identity" not in study.user_attrs:
        study.set_user_attr("identity", identity)
    elif study.user_attrs["identity"] != identity:
        raise TuneforgeError(
            f"{spec.storage}: this sweep was started with another search space, metric, "
            "search or seeds; use another output_dir (or --storage) for a new sweep"
        )
    return study


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead(trial) -> bool:
    """A running trial whose worker process is gone (this machine) or silent too long."""
    worker = trial.user_attrs.get("worker", "")
    host, _, pid = worker.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return not run_status.alive(int(pid))
    alive = trial.user_attrs.get("alive_at") or trial.datetime_start.timestamp()
    return time.time() - alive > run_status.STALE_SECONDS


def recover(study) -> list[int]:
    """Running trials whose worker died: failed, and their settings queued again (their seed runs
    resume from their checkpoints). Returns the trial numbers recovered."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _dead(t):
            # FrozenTrial keeps its storage id private; Optuna's own callbacks read it the same way
            try:
                failed = study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:  # finished meanwhile, or another worker recovered it
                continue
            if failed and _setting(t):
                study.enqueue_trial(_setting(t), user_attrs={"retry_of": t.number})
                out.append(t.number)
    return out


def _setting(t) -> dict:
    """A trial's setting: the params it was queued with (a worker that just took it from the
    queue is still suggesting them), else its params ({} while the sampler draws them)."""
    return t.system_attrs.get("fixed_params") or t.params


def _taken(study) -> list[dict]:
    """Settings done or under way (complete, pruned, running or queued; not failed)."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    return [_setting(t) for t in study.get_trials(deepcopy=False, states=states)]


def next_grid_point(spec: SweepSpec, study) -> dict | None:
    taken = [json.dumps(p, sort_keys=True) for p in _taken(study)]
    for point in spec.grid():
        if json.dumps(point, sort_keys=True) not in taken:
            return point
    return None


def _duplicate(study, trial, grid: bool, wait: float = 10.0) -> bool:
    """An earlier trial has this setting queued or running, or (grid) ran it: two workers queued
    the same grid point at once, or drew the same setting, and the trial with the lower number
    keeps it. (Random and TPE may draw a setting again once it is done: its runs are reused, not
    trained again.) An earlier trial whose setting is still being drawn is waited for (up to
    ``wait`` seconds; its worker writes it within moments, unless it died doing so)."""
    from optuna.trial import TrialState

    me = json.dumps(trial.params, sort_keys=True)
    keep = (TrialState.WAITING, TrialState.RUNNING) + (
        (TrialState.COMPLETE, TrialState.PRUNED) if grid else ())  # fmt: skip
    end = time.time() + wait
    while True:
        earlier = [t for t in study.get_trials(deepcopy=False)
                   if t.number < trial.number and t.state in keep]  # fmt: skip
        if any(json.dumps(_setting(t), sort_keys=True) == me for t in earlier):
            return True
        if all(len(_setting(t)) == len(trial.params) for t in earlier) or time.time() > end:
            return False
        time.sleep(0.2)


class Busy(Exception):
    """A live process on this machine trains the run folder: the setting is left to it."""


def run_setting(spec: SweepSpec, trial, params: dict, say) -> tuple[float, dict]:
    """Train (or resume, or reuse) the setting's run for each seed; returns (mean metric,
    per-seed metrics). Raises Busy rather than overwrite a run that another process trains."""
    from tuneforge.train import train

    values: dict[str, float] = {}
    for i, seed in enumerate(spec.seeds):
        run_dir = spec.out / "trials" / slug(params) / f"seed-{seed}"
        value = _finished_value(run_dir, spec.settings.metric)
        if value is None:
            record = run_status.read(run_dir)
            if run_status.running_here(record):
                raise Busy(f"{run_dir} is being trained by process {record['pid']}")
            cfg = spec.config_for(params, seed, run_dir)
            cfg.training.progress = False
            resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
            hooks = [PruneHook(trial, spec.maximize, prune=i == 0)]  # the first seed decides
            summary = train(cfg, resume=resume, overwrite=not resume, loggers=hooks)
            value = measure(run_dir, cfg, summary, spec.settings.metric)
        values[str(seed)] = value
        trial.set_user_attr("values", values)
        say(f"  seed {seed}: {spec.settings.metric} {value:.4f}  ({run_dir})")
    return sum(values.values()) / len(values), values


def _finished_value(run_dir: Path, metric: str) -> float | None:
    path = run_dir / "sweep_metric.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("metric") == metric:
            return float(data["value"])
    return None


def measure(run_dir: Path, cfg: Config, summary: dict, metric: str) -> float:
    """The setting's metric for one finished run, kept in ``sweep_metric.json`` beside it."""
    if metric == "eval_loss":
        value = summary.get("best_eval_loss")
        if value is None:
            history = summary.get("eval_history") or []
            value = min((v for _, v in history), default=None)
        if value is None:
            raise TuneforgeError(f"{run_dir}: the run logged no eval loss")
    else:
        value = generation_metric(run_dir, cfg, metric)
    write_atomic(run_dir / "sweep_metric.json", json.dumps({"metric": metric, "value": value}))
    return float(value)


def generation_metric(run_dir: Path, cfg: Config, metric: str) -> float:
    """``metric`` of the run's greedy answers to the eval data (eval.data, else data.eval)."""
    from tuneforge.eval.baselines import load_eval_set
    from tuneforge.eval.metrics import task_metrics
    from tuneforge.infer.generate import generate
    from tuneforge.infer.runs import load_for_inference

    e = cfg.eval
    path = e.data or cfg.data.eval
    if not path:
        raise TuneforgeError(
            f"sweep.metric {metric} is measured on eval.data or data.eval (a file); "
            "data.eval_split leaves none"
        )
    evalset = load_eval_set(path, cfg.data.format, cfg.data.system_prompt, e.max_examples)
    model, tok = load_for_inference(str(run_dir), adapter=True)
    if e.merge_adapter and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    answers = generate(
        model, tok, evalset.prompts, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size
    )
    return float(task_metrics([metric], answers, evalset.references, e.labels)[metric])


def run_sweep(spec: SweepSpec, say=print) -> dict:
    """Work on the sweep until no setting is left (or the time budget is spent); then write
    the results from every worker's trials. Returns the results."""
    import optuna
    from optuna.trial import TrialState

    study = open_study(spec)
    s = spec.settings
    deadline = time.time() + 60 * s.timeout_minutes if s.timeout_minutes else None
    distributions = _distributions(spec.params)
    for number in recover(study):
        say(f"trial {number}: its worker stopped; queued again (its runs resume)")
    while deadline is None or time.time() < deadline:
        recover(study)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if s.search == "grid" and not waiting:
            point = next_grid_point(spec, study)
            if point is None:
                break
            study.enqueue_trial(point)
        elif s.search != "grid" and not waiting:
            started = study.get_trials(deepcopy=False, states=(
                TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))  # fmt: skip
            if len(started) >= s.trials:
                break
        trial = study.ask(distributions)
        trial.set_user_attr("worker", _worker())
        trial.set_user_attr("alive_at", time.time())  # not its start: naive local time, per host
        if _duplicate(study, trial, s.search == "grid"):
            trial.set_user_attr("duplicate", True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        params = spec.ordered(trial.params)
        say(f"trial {trial.number}: {describe_setting(params)}")
        try:
            value, _ = run_setting(spec, trial, params, say)
        except optuna.TrialPruned as e:
            say(f"  pruned: {e}")
            study.tell(trial, state=TrialState.PRUNED)
            continue
        except Busy as e:
            say(f"  {e}; leaving this setting to it")
            trial.set_user_attr("duplicate", True)
            study.tell(trial, state=TrialState.FAIL)
            time.sleep(5)  # the setting may be queued again at once: no spinning while it trains
            continue
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, value)
    results = summarize(spec, study)
    write_results(spec, results)
    return results


# -- results ------------------------------------------------------------------------------------
def mean_ci(values: list[float]) -> tuple[float, float | None, float | None]:
    """Mean and the 95% t interval over seeds (None with one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T975.get(n - 1) or (T975[max(k for k in T975 if k <= n - 1)] if n - 1 <= 30 else 1.96)
    half = t * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def summarize(spec: SweepSpec, study) -> dict:
    """One row per setting (a finished trial over a failed one, the first of repeats), best
    first, with the comparison of the best and the runner-up."""
    from optuna.trial import TrialState

    rows: dict[str, dict] = {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("duplicate") or t.state in (TrialState.WAITING, TrialState.RUNNING):
            continue
        values = t.user_attrs.get("values", {})
        if t.state == TrialState.FAIL and not values:
            continue
        key = json.dumps(t.params, sort_keys=True)
        if key in rows and (rows[key]["state"] != "FAIL" or t.state == TrialState.FAIL):
            continue
        row = {"trial": t.number, "state": t.state.name, "params": spec.ordered(t.params),
               "values": values}  # fmt: skip
        if t.state == TrialState.COMPLETE:
            mean, lo, hi = mean_ci(list(values.values()))
            row.update(mean=mean, ci95=[lo, hi] if lo is not None else None)
        rows[key] = row
    done = [r for r in rows.values() if r["state"] == "COMPLETE"]
    done.sort(key=lambda r: -r["mean"] if spec.maximize else r["mean"])
    others = [r for r in rows.values() if r["state"] != "COMPLETE"]
    return {
        "metric": spec.settings.metric,
        "direction": "maximize" if spec.maximize else "minimize",
        "search": spec.settings.search,
        "seeds": spec.seeds,
        "space": [p.describe() for p in spec.params],
        "settings": done + others,
        "best": done[0] if done else None,
        "comparison": compare(done[0], done[1], spec.maximize) if len(done) > 1 else None,
    }


def compare(best: dict, runner: dict, maximize: bool) -> dict:
    """Does the best setting beat the runner-up by more than the seed noise? The paired
    difference over the seeds both ran, and its 95% t interval."""
    seeds = [s for s in best["values"] if s in runner["values"]]
    diffs = [best["values"][s] - runner["values"][s] for s in seeds]
    if not maximize:
        diffs = [-d for d in diffs]  # positive: the best is better
    mean, lo, hi = mean_ci(diffs) if diffs else (0.0, None, None)
    beats = lo is not None and lo > 0
    if lo is None:
        text = (
            "One seed: the difference to the runner-up has no estimate of the seed noise; "
            "run with --seeds 2 or more to know whether it is real."
        )
    elif beats:
        text = (
            f"The best setting beats the runner-up by {mean:.4g} (95% CI {lo:.4g} to {hi:.4g} "
            f"over {len(diffs)} seeds): more than the seed noise."
        )
    else:
        text = (
            f"The best setting is ahead of the runner-up by {mean:.4g}, but the 95% CI of the "
            f"difference ({lo:.4g} to {hi:.4g} over {len(diffs)} seeds) includes 0: within the "
            "seed noise."
        )
    return {"difference": mean, "ci95": [lo, hi] if lo is not None else None, "beats": beats,
            "seeds": len(diffs), "text": text}  # fmt: skip


def describe_setting(params: dict) -> str:
    """``learning_rate=0.0003, r=16``: the last part of each key, numbers to 4 digits."""
    return ", ".join(
        f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
        for k, v in params.items()
    )


def table(results: dict) -> str:
    metric = results["metric"]
    lines = [
        f"| setting | {metric} mean | 95% CI over seeds | per seed | state |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results["settings"]:
        setting = describe_setting(r["params"])
        per = ", ".join(f"{v:.4f}" for v in r["values"].values())
        mean = f"{r['mean']:.4f}" if "mean" in r else "-"
        ci = f"{r['ci95'][0]:.4f} to {r['ci95'][1]:.4f}" if r.get("ci95") else "-"
        lines.append(f"| {setting} | {mean} | {ci} | {per} | {r['state'].lower()} |")
    return "\n".join(lines)


def write_results(spec: SweepSpec, results: dict) -> None:
    out = spec.out
    write_atomic(out / "sweep.json", json.dumps(results, indent=2))
    md = [f"# Sweep: {results['metric']} ({results['direction']})", "",
          "Space: " + "; ".join(results["space"]) + f"; seeds {results['seeds']}.", "",
          table(results), ""]  # fmt: skip
    if results["best"]:
        md.append("Best: " + describe_setting(results["best"]["params"]))
        if results["comparison"]:
            md.append(results["comparison"]["text"])
        cfg = spec.config_for(results["best"]["params"], spec.base.training.seed, out / "best")
        dump_config(cfg, out / "best.yaml")
        md.append(f"\n`tuneforge train {out / 'best.yaml'}` trains it.")
    write_atomic(out / "sweep.md", "\n".join(md) + "\n")
    plot(results, out / "sweep.png")


def plot(results: dict, path: Path) -> None:
    """Each finished setting's mean and 95% interval (a dot per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results["settings"] if "mean" in r]
    if not done:
        return
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(done) + 1.2))
    for i, r in enumerate(done):
        y = len(done) - 1 - i
        if r.get("ci95"):
            ax.plot(r["ci95"], [y, y], color="tab:blue", lw=3, alpha=0.4)
        ax.plot([r["mean"]], [y], "o", color="tab:blue")
        ax.plot(list(r["values"].values()), [y] * len(r["values"]), "x", color="gray")
    ax.set_yticks(range(len(done)))
    ax.set_yticklabels([describe_setting(r["params"]) for r in done][::-1])
    ax.set_xlabel(f"{results['metric']} (mean, 95% CI over seeds; x: each seed)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)

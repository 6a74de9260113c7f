"""``tuneforge sweep``: the search space checked before any trial, the results over seeds,
continuing a killed sweep, two workers on one SQLite study, pruning, the interval arithmetic."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tuneforge.errors import TuneforgeError

from .conftest import ROOT, run_cli, write_jsonl

DATES = [json.loads(x) for x in (ROOT / "examples/dates/train.jsonl").read_text().splitlines()]


def sweep_config(tmp_path: Path, sweep: dict | None, **training) -> Path:
    """A tiny-llama LoRA config with a sweep section, in tmp_path."""
    train = write_jsonl(tmp_path / "train.jsonl", DATES[:16])
    held = write_jsonl(tmp_path / "eval.jsonl", DATES[16:22])
    cfg = {
        "model": "tiny-llama",
        "output_dir": str(tmp_path / "sweep"),
        "method": {"name": "lora", "r": 4, "lora_alpha": 8},
        "data": {"train": str(train), "eval": str(held), "max_length": 96},
        "training": {"max_steps": 4, "eval_steps": 2, "batch_size": 4, "progress": False,
                     **training},
    }  # fmt: skip
    if sweep is not None:
        cfg["sweep"] = sweep
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


SPACE = {"params": {"training.learning_rate": [1e-3, 4e-3], "method.r": [2, 4]}}


@pytest.mark.parametrize(
    "params, extra, message",
    [
        (["--param", "method.rr=2,4"], [], "sweep.params.method.rr = 2: unknown key 'rr' in method; did you mean 'r'?"),
        (["--param", "method.r="], [], "'sweep.params.method.r' is an empty list"),
        (["--param", "method.r=two,4"], [], "sweep.params.method.r = 'two': 'method.r' must be an integer"),
        (["--param", "method.r=2,2"], [], "lists a value twice"),
        (["--param", "training.learning_rate=1e-4:1e-2"], [], "is a range; a grid needs a list of values"),
        (["--param", "training.learning_rate=1e-2:1e-4:log", "--search", "tpe", "--trials", "2"], [], "low must be below high"),
        (["--param", "method.r=2,4", "--search", "random"], [], "'sweep.trials' must be set for search random"),
        (["--param", "method.r=2,4", "--metric", "exactmatch"], [], "unknown metric 'exactmatch'"),
        (["--param", "training.seed=1,2"], [], "is set by the sweep itself"),
        (["--param", "method.r=2,4"], ["data.eval=null"], "a sweep judges settings on eval data"),
        (["--param", "method.r=0,4"], [], "sweep.params.method.r = 0: 'method.r' must be"),
        ([], [], "no search space"),
    ],
)  # fmt: skip
def test_bad_search_spaces_are_one_line_before_any_trial(tmp_path, params, extra, message):
    config = sweep_config(tmp_path, None)
    r = run_cli("sweep", str(config), *extra, *params)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "sweep").exists()  # nothing trained, no database


def test_train_refuses_a_config_with_a_search_space(tmp_path):
    r = run_cli("train", str(sweep_config(tmp_path, SPACE)))
    assert r.returncode == 2 and "run it with `tuneforge sweep CONFIG`" in r.stderr


def test_a_grid_over_two_seeds_gives_each_setting_its_mean_and_interval(tmp_path):
    """2 settings x 2 seeds: four ordinary run folders; each setting's per-seed values are
    its runs' best eval losses, its mean and t interval are computed from them, the table is
    best first, best.yaml is the best setting as a train config; running the command again
    trains nothing."""
    from tuneforge.config import load_config
    from tuneforge.sweep import mean_ci

    space = {"training.learning_rate": [4e-3], "method.r": [2, 4]}
    config = sweep_config(tmp_path, {"params": space, "seeds": 2, "prune": False})
    r = run_cli("sweep", str(config))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "sweep"
    results = json.loads((out / "sweep.json").read_text())
    settings = results["settings"]
    assert len(settings) == 2 and all(s["state"] == "COMPLETE" for s in settings)
    assert sorted(s["params"]["method.r"] for s in settings) == [2, 4]
    assert all(list(s["params"]) == ["training.learning_rate", "method.r"] for s in settings)
    for s in settings:
        assert list(s["values"]) == ["42", "43"]
        for seed, value in s["values"].items():
            run = (
                out
                / "trials"
                / f"learning_rate-{s['params']['training.learning_rate']}_r-{s['params']['method.r']}"
                / f"seed-{seed}"
            )
            summary = json.loads((run / "summary.json").read_text())
            assert summary["best_eval_loss"] == pytest.approx(value)
            saved = load_config(run / "config.yaml")
            assert saved.training.seed == int(seed) and saved.method.r == s["params"]["method.r"]
        mean, lo, hi = mean_ci(list(s["values"].values()))
        assert s["mean"] == pytest.approx(mean) and s["ci95"] == pytest.approx([lo, hi])
    means = [s["mean"] for s in settings]
    assert means == sorted(means)  # eval loss: lowest first
    assert results["best"] == settings[0] and "seeds" in results["comparison"]["text"]
    best = load_config(out / "best.yaml")
    assert best.method.r == settings[0]["params"]["method.r"]
    assert best.training.learning_rate == settings[0]["params"]["training.learning_rate"]
    assert not best.sweep.params and best.output_dir == str(out / "best")
    assert (out / "sweep.png").stat().st_size > 1000 and "| setting |" in (
        out / "sweep.md"
    ).read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/*/summary.json")}
    assert len(stamps) == 4
    again = run_cli("sweep", str(config))
    assert again.returncode == 0 and "seed 42" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/*/summary.json")} == stamps
    # another space in the same folder is refused
    other = run_cli("sweep", str(config), "--param", "method.r=2,8")
    assert other.returncode == 2 and "started with another search space" in other.stderr


def _wait_for(predicate, timeout: float, proc=None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_killed_sweep_continues_and_never_repeats_a_finished_setting(tmp_path):
    """Killed (SIGKILL) while its second setting trains: run again, it resumes that setting's
    run from its checkpoint, trains the rest, and leaves the first setting's runs untouched.
    The resumed run ends equal to the same setting trained in one go."""
    from safetensors.torch import load_file

    space = {"params": {"training.learning_rate": [1e-3, 2e-3, 4e-3]}, "prune": False}
    config = sweep_config(tmp_path, space, max_steps=12, save_steps=2, eval_steps=4)
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "tuneforge", "sweep", str(config)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    second = out / "trials" / "learning_rate-0.002" / "seed-42"

    def second_is_training() -> bool:
        # any checkpoint, not one step's: older ones are rotated out within a few steps,
        # quicker than a loaded machine polls
        return (
            any((second / "checkpoints").glob("step-*")) and not (second / "summary.json").exists()
        )

    try:
        _wait_for(second_is_training, 300, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = out / "trials" / "learning_rate-0.001" / "seed-42" / "summary.json"
    stamp = first.stat().st_mtime_ns
    assert not (second / "summary.json").exists()
    r = run_cli("sweep", str(config))
    assert r.returncode == 0, r.stderr
    assert "its worker stopped; queued again" in r.stdout
    assert first.stat().st_mtime_ns == stamp
    results = json.loads((out / "sweep.json").read_text())
    done = [s for s in results["settings"] if s["state"] == "COMPLETE"]
    assert sorted(s["params"]["training.learning_rate"] for s in done) == [1e-3, 2e-3, 4e-3]
    assert len(results["settings"]) == 3  # the killed trial is not listed twice
    # the resumed run equals the setting trained without a kill
    from tuneforge.config import load_config
    from tuneforge.train import train

    cfg = load_config(second / "config.yaml", [f"output_dir={tmp_path / 'clean'}"])
    train(cfg)
    a = load_file(str(second / "adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "clean/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_two_workers_share_one_sqlite_sweep(tmp_path):
    """Two processes on one sweep: every setting is trained exactly once, by one of them, and
    both took part."""
    import optuna

    space = {"params": {"training.learning_rate": [1e-3, 2e-3, 3e-3, 4e-3]}, "prune": False}
    config = sweep_config(tmp_path, space, max_steps=6, eval_steps=3)
    cmd = [sys.executable, "-m", "tuneforge", "sweep", str(config)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    out = tmp_path / "sweep"
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'sweep.db'}")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["training.learning_rate"] for t in done) == [1e-3, 2e-3, 3e-3, 4e-3]
    workers = {t.user_attrs["worker"] for t in done}
    assert len(workers) == 2, workers
    assert len(list(out.glob("trials/*/seed-42/summary.json"))) == 4
    # each setting was trained by exactly one worker
    assert sum(o[0].count("seed 42:") for o in outs) == 4


# a worker taking queued trials as fast as it can, from a given moment (argv: storage URL, time)
TAKE = """
import json, sys, time
import optuna
from tuneforge.sweep import STUDY, _storage
study = optuna.load_study(study_name=STUDY, storage=_storage(sys.argv[1]))
while time.time() < float(sys.argv[2]):
    pass
taken = []
while (number := study.ask().number) < 300:  # the queue holds trials 0 to 299
    taken.append(number)
print(json.dumps(taken))
"""


def test_two_workers_never_take_the_same_queued_trial_from_sqlite(tmp_path):
    """SQLite ignores the SELECT ... FOR UPDATE with which Optuna takes a queued trial: without
    BEGIN IMMEDIATE two workers took one trial several times in 300 (and trained one run
    folder at once)."""
    import optuna

    from tuneforge.sweep import STUDY, _storage

    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    study = optuna.create_study(study_name=STUDY, storage=_storage(url))
    for i in range(300):
        study.enqueue_trial({"x": i})
    start = str(time.time() + 5)  # both are up by then; they start at once
    procs = [subprocess.Popen([sys.executable, "-c", TAKE, url, start], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    a, b = (set(json.loads(o[0])) for o in outs)
    assert not a & b and a | b == set(range(300))


def test_a_setting_taken_or_drawn_a_moment_ago_is_a_duplicate():
    """A worker that just took a queued grid point is still suggesting its params, and one whose
    sampler draws a setting has none yet: a later trial of the same setting is still the
    duplicate (it waits for the drawn setting), a later trial of another setting is not."""
    import threading

    import optuna
    from optuna.distributions import CategoricalDistribution

    from tuneforge.sweep import _duplicate

    key = "training.learning_rate"
    space = {key: CategoricalDistribution([1e-3, 2e-3])}
    study = optuna.create_study()
    for lr in (1e-3, 1e-3, 2e-3):  # two workers queued the same grid point at once
        study.enqueue_trial({key: lr})
    taken = study.ask()  # popped from the queue; its params are not suggested yet
    assert taken.params == {}
    same, other = study.ask(space), study.ask(space)
    assert _duplicate(study, same, grid=True) and not _duplicate(study, other, grid=True)

    # random search: both workers draw 2e-3 (the only value), the first one's not written yet
    study = optuna.create_study()
    drawing = study.ask()
    late = study.ask({key: CategoricalDistribution([2e-3])})
    assert drawing.params == {} and late.params == {key: 2e-3}
    threading.Timer(0.5, drawing.suggest_categorical, (key, [2e-3])).start()
    assert _duplicate(study, late, grid=False)


def test_a_run_folder_that_a_live_process_trains_is_left_to_it(tmp_path):
    """Defence in depth: a seed run whose status.json names a live process on this machine is
    neither overwritten nor resumed; the trial is left (Busy) before anything loads."""
    from tuneforge import run_status
    from tuneforge.sweep import Busy, load_sweep, run_setting, slug

    spec = load_sweep(str(sweep_config(tmp_path, SPACE)), [], [])
    params = {"training.learning_rate": 1e-3, "method.r": 2}
    run_dir = spec.out / "trials" / slug(params) / "seed-42"
    run_dir.mkdir(parents=True)
    run_status.mark(run_dir, run_status.RUNNING)  # this process: alive, on this machine
    with pytest.raises(Busy, match=f"seed-42 is being trained by process {os.getpid()}"):
        run_setting(spec, None, params, print)
    assert sorted(x.name for x in run_dir.iterdir()) == ["status.json"]


def test_a_setting_behind_the_median_is_pruned():
    """The hook reports eval loss to the trial; a trial the study's pruner judges behind at a step
    is stopped (TrialPruned), one that is better goes on. Maximised metrics report the loss negated, so the pruner's direction holds."""
    import optuna

    from tuneforge.sweep import PruneHook

    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for loss in (1.0, 1.2):
        t = study.ask()
        t.report(loss, 2)
        study.tell(t, loss)
    good, bad = study.ask(), study.ask()
    PruneHook(good, maximize=False).log({"step": 2, "eval_loss": 0.9})
    with pytest.raises(
        optuna.TrialPruned, match="eval loss 1.5000 at step 2 is behind the other settings"
    ):
        PruneHook(bad, maximize=False).log({"step": 2, "eval_loss": 1.5})
    PruneHook(bad, maximize=False, prune=False).log({"step": 2, "eval_loss": 1.5})  # other seeds

    up = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2)
    )
    for loss in (1.0, 1.2):
        t = up.ask()
        t.report(-loss, 2)
        up.tell(t, 50.0)
    PruneHook(up.ask(), maximize=True).log({"step": 2, "eval_loss": 0.9})
    with pytest.raises(optuna.TrialPruned):
        PruneHook(up.ask(), maximize=True).log({"step": 2, "eval_loss": 1.5})


def test_the_sweep_prunes_only_a_setting_clearly_behind():
    """The sweep's pruner: three finished settings, of which only one reached step 12: a setting
    behind it there goes on (one other is no evidence); once two reached step 12, a setting
    worse than both is stopped, and one between them goes on."""
    import optuna

    from tuneforge.sweep import make_pruner

    study = optuna.create_study(pruner=make_pruner(True))
    for losses in ({4: 1.0, 8: 0.5}, {4: 1.1, 8: 0.6}, {4: 0.9, 8: 0.4, 12: 0.30}):
        t = study.ask()
        for step, loss in losses.items():
            t.report(loss, step)
        study.tell(t, min(losses.values()))
    late = study.ask()
    late.report(0.35, 12)
    assert not late.should_prune()
    study.tell(late, 0.35)  # now two settings reached step 12: 0.30 and 0.35
    behind, between = study.ask(), study.ask()
    behind.report(0.50, 12)
    between.report(0.32, 12)
    assert behind.should_prune() and not between.should_prune()
    assert isinstance(make_pruner(False), optuna.pruners.NopPruner)


def test_mean_ci_and_the_comparison_by_hand():
    """[1, 2, 3]: mean 2, sd 1, t(0.975, 2) = 4.303 -> 2 +- 4.303 / sqrt(3). The best beats the
    runner-up when the paired differences' interval excludes 0."""
    from tuneforge.sweep import compare, mean_ci

    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    half = 4.303 / math.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert mean_ci([5.0]) == (5.0, None, None)
    best = {"values": {"1": 0.50, "2": 0.52, "3": 0.51}}
    runner = {"values": {"1": 0.60, "2": 0.61, "3": 0.63}}
    c = compare(best, runner, maximize=False)  # eval loss: lower is better
    assert c["beats"] and c["difference"] == pytest.approx((0.10 + 0.09 + 0.12) / 3)
    assert c["ci95"][0] > 0 and "more than the seed noise" in c["text"]
    noisy = {"values": {"1": 0.40, "2": 0.70, "3": 0.50}}
    c = compare(best, noisy, maximize=False)
    assert not c["beats"] and "includes 0" in c["text"]
    one = compare({"values": {"1": 1.0}}, {"values": {"1": 0.0}}, maximize=True)
    assert not one["beats"] and "One seed" in one["text"]


def test_command_line_values_are_numbers():
    from tuneforge.sweep import parse_cli_param

    assert parse_cli_param("training.learning_rate=1e-4,3e-4") == (
        "training.learning_rate",
        [1e-4, 3e-4],
    )
    assert parse_cli_param("training.learning_rate=1e-5:1e-3:log") == (
        "training.learning_rate", {"low": 1e-5, "high": 1e-3, "log": True})  # fmt: skip
    assert parse_cli_param("method.target_modules=all") == ("method.target_modules", ["all"])
    with pytest.raises(TuneforgeError, match="must look like KEY=V1,V2"):
        parse_cli_param("method.r")


@pytest.mark.parametrize("search", ["random", "tpe"])
def test_trial_n_draws_the_same_setting_whichever_worker_and_whenever(search):
    """Seeded per trial number: a second worker (its own sampler, same seed) joining after two
    trials draws trial 2's setting, not trial 0's again; the first worker's draws are
    reproducible."""
    import optuna
    from optuna.distributions import FloatDistribution

    from tuneforge.sweep import trial_seeded_sampler

    space = {"lr": FloatDistribution(1e-5, 1e-2, log=True), "wd": FloatDistribution(0.0, 0.1)}

    def draws(study, n):
        out = []
        for _ in range(n):
            t = study.ask(space)
            out.append(t.params)
            study.tell(t, 1.0)
        return out

    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(storage=storage, sampler=trial_seeded_sampler(search, 42))
    a = draws(first, 2)
    second = optuna.load_study(study_name=first.study_name, storage=storage,
                               sampler=trial_seeded_sampler(search, 42))  # fmt: skip
    b = draws(second, 2)
    assert a[0] != a[1] and b[0] not in a and b[1] not in a
    alone = optuna.create_study(sampler=trial_seeded_sampler(search, 42))
    assert draws(alone, 4) == a + b  # the same draws by trial number, one worker or two

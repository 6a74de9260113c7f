"""GRPO's rewards: rules that check a completion (built in by name) or the user's functions.

``training.reward_functions`` lists them; each is called on a whole rollout as
``f(prompts, completions, **fields) -> list[float | None]`` (TRL's calling convention):
``prompts`` as the records gave them (text, or a list of messages), ``completions`` the decoded
texts, and every other key of the records (``answer``, ...) as a list with one entry per
completion. ``None`` means "does not apply" and counts as 0 in the weighted sum (TRL's
``nansum``); a completion no function applies to gets no advantage. A function that raises, or returns the wrong number of values, stops the run with one
line naming it; the checkpoints already written stay.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.eval.metrics import exact_match_scores

BUILTINS = ("exact_match", "regex", "json_valid", "length")


def exact_match(field: str):
    def reward(prompts, completions, **fields):
        if field not in fields:
            keys = ", ".join(sorted(k for k in fields if k != "completion_tokens")) or "none"
            raise TuneforgeError(
                f"reward exact_match: the prompt records have no '{field}' field (fields: {keys}); "
                f"add it, or name the field as exact_match:FIELD"
            )
        return exact_match_scores(completions, [str(a) for a in fields[field]])

    return reward


def regex(pattern: str):
    compiled = re.compile(pattern, re.DOTALL)

    def reward(prompts, completions, **fields):
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    return reward


def json_valid(prompts, completions, **fields):
    out = []
    for c in completions:
        try:
            json.loads(c)
            out.append(1.0)
        except ValueError:
            out.append(0.0)
    return out


def check_spec(spec: str) -> str | None:
    """What is wrong with a reward function spec, checked with the config (None: nothing)."""
    if not isinstance(spec, str) or not spec.strip():
        return "must be a built-in name or 'module:function'"
    name, _, arg = spec.partition(":")
    if name == "regex":
        try:
            re.compile(arg)
        except re.error as e:
            return f"regex {arg!r} does not compile ({e})"
        return None if arg else "regex needs a pattern: regex:PATTERN"
    if name in ("exact_match", "json_valid", "length"):
        return None if name == "exact_match" or not arg else f"{name} takes no argument"
    if ":" not in spec:
        return (
            f"{spec!r} is neither a built-in reward ({', '.join(BUILTINS)}) nor 'module:function' "
            "/ 'path/file.py:function'"
        )
    return None


def load_function(spec: str, key: str) -> Callable:
    """``module:function`` or ``path/file.py:function`` -> the function.

    Raises:
        TuneforgeError: the module, file or function cannot be found (``key`` names the setting).
    """
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise TuneforgeError(f"{key}: file {where} not found")
        mod_spec = importlib.util.spec_from_file_location(f"tuneforge_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any error is theirs, shown in one line
            raise TuneforgeError(
                f"{key}: {where} fails to load ({type(e).__name__}: {e})"
            ) from None
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise TuneforgeError(f"{key}: cannot import module '{where}' ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise TuneforgeError(f"{key}: '{where}' has no function '{name}'")
    return fn


@dataclass
class RewardFunction:
    name: str  # as configured; shown in metrics and errors
    fn: Callable
    builtin: bool = False  # built-ins also get completion_tokens (token counts)


def load_rewards(specs: Sequence[str], response_length: int) -> list[RewardFunction]:
    """The configured rewards, built-ins made and user functions imported (errors: one line)."""
    out = []
    for i, spec in enumerate(specs):
        name, _, arg = spec.partition(":")
        if name == "exact_match":
            fn = exact_match(arg or "answer")
        elif name == "regex":
            fn = regex(arg)
        elif name == "json_valid":
            fn = json_valid
        elif name == "length":
            fn = _length(response_length)
        else:
            out.append(
                RewardFunction(spec, load_function(spec, f"'training.reward_functions[{i}]'"))
            )
            continue
        out.append(RewardFunction(spec, fn, builtin=True))
    return out


def _length(response_length: int):
    def reward(prompts, completions, completion_tokens=None, **fields):
        return [-min(n, response_length) / response_length for n in completion_tokens]

    return reward


def score_all(
    rewards: Sequence[RewardFunction],
    prompts: list,
    completions: list[str],
    fields: dict[str, list],
    completion_tokens: list[int],
) -> torch.Tensor:
    """(N, F) rewards of N completions under F functions; NaN where a function said None.

    Raises:
        TuneforgeError: a function raised, or returned the wrong number of values or a value
            that is not a number; the line names the function.
    """
    columns = []
    for r in rewards:
        extra = {"completion_tokens": completion_tokens} if r.builtin else {}
        try:
            out = r.fn(prompts, completions, **fields, **extra)
        except TuneforgeError:
            raise
        except Exception as e:  # the user's function: its error, in one line
            raise TuneforgeError(
                f"reward function {r.name} raised {type(e).__name__}: {e}"
            ) from None
        columns.append(_as_floats(r.name, out, len(completions)))
    return torch.tensor(columns, dtype=torch.float32).T.reshape(len(completions), len(rewards))


def _as_floats(name: str, out, n: int) -> list[float]:
    try:
        values = [math.nan if x is None else float(x) for x in out]
    except (TypeError, ValueError):
        raise TuneforgeError(
            f"reward function {name} must return a list of numbers (or None), got {str(out)[:80]}"
        ) from None
    if len(values) != n:
        raise TuneforgeError(
            f"reward function {name} returned {len(values)} values for {n} completions"
        )
    if any(math.isinf(v) for v in values):
        raise TuneforgeError(f"reward function {name} returned an infinite value")
    return values


def combine(per_function: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """(N,) total rewards: the weighted sum over functions, None / NaN counting as 0; NaN where
    every function said None (that completion then has no advantage), as TRL."""
    w = torch.tensor(list(weights) or [1.0] * per_function.size(1), dtype=torch.float32)
    total = (per_function * w).nansum(1)
    total[per_function.isnan().all(1)] = math.nan
    return total

"""Preference records ``{prompt, chosen, rejected}`` -> pairs of samples that share prompt tokens.

Both responses are rendered by the same chat-template code (``render.render_reply``), so the
prompt tokens of a pair are identical, and identical to what ``generate`` feeds the model. A pair
whose prompt alone fills ``max_length`` is dropped and counted (truncating it would leave nothing
to compare); a pair whose responses become identical once truncated is dropped and counted too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tuneforge.config import DataConfig
from tuneforge.data.io import Record, read_records
from tuneforge.data.records import ROLES, Messages
from tuneforge.data.render import IGNORE, Sample, ensure_chat_template, render_reply
from tuneforge.errors import TuneforgeError

NEEDS = "preference records need 'prompt', 'chosen' and 'rejected'"


@dataclass
class Preference:
    """One validated preference record."""

    prompt: Messages
    chosen: str
    rejected: str
    source: str


@dataclass
class PairSample:
    """Chosen and rejected samples of one prompt; labels on the responses only."""

    chosen: Sample
    rejected: Sample
    prompt_length: int
    source: str
    reference_logps: tuple[float, float] | None = None  # (chosen, rejected), when precomputed
    messages: list[dict] | None = None  # the prompt (generation guards answer it)

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


@dataclass
class PairStats:
    rendered: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0  # the prompt alone fills max_length: no response token to compare
    dropped_identical: int = 0  # responses identical within max_length
    dropped_sources: list[str] = field(default_factory=list)


@dataclass
class PreparedPairs:
    train: list[PairSample]
    eval: list[PairSample]
    train_stats: PairStats
    eval_stats: PairStats = field(default_factory=PairStats)


# -- validation ---------------------------------------------------------------------------------
def prompt_messages(
    rec: Record, system_prompt: str | None = None, what: str = NEEDS, key: str = "prompt"
) -> Messages:
    """The ``prompt`` (or ``key``) of a record as messages ending with a user turn.

    Raises:
        TuneforgeError: naming file, line and field.
    """
    if key not in rec.data or rec.data[key] is None:
        keys = ", ".join(sorted(map(str, rec.data))) or "none"
        raise rec.error(f"'{key}' is missing ({what}; keys here: {keys})")
    raw = rec.data[key]
    if isinstance(raw, str):
        if not raw.strip():
            raise rec.error(f"'{key}' is empty")
        messages = [{"role": "user", "content": raw}]
    elif isinstance(raw, list):
        messages = _prompt_list(rec, raw, key)
    else:
        raise rec.error(
            f"'{key}' must be text or a list of {{role, content}} messages, got {type(raw).__name__}"
        )
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _prompt_list(rec: Record, raw: list, key: str = "prompt") -> Messages:
    if not raw:
        raise rec.error(f"'{key}' is an empty list of messages")
    messages = []
    for i, m in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise rec.error(f"'{where}' must be an object with 'role' and text 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise rec.error(f"'{where}.role' is {role!r}; use system, user or assistant")
        if role == "system" and i != 0:
            raise rec.error(f"'{where}' is a system message; only the first message may be one")
        messages.append({"role": role, "content": m["content"]})
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[0]["role"] != "user":
        raise rec.error(f"'{key}' must start with a user message (after an optional system one)")
    if turns[-1]["role"] != "user":
        raise rec.error(f"'{key}' must end with a user message (the responses answer it)")
    for prev, cur in zip(turns, turns[1:], strict=False):
        if prev["role"] == cur["role"]:
            raise rec.error(f"'{key}' has two '{cur['role']}' messages in a row")
    return messages


def _response(rec: Record, key: str) -> str:
    if key not in rec.data or rec.data[key] is None:
        raise rec.error(f"'{key}' is missing ({NEEDS})")
    value = rec.data[key]
    if isinstance(value, list):  # conversational form: [{"role": "assistant", "content": ...}]
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise rec.error(f"'{key}' as a list must hold exactly one assistant message")
        value = value[0].get("content")
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise rec.error(f"'{key}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise rec.error(f"'{key}' is empty (both responses must say something)")
    return value


def to_preference(rec: Record, system_prompt: str | None = None) -> Preference:
    """Validate one preference record.

    Raises:
        TuneforgeError: missing or empty fields, or identical responses (nothing to prefer).
    """
    if "messages" in rec.data and "prompt" not in rec.data:
        raise rec.error(f"a chat record in preference data ({NEEDS})")
    prompt = prompt_messages(rec, system_prompt)
    chosen, rejected = _response(rec, "chosen"), _response(rec, "rejected")
    if chosen.strip() == rejected.strip():
        raise rec.error("'chosen' and 'rejected' are identical, so there is nothing to prefer")
    return Preference(prompt, chosen, rejected, rec.source)


# -- rendering ------------------------------------------------------------------------------------
def render_pair(tokenizer, pref: Preference, max_length: int) -> tuple[PairSample | None, str]:
    """Render both responses; returns ``(pair, "")`` or ``(None, reason)`` when it must be dropped.

    Each sequence is cut to ``max_length`` (``truncated`` in the reason's place is reported by the
    caller through ``PairStats``); the prompt itself is never cut.
    """
    chosen, p = render_reply(tokenizer, pref.prompt, pref.chosen)
    rejected, p2 = render_reply(tokenizer, pref.prompt, pref.rejected)
    if (
        p != p2 or chosen.input_ids[:p] != rejected.input_ids[:p]
    ):  # same template code: cannot differ
        raise TuneforgeError(f"{pref.source}: chosen and rejected render different prompt tokens")
    if p >= max_length:
        return None, "prompt"
    cut = PairSample(
        Sample(chosen.input_ids[:max_length], chosen.labels[:max_length]),
        Sample(rejected.input_ids[:max_length], rejected.labels[:max_length]),
        p,
        pref.source,
        messages=pref.prompt,
    )
    if cut.chosen.labels == cut.rejected.labels:
        return None, "identical"
    truncated = max(len(chosen), len(rejected)) > max_length
    return cut, "truncated" if truncated else ""


def render_pairs(tokenizer, prefs: list[Preference], max_length: int):
    """Render many preference records; returns ``(pairs, PairStats)``."""
    stats = PairStats()
    pairs = []
    for pref in prefs:
        pair, reason = render_pair(tokenizer, pref, max_length)
        if pair is None:
            if reason == "prompt":
                stats.dropped_no_labels += 1
            else:
                stats.dropped_identical += 1
            stats.dropped_sources.append(pref.source)
            continue
        stats.truncated += reason == "truncated"
        stats.rendered += 1
        pairs.append(pair)
    return pairs, stats


def load_preferences(path: str, system_prompt: str | None = None) -> list[Preference]:
    """Read and validate a preference file (the first bad record raises its one-line error)."""
    return [to_preference(r, system_prompt) for r in read_records(path)]


def prepare_preference_data(cfg: DataConfig, tokenizer, seed: int) -> PreparedPairs:
    """Read, validate and render train (and eval) preference pairs, after the data steps every
    objective shares (clean, dedup, eval split, mix: ``data.pipeline``).

    Raises:
        TuneforgeError: bad records, or no pair left within ``max_length``.
    """
    from tuneforge.data.pipeline import prepare_records, record_converter

    ensure_chat_template(tokenizer)
    prepared = prepare_records(cfg, seed, record_converter(cfg, "dpo"), lambda p: p.prompt)
    train, stats = render_pairs(tokenizer, prepared.train, cfg.max_length)
    if not train:
        raise TuneforgeError(
            f"{cfg.train}: no preference pair has a response token within "
            f"data.max_length={cfg.max_length} ({stats.dropped_no_labels} prompts too long, "
            f"{stats.dropped_identical} pairs identical once cut); raise data.max_length"
        )
    evals, eval_stats = render_pairs(tokenizer, prepared.eval, cfg.max_length)
    return PreparedPairs(train, evals, stats, eval_stats)


PROMPTS_NEED = "PPO prompt records need 'prompt' (text or messages)"


def load_prompts(path: str, system_prompt: str | None = None) -> list[Messages]:
    """Prompts for rollouts: the ``prompt`` of each record (preference records qualify)."""
    return [prompt_messages(r, system_prompt, PROMPTS_NEED) for r in read_records(path)]


def prepare_prompts(cfg: DataConfig, seed: int) -> tuple[list[Messages], list[Messages]]:
    """(train prompts, eval prompts) after the data steps every objective shares."""
    from tuneforge.data.pipeline import prepare_records, record_converter

    prepared = prepare_records(cfg, seed, record_converter(cfg, "ppo"), lambda m: m)
    return prepared.train, prepared.eval


GRPO_NEEDS = "grpo records need 'prompt' (text or messages) or 'messages' ending in a user turn"


@dataclass
class PromptRecord:
    """A GRPO prompt: its messages, the prompt as the record gave it (what reward functions
    get) and the record's other fields (passed to them by name, e.g. ``answer``)."""

    messages: Messages
    prompt: object
    fields: dict
    source: str


def to_prompt_record(rec: Record, system_prompt: str | None = None) -> PromptRecord:
    """Validate one GRPO prompt record (one-line errors naming file, line and field)."""
    key = "messages" if "prompt" not in rec.data and "messages" in rec.data else "prompt"
    messages = prompt_messages(rec, system_prompt, GRPO_NEEDS, key)
    fields = {k: v for k, v in rec.data.items() if k != key}
    return PromptRecord(messages, rec.data[key], fields, rec.source)


def prepare_prompt_records(cfg: DataConfig, seed: int) -> tuple[list, list]:
    """(train, eval) GRPO prompt records after the data steps every objective shares; every
    record must carry the same fields (reward functions get one list per field)."""
    from tuneforge.data.pipeline import prepare_records, record_converter

    prepared = prepare_records(cfg, seed, record_converter(cfg, "grpo"), lambda p: p.messages)
    items = prepared.train + prepared.eval
    if items:
        first = items[0]
        for item in items[1:]:
            if item.fields.keys() != first.fields.keys():
                have = ", ".join(sorted(item.fields)) or "none"
                want = ", ".join(sorted(first.fields)) or "none"
                raise TuneforgeError(
                    f"{item.source}: fields {have} differ from {first.source}'s ({want}); "
                    "every grpo record needs the same fields (reward functions get each as a list)"
                )
    return prepared.train, prepared.eval


# -- batching -------------------------------------------------------------------------------------
def pad_rows(rows: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE past each row)."""
    T = max(len(s) for s in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, s in enumerate(rows):
        input_ids[i, : len(s)] = torch.tensor(s.input_ids)
        labels[i, : len(s)] = torch.tensor(s.labels)
        mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_pairs(pairs: list[PairSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of 2B rows: the B chosen samples, then the B rejected ones.

    Adds ``reference_logps`` (2B,) in the same order when every pair has them precomputed.
    """
    batch = pad_rows([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    if all(p.reference_logps is not None for p in pairs):
        ref = [p.reference_logps[0] for p in pairs] + [p.reference_logps[1] for p in pairs]
        batch["reference_logps"] = torch.tensor(ref, dtype=torch.float32)
    return batch

"""Guards at each evaluation of a dpo, orpo, simpo or kto run: is the model still a language model?

Training metrics of a preference run can look perfect (held-out reward accuracy 1.0) while its
answers turn to repetition, another script, or never end. So at each evaluation the model answers a
few held-out prompts (``training.guard_prompts`` of them) and is measured as ``tuneforge eval``
measures a run (eval/degeneration.py): its greedy answers against the starting model's greedy
answers to the same prompts, and its KL to the starting model on answers sampled from it
(adapter methods: the reference is the adapter disabled). The measures go into the eval record (``eval_guard_*`` in metrics.jsonl); a
measure that rises past its limit (``LIMITS``) is one warning line; ``training.max_kl`` stops the
run when the KL passes it, and the loop keeps the last weights within it.
"""

from __future__ import annotations

import contextlib

import torch

from tuneforge.eval.degeneration import LIMITS, degeneration, kl_to_start
from tuneforge.infer.generate import generate
from tuneforge.methods import trains_adapter
from tuneforge.train.dpo import adapter_disabled
from tuneforge.train.run import log

GUARDED = ("dpo", "orpo", "simpo", "kto")

# what to try first, by objective (the NLL of the chosen responses anchors them)
ADVICE = {
    "dpo": "lower training.learning_rate or set training.rpo_alpha (e.g. 1.0)",
    "simpo": "lower training.learning_rate or set training.cpo_alpha (e.g. 1.0)",
}

# the measures a warning watches -> how to say them
SAY = {
    "repetitive": "repeat themselves",
    "off_script": "are mostly outside the prompt's script",
    "unfinished": "never reach an end of turn",
}


def guard_prompts(samples, n: int) -> list[list[dict]]:
    """The first ``n`` distinct prompts (as messages) of the eval samples (pairs or labelled)."""
    seen, out = set(), []
    for s in samples:
        key = repr(s.messages)
        if s.messages is None or key in seen:
            continue
        seen.add(key)
        out.append(s.messages)
        if len(out) == n:
            break
    return out


class GenerationGuard:
    """Measures the model's answers to ``prompts`` at each evaluation (``measure``), says when one
    crosses its limit (``warnings``) and whether the KL passed ``max_kl`` (``over_limit``).

    Built before the loop restores a checkpoint, so the starting answers are the starting
    model's whatever ``model`` holds later; for adapter methods the KL's reference is the
    adapter disabled (for full fine-tuning there is no reference in memory, so no KL).
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompts,
        max_new_tokens: int,
        max_kl,
        has_reference,
        advice: str,
        seed: int = 0,
    ):
        self.model, self.tokenizer, self.prompts = model, tokenizer, prompts
        self.advice, self.seed = advice, seed
        self.max_new_tokens, self.max_kl = max_new_tokens, max_kl
        self.has_reference = has_reference
        self.warned: set[str] = set()
        with self._reference():
            self.start = self._answers_measured()

    def _reference(self):
        return adapter_disabled(self.model) if self.has_reference else contextlib.nullcontext()

    def _answers_measured(self) -> dict:
        answers = generate(
            self.model,
            self.tokenizer,
            self.prompts,
            max_new_tokens=self.max_new_tokens,
            batch_size=len(self.prompts),
        )
        d = degeneration(self.prompts, answers, self.tokenizer, self.max_new_tokens)
        return {k: getattr(d, k) for k in (*SAY, "mean_tokens")}

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        """``guard_<measure>`` of the model as it is now (its train/eval mode is kept)."""
        was_training = self.model.training
        now = self._answers_measured()
        out = {f"guard_{k}": v for k, v in now.items()}
        if self.has_reference:
            out["guard_kl"] = kl_to_start(
                self.model, self._reference, self.tokenizer, self.prompts,
                self.max_new_tokens, self.seed,
            )  # fmt: skip
        if was_training:
            self.model.train()
        return out

    def warnings(self, step: int, readings: dict[str, float]) -> list[str]:
        """One line for each measure that rose past its limit over the start (once a run)."""
        lines = []
        n = len(self.prompts)
        for key, what in SAY.items():
            now, start = readings[f"guard_{key}"], self.start[key]
            if key in self.warned or now - start <= LIMITS[key]:
                continue
            self.warned.add(key)
            lines.append(
                f"warning: at step {step}, {now:.0%} of {n} held-out answers {what} (the starting "
                f"model's: {start:.0%}): the model is degenerating; {self.advice}, or set "
                "training.max_kl to stop at the last weights within it; check its answers with "
                "tuneforge eval"
            )
        return lines

    def over_limit(self, readings: dict[str, float]) -> bool:
        return self.max_kl is not None and readings.get("guard_kl", 0.0) > self.max_kl


def make_guard(ctx, data):
    """The guard of a run (None when the objective has none, ``guard_prompts`` is 0, or there is
    no eval data); says in one line why it is off where the user might expect it."""
    cfg, t = ctx.cfg, ctx.cfg.training
    if t.objective not in GUARDED or t.guard_prompts == 0:
        return None
    prompts = guard_prompts(data.eval, t.guard_prompts)
    if not prompts:
        return None
    adapter = trains_adapter(cfg.method)
    if ctx.dist.enabled and not adapter:  # FSDP2: a sharded model cannot generate alone
        if ctx.dist.is_main:
            log("guards: off (full fine-tuning on several processes shards the model)")
        return None
    advice = ADVICE.get(t.objective, "lower training.learning_rate")
    with ctx.precision.autocast():  # the starting answers, as the loop measures later ones
        return GenerationGuard(
            ctx.lm, ctx.tokenizer, prompts, t.guard_max_new_tokens, t.max_kl, adapter, advice,
            t.seed,
        )  # fmt: skip

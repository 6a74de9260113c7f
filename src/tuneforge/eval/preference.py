"""``tuneforge eval`` for the objectives other than sft: better on the objective, and still intact
as a language model?

A preference or RL run can look perfect in its training metrics (held-out reward accuracy 1.0)
while its generations have turned to repetition or another script. So besides the objective
(pairwise accuracy and margin on held-out pairs; the run's own rewards, for ppo / grpo runs with
reward functions; the share of answers with a user-named property), the fine-tuned and the
starting model both answer the held-out prompts, and the report compares them: KL to the
starting model on the fine-tuned model's answers, general-text perplexity (forgetting), and
degeneration measures (answers that repeat themselves, leave the prompt's script, or never reach
an end of turn, and their length). The verdict says both things in words; ``intact`` is False
when any guard crosses its limit (``LIMITS``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tuneforge.config import Config
from tuneforge.data.io import read_records
from tuneforge.data.preference import collate_pairs, render_pair, to_preference, to_prompt_record
from tuneforge.errors import TuneforgeError
from tuneforge.eval.advice import forgetting as forgetting_advice
from tuneforge.eval.degeneration import LIMITS, degeneration, kl_to_start
from tuneforge.eval.metrics import paired_bootstrap_ci
from tuneforge.eval.perplexity import read_texts, resolve_general_text, samples_nll, text_samples
from tuneforge.files import write_atomic
from tuneforge.infer.generate import generate
from tuneforge.train.policy import labelled_logprobs, response_token_counts


# -- held-out data -----------------------------------------------------------------------------------
@dataclass
class HeldOut:
    prompts: list  # messages
    raw_prompts: list  # as the records gave them (reward functions get these)
    fields: dict[str, list]  # the records' other keys (grpo's reward functions)
    pairs: list  # Preference, when the records are pairs
    path: str


def load_held_out(path: str, cfg: Config, max_examples: int = 0) -> HeldOut:
    """Preference pairs (pairwise accuracy, and their prompts) or prompt records."""
    records = read_records(path)
    if max_examples:
        records = records[:max_examples]
    if all("chosen" in r.data for r in records):
        pairs = [to_preference(r, cfg.data.system_prompt) for r in records]
        raw = [r.data["prompt"] for r in records]
        return HeldOut([p.prompt for p in pairs], raw, {}, pairs, str(path))
    items = [to_prompt_record(r, cfg.data.system_prompt) for r in records]
    # the fields every record has (KTO's completion and label are not a reward's)
    common = set.intersection(*(set(it.fields) for it in items)) - {"completion", "label"}
    fields = {k: [it.fields[k] for it in items] for k in sorted(common)}
    prompts, raw = [it.messages for it in items], [it.prompt for it in items]
    return HeldOut(prompts, raw, fields, [], str(path))


# -- pairwise accuracy ------------------------------------------------------------------------------
@torch.no_grad()
def pair_logps(model, tokenizer, pairs, max_length: int, batch_size: int = 8):
    """(chosen, rejected) summed response log-probs and response token counts, per pair."""
    rendered = [render_pair(tokenizer, p, max_length)[0] for p in pairs]
    keep = [i for i, x in enumerate(rendered) if x is not None]
    device = next(model.parameters()).device
    out = {"chosen": [], "rejected": [], "n_chosen": [], "n_rejected": []}
    for i in range(0, len(keep), batch_size):
        chunk = [rendered[j] for j in keep[i : i + batch_size]]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, tokenizer.pad_token_id).items()}
        logps = labelled_logprobs(model, batch).sum(-1).cpu()
        counts = response_token_counts(batch["labels"]).cpu()
        c, r = logps.chunk(2)
        nc, nr = counts.chunk(2)
        out["chosen"] += c.tolist()
        out["rejected"] += r.tolist()
        out["n_chosen"] += nc.tolist()
        out["n_rejected"] += nr.tolist()
    return out


def implicit_margins(objective: str, beta: float, tuned: dict, base: dict) -> list[float]:
    """Per pair, the fine-tuned policy's reward of chosen minus rejected, as the objective
    defines it: ``beta * log-ratio to the start`` (dpo, kto), ``beta * mean log-prob``
    (orpo, simpo), the log-prob difference otherwise."""
    out = []
    for i in range(len(tuned["chosen"])):
        c, r = tuned["chosen"][i], tuned["rejected"][i]
        if objective in ("dpo", "kto"):
            out.append(beta * ((c - base["chosen"][i]) - (r - base["rejected"][i])))
        elif objective in ("orpo", "simpo"):
            out.append(beta * (c / tuned["n_chosen"][i] - r / tuned["n_rejected"][i]))
        else:
            out.append(c - r)
    return out


# -- the evaluation ---------------------------------------------------------------------------------
def evaluate_preference_run(
    run_dir: Path, cfg: Config, data_path: str, review_sheet=None, review_key=None, gguf=None
) -> dict:
    """The evaluation of a reward, dpo, orpo, simpo, kto, ppo or grpo run; see the module
    docstring. Writes eval.json and report.md into the run, and with ``review_sheet`` a blind
    sheet of the fine-tuned against the starting model's answers (eval/review.py)."""
    if gguf:
        raise TuneforgeError(
            f"--gguf applies to sft runs; this run's objective is {cfg.training.objective}"
        )
    if review_sheet:
        if cfg.training.objective == "reward":
            raise TuneforgeError("--review-sheet: a reward run does not answer prompts")
        parent = Path(review_sheet).resolve().parent
        if not parent.is_dir():
            raise TuneforgeError(f"{parent}: folder for --review-sheet does not exist")
    e, t = cfg.eval, cfg.training
    objective = t.objective
    held = load_held_out(data_path, cfg, e.max_examples)
    general = resolve_general_text(e.general_text)
    texts = read_texts(general) if general else None
    rewards = None
    if objective == "grpo":
        from tuneforge.train.reward_functions import load_rewards

        rewards = load_rewards(t.reward_functions, t.response_length)
    elif objective == "ppo":
        from tuneforge.train.reward import make_reward

        rewards = make_reward(t)
    prop = re.compile(e.property) if e.property else None
    from tuneforge.infer.runs import load_for_inference

    start = time.perf_counter()
    if objective == "reward":
        return _reward_run(run_dir, cfg, held, data_path)
    base, tok = load_for_inference(str(run_dir), adapter=False)
    tuned, _ = load_for_inference(str(run_dir), adapter=True)
    results: dict = {
        "run": str(run_dir),
        "objective": objective,
        "model": cfg.model,
        "method": cfg.method.name,
        "data": str(data_path),
        "examples": len(held.prompts),
    }
    if held.pairs:
        tuned_lp = pair_logps(tuned, tok, held.pairs, cfg.data.max_length, e.batch_size)
        base_lp = pair_logps(base, tok, held.pairs, cfg.data.max_length, e.batch_size)
        beta = t.beta if t.beta is not None else 1.0
        margins = implicit_margins(objective, beta, tuned_lp, base_lp)
        base_pref = [c - r for c, r in zip(base_lp["chosen"], base_lp["rejected"], strict=True)]
        n = max(len(margins), 1)
        results["pairwise"] = {
            "pairs": len(margins),
            "accuracy": sum(m > 0 for m in margins) / n,
            "margin": sum(margins) / n,
            "base_logprob_accuracy": sum(d > 0 for d in base_pref) / n,
            "chosen_logprob_change": sum(
                c - b for c, b in zip(tuned_lp["chosen"], base_lp["chosen"], strict=True)
            )
            / n,
            "rejected_logprob_change": sum(
                c - b for c, b in zip(tuned_lp["rejected"], base_lp["rejected"], strict=True)
            )
            / n,
        }
    answers = {}
    for name, model in (("start", base), ("fine-tuned", tuned)):
        answers[name] = generate(
            model, tok, held.prompts, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size
        )
    results["answers"] = answers
    results["prompts"] = [p[-1]["content"] for p in held.prompts]
    results["degeneration"] = {
        name: asdict(degeneration(held.prompts, a, tok, e.max_new_tokens))
        for name, a in answers.items()
    }
    results["kl_to_start"] = kl_to_start(tuned, base, tok, held.prompts, e.max_new_tokens, e.seed)
    if rewards is not None:
        from tuneforge.train.reward_functions import combine, score_all

        scored = {}
        for name, a in answers.items():
            if objective == "ppo":  # its reward model or function
                scored[name] = rewards(held.prompts, a).tolist()
                continue
            toks = [len(tok(x, add_special_tokens=False)["input_ids"]) for x in a]
            per = score_all(rewards, held.raw_prompts, a, held.fields, toks)
            scored[name] = combine(per, t.reward_weights).nan_to_num(0.0).tolist()
        lo, hi = paired_bootstrap_ci(scored["fine-tuned"], scored["start"], seed=e.seed)
        results["reward"] = {
            "start": sum(scored["start"]) / len(scored["start"]),
            "fine-tuned": sum(scored["fine-tuned"]) / len(scored["fine-tuned"]),
            "ci95_difference": [lo / 100, hi / 100],
        }
    if prop is not None:
        has = {k: [float(prop.search(a) is not None) for a in v] for k, v in answers.items()}
        lo, hi = paired_bootstrap_ci(has["fine-tuned"], has["start"], seed=e.seed)
        results["property"] = {
            "pattern": e.property,
            **{k: sum(v) / len(v) for k, v in has.items()},
            "ci95_points": [lo, hi],
        }
    if texts:
        samples = text_samples(tok, texts, cfg.data.max_length)
        b = samples_nll(base, samples, tok.pad_token_id, e.batch_size)
        f = samples_nll(tuned, samples, tok.pad_token_id, e.batch_size)
        results["forgetting"] = {
            "path": str(general),
            "base_perplexity": b.perplexity,
            "fine_tuned_perplexity": f.perplexity,
            "relative_change": f.perplexity / b.perplexity - 1,
        }
    results["guards"], results["intact"] = guards(results)
    results["verdict"] = verdict_lines(results)
    results["advice"] = advice_lines(results)
    results["seconds"] = round(time.perf_counter() - start, 1)
    if review_sheet:
        from tuneforge.eval.review import write_review_sheet

        sheet, key = write_review_sheet(
            review_sheet, results["prompts"], answers["fine-tuned"], answers["start"], "start",
            e.seed, review_key,
        )  # fmt: skip
        results["review_sheet"] = {"sheet": str(sheet), "key": str(key), "baseline": "start"}
    save_preference_results(run_dir, results)
    return results


def _reward_run(run_dir: Path, cfg: Config, held: HeldOut, data_path: str) -> dict:
    from tuneforge.train.reward import load_reward_model, score

    if not held.pairs:
        raise TuneforgeError(f"{data_path}: a reward run is evaluated on preference pairs")
    rm, tok = load_reward_model(run_dir)
    chosen = score(rm, tok, [p.prompt for p in held.pairs], [p.chosen for p in held.pairs])
    rejected = score(rm, tok, [p.prompt for p in held.pairs], [p.rejected for p in held.pairs])
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    n = max(len(margins), 1)
    results = {
        "run": str(run_dir),
        "objective": "reward",
        "data": str(data_path),
        "examples": len(margins),
        "pairwise": {
            "pairs": len(margins),
            "accuracy": sum(m > 0 for m in margins) / n,
            "margin": sum(margins) / n,
        },
        "guards": {},
        "intact": True,
    }
    results["verdict"] = verdict_lines(results)
    save_preference_results(run_dir, results)
    return results


def guards(r: dict) -> tuple[dict, bool]:
    """Each guard's start and fine-tuned values and whether it crossed its limit."""
    out = {}
    forgetting = r.get("forgetting")
    if forgetting:
        change = forgetting["relative_change"]
        out["perplexity_change"] = {
            "value": change,
            "limit": LIMITS["perplexity_change"],
            "crossed": change > LIMITS["perplexity_change"],
        }
    d = r.get("degeneration")
    if d:
        for key in ("repetitive", "off_script", "unfinished"):
            rise = d["fine-tuned"][key] - d["start"][key]
            out[key] = {
                "start": d["start"][key],
                "fine-tuned": d["fine-tuned"][key],
                "limit": LIMITS[key],
                "crossed": rise > LIMITS[key],
            }
    return out, not any(g["crossed"] for g in out.values())


def verdict_lines(r: dict) -> list[str]:
    lines = []
    pw = r.get("pairwise")
    if pw:
        lines.append(
            f"On the objective: held-out pairwise accuracy {pw['accuracy']:.1%} over "
            f"{pw['pairs']} pairs (margin {pw['margin']:+.3f})"
            + (
                f"; chosen log-prob {pw['chosen_logprob_change']:+.2f}, rejected "
                f"{pw['rejected_logprob_change']:+.2f} per response against the start"
                if "chosen_logprob_change" in pw
                else ""
            )
            + "."
        )
    if "reward" in r:
        rw = r["reward"]
        lo, hi = rw["ci95_difference"]
        lines.append(
            f"The run's reward on held-out prompts: {rw['start']:.3f} at the start, "
            f"{rw['fine-tuned']:.3f} fine-tuned (95% CI of the difference {lo:+.3f} to {hi:+.3f})."
        )
    if "property" in r:
        p = r["property"]
        lo, hi = p["ci95_points"]
        lines.append(
            f"Answers matching /{p['pattern']}/: {p['start']:.1%} at the start, "
            f"{p['fine-tuned']:.1%} fine-tuned (95% CI {lo:+.1f} to {hi:+.1f} points)."
        )
    crossed = [k for k, g in r.get("guards", {}).items() if g["crossed"]]
    if not r.get("guards"):
        return lines
    if crossed:
        what = ", ".join(_describe(k, r["guards"][k]) for k in crossed)
        lines.append(f"NOT intact as a language model: {what}.")
    else:
        lines.append(
            "Intact as a language model: general-text perplexity and the degeneration measures "
            "are within their limits."
        )
    return lines


def advice_lines(r: dict) -> list[str]:
    """What to change, from the evidence (eval/advice.py): forgetting, when it was measured."""
    f = r.get("forgetting")
    line = forgetting_advice(f["relative_change"], r["objective"]) if f else None
    return [line] if line else []


def _describe(key: str, g: dict) -> str:
    if key == "perplexity_change":
        return f"general-text perplexity {g['value']:+.1%} (limit +{g['limit']:.0%})"
    names = {
        "repetitive": "answers that repeat themselves",
        "off_script": "answers outside the prompt's script",
        "unfinished": "answers cut at max_new_tokens",
    }
    return f"{names[key]} {g['start']:.0%} -> {g['fine-tuned']:.0%}"


def report_markdown(r: dict) -> str:
    out = [f"# Evaluation of {r['run']} ({r['objective']})", "", *r["verdict"], ""]
    if r.get("advice"):  # eval.json files written before the advice have none
        out += ["## Advice", "", *r["advice"], ""]
    if r.get("guards"):
        out += [
            "| guard | start | fine-tuned | limit | crossed |",
            "| --- | --- | --- | --- | --- |",
        ]
        for k, g in r["guards"].items():
            start = g.get("start", 0.0)
            tuned = g.get("fine-tuned", g.get("value"))
            out.append(f"| {k} | {start:.3f} | {tuned:.3f} | +{g['limit']:.2f} | {g['crossed']} |")
        out.append("")
    if "kl_to_start" in r:
        out += [
            f"KL to the start on the fine-tuned answers: {r['kl_to_start']:.3f} per answer.",
            "",
        ]
    if r.get("review_sheet"):
        rs = r["review_sheet"]
        out += [f"Blind review sheet (fine-tuned vs start): {rs['sheet']}; key: {rs['key']}.", ""]
    if r.get("review"):
        from tuneforge.eval.review import describe_review

        out += [describe_review(r["review"]), ""]
    for i, prompt in enumerate(r.get("prompts", [])[:5]):
        out += [f"- **{prompt}**"]
        for name, answers in r["answers"].items():
            out.append(f"  - {name}: {answers[i]!r}")
    return "\n".join(out) + "\n"


def save_preference_results(run_dir: Path, results: dict) -> None:
    write_atomic(run_dir / "eval.json", json.dumps(results, indent=2))
    write_atomic(run_dir / "report.md", report_markdown(results))

"""Typed configuration: YAML + dotted ``key=value`` overrides, with errors that name the key.

Every field has a docstring-like ``help`` string; the same text is shown by ``--help`` and in the
docs/configuration.md (``tuneforge config-reference`` prints it).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuneforge.errors import TuneforgeError
from tuneforge.files import write_atomic


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


METHODS = ("full", "lora", "qlora", "dora", "ia3", "adapter", "prefix", "prompt")
OBJECTIVES = ("sft", "reward", "dpo", "orpo", "simpo", "kto", "ppo", "grpo")
# training.beta and training.loss_type when unset: each objective's paper / TRL default
BETA_DEFAULTS = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1, "grpo": 0.0}
LOSS_TYPES = {"dpo": ("sigmoid", "ipo", "hinge"), "grpo": ("dapo", "grpo", "bnpo", "dr_grpo")}


@dataclass
class MethodConfig:
    """How the model is adapted."""

    name: str = _f(
        "lora",
        "full | lora | qlora | dora | ia3 | adapter | prefix | prompt: which weights train "
        "(qlora: LoRA on a base held in 4 bits; see docs/methods.md).",
        choices=METHODS,
    )
    r: int = _f(16, "LoRA rank (lora, qlora, dora).")
    lora_alpha: float = _f(32.0, "LoRA scaling numerator; the update is scaled by lora_alpha / r.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input path during training.")
    target_modules: list[str] | str = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        "Module names (or suffixes) to adapt, or 'all-linear' for every linear layer but the head "
        "(lora, dora, ia3).",
    )
    use_rslora: bool = _f(
        False,
        "lora, dora: scale the update by lora_alpha / sqrt(r) (rank-stabilised LoRA) "
        "instead of lora_alpha / r.",
    )
    feedforward_modules: list[str] = _f(
        ["down_proj"],
        "ia3: modules whose input (not output) is rescaled, as for the IA3 feed-forward vector; "
        "they are adapted in addition to target_modules.",
    )
    placement: str = _f(
        "both",
        "adapter: both (after attention and after the MLP of every layer, Houlsby) | mlp "
        "(after the MLP only, Pfeiffer).",
        choices=("both", "mlp"),
    )
    bottleneck_size: int = _f(
        0, "adapter: width of the bottleneck; 0 means hidden_size // reduction_factor."
    )
    reduction_factor: int = _f(
        16, "adapter: hidden_size / bottleneck width, used when bottleneck_size is 0."
    )
    non_linearity: str = _f(
        "relu",
        "adapter: activation between the down- and up-projection.",
        choices=("relu", "gelu", "silu", "tanh"),
    )
    num_virtual_tokens: int = _f(
        20, "prefix, prompt: learned virtual tokens (prefix: per layer keys/values)."
    )
    prefix_projection: bool = _f(
        False,
        "prefix: train the prefix through a 2-layer MLP (reparameterisation); only its output "
        "is saved.",
    )
    encoder_hidden_size: int = _f(
        0, "prefix: hidden width of the prefix_projection MLP; 0 means the model's hidden size."
    )
    prompt_init_text: str | None = _f(
        None,
        "prompt, prefix: start from this text (repeated or cut to num_virtual_tokens): the soft "
        "prompt as its embeddings, the prefix (without prefix_projection) as the keys/values the "
        "model computes for it; unset: random vocabulary tokens instead.",
    )
    quant_type: str = _f(
        "nf4",
        "qlora: 4-bit data type of the frozen base, nf4 (NormalFloat, for normally distributed "
        "weights) or fp4.",
        choices=("nf4", "fp4"),
    )
    double_quant: bool = _f(
        True,
        "qlora: quantize the per-block scales again (8-bit, blocks of 256), ~0.37 fewer bits "
        "per weight.",
    )
    compute_dtype: str = _f(
        "auto",
        "qlora: dtype the 4-bit weights are dequantized to for each matmul (auto: "
        "training.dtype resolved, so bfloat16 on GPUs that support it and float32 on CPU).",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    quantize_embeddings: bool = _f(
        True,
        "qlora: hold the token embedding and the LM head (one copy when tied) in 4 bits too, "
        "quantized as the linear layers; false keeps them in training.dtype.",
    )


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes tokens."""

    train: str = _f("", "Training data: .jsonl, .json, .csv or .parquet.")
    eval: str | None = _f(None, "Held-out data for eval loss and early stopping (optional).")
    eval_split: float = _f(
        0.0, "If no eval file: fraction of train held out (deterministic by seed)."
    )
    format: str = _f(
        "auto",
        "auto | instruction | chat | preference: record layout (preference: prompt, chosen, "
        "rejected; reward, dpo, orpo and simpo read preference records, kto prompt / completion "
        "/ label records, ppo and grpo prompt records).",
        choices=("auto", "instruction", "chat", "preference"),
    )
    max_length: int = _f(
        512, "Longest sample in tokens; longer ones are truncated (never to zero labels)."
    )
    system_prompt: str | None = _f(
        None, "System message added to records that have none (else the template's default)."
    )
    packing: bool = _f(
        False,
        "Pack several samples per row of max_length tokens (each attends only to itself); "
        "training.batch_size then counts rows.",
    )
    group_by_length: bool = _f(
        False, "Without packing: batch samples of similar length together (less padding)."
    )
    clean: bool = _f(
        False,
        "Normalise unicode and whitespace, strip control characters, drop records with empty "
        "outputs or that train would refuse (as `tuneforge data clean`); drops are reported.",
    )
    dedup: bool = _f(
        False, "Drop exact and near-duplicate training records (as `tuneforge data dedup`)."
    )
    dedup_threshold: float = _f(
        0.85,
        "Jaccard similarity of word 2-gram shingles from which two records are near duplicates "
        "(data.dedup and the eval contamination warning).",
    )
    mix: list[dict] = _f(
        [],
        "Other datasets mixed into train by share of the final set, e.g. "
        "[{path: general.jsonl, ratio: 0.2}]; data.train keeps every record (seeded sampling).",
    )
    augment: int = _f(
        0,
        "Grow the training set K-fold with augmented variants of each record (0: off); eval "
        "data is never augmented.",
    )
    augment_mode: str = _f(
        "both",
        "both | paraphrase | noise: rewrites of the instruction by the base model, and/or word "
        "dropout and swaps; expected outputs are never changed.",
        choices=("both", "paraphrase", "noise"),
    )
    augment_noise: float = _f(0.1, "Word dropout and swap probability of noise variants.")


@dataclass
class TrainingConfig:
    """The optimisation loop."""

    objective: str = _f(
        "sft",
        "sft: supervised fine-tuning on assistant tokens | reward: reward model (scalar head, "
        "Bradley-Terry) | dpo: direct preference optimisation | orpo, simpo: preference pairs "
        "without a reference model | kto: single completions labelled good or bad | ppo: RLHF "
        "with rollouts and a reward model or function | grpo: group-relative policy "
        "optimisation with reward functions (no value head, no reward model).",
        choices=OBJECTIVES,
    )
    learning_rate: float = _f(2.0e-4, "Peak learning rate (AdamW).")
    num_epochs: float = _f(3.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _f(0, "Optimizer steps to run; 0 means use num_epochs.")
    batch_size: int = _f(4, "Samples per micro-batch.")
    gradient_accumulation: int = _f(1, "Micro-batches per optimizer step.")
    warmup_ratio: float = _f(0.0, "Fraction of steps with linear warmup from 0.")
    weight_decay: float = _f(0.0, "AdamW weight decay (never applied to biases and norm weights).")
    lr_scheduler: str = _f(
        "cosine",
        "cosine | linear | constant (after warmup).",
        choices=("cosine", "linear", "constant"),
    )
    optimizer: str = _f(
        "adamw",
        "adamw | adamw_8bit | paged_adamw | paged_adamw_8bit (8-bit and paged: bitsandbytes; "
        "paged needs a CUDA GPU and falls back to the unpaged one elsewhere, with a notice).",
        choices=("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"),
    )
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this; 0 disables clipping.")
    seed: int = _f(42, "Seed for initialisation, data order and dropout.")
    eval_steps: int = _f(0, "Evaluate every N optimizer steps (0: once per epoch).")
    early_stopping_patience: int = _f(
        0, "Stop after N evaluations without improvement in eval loss (0: never stop early)."
    )
    guard_prompts: int = _f(
        16,
        "dpo, orpo, simpo, kto: held-out prompts the model answers (greedy) at each evaluation; "
        "their KL to the starting model and degeneration measures (repetition, another script, "
        "no end of turn) against the starting model's answers go into metrics.jsonl as "
        "eval_guard_*, with a warning line when one crosses its limit. 0: off.",
    )
    guard_max_new_tokens: int = _f(64, "dpo, orpo, simpo, kto: longest guard answer, in tokens.")
    max_kl: float | None = _f(
        None,
        "dpo, orpo, simpo, kto with an adapter method: stop when the guard answers' KL to the "
        "starting model (nats per answer) passes this, keeping the last weights within it "
        "(unset: never).",
    )
    save_steps: int = _f(0, "Write a checkpoint every N optimizer steps (0: at each evaluation).")
    save_total_limit: int = _f(2, "Checkpoints to keep (oldest removed first).")
    logging_steps: int = _f(1, "Append to metrics.jsonl every N optimizer steps.")
    max_bad_steps: int = _f(
        5,
        "A non-finite loss or gradient norm skips the step; stop after this many in a row.",
    )
    dtype: str = _f(
        "auto",
        "auto | float32 | bfloat16 | float16: the dtype matmuls run in (autocast) and frozen "
        "weights are held in (auto: float32 on CPU, bfloat16 on GPUs that support it in "
        "hardware). float16 scales the loss (dynamic, GradScaler). A fully fine-tuned model is "
        "saved in it.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    master_weights: bool = _f(
        True,
        "Under a bfloat16 / float16 training.dtype, hold the weights that train in float32 so "
        "small updates are not rounded away (mixed precision). false holds them in "
        "training.dtype: half the memory of full fine-tuning's weights, gradients and optimizer "
        "state, but an update below ~0.4% of a bfloat16 weight is lost; float16 needs true.",
    )
    device: str = _f("auto", "auto | cpu | cuda | cuda:N.")
    attn_implementation: str = _f(
        "auto",
        "auto | sdpa | eager | flash_attention_2 (auto: flash-attn's variable-length kernel on "
        "GPUs where it is installed, else SDPA with a block-diagonal mask for packed rows).",
        choices=("auto", "sdpa", "eager", "flash_attention_2"),
    )
    gradient_checkpointing: bool = _f(
        False, "Recompute layer activations in backward (non-reentrant): less memory, ~30% slower."
    )
    compile: bool = _f(
        False, "torch.compile each decoder layer (first steps are slow while it compiles)."
    )
    fused_ops: bool = _f(
        True,
        "Fused RMSNorm, rotary-embedding and LoRA autograd functions for Llama, Mistral and "
        "Qwen2/3 models (tuneforge/accel/fused.py): the same numbers up to float rounding, fewer passes "
        "over activations; each replaces model code only after giving its numbers on a small "
        "check (else one warning line and the model's own code); false runs the models' own code.",
    )
    progress: bool = _f(True, "Show a progress bar (loss, lr, tokens/s, ETA).")
    # -- preference objectives (dpo, ppo, reward); see train/dpo.py, train/ppo.py, train/reward.py
    beta: float | None = _f(
        None,
        "dpo, kto: strength of the tie to the reference (beta of Rafailov et al. 2023, "
        "Ethayarajh et al. 2024); orpo: weight of the odds-ratio term (lambda of Hong et al. "
        "2024); simpo: reward scale (beta of Meng et al. 2024); grpo: weight of the KL term "
        "against the reference (0: no reference pass). Unset: 0.1 (dpo, orpo, kto), 2.0 "
        "(simpo), 0.0 (grpo).",
    )
    loss_type: str | None = _f(
        None,
        "dpo: sigmoid (DPO, the default) | ipo (IPO, per-token averaged log-ratios) | hinge "
        "(SLiC). grpo, as TRL names them: dapo (the default: token losses summed over the step, "
        "divided by its tokens) | grpo (per-completion means, averaged) | bnpo (per micro-batch "
        "token means) | dr_grpo (summed, divided by completions x response_length).",
    )
    simpo_gamma: float = _f(
        0.5, "simpo: target reward margin gamma (Meng et al. 2024; TRL's simpo_gamma)."
    )
    cpo_alpha: float = _f(
        0.0,
        "simpo: weight of the NLL of the chosen responses added to the loss (TRL's cpo_alpha; "
        "0 is SimPO as published).",
    )
    rpo_alpha: float = _f(
        0.0,
        "dpo: weight of the chosen responses' NLL (a mean over their tokens) added to the DPO "
        "loss: RPO (Pang et al. 2024), TRL's loss_type [sigmoid, sft] with loss_weights [1, "
        "rpo_alpha]. It keeps the chosen responses likely, so DPO cannot raise the margin by "
        "pushing both responses down; 0 is DPO as published.",
    )
    desirable_weight: float = _f(
        1.0, "kto: weight of the desirable (label true) examples' losses (lambda_D)."
    )
    undesirable_weight: float = _f(
        1.0, "kto: weight of the undesirable (label false) examples' losses (lambda_U)."
    )
    precompute_reference: bool = _f(
        False,
        "dpo with an adapter method: compute reference log-probs once before training instead of "
        "at every step (same numbers, fewer forward passes). Full fine-tuning always precomputes.",
    )
    reward_model: str = _f(
        "", "ppo: run folder of a reward model (a run trained with training.objective: reward)."
    )
    reward_function: str = _f(
        "",
        "ppo: rule-based reward instead of a reward model: 'module:function' or "
        "'path/file.py:function', called as f(prompts, responses) -> one float per response.",
    )
    reward_functions: list[str] = _f(
        [],
        "grpo: rewards of each completion, summed with reward_weights: built-ins by name "
        "(exact_match: the completion equals the record's 'answer' field, or exact_match:FIELD; "
        "regex:PATTERN: the pattern matches the whole completion; json_valid: it parses as JSON; "
        "length: minus the completion's share of response_length) or 'module:function' / "
        "'path/file.py:function', called as f(prompts, completions, **fields) -> one float (or "
        "None: not applicable) per completion; fields are the records' other keys, one list each.",
    )
    reward_weights: list[float] = _f([], "grpo: one weight per reward function (empty: all 1).")
    num_generations: int = _f(
        4, "grpo: completions sampled per prompt (a group; advantages are relative to it)."
    )
    scale_rewards: str = _f(
        "group",
        "grpo: group (divide advantages by the group's reward std, GRPO) | batch (by the std "
        "of the whole rollout) | none (no scaling, Dr. GRPO).",
        choices=("group", "batch", "none"),
    )
    epsilon: float = _f(
        0.2,
        "grpo: clip range of the probability ratio (lower side, and upper unless epsilon_high).",
    )
    epsilon_high: float | None = _f(
        None, "grpo: upper clip range (DAPO's clip-higher, e.g. 0.28); unset: epsilon."
    )
    num_iterations: int = _f(
        1, "grpo: optimisation passes over each rollout (mu of Shao et al. 2024)."
    )
    mask_truncated_completions: bool = _f(
        False, "grpo: leave completions cut at response_length (no end of turn) out of the loss."
    )
    rollout_batch_size: int = _f(
        16,
        "ppo, grpo: prompts per rollout (one step); ppo: a multiple of batch_size * "
        "gradient_accumulation (one optimizer step per such mini-batch); grpo: prompts x "
        "num_generations completions, a multiple of batch_size * gradient_accumulation.",
    )
    num_ppo_epochs: int = _f(2, "ppo: optimisation passes over each rollout.")
    response_length: int = _f(64, "ppo, grpo: longest generated completion, in tokens.")
    temperature: float = _f(
        1.0, "ppo, grpo: sampling temperature of rollouts (log-probs use the same temperature)."
    )
    kl_coef: float = _f(
        0.05, "ppo: weight of the per-token KL penalty against the reference policy in the reward."
    )
    cliprange: float = _f(0.2, "ppo: clip range of the policy probability ratio (epsilon).")
    cliprange_value: float = _f(0.2, "ppo: clip range of the value update around old values.")
    vf_coef: float = _f(0.1, "ppo: weight of the value loss in the total loss.")
    gamma: float = _f(1.0, "ppo: discount factor of GAE.")
    lam: float = _f(0.95, "ppo: lambda of GAE (bias/variance trade-off of advantages).")
    whiten_rewards: bool = _f(
        False, "ppo: scale per-token rewards to unit variance over each rollout (mean kept)."
    )
    missing_eos_penalty: float = _f(
        0.0, "ppo: subtracted from the score of a response cut at response_length (no end of turn)."
    )
    report_to: str = _f(
        "none",
        "none | tensorboard: also write TensorBoard event files to <output_dir>/tensorboard "
        "(needs the tensorboard extra).",
        choices=("none", "tensorboard"),
    )


@dataclass
class EvalConfig:
    """`tuneforge eval`: metrics, prompting baselines, forgetting and the report."""

    data: str | None = _f(
        None, "Held-out data to evaluate on (else --data, else data.eval of the run)."
    )
    metrics: list[str] = _f(
        ["exact_match", "token_f1"],
        "Task metrics, the first one decides the verdict: exact_match, accuracy, token_f1, bleu, "
        "chrf, rouge1, rouge2, rougeL, eval_loss, perplexity.",
    )
    labels: list[str] = _f(
        [], "Label set for accuracy (empty: the distinct reference answers of the eval data)."
    )
    few_shot_k: int = _f(
        3, "Training examples put in the prompt for the few-shot baselines (0: no few-shot rows)."
    )
    max_examples: int = _f(0, "Evaluate at most this many examples (0: all).")
    max_new_tokens: int = _f(64, "Longest generated answer in tokens.")
    temperature: float = _f(0.0, "Sampling temperature; 0 is greedy decoding.")
    top_p: float = _f(1.0, "Nucleus sampling threshold (with temperature > 0).")
    seed: int = _f(0, "Seed for sampling, few-shot example choice and review-sheet sides.")
    batch_size: int = _f(
        128,
        "Prompts generated per batch (large batches are much faster on CPU; lower if memory is short).",
    )
    merge_adapter: bool = _f(
        True, "Merge LoRA weights into a copy of the base before generating (faster, same outputs)."
    )
    general_text: str = _f(
        "builtin",
        "Text for forgetting (perplexity of base vs fine-tuned): 'builtin' (the shipped "
        "examples/general/general_text.jsonl), a file of {text} records, or 'none'.",
    )
    review_baseline: str = _f(
        "best",
        "Which prompting baseline the review sheet puts against the fine-tuned model: best | "
        "zero_shot | few_shot.",
        choices=("best", "zero_shot", "few_shot"),
    )
    report_examples: int = _f(5, "Outputs shown side by side in the report.")
    property: str = _f(
        "",
        "Runs other than sft: a regular expression; the report gives the share of held-out "
        "answers it matches (searched anywhere), at the start and fine-tuned, with a paired "
        "bootstrap interval (e.g. the property the preferences reward).",
    )
    progress: bool = _f(True, "Show a progress bar while generating.")


@dataclass
class SweepConfig:
    """`tuneforge sweep`: the search space and how to search it (read by sweep only)."""

    params: dict[str, object] = _f(
        {},
        "Search space: dotted key -> list of values ([1e-4, 3e-4]) or a range ({low: 1e-5, "
        "high: 1e-3, log: true}; random and tpe only). --param KEY=V1,V2 or KEY=LOW:HIGH[:log] "
        "on the command line adds or replaces one.",
    )
    seeds: int = _f(1, "Seeds per setting (training.seed, +1, ...): the interval is over them.")
    trials: int = _f(0, "Settings to try (0: every grid point; random and tpe need a number).")
    search: str = _f(
        "grid", "grid | random | tpe (Optuna's samplers).", choices=("grid", "random", "tpe")
    )
    metric: str = _f(
        "eval_loss",
        "What a setting is judged by, on data.eval (or eval.data): eval_loss (best eval loss, "
        "lower is better) or a task metric measured by generation (exact_match, token_f1, ...).",
    )
    prune: bool = _f(
        True,
        "Stop a setting whose first seed's eval loss is worse than three quarters of the other "
        "settings' at the same step (Optuna's PercentilePruner(75), once 3 settings finished "
        "and 2 reached that step).",
    )
    timeout_minutes: float = _f(0.0, "Start no new setting after this many minutes (0: none).")
    storage: str = _f(
        "",
        "Where the sweep's state lives: a SQLAlchemy URL (postgresql://..., sqlite:///...) that "
        "several machines can share; empty: sqlite in output_dir/sweep.db.",
    )


@dataclass
class Config:
    """A tuneforge run."""

    model: str = _f(
        "", "alias (smollm2-135m-instruct, tiny-llama) | HF folder | file.gguf | hub id."
    )
    output_dir: str = _f("", "Run folder: config, adapter or model, checkpoints, metrics.")
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    trust_remote_code: bool = _f(False, "Allow model code from the model folder (off by default).")


SECTIONS = {
    "method": MethodConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "eval": EvalConfig,
    "sweep": SweepConfig,
}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f" (valid: {', '.join(sorted(options))})"


def _where(source: str, lines: dict[str, int], key: str) -> str:
    line = lines.get(key)
    return f"{source}:{line}: " if line else (f"{source}: " if source else "")


def _coerce(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Check/convert ``value`` to the field's type; raise a one-line error naming ``key``."""
    hint = annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and str in args:
            return value
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except TuneforgeError as e:
                errors.append(str(e))
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise TuneforgeError(f"{where}'{key}' must be {names}, got {value!r}", key)
    if origin is dict:  # (a bare ``dict`` element, as data.mix's, is checked by its section)
        if not isinstance(value, dict):
            raise TuneforgeError(f"{where}'{key}' must be a mapping, got {value!r}", key)
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise TuneforgeError(f"{where}'{key}' must be a list, got {value!r}", key)
        return [_coerce(v, args[0], key, where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TuneforgeError(f"{where}'{key}' must be true or false, got {value!r}", key)
    if hint is int:
        if isinstance(value, bool):
            raise TuneforgeError(f"{where}'{key}' must be an integer, got {value!r}", key)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise TuneforgeError(f"{where}'{key}' must be an integer, got {value!r}", key)
    if hint is float:
        if isinstance(value, bool):
            raise TuneforgeError(f"{where}'{key}' must be a number, got {value!r}", key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TuneforgeError(f"{where}'{key}' must be a number, got {value!r}", key)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise TuneforgeError(f"{where}'{key}' must be a string, got {value!r}", key)
    return value


def _type_name(t: Any) -> str:
    if typing.get_origin(t) is list:
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        t, str(t)
    )


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys ('training.learning_rate') to their 1-based line in the YAML text."""
    lines: dict[str, int] = {}
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    return lines


def _apply(cfg: Any, data: dict, prefix: str, source: str, lines: dict[str, int]) -> None:
    hints = typing.get_type_hints(type(cfg))
    fields = _fields(type(cfg))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            where = _where(source, lines, key)
            section = prefix.rstrip(".") or "the top level"
            raise TuneforgeError(
                f"{where}unknown key '{name}' in {section}{_suggest(str(name), list(fields))}", key
            )
        where = _where(source, lines, key)
        if name in SECTIONS and prefix == "":
            if isinstance(value, str) and name == "method":
                value = {"name": value}
            if value is None:
                continue
            if not isinstance(value, dict):
                raise TuneforgeError(f"{where}'{key}' must be a mapping of keys to values", key)
            _apply(getattr(cfg, name), value, key + ".", source, lines)
            continue
        coerced = _coerce(value, hints[name], key, where)
        choices = fields[name].metadata.get("choices")
        if choices and coerced not in choices:
            raise TuneforgeError(
                f"{where}'{key}' is {coerced!r}; choose one of {', '.join(choices)}", key
            )
        setattr(cfg, name, coerced)


def parse_overrides(overrides: list[str]) -> dict:
    """``['training.learning_rate=1e-4', 'method.r=8']`` -> nested dict (values parsed as YAML)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise TuneforgeError(
                f"override '{item}' must look like key=value (e.g. training.learning_rate=1e-4)"
            )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise TuneforgeError(f"override '{item}' conflicts with an earlier one")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply dotted overrides, validate, and return a typed ``Config``.

    Raises:
        TuneforgeError: unreadable file, invalid YAML, unknown key, wrong type or bad value.
    """
    if path is None:
        return config_from_text("", "config", overrides)
    path = Path(path)
    if not path.is_file():
        raise TuneforgeError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TuneforgeError(f"{path}: not a UTF-8 text file") from None
    return config_from_text(text, str(path), overrides)


def config_from_text(text: str, source: str, overrides: list[str] | None = None) -> Config:
    """``load_config`` of YAML ``text``; errors name ``source`` (a file's path) and the line,
    as for a file (the web UI checks its editor's text with this)."""
    cfg = Config()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise TuneforgeError(f"{source}{line}: invalid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TuneforgeError(f"{source}:1: a config must be a mapping of keys to values")
    _apply(cfg, data, "", source, _key_lines(text))
    if overrides:
        _apply(cfg, parse_overrides(overrides), "", "override", {})
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    """Range checks that types alone cannot express."""
    t, m, d = cfg.training, cfg.method, cfg.data

    def bad(key: str, msg: str) -> None:
        raise TuneforgeError(f"{source}: '{key}' {msg}", key)

    if not cfg.model:
        bad("model", "is required (e.g. model: smollm2-135m-instruct)")
    if not cfg.output_dir:
        bad("output_dir", "is required (e.g. output_dir: runs/my-run)")
    if not d.train:
        bad("data.train", "is required (a .jsonl, .json, .csv or .parquet file)")
    if t.learning_rate <= 0:
        bad("training.learning_rate", f"must be positive, got {t.learning_rate}")
    if t.num_epochs <= 0 and t.max_steps <= 0:
        bad("training.num_epochs", "must be positive (or set training.max_steps)")
    if t.max_steps < 0:
        bad("training.max_steps", f"must be >= 0, got {t.max_steps}")
    for key in (
        "batch_size",
        "gradient_accumulation",
        "save_total_limit",
        "logging_steps",
        "max_bad_steps",
    ):
        if getattr(t, key) < 1:
            bad(f"training.{key}", f"must be at least 1, got {getattr(t, key)}")
    for key in ("eval_steps", "save_steps", "early_stopping_patience"):
        if getattr(t, key) < 0:
            bad(f"training.{key}", f"must be >= 0, got {getattr(t, key)}")
    if not 0 <= t.warmup_ratio < 1:
        bad("training.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    if t.weight_decay < 0:
        bad("training.weight_decay", f"must be >= 0, got {t.weight_decay}")
    if t.max_grad_norm < 0:
        bad("training.max_grad_norm", f"must be >= 0, got {t.max_grad_norm}")
    if d.max_length < 8:
        bad("data.max_length", f"must be at least 8 tokens, got {d.max_length}")
    if not 0 <= d.eval_split < 1:
        bad("data.eval_split", f"must be in [0, 1), got {d.eval_split}")
    if not 0 < d.dedup_threshold <= 1:
        bad("data.dedup_threshold", f"must be in (0, 1], got {d.dedup_threshold}")
    if d.augment < 0 or d.augment == 1:
        bad("data.augment", f"must be 0 (off) or a factor of at least 2, got {d.augment}")
    if not 0 < d.augment_noise < 1:
        bad("data.augment_noise", f"must be in (0, 1), got {d.augment_noise}")
    if d.mix:
        from tuneforge.datatools.mix import parse_mix_config

        try:
            d.mix = parse_mix_config(d.mix)
        except TuneforgeError as e:
            raise TuneforgeError(f"{source}: {e}", "data.mix") from None
    _validate_preference(cfg, bad)
    validate_eval(cfg.eval, source)
    if m.name == "qlora" or t.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        _require_bitsandbytes(m.name, t.optimizer, bad)
    if m.name in ("lora", "qlora", "dora"):
        if m.r < 1:
            bad("method.r", f"must be at least 1, got {m.r}")
        if m.lora_alpha <= 0:
            bad("method.lora_alpha", f"must be positive, got {m.lora_alpha}")
        if not 0 <= m.lora_dropout < 1:
            bad("method.lora_dropout", f"must be in [0, 1), got {m.lora_dropout}")
        if isinstance(m.target_modules, str) and m.target_modules != "all-linear":
            m.target_modules = [t.strip() for t in m.target_modules.split(",") if t.strip()]
        if isinstance(m.target_modules, list) and not m.target_modules:
            bad("method.target_modules", "must name at least one module (or 'all-linear')")
    if t.dtype == "float16" and not t.master_weights:
        bad(
            "training.master_weights",
            "must be true under training.dtype float16: its loss scaling unscales float32 "
            "gradients; set it to true, or use training.dtype: bfloat16",
        )
    validate_method_extras(cfg, bad)


def validate_method_extras(cfg: Config, bad) -> None:
    """Checks for the keys of dora / ia3 / adapter / prefix / prompt (issue 5)."""
    m = cfg.method
    if m.use_rslora and m.name not in ("lora", "qlora", "dora"):
        bad("method.use_rslora", f"applies to lora and dora only, not to '{m.name}'")
    if m.name == "ia3":
        if isinstance(m.target_modules, str) and m.target_modules != "all-linear":
            m.target_modules = [t.strip() for t in m.target_modules.split(",") if t.strip()]
        if isinstance(m.target_modules, list) and not m.target_modules:
            bad("method.target_modules", "must name at least one module (or 'all-linear')")
    if m.name == "adapter":
        if m.bottleneck_size < 0:
            bad("method.bottleneck_size", f"must be >= 0, got {m.bottleneck_size}")
        if m.reduction_factor < 1:
            bad("method.reduction_factor", f"must be at least 1, got {m.reduction_factor}")
    if m.name in ("prefix", "prompt"):
        if m.num_virtual_tokens < 1:
            bad("method.num_virtual_tokens", f"must be at least 1, got {m.num_virtual_tokens}")
        if m.encoder_hidden_size < 0:
            bad("method.encoder_hidden_size", f"must be >= 0, got {m.encoder_hidden_size}")
        if m.prompt_init_text is not None and not m.prompt_init_text.strip():
            bad("method.prompt_init_text", "is empty; remove it for a random initialisation")


# data settings that apply to some objectives only -> (those objectives, why not the others);
# the rest (dedup, eval_split, mix, system_prompt, max_length) apply to every objective
DATA_STEPS = {
    "packing": (("sft",), "pairs and rollouts are batched as they are"),
    "augment": (("sft",), "it rewrites instructions and answers, not pairs or prompts"),
    "clean": (
        ("sft", "reward", "dpo", "orpo", "simpo"),
        "prompt and labelled-completion records have no answer pair to check",
    ),
}


# training keys read by some objectives only -> those objectives; setting one for another
# objective is refused (a setting is never silently ignored)
OBJECTIVE_KEYS = {
    "simpo_gamma": ("simpo",),
    "cpo_alpha": ("simpo",),
    "rpo_alpha": ("dpo",),
    "guard_prompts": ("dpo", "orpo", "simpo", "kto"),
    "guard_max_new_tokens": ("dpo", "orpo", "simpo", "kto"),
    "max_kl": ("dpo", "orpo", "simpo", "kto"),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "reward_functions": ("grpo",),
    "reward_weights": ("grpo",),
    "num_generations": ("grpo",),
    "scale_rewards": ("grpo",),
    "epsilon": ("grpo",),
    "epsilon_high": ("grpo",),
    "num_iterations": ("grpo",),
    "mask_truncated_completions": ("grpo",),
}


def _validate_preference(cfg: Config, bad) -> None:
    """Checks for the objectives other than sft (only the chosen one's keys)."""
    t, d = cfg.training, cfg.data
    for key, (objectives, why) in DATA_STEPS.items():
        if getattr(d, key) and t.objective not in objectives:
            off = "false" if key != "augment" else "0"
            bad(
                f"data.{key}",
                f"applies to objective {' and '.join(objectives)} only ({why}); "
                f"set it {off} for {t.objective}",
            )
    defaults = TrainingConfig()
    for key, objectives in OBJECTIVE_KEYS.items():
        if getattr(t, key) != getattr(defaults, key) and t.objective not in objectives:
            bad(f"training.{key}", f"applies to objective {', '.join(objectives)} only")
    for key, table in (("beta", BETA_DEFAULTS), ("loss_type", LOSS_TYPES)):
        if getattr(t, key) is not None and t.objective not in table:
            bad(f"training.{key}", f"applies to objective {', '.join(table)} only")
    if t.objective in BETA_DEFAULTS and t.beta is None:
        t.beta = BETA_DEFAULTS[t.objective]
    if t.objective in LOSS_TYPES:
        if t.loss_type is None:
            t.loss_type = LOSS_TYPES[t.objective][0]
        elif t.loss_type not in LOSS_TYPES[t.objective]:
            bad(
                "training.loss_type",
                f"is {t.loss_type!r}; choose one of {', '.join(LOSS_TYPES[t.objective])} for "
                f"objective {t.objective}",
            )
    if t.objective == "sft":
        return
    if d.format not in ("auto", "preference"):
        bad("data.format", f"must be auto or preference for objective {t.objective}")
    if t.objective == "grpo":
        if t.beta < 0:
            bad("training.beta", f"must be >= 0, got {t.beta}")
    elif t.beta is not None and t.beta <= 0:
        bad("training.beta", f"must be positive, got {t.beta}")
    nonnegative = {"simpo": ("simpo_gamma", "cpo_alpha"), "dpo": ("rpo_alpha",)}
    for key in nonnegative.get(t.objective, ()):
        if getattr(t, key) < 0:
            bad(f"training.{key}", f"must be >= 0, got {getattr(t, key)}")
    if t.objective == "kto":
        for key in ("desirable_weight", "undesirable_weight"):
            if getattr(t, key) <= 0:
                bad(f"training.{key}", f"must be positive, got {getattr(t, key)}")
        if t.batch_size < 2:
            bad(
                "training.batch_size",
                "must be at least 2 for kto: its reference point pairs each prompt with another "
                "example's completion in the micro-batch",
            )
    if t.objective == "grpo":
        _validate_grpo(t, bad)
    if t.objective in OBJECTIVE_KEYS["max_kl"]:
        _validate_guards(cfg, bad)
    if t.objective != "ppo":
        return
    if bool(t.reward_model) == bool(t.reward_function):
        bad(
            "training.reward_model",
            "or training.reward_function: set exactly one for objective ppo "
            "(a reward-model run folder, or 'module:function')",
        )
    if t.reward_function and ":" not in t.reward_function:
        bad(
            "training.reward_function", f"must look like module:function, got {t.reward_function!r}"
        )
    _validate_rollouts(t, bad, t.rollout_batch_size, ("num_ppo_epochs",))
    for key in ("cliprange", "cliprange_value"):
        if getattr(t, key) <= 0:
            bad(f"training.{key}", f"must be positive, got {getattr(t, key)}")
    for key in ("kl_coef", "vf_coef", "missing_eos_penalty"):
        if getattr(t, key) < 0:
            bad(f"training.{key}", f"must be >= 0, got {getattr(t, key)}")
    for key in ("gamma", "lam"):
        if not 0 <= getattr(t, key) <= 1:
            bad(f"training.{key}", f"must be in [0, 1], got {getattr(t, key)}")


def _validate_rollouts(t, bad, samples: int, counts: tuple[str, ...]) -> None:
    """The checks PPO and GRPO share: ``samples`` (responses per rollout) split into
    optimizer-step mini-batches, counts at least 1, a positive temperature."""
    for key in ("rollout_batch_size", "response_length", *counts):
        if getattr(t, key) < 1:
            bad(f"training.{key}", f"must be at least 1, got {getattr(t, key)}")
    minibatch = t.batch_size * t.gradient_accumulation
    if samples % minibatch:
        per = " x num_generations" if t.objective == "grpo" else ""
        bad(
            "training.rollout_batch_size",
            f"({t.rollout_batch_size}){per} = {samples} responses per rollout must be a multiple "
            f"of batch_size * gradient_accumulation ({minibatch})",
        )
    if t.temperature <= 0:
        bad("training.temperature", f"must be positive, got {t.temperature}")


def _validate_guards(cfg: Config, bad) -> None:
    t = cfg.training
    if t.guard_prompts < 0:
        bad("training.guard_prompts", f"must be >= 0, got {t.guard_prompts}")
    if t.guard_max_new_tokens < 1:
        bad("training.guard_max_new_tokens", f"must be at least 1, got {t.guard_max_new_tokens}")
    if t.max_kl is None:
        return
    if t.max_kl <= 0:
        bad("training.max_kl", f"must be positive, got {t.max_kl}")
    if t.guard_prompts == 0:
        bad("training.max_kl", "needs the guards: set training.guard_prompts above 0")
    if not cfg.data.eval and not cfg.data.eval_split:
        bad("training.max_kl", "needs eval data (data.eval or data.eval_split) to answer")
    if cfg.method.name == "full":
        bad(
            "training.max_kl",
            "needs an adapter method: its reference is the adapter disabled (full fine-tuning "
            "keeps no starting model in memory)",
        )


def _validate_grpo(t, bad) -> None:
    if not t.reward_functions:
        bad(
            "training.reward_functions",
            "must name at least one reward for objective grpo (e.g. [exact_match] or "
            "['rewards.py:score'])",
        )
    if t.reward_weights and len(t.reward_weights) != len(t.reward_functions):
        bad(
            "training.reward_weights",
            f"has {len(t.reward_weights)} weights for {len(t.reward_functions)} reward functions",
        )
    if t.num_generations < 2:
        bad("training.num_generations", f"must be at least 2 (a group), got {t.num_generations}")
    _validate_rollouts(t, bad, t.rollout_batch_size * t.num_generations, ("num_iterations",))
    if t.epsilon <= 0:
        bad("training.epsilon", f"must be positive, got {t.epsilon}")
    if t.epsilon_high is not None and t.epsilon_high <= 0:
        bad("training.epsilon_high", f"must be positive, got {t.epsilon_high}")
    if t.reward_model or t.reward_function:
        bad(
            "training.reward_model",
            "and training.reward_function are ppo's; grpo takes training.reward_functions",
        )
    from tuneforge.train.reward_functions import check_spec

    for i, spec in enumerate(t.reward_functions):
        problem = check_spec(spec)
        if problem:
            bad(f"training.reward_functions[{i}]", problem)


def validate_eval(e: EvalConfig, source: str = "config") -> None:
    """Range checks for the eval section."""
    from tuneforge.eval.metrics import check_metric_names

    def bad(key: str, msg: str) -> None:
        raise TuneforgeError(f"{source}: 'eval.{key}' {msg}", f"eval.{key}")

    if not e.metrics:
        bad("metrics", "must name at least one metric (e.g. [exact_match])")
    check_metric_names(e.metrics, f"{source}: 'eval.metrics'")
    for key in ("few_shot_k", "max_examples"):
        if getattr(e, key) < 0:
            bad(key, f"must be >= 0, got {getattr(e, key)}")
    for key in ("max_new_tokens", "batch_size"):
        if getattr(e, key) < 1:
            bad(key, f"must be at least 1, got {getattr(e, key)}")
    if e.temperature < 0:
        bad("temperature", f"must be >= 0, got {e.temperature}")
    if not 0 < e.top_p <= 1:
        bad("top_p", f"must be in (0, 1], got {e.top_p}")
    if e.report_examples < 0:
        bad("report_examples", f"must be >= 0, got {e.report_examples}")
    if e.property:
        import re

        try:
            re.compile(e.property)
        except re.error as err:
            bad("property", f"is not a regular expression ({err})")


def _require_bitsandbytes(method: str, optimizer: str, bad) -> None:
    """qlora and the 8-bit optimizers need bitsandbytes; say so before anything is loaded."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        return
    install = "pip install 'tuneforge[qlora]' (bitsandbytes>=0.45)"
    if method == "qlora":
        bad(
            "method.name",
            f"qlora needs bitsandbytes, which is not installed: {install}, "
            "or use method.name: lora",
        )
    bad(
        "training.optimizer",
        f"{optimizer} needs bitsandbytes, which is not installed: "
        f"{install}, or use training.optimizer: adamw",
    )


def to_dict(cfg: Config) -> dict:
    """The config as plain data; the sweep section only when it says something (a run's
    config.yaml never carries one)."""
    out = dataclasses.asdict(cfg)
    if cfg.sweep == SweepConfig():
        del out["sweep"]
    return out


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_reference() -> str:
    """Markdown reference of every key, its default and its help text."""

    def row(key: str, f: dataclasses.Field) -> str:
        text = f.metadata.get("help", "").replace("|", "\\|")
        return f"| `{key}` | `{_default(f)}` | {text} |"

    out = []
    top = [f for f in dataclasses.fields(Config) if f.name not in SECTIONS]
    out.append("| key | default | meaning |\n| --- | --- | --- |")
    for f in top:
        out.append(row(f.name, f))
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            out.append(row(f"{section}.{f.name}", f))
    return "\n".join(out)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return ""

"""Reward model: the LM's decoder plus a scalar head read at the last real token, trained with the
Bradley-Terry loss on chosen vs rejected (Ouyang et al. 2022, eq. 1).

A reward run folder holds the LM as any run does (``adapter/`` or ``model/``) plus
``reward_head.safetensors``; ``load_reward_model`` rebuilds it and ``score`` rates responses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneforge.config import TrainingConfig
from tuneforge.data.records import Messages
from tuneforge.data.render import render_reply
from tuneforge.errors import TuneforgeError
from tuneforge.files import atomic_path
from tuneforge.losses import bradley_terry_loss
from tuneforge.methods import unwrap
from tuneforge.train.policy import decoder_hidden

HEAD_FILE = "reward_head.safetensors"
RewardFn = Callable[[list[Messages], list[str]], list[float]]


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position with attention_mask 1 (right or left padding)."""
    T = attention_mask.size(1)
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.long()).argmax(-1)


class RewardModel(torch.nn.Module):
    """``lm`` (a causal LM, possibly peft-wrapped) and a linear ``score`` head on its last hidden
    state at the last real token of each sequence."""

    def __init__(self, lm: torch.nn.Module, head: torch.nn.Linear | None = None):
        super().__init__()
        self.lm = lm
        if head is None:
            config = unwrap(lm).config
            hidden = config.hidden_size
            param = next(p for p in lm.parameters() if p.is_floating_point())  # not 4-bit codes
            head = torch.nn.Linear(hidden, 1, device=param.device, dtype=param.dtype)
            torch.nn.init.normal_(head.weight, std=1 / math.sqrt(hidden + 1))
            torch.nn.init.zeros_(head.bias)
        self.score = head
        # Bradley-Terry sees only score differences: the bias's gradient is zero up to rounding,
        # which Adam would turn into full-size steps of either sign. It stays at zero.
        head.bias.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) scalar rewards."""
        hidden = decoder_hidden(self.lm, {"input_ids": input_ids, "attention_mask": attention_mask})
        last = last_real_index(attention_mask)
        picked = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, C)
        return self.score(picked).squeeze(-1).float()

    def save_head(self, run_dir: Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
        """``weights``: the full ``score.*`` tensors of a model sharded across ranks (FSDP2)."""
        if weights is None:
            weights = self.score.state_dict()
        else:
            weights = {
                k.removeprefix("score."): v for k, v in weights.items() if k.startswith("score.")
            }
        state = {k: v.detach().contiguous() for k, v in weights.items()}
        with atomic_path(run_dir / HEAD_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": "tuneforge-reward-head"})
        return run_dir / HEAD_FILE


class RewardObjective:
    """Bradley-Terry loss summed over pairs; the loop normalises per pair.

    Batches are ``collate_pairs`` batches: B chosen rows, then B rejected rows.
    """

    name = "reward"

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].size(0) // 2

    def loss_sum(self, model: RewardModel, batch: dict[str, torch.Tensor]):
        scores = model(batch["input_ids"], batch["attention_mask"])  # (2B,)
        chosen, rejected = scores.chunk(2)
        losses = bradley_terry_loss(chosen, rejected)
        metrics = {
            "accuracy": (chosen > rejected).float().sum(),
            "margin": (chosen - rejected).detach().sum(),
            "score_chosen": chosen.detach().sum(),
            "score_rejected": rejected.detach().sum(),
        }
        return losses.sum(), metrics


def is_reward_run(path: str | Path) -> bool:
    return (Path(path) / HEAD_FILE).is_file()


def load_reward_model(run: str | Path, dtype: str = "auto", device: str = "auto"):
    """(RewardModel in eval mode, tokenizer) from a reward run folder.

    Raises:
        TuneforgeError: the folder is not a finished reward-model run.
    """
    from tuneforge.infer.runs import load_for_inference

    run = Path(run)
    if not is_reward_run(run):
        raise TuneforgeError(
            f"'{run}' is not a reward-model run (no {HEAD_FILE}); train one with "
            "training.objective: reward"
        )
    lm, tokenizer = load_for_inference(str(run), dtype=dtype, device=device)
    state = load_file(str(run / HEAD_FILE))
    weight = state["weight"]
    param = next(p for p in lm.parameters() if p.is_floating_point())  # not 4-bit codes
    head = torch.nn.Linear(weight.size(1), 1, device=param.device, dtype=param.dtype)
    head.load_state_dict(state)
    model = RewardModel(lm, head)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def score(
    model: RewardModel,
    tokenizer,
    prompts: list[Messages],
    responses: list[str],
    batch_size: int = 16,
) -> list[float]:
    """Reward of each (prompt, response), rendered exactly as the training pairs were."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    samples = [render_reply(tokenizer, p, r)[0] for p, r in zip(prompts, responses, strict=True)]
    out: list[float] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        T = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, : len(s)] = torch.tensor(s.input_ids)
            mask[row, : len(s)] = 1
        out += model(ids.to(device), mask.to(device)).tolist()
    return out


# -- reward sources for PPO ----------------------------------------------------------------------
def load_reward_function(spec: str) -> RewardFn:
    """PPO's ``training.reward_function``: ``module:function`` or ``path/file.py:function``."""
    from tuneforge.train.reward_functions import load_function

    return load_function(spec, "'training.reward_function'")


def make_reward(t: TrainingConfig) -> Callable[[list[Messages], list[str]], torch.Tensor]:
    """The configured reward as ``f(prompts, responses) -> (B,) tensor``."""
    if t.reward_model:
        rm, rm_tokenizer = load_reward_model(t.reward_model, t.dtype, t.device)

        def from_model(prompts, responses):
            return torch.tensor(score(rm, rm_tokenizer, prompts, responses), dtype=torch.float32)

        return from_model
    fn = load_reward_function(t.reward_function)

    def from_function(prompts, responses):
        last_user = [
            next(m["content"] for m in reversed(p) if m["role"] == "user") for p in prompts
        ]
        out = fn(last_user, responses)
        try:
            values = torch.tensor([float(x) for x in out], dtype=torch.float32)
        except (TypeError, ValueError):
            values = None
        if values is None or values.numel() != len(responses) or not values.isfinite().all():
            raise TuneforgeError(
                f"'training.reward_function' {t.reward_function} must return one finite number "
                f"per response ({len(responses)}), got {str(out)[:80]}"
            )
        return values

    return from_function

"""GRPO's losses (advantages, the clipped token loss with its KL, the loss types' normalisations)
against hand-worked numbers and against TRL 1.16's GRPOTrainer on the same tensors."""

import collections
import math
from types import SimpleNamespace

import pytest
import torch

from tuneforge.losses import (
    group_advantages,
    grpo_loss_sum,
    grpo_token_losses,
    grpo_units,
    nanstd,
)

t = torch.tensor
NAN = float("nan")
LN2 = math.log(2)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- by hand: GRPO ----------------------------------------------------------------------------------
def test_nanstd_by_hand():
    """[1, 2, NaN]: the NaN is skipped, mean 1.5, unbiased variance (0.25 + 0.25) / 1 = 0.5, std
    0.707107; [3, 5, 7] has std 2; a row with one value has no unbiased std (NaN)."""
    x = t([[1.0, 2.0, NAN], [3.0, 5.0, 7.0], [4.0, NAN, NAN]])
    got = nanstd(x, 1)
    torch.testing.assert_close(got[:2], t([math.sqrt(0.5), 2.0]))
    assert got[2].isnan()
    torch.testing.assert_close(nanstd(t([1.0, NAN, 3.0])), t(math.sqrt(2.0)))


def test_nanstd_is_nan_without_any_value():
    """The docstring says NaN where fewer than two values; TRL's ``nanstd`` gives NaN for a row
    with no value at all. With zero values the sum of squares is 0 and the count minus one is -1,
    so 0 / -1 = -0.0 and sqrt(-0.0) = -0.0 unless the count is checked."""
    assert nanstd(t([[NAN, NAN], [1.0, 3.0]]), 1)[0].isnan()
    assert nanstd(t([NAN, NAN, NAN])).isnan()


def test_group_advantages_by_hand():
    """Two groups of 3: [1, 2, NaN] (the NaN is a completion no function scored) and [4, 4, 4].

    group: group 1 has mean 1.5 and std sqrt(0.5) = 0.707107 over its two scored rewards, so
    advantages -+0.5 / (0.707107 + 1e-4) = -+0.707007, and 0 for the NaN; group 2 has std 0:
    0 / 1e-4 = 0, and zero_std is true there only.
    batch: the std is over all five scored rewards [1, 2, 4, 4, 4] (mean 3, squares 4 + 1 + 1 + 1
    + 1 = 8, / 4 = 2, std 1.414214) while the mean stays the group's: -+0.5 / 1.414314 =
    -+0.353528; zero_std follows that (batch) std, as in TRL: false everywhere.
    none: the raw differences -+0.5 and 0; zero_std from the group std, as for group."""
    rewards = t([1.0, 2.0, NAN, 4.0, 4.0, 4.0])
    zero_by_group = t([False, False, False, True, True, True])
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    adv, zero = group_advantages(rewards, 3, "group")
    torch.testing.assert_close(adv, t([-a, a, 0.0, 0.0, 0.0, 0.0]))
    assert torch.equal(zero, zero_by_group)
    b = 0.5 / (math.sqrt(2.0) + 1e-4)
    adv, zero = group_advantages(rewards, 3, "batch")
    torch.testing.assert_close(adv, t([-b, b, 0.0, 0.0, 0.0, 0.0]))
    assert not zero.any()
    adv, zero = group_advantages(rewards, 3, "none")
    torch.testing.assert_close(adv, t([-0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))
    assert torch.equal(zero, zero_by_group)
    with pytest.raises(ValueError):
        group_advantages(rewards, 3, "global")


def _ratios_to_logprobs(ratios: list[list[float]], old: float = -1.0):
    """(logprobs, old_logprobs) whose ratio exp(logp - old) is ``ratios``."""
    old_logprobs = torch.full((len(ratios), len(ratios[0])), old)
    return torch.log(t(ratios)) + old, old_logprobs


def test_grpo_token_losses_clip_by_hand():
    """eps_low 0.2, eps_high 0.28: the ratio is clipped to [0.8, 1.28].

    Row 0, A = +1, ratios [1.5, 0.5, 1.25]: -min(1.5, 1.28) = -1.28 (clipped: up, pushed up);
    -min(0.5, 0.8) = -0.5 (below the range but A > 0: not clipped); 1.25 is inside [0.8, 1.28]:
    -1.25 (a symmetric eps_high = 0.2 would clip it to -1.2).
    Row 1, A = -2, ratios [0.5, 1.5, 0.85]: -min(-1.0, -1.6) = 1.6 (clipped: down, pushed down);
    -min(-3.0, -2.56) = 3.0 (above the range but A < 0: not clipped); 0.85 is inside: 1.7.
    beta 0: no KL."""
    logp, old = _ratios_to_logprobs([[1.5, 0.5, 1.25], [0.5, 1.5, 0.85]])
    losses, clipped, kl = grpo_token_losses(logp, old, t([1.0, -2.0]), 0.2, 0.28)
    torch.testing.assert_close(losses, t([[-1.28, -0.5, -1.25], [1.6, 3.0, 1.7]]))
    assert clipped.tolist() == [[True, False, False], [True, False, False]]
    assert kl is None
    symmetric = grpo_token_losses(logp, old, t([1.0, -2.0]), 0.2, 0.2)[0]
    torch.testing.assert_close(symmetric[0, 2], t(-1.2))


def test_grpo_token_losses_kl_by_hand():
    """beta 0.1, A = +1, ratios [1.5, 0.5, 1.0], reference - policy = [ln 2, -ln 2, 0].
    k3: e^d - d - 1 = [2 - ln 2 - 1, 0.5 + ln 2 - 1, 0] = [0.306853, 0.193147, 0], times the
    ratio: [0.460279, 0.096574, 0]. Losses: -1.28 + 0.1 * 0.460279 = -1.233972;
    -0.5 + 0.0096574 = -0.490343; -1.0. Without reference log-probs beta > 0 is an error."""
    logp, old = _ratios_to_logprobs([[1.5, 0.5, 1.0]])
    ref = logp + t([[LN2, -LN2, 0.0]])
    losses, _, kl = grpo_token_losses(
        logp, old, t([1.0]), 0.2, 0.28, beta=0.1, reference_logprobs=ref
    )
    k3 = [(2 - LN2 - 1) * 1.5, (0.5 + LN2 - 1) * 0.5, 0.0]
    torch.testing.assert_close(kl, t([k3]))
    torch.testing.assert_close(losses, t([[-1.28 + 0.1 * k3[0], -0.5 + 0.1 * k3[1], -1.0]]))
    torch.testing.assert_close(losses, t([[-1.233972, -0.490343, -1.0]]))
    with pytest.raises(ValueError):
        grpo_token_losses(logp, old, t([1.0]), 0.2, 0.28, beta=0.1)


# token losses [[1, 2, 3], [4, 5, 6]] with mask [[1, 1, 0], [1, 0, 0]], then a second micro-batch
# [[10, 0, 0]] with mask [[1, 0, 0]]; response_length 4.
GRPO_BY_HAND = {
    # loss_type: (numerator, units of micro-batch 1, loss over both micro-batches)
    "grpo": (1.5 + 4.0, 2.0, (1.5 + 4.0 + 10.0) / 3),
    "dapo": (7.0, 3.0, (7.0 + 10.0) / 4),
    "bnpo": (7.0 / 3, 1.0, (7.0 / 3 + 10.0) / 2),
    "dr_grpo": (7.0 / 4, 2.0, (7.0 / 4 + 10.0 / 4) / 3),
}


@pytest.mark.parametrize("loss_type", list(GRPO_BY_HAND))
def test_grpo_loss_sum_and_units_by_hand(loss_type):
    """Micro-batch 1: token losses [[1, 2, 3], [4, 5, 6]], mask [[1, 1, 0], [1, 0, 0]] (3 tokens,
    2 completions); micro-batch 2: [[10, 0, 0]], mask [[1, 0, 0]]; response_length 4.

    grpo: completion means 1.5 and 4 -> numerator 5.5, units 2 (completions); both micro-batches:
    (1.5 + 4 + 10) / 3 = 5.1667.
    dapo: token sum 7, units 3 (tokens); both: (7 + 10) / 4 = 4.25.
    bnpo: the micro-batch's token mean 7/3, units 1; both: (7/3 + 10) / 2 = 6.1667 (differs from
    dapo once micro-batches hold different token counts).
    dr_grpo: 7 / response_length 4 = 1.75, units 2; both: (1.75 + 2.5) / 3 = 1.4167."""
    numerator, units, both = GRPO_BY_HAND[loss_type]
    losses1, mask1 = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), t([[1, 1, 0], [1, 0, 0]]).bool()
    losses2, mask2 = t([[10.0, 0.0, 0.0]]), t([[1, 0, 0]]).bool()
    torch.testing.assert_close(grpo_loss_sum(losses1, mask1, loss_type, 4), t(numerator))
    assert grpo_units(mask1, loss_type) == units
    total = grpo_loss_sum(losses1, mask1, loss_type, 4) + grpo_loss_sum(
        losses2, mask2, loss_type, 4
    )
    torch.testing.assert_close(
        total / (grpo_units(mask1, loss_type) + grpo_units(mask2, loss_type)), t(both)
    )


def test_grpo_unknown_loss_type_raises():
    with pytest.raises(ValueError):
        grpo_loss_sum(torch.ones(1, 2), torch.ones(1, 2), "ppo", 2)


# -- against TRL: GRPO ------------------------------------------------------------------------------
def trl_grpo_loss(tmp_path, loss_type, logps, old, ref, mask, adv, *, ga=1, spg=1, num_items=None):
    """TRL 1.16's ``GRPOTrainer._compute_loss`` with a SimpleNamespace ``self`` whose model
    forward returns ``logps`` (beta 0.04, epsilon 0.2, epsilon_high 0.28, token-level ratios);
    returns the loss and the metrics it logged."""
    from accelerate import Accelerator
    from trl import GRPOConfig, GRPOTrainer

    B, T = logps.shape
    args = GRPOConfig(
        output_dir=str(tmp_path), bf16=False, report_to=[], loss_type=loss_type, beta=0.04,
        epsilon=0.2, epsilon_high=0.28, per_device_train_batch_size=B, num_generations=2,
        max_completion_length=T,
    )  # fmt: skip
    args.steps_per_generation = spg
    ns = SimpleNamespace(
        args=args, loss_type=loss_type, beta=0.04, epsilon_low=0.2, epsilon_high=0.28,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        use_vllm=False, vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, max_completion_length=T, current_gradient_accumulation_steps=ga,
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        model=SimpleNamespace(training=True), accelerator=Accelerator(cpu=True),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros(B, T), None),
    )  # fmt: skip
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum() if num_items is None else t(num_items),
    }
    loss = GRPOTrainer._compute_loss(ns, None, inputs)
    return loss, {k: v[-1] for k, v in ns._metrics["train"].items()}


def grpo_case():
    """4 completions x 5 tokens, two padded rows, advantages of both signs, old log-probs up to
    0.45 away from the current ones (ratios 0.64 to 1.57: both clips are hit), a reference off
    by about 0.3."""
    g = torch.Generator().manual_seed(0)
    logps = torch.randn(4, 5, generator=g) * 0.5 - 1.5
    old = logps + (torch.rand(4, 5, generator=g) - 0.5) * 0.9
    ref = logps + torch.randn(4, 5, generator=g) * 0.3
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[3, 1:] = False
    adv = t([1.0, -0.7, 0.4, -1.3])
    return logps, old, ref, mask, adv


def our_grpo_loss(loss_type, logps, old, ref, mask, adv, rows: list[slice]):
    """Ours over the micro-batches ``rows``: each one's loss sum over the step's units."""
    units = sum(grpo_units(mask[r], loss_type) for r in rows)
    total = 0
    for r in rows:
        losses = grpo_token_losses(logps[r], old[r], adv[r], 0.2, 0.28, 0.04, ref[r])[0]
        total = total + grpo_loss_sum(losses, mask[r], loss_type, logps.size(1)) / units
    return total


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_matches_trl(tmp_path, loss_type):
    """One micro-batch: our loss sum over our units equals TRL's loss, and so do the gradients
    with respect to the current log-probs (beta 0.04 with the ratio-weighted k3 KL,
    epsilon_high 0.28, padding in the mask). Our clipped tokens and per-token KL, averaged over
    the mask, are TRL's ``clip_ratio/region_mean`` and ``kl`` metrics."""
    pytest.importorskip("trl")
    logps, old, ref, mask, adv = grpo_case()
    _, clipped, kl = grpo_token_losses(logps, old, adv, 0.2, 0.28, 0.04, ref)
    a = adv.unsqueeze(1).expand_as(clipped)
    assert (clipped & mask & (a > 0)).any() and (clipped & mask & (a < 0)).any()
    ours_lp, theirs_lp = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    ours = our_grpo_loss(loss_type, ours_lp, old, ref, mask, adv, [slice(None)])
    theirs, metrics = trl_grpo_loss(tmp_path, loss_type, theirs_lp, old, ref, mask, adv)
    n = float(mask.sum())
    clip_ratio = float((clipped & mask).sum()) / n
    assert math.isclose(clip_ratio, metrics["clip_ratio/region_mean"], rel_tol=1e-6)
    assert math.isclose(float(kl[mask].sum()) / n, metrics["kl"], rel_tol=1e-5)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, rtol=1e-5, atol=1e-7)
    assert ours_lp.grad[~mask].eq(0).all() and ours_lp.grad[mask].ne(0).any()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_accumulation_matches_trl(tmp_path, loss_type):
    """Two micro-batches of 2 completions (7 and 6 tokens) in one optimizer step. TRL:
    ``current_gradient_accumulation_steps=2``, ``steps_per_generation=2`` and, for dapo,
    ``num_items_in_batch`` counting both halves' tokens; its two losses summed and their
    gradients accumulated. Ours: each half's loss sum over the units of both halves. The
    summed losses and the accumulated gradients agree."""
    pytest.importorskip("trl")
    logps, old, ref, mask, adv = grpo_case()
    halves = [slice(0, 2), slice(2, 4)]
    assert [int(mask[h].sum()) for h in halves] == [8, 6]
    ours_lp, theirs_lp = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    ours = our_grpo_loss(loss_type, ours_lp, old, ref, mask, adv, halves)
    ours.backward()
    theirs = 0
    for h in halves:
        loss, _ = trl_grpo_loss(
            tmp_path, loss_type, theirs_lp[h], old[h], ref[h], mask[h], adv[h],
            ga=2, spg=2, num_items=int(mask.sum()),
        )  # fmt: skip
        loss.backward()
        theirs = theirs + loss.detach()
    torch.testing.assert_close(ours.detach(), theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, rtol=1e-5, atol=1e-7)


def trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str):
    """TRL 1.16 computes GRPO's advantages inline in ``GRPOTrainer._generate_and_score_completions``
    (no function exposes them), so this is TRL's code quoted (sum_then_normalize branch), with one
    reward function of weight 1 (``rewards_per_func = rewards[:, None]``), ``self.`` and the
    unknown-value error branch removed; ``nanstd`` is TRL's own."""
    from trl.trainer.utils import nanstd

    rewards_per_func = rewards.unsqueeze(1)
    reward_weights = torch.ones(1)
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        # If self.scale_rewards = "none", we'll only use std_rewards to check for zero std for logging
        if num_generations > 1:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:  # doesn't occur during training, but could occur in eval when num_generations_eval=1
            std_rewards = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        # Compute global std
        if rewards.numel() > 1:
            std_rewards = nanstd(rewards).expand_as(rewards)
        else:  # doesn't occur during training, but could occur in eval when num_generations_eval=batch_size=1
            std_rewards = torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))  # for logging
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages, is_std_zero


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale_rewards):
    """Four groups of 4: one NaN (unscored) completion, all rewards equal, two NaNs, and only
    one scored completion (its group has no std: advantage 0)."""
    pytest.importorskip("trl")
    rewards = t(
        [0.2, NAN, 1.0, 0.5] + [1.0, 1.0, 1.0, 1.0] + [NAN, 3.0, NAN, -1.0] + [NAN, 2.0, NAN, NAN]
    )
    adv, zero = group_advantages(rewards.clone(), 4, scale_rewards)
    trl_adv, trl_zero = trl_advantages(rewards.clone(), 4, scale_rewards)
    torch.testing.assert_close(adv, trl_adv, rtol=1e-6, atol=1e-7)
    assert torch.equal(zero, trl_zero)
    assert adv[[1, 8, 10, 12, 14, 15]].eq(0).all() and adv[[0, 2, 3, 9, 11]].ne(0).all()


def test_group_advantages_all_unscored_group_matches_trl():
    """A group where no completion was scored: advantages 0 in both, and TRL's ``is_std_zero``
    (what ``frac_reward_zero_std`` averages) is false there, its std being NaN."""
    pytest.importorskip("trl")
    rewards = t([NAN, NAN, NAN, 0.0, 1.0, 3.0])
    for scale_rewards in ("group", "none"):
        adv, zero = group_advantages(rewards.clone(), 3, scale_rewards)
        trl_adv, trl_zero = trl_advantages(rewards.clone(), 3, scale_rewards)
        torch.testing.assert_close(adv, trl_adv)
        assert zero.tolist() == trl_zero.tolist(), scale_rewards

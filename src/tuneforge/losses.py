"""Pure tensor loss functions. Inputs are logits / hidden states / labels; outputs are tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE = -100


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions (the plain reference path).

    Args:
        logits: (B, T, V)
        labels: (B, T), IGNORE where not supervised.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")


def _head_weight(weight):
    return weight() if callable(weight) else weight  # a 4-bit head dequantizes here


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk, with the
    gradients computed in forward: each chunk's logits become their exponentials ``e`` in place
    and are multiplied back at once (``(softmax - one_hot) @ W = (e @ W) / sum(e) - W[target]``),
    so only ``d loss / d hidden`` (and the head's gradient, when it trains) is kept. Backward
    scales them by the incoming gradient: no logits are kept or recomputed.

    ``dtype``: the matmuls' dtype (autocast's, taken by the caller), or None for the head's own;
    a trained head's gradient is summed in the head's dtype (float32 master weights)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, head, grads: bool, dtype=None):
        want_h, want_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = None
        cast = None if callable(head) else head.to(dtype or head.dtype)  # once, not per chunk
        for i in range(0, targets.numel(), chunk_size):
            w = _head_weight(head) if cast is None else cast
            h = hidden[i : i + chunk_size].to(w.dtype)
            t = targets[i : i + chunk_size]
            logits = (h @ w.t()).float()  # (n, V), the only (n, V) tensor
            picked = logits.gather(1, t.unsqueeze(1))
            top = logits.amax(1, keepdim=True)
            e = logits.sub_(top).exp_()  # in place, as logsumexp computes it
            sums = e.sum(1, keepdim=True)
            total += (sums.log() + top - picked).sum()  # log-sum-exp minus the target's logit
            if not (want_h or want_w):
                continue
            # softmax - one_hot = e / sums - one_hot: the division goes on the [n x C] products
            # (a pass over [n x V] fewer), the one-hot part is a gather / index_add of rows
            e = e.to(w.dtype)
            inv = sums.reciprocal()
            if want_h:
                grad_h[i : i + chunk_size] = (e @ w).mul_(inv).sub_(w[t])
            if want_w:
                part = e.t() @ (h * inv.to(h.dtype))
                part.index_add_(0, t, h, alpha=-1)
                grad_w = part.to(weight.dtype) if grad_w is None else grad_w.add_(part)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_h, grad_w = (None if g is None else g * grad for g in ctx.saved_tensors)
        return grad_h, grad_w, None, None, None, None, None


def selective_lm_loss_sum(
    hidden: torch.Tensor,
    head_weight: torch.Tensor | Callable[[], torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Same value and gradients as ``causal_lm_loss_sum`` without a full (B, T, V) logits tensor.

    The LM head is applied only at positions whose next token is supervised, in chunks, and the
    gradients are taken chunk by chunk in the forward pass (``_LinearCrossEntropy``), so at most
    one chunk's logits exist at a time and none is kept or recomputed for the backward.

    Args:
        hidden: (B, T, C) final hidden states (after the last norm).
        head_weight: (V, C) the LM head (bias-free, as in Llama/Qwen/GPT-2 heads), or a function
            returning it (a 4-bit head dequantizes inside each chunk: the full-precision head
            is then a temporary, never kept; it does not train). ``hidden`` is cast to its dtype,
            or under autocast both to autocast's dtype (the logits are float32 either way).
        labels: (B, T) with IGNORE where not supervised.
    """
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]  # (N, C)
    t = targets[keep]  # (N,)
    weight = None if callable(head_weight) else head_weight
    grads = torch.is_grad_enabled()  # evaluation (no_grad) takes no gradients
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return _LinearCrossEntropy.apply(h, weight, t, chunk_size, head_weight, grads)
    # Autocast does not reach inside an autograd Function consistently (index_add_ would mix
    # dtypes): the Function casts explicitly, to autocast's dtype, with autocast off.
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, t, chunk_size, head_weight, grads, dtype)


# -- preference and RL losses ---------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under ``softmax(logits)``, computed in fp32.

    Args:
        logits: (..., V)
        targets: (...) token ids.

    Returns:
        (...) log-probabilities.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` along the last axis, (..., V) -> (...), in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model loss per pair: -log sigmoid(r_chosen - r_rejected).

    Bradley & Terry 1952; the reward-model loss of Ouyang et al. 2022, eq. 1.

    Args:
        chosen_scores: (B,) scalar rewards of the preferred responses.
        rejected_scores: (B,) scalar rewards of the other responses.

    Returns:
        (B,) losses (sum or average them as the caller normalises).
    """
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float())


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO family of pairwise losses on sequence log-probs.

    With ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``:

    * ``sigmoid``: ``-log sigmoid(beta * h)`` (DPO eq. 7, Rafailov et al. 2023);
    * ``hinge``: ``max(0, 1 - beta * h)`` (SLiC, Zhao et al. 2023);
    * ``ipo``: ``(h' - 1 / (2 beta))^2`` (IPO eq. 17, Azar et al. 2023), where ``h'`` uses log-ratios
      averaged per response token (needs ``chosen_tokens`` / ``rejected_tokens``), as TRL does.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed response log-probs, policy.
        reference_chosen_logps, reference_rejected_logps: (B,) the same under the reference.
        beta: strength of the tie to the reference.
        loss_type: one of ``DPO_LOSS_TYPES``.
        chosen_tokens, rejected_tokens: (B,) response token counts (``ipo`` only).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,); the implicit rewards are
        ``beta * (log pi - log ref)``, detached.
    """
    chosen_logratios = policy_chosen_logps.float() - reference_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - reference_rejected_logps.float()
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs chosen_tokens and rejected_tokens")
        h_avg = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / (
            rejected_tokens.clamp(min=1)
        )
        losses = (h_avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use one of {DPO_LOSS_TYPES}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true (all axes)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of ``values`` where ``mask`` is true (as TRL's ``masked_var``)."""
    mask = mask.to(values.dtype)
    n = mask.sum()
    mean = (values * mask).sum() / n.clamp(min=1)
    var = (((values - mean) ** 2) * mask).sum() / n.clamp(min=1)
    return var * n / (n - 1).clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries; ``shift_mean=False`` keeps the mean.

    Zero outside the mask. Rewards are whitened with ``shift_mean=False`` (scale only), advantages
    with ``shift_mean=True`` (Ziegler et al. 2019; TRL's ``masked_whiten``).
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


def kl_per_token(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate ``log pi(a) - log ref(a)`` of sampled tokens (the k1 estimator).

    Its expectation over the policy's samples is KL(pi || ref); it is the per-token penalty of
    Ziegler et al. 2019 and Ouyang et al. 2022 (eq. 2).
    """
    return logprobs - reference_logprobs


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, with
    ``V`` and ``A`` zero past the end of each response.

    Args:
        rewards: (B, L) per-token rewards, zero outside the mask.
        values: (B, L) value estimates V_t.
        mask: (B, L) true on response tokens (one contiguous run per row).

    Returns:
        ``(advantages, returns)``, each (B, L) and zero outside the mask; returns = A + V.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    L = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(L)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = adv  # zero outside the response: nothing flows in from padding
        next_adv = adv
        next_value = values[:, t]
    return advantages, (advantages + values) * m


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective (PPO eq. 7, Schulman et al. 2017), summed over masked tokens.

    Per token: ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))`` with
    ``ratio = exp(logp - old_logp)``.

    Returns:
        ``(loss_sum, clipped_tokens)``: the summed loss and how many tokens the clip was active on.
    """
    m = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = torch.maximum(unclipped, clipped)
    return (loss * m).sum(), ((clipped > unclipped).to(m.dtype) * m).sum().detach()


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_clip - R)^2)``, summed over masked tokens.

    ``V_clip = V_old + clip(V - V_old, -c, c)`` (the value clipping of OpenAI baselines' PPO2).

    Returns:
        ``(loss_sum, clipped_tokens)``.
    """
    m = mask.to(values.dtype)
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped, clipped)
    return (loss * m).sum(), ((clipped > unclipped).to(m.dtype) * m).sum().detach()


# -- reference-free and unpaired preference losses ----------------------------------------------
def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (Maechler 2012; TRL's
    ``log1mexp``): ``log(-expm1(x))`` near 0, ``log1p(-exp(x))`` below ``-ln 2``."""
    near = x > -0.6931471805599453
    return torch.where(
        near, torch.log(-torch.expm1(torch.where(near, x, -1.0))), torch.log1p(-torch.exp(x))
    )


class _OddsRatioTerm(torch.autograd.Function):
    """``softplus(z)`` with ``z = -log_odds = (x_r - x_c) + log(1 - p_c) - log(1 - p_r)``, with the
    gradient in a form that stays finite when the chosen response is certain (``p_c = 1``: the
    loss is 0, ``log(1 - p_c)`` is -inf, and autograd through it gives NaN, as TRL's does):
    ``d/dx_c = -odds_r / (p_c (1 + e^z))``, ``d/dx_r = sigmoid(z) / (1 - p_r)``."""

    @staticmethod
    def forward(ctx, xc, xr):
        lr = log1mexp(xr)
        z = (xr - xc) + log1mexp(xc) - lr
        ctx.save_for_backward(xc, xr, z, lr)
        return F.softplus(z)

    @staticmethod
    def backward(ctx, grad):
        xc, xr, z, lr = ctx.saved_tensors
        grad_c = -torch.exp(xr - lr - xc) / (1 + torch.exp(z))
        grad_r = torch.sigmoid(z) * torch.exp(-lr)
        return grad * grad_c, grad * grad_r


def orpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The odds-ratio term of ORPO (Hong et al. 2024, eq. 6-7), per pair.

    ``log_odds = log(odds(y_w) / odds(y_l))`` with ``odds(y) = p / (1 - p)`` and ``log p`` the
    response's mean per-token log-prob; the loss is ``-beta * log sigmoid(log_odds)`` (``beta`` is
    the paper's lambda). ORPO adds the chosen responses' NLL (the SFT term) to it; TRL's
    ``ORPOTrainer.odds_ratio_loss`` returns ``beta * log sigmoid(log_odds)`` and subtracts it.
    ``log(1 - p)`` is computed as ``log1mexp``, and the gradient stays finite for a response
    the model is certain of (``_OddsRatioTerm``).

    Returns:
        ``(losses, log_odds)``, each (B,).
    """
    pc, pr = chosen_mean_logps.float(), rejected_mean_logps.float()
    losses = beta * _OddsRatioTerm.apply(pc, pr)
    with torch.no_grad():
        log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    return losses, log_odds


def simpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6), per pair: ``-log sigmoid(beta * (m_w - m_l) - gamma)``
    with ``m`` the response's mean per-token log-prob (no reference model); TRL's CPOTrainer
    with ``loss_type="simpo"`` (``simpo_gamma`` = gamma), including its label smoothing."""
    logits = beta * (chosen_mean_logps.float() - rejected_mean_logps.float()) - gamma
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def kto_kl(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z_ref`` (Ethayarajh et al. 2024, eq. 8): the mean log-ratio of
    mismatched (prompt, completion) pairs, clamped at 0 and detached (no gradient flows
    through it), as TRL's ``KTOTrainer.kto_loss`` computes it per micro-batch."""
    return (policy_kl_logps.float() - reference_kl_logps.float()).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 8), per example.

    With ``r = log pi(y|x) - log ref(y|x)`` (summed over the completion) and the reference
    point ``kl`` (``kto_kl``): a desirable example loses ``w_d * (1 - sigmoid(beta * (r - kl)))``,
    an undesirable one ``w_u * (1 - sigmoid(beta * (kl - r)))``. The mean over examples is TRL's
    loss.

    Args:
        desirable: (B,) bool, the label of each example.

    Returns:
        ``(losses, rewards)``, each (B,); the implicit rewards ``beta * r`` are detached.
    """
    r = policy_logps.float() - reference_logps.float()
    good = 1 - torch.sigmoid(beta * (r - kl))
    bad = 1 - torch.sigmoid(beta * (kl - r))
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return losses, beta * r.detach()


# -- GRPO ------------------------------------------------------------------------------------------
SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased standard deviation over the non-NaN entries (NaN where fewer than two)."""
    mean = x.nanmean() if dim is None else x.nanmean(dim, keepdim=True)
    n = (~x.isnan()).sum() if dim is None else (~x.isnan()).sum(dim)
    sq = (x - mean) ** 2
    var = (sq.nansum() if dim is None else sq.nansum(dim)) / (n - 1)
    return torch.where(n > 1, var, torch.nan).sqrt()


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's advantages (Shao et al. 2024, sec. 4.1.2): each reward minus its group's mean.

    ``rewards`` (N,) holds ``num_generations`` consecutive completions per prompt; NaN marks a
    completion no reward function could score (it stays out of its group's mean and std and gets
    advantage 0). ``group`` divides by the group's standard deviation, ``batch`` by that of all N
    rewards (the mean stays the group's), ``none`` leaves the scale (Dr. GRPO, Liu et al. 2025).
    The std is unbiased and gets ``+ 1e-4``, as in TRL.

    Returns:
        ``(advantages, zero_std)``: (N,), and (N,) true where the std the advantages are scaled
        by is zero (with ``group`` / ``none``: the group's rewards are all equal, so it teaches
        nothing; with ``batch``: every reward of the rollout is equal), as TRL's
        ``frac_reward_zero_std`` counts it.
    """
    rewards = rewards.float()
    grouped = rewards.view(-1, num_generations)
    mean = grouped.nanmean(1).repeat_interleave(num_generations)
    group_std = nanstd(grouped, 1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards == "group":
        std = group_std
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)
    elif scale_rewards == "none":
        std = group_std
    else:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; use one of {SCALE_REWARDS}")
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), zero_std


def grpo_token_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    reference_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GRPO's per-token loss (Shao et al. 2024, eq. 3, with DAPO's asymmetric clip).

    ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)`` with
    ``ratio = exp(logp - old_logp)``, plus ``beta * KL`` when ``beta > 0``: the k3 estimator
    ``exp(ref - logp) - (ref - logp) - 1`` times the ratio (TRL's ``use_bias_correction_kl``; the
    same value on-policy, an unbiased gradient off it).

    Args:
        logprobs, old_logprobs: (B, L) log-probs of the sampled tokens now and at sampling time.
        advantages: (B,) one per completion.
        reference_logprobs: (B, L), needed when ``beta > 0``.

    Returns:
        ``(losses, clipped, kl)``: (B, L) per-token losses, (B, L) where the clip was active
        (the ratio left its range in the direction the advantage pushes), and the (B, L)
        per-token KL (None when ``beta`` is 0).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages.float().unsqueeze(1)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * a
    losses = -torch.min(unclipped, clipped)
    kl = None
    if beta != 0.0:
        if reference_logprobs is None:
            raise ValueError("beta > 0 needs reference_logprobs")
        delta = reference_logprobs - logprobs
        kl = (torch.exp(delta) - delta - 1) * ratio
        losses = losses + beta * kl
    hit = ((ratio < 1 - epsilon_low) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
    return losses, hit.detach(), kl


def grpo_loss_sum(
    token_losses: torch.Tensor, mask: torch.Tensor, loss_type: str, response_length: int
) -> torch.Tensor:
    """The numerator of GRPO's loss for one micro-batch; ``grpo_units`` gives the denominator
    (over the whole optimizer step, so 4 x 1 and 1 x 4 micro-batches give the same gradient).

    * ``grpo``: each completion's mean token loss, averaged over completions (Shao et al.);
    * ``dapo``: the sum over all tokens divided by the step's tokens (DAPO, Yu et al. 2025);
    * ``bnpo``: the mean over each micro-batch's tokens, averaged over micro-batches (as TRL:
      the same as ``dapo`` with one micro-batch per step);
    * ``dr_grpo``: the sum divided by completions x ``response_length`` (Liu et al. 2025).
    """
    m = mask.to(token_losses.dtype)
    summed = token_losses * m
    if loss_type == "grpo":
        return (summed.sum(-1) / m.sum(-1).clamp(min=1)).sum()
    if loss_type == "dapo":
        return summed.sum()
    if loss_type == "bnpo":
        return summed.sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return summed.sum() / response_length
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; use one of {GRPO_LOSS_TYPES}")


def grpo_units(mask: torch.Tensor, loss_type: str) -> float:
    """One micro-batch's share of the step's denominator: its tokens (dapo), one (bnpo: a mean
    per micro-batch), or its completions (grpo, dr_grpo)."""
    if loss_type == "dapo":
        return float(mask.sum())
    return 1.0 if loss_type == "bnpo" else float(mask.size(0))

"""Reward, DPO-family and PPO losses against hand-worked numbers, and DPO against TRL."""

import copy
import math

import pytest
import torch

from tuneforge.losses import (
    IGNORE,
    bradley_terry_loss,
    dpo_loss,
    gae,
    kl_per_token,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
    whiten,
)

t = torch.tensor


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token log-probs over supervised positions, per sequence: the plain reference
    (full logits, then select) for the policy's fast path.

    Args:
        logits: (B, T, V)
        labels: (B, T), IGNORE where not supervised.

    Returns:
        (B,) log p(response | prompt) for each row.
    """
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE
    logp = token_logprobs(logits[:, :-1], targets.clamp(min=0))  # (B, T-1)
    return (logp * keep).sum(-1)


def test_bradley_terry_by_hand():
    """r_c - r_r = 2 -> -log sigmoid(2) = log(1 + e^-2) = 0.126928; a tie -> log 2 = 0.693147;
    the wrong order (-1) -> log(1 + e) = 1.313262."""
    losses = bradley_terry_loss(t([2.0, 0.5, 0.0]), t([0.0, 0.5, 1.0]))
    torch.testing.assert_close(losses, t([0.126928, 0.693147, 1.313262]), atol=1e-6, rtol=0)


def test_dpo_family_by_hand():
    """Policy log-probs chosen -1, rejected -3; reference -2 and -2. Log-ratios +1 and -1, so
    h = 2. beta 0.5: sigmoid -log sigmoid(1) = log(1 + e^-1) = 0.313262; rewards 0.5 and -0.5.
    hinge: max(0, 1 - 0.5 * 2) = 0; with beta 0.25: 1 - 0.5 = 0.5.
    ipo with 2 chosen and 4 rejected tokens: h' = 1/2 - (-1)/4 = 0.75; (0.75 - 1/(2*0.5))^2 =
    0.0625."""
    args = (t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]))
    losses, cr, rr = dpo_loss(*args, beta=0.5, loss_type="sigmoid")
    torch.testing.assert_close(losses, t([math.log1p(math.exp(-1))]))
    torch.testing.assert_close((cr, rr), (t([0.5]), t([-0.5])))
    assert float(dpo_loss(*args, beta=0.5, loss_type="hinge")[0]) == 0.0
    torch.testing.assert_close(dpo_loss(*args, beta=0.25, loss_type="hinge")[0], t([0.5]))
    ipo = dpo_loss(*args, 0.5, "ipo", chosen_tokens=t([2]), rejected_tokens=t([4]))[0]
    torch.testing.assert_close(ipo, t([0.0625]))


def test_sequence_logprobs_by_hand():
    """Vocab 2, logits [0, 0] at every position: each supervised token has log-prob -ln 2; two
    supervised targets in row 0, one in row 1."""
    logits = torch.zeros(2, 3, 2)
    labels = t([[-100, 1, 0], [-100, -100, 1]])
    torch.testing.assert_close(sequence_logprobs(logits, labels), t([-2, -1]) * math.log(2))


def test_policy_logprobs_equal_the_full_logits_reference():
    """DPO's and PPO's fast path (decoder once, LM head only at labelled positions) gives the
    sums the reference computes from the model's full logits."""
    from tuneforge.models import load_model
    from tuneforge.train.dpo import sequence_logps

    model, _, _ = load_model("tiny-llama", dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # a right-padded row
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[2, 9:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        expected = sequence_logprobs(model(input_ids=ids, attention_mask=mask).logits, labels)
        torch.testing.assert_close(sequence_logps(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_gae_by_hand():
    """Rewards [0, 1], values [0.5, 0.2], gamma 1, lambda 0.5, then a padded position.
    delta_1 = 1 + 0 - 0.2 = 0.8 = A_1; delta_0 = 0 + 0.2 - 0.5 = -0.3, A_0 = -0.3 + 0.5 * 0.8 =
    0.1. Returns A + V = [0.6, 1.0]. The padded position stays 0 and leaks nothing."""
    rewards = t([[0.0, 1.0, 7.0]])
    values = t([[0.5, 0.2, 9.0]])
    mask = t([[True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, t([[0.1, 0.8, 0.0]]))
    torch.testing.assert_close(ret, t([[0.6, 1.0, 0.0]]))


def test_whiten_by_hand():
    """[1, 2, 3] (and a masked 100): mean 2, unbiased variance 1 -> [-1, 0, 1]; keeping the mean
    -> [1, 2, 3]."""
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([True, True, True, False])
    torch.testing.assert_close(whiten(x, mask), t([-1.0, 0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), t([1.0, 2.0, 3.0, 0.0]))


def test_ppo_policy_loss_by_hand():
    """eps 0.2. Token 1: ratio 1.5, A = 1 -> max(-1.5, -1.2) = -1.2 (clipped). Token 2: ratio 0.5,
    A = -1 -> max(0.5, 0.8) = 0.8 (clipped). Token 3: ratio 1.1, A = 2 -> -2.2 (not clipped).
    Token 4 is masked. Sum -2.6, 2 clipped tokens."""
    old = torch.zeros(4)
    new = torch.log(t([1.5, 0.5, 1.1, 3.0]))
    adv = t([1.0, -1.0, 2.0, 5.0])
    loss, clipped = ppo_policy_loss(new, old, adv, t([True, True, True, False]), 0.2)
    torch.testing.assert_close(loss, t(-2.6))
    assert float(clipped) == 2.0


def test_ppo_value_loss_by_hand():
    """V = 2, V_old = 1, R = 3, c = 0.5: unclipped (2 - 3)^2 = 1, clipped V = 1.5 -> 2.25; loss
    0.5 * 2.25 = 1.125 (clipped). V = 1.2, V_old = 1, R = 0: 1.44 vs 1.44 -> 0.72, not clipped."""
    loss, clipped = ppo_value_loss(t([2.0, 1.2]), t([1.0, 1.0]), t([3.0, 0.0]), t([1, 1]), 0.5)
    torch.testing.assert_close(loss, t(1.125 + 0.72))
    assert float(clipped) == 1.0


def test_kl_per_token_is_the_log_ratio():
    torch.testing.assert_close(kl_per_token(t([-1.0, -2.0]), t([-1.5, -1.0])), t([0.5, -1.0]))


def test_dpo_loss_matches_trl_on_the_same_model(tmp_path):
    """TRL 1.16 has no standalone DPO loss function: the loss lives in
    ``DPOTrainer._compute_loss``. So a real DPOTrainer is built on a tiny Llama; it computes the
    policy log-probs itself and is given our reference log-probs (its precomputed-reference
    input). Our loss on our log-probs must equal its loss, for sigmoid, ipo and hinge."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tuneforge.data.preference import Preference, collate_pairs, render_pair
    from tuneforge.models import load_model
    from tuneforge.train.dpo import DPOObjective
    from tuneforge.train.loop import per_unit
    from tuneforge.train.policy import labelled_logprobs, response_token_counts

    model, tok, _ = load_model("tiny-llama")
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    prefs = [
        Preference([{"role": "user", "content": "Capital of Peru?"}], "Answer: Lima", "Lima!", "a"),
        Preference([{"role": "user", "content": "2 plus 2?"}], "Answer: 4", "It is four.", "b"),
    ]
    batch = collate_pairs([render_pair(tok, p, 128)[0] for p in prefs], tok.pad_token_id)
    with torch.no_grad():
        pc, pr = labelled_logprobs(model, batch).sum(-1).chunk(2)
        rc, rr = labelled_logprobs(reference, batch).sum(-1).chunk(2)
    nc, nr = response_token_counts(batch["labels"]).chunk(2)
    args = DPOConfig(output_dir=str(tmp_path), beta=0.3, report_to="none", use_cpu=True, bf16=False)
    ds = Dataset.from_list([{"prompt": "hi", "chosen": " a", "rejected": " b"}])
    trainer = DPOTrainer(
        model=copy.deepcopy(model), ref_model=reference, args=args, train_dataset=ds,
        processing_class=tok,
    )  # fmt: skip
    trainer.precompute_ref_logps = True  # take our reference log-probs as given
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(),
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    for loss_type in ("sigmoid", "ipo", "hinge"):
        trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
        with torch.no_grad():
            theirs = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        ours = dpo_loss(pc, pr, rc, rr, 0.3, loss_type, nc, nr)[0].mean()
        assert float(ours) > 0
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)

    # RPO: DPO plus rpo_alpha x the chosen responses' mean NLL per token is TRL's
    # loss_type [sigmoid, sft] with loss_weights [1, rpo_alpha]
    trainer.loss_types, trainer.loss_weights = ["sigmoid", "sft"], [1.0, 0.5]
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        objective = DPOObjective(0.3, "sigmoid", rpo_alpha=0.5)
        with_ref = {**batch, "reference_logps": torch.cat([rc, rr])}
        sums, metrics = objective.loss_sum(model, with_ref)
        ours = per_unit(sums, objective.units(batch))
    assert float(sums["tokens"]) > 0 and "nll_chosen" in metrics
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)

"""ORPO, SimPO and KTO losses against hand-worked numbers, and against TRL 1.16 on the same
tensors and on the same tiny model and pairs."""

import collections
import copy
import functools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tuneforge.losses import (
    IGNORE,
    kto_kl,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

t = torch.tensor
NAN = float("nan")
LN2 = math.log(2)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- by hand: ORPO, SimPO, KTO --------------------------------------------------------------------
def test_orpo_loss_by_hand():
    """Mean log-probs log 0.5 and log 0.2: odds(0.5) = 1, odds(0.2) = 0.25, so the pair (0.5 over
    0.2) has log_odds = log 1 - log 0.25 = log 4 = 1.386294 and loses -0.1 * log sigmoid(log 4)
    = 0.1 * log(1 + 1/4) = 0.022314; the swapped pair has log_odds -log 4 and loses
    0.1 * log(1 + 4) = 0.160944."""
    pc = torch.log(t([0.5, 0.2])).requires_grad_()
    pr = torch.log(t([0.2, 0.5]))
    losses, log_odds = orpo_loss(pc, pr, beta=0.1)
    torch.testing.assert_close(log_odds, t([math.log(4), -math.log(4)]))
    torch.testing.assert_close(losses, t([0.1 * math.log(1.25), 0.1 * math.log(5)]))
    assert losses.requires_grad and not log_odds.requires_grad


def test_simpo_loss_by_hand():
    """beta 2, gamma 0.5. Mean log-probs -1 over -1.5: z = 2 * 0.5 - 0.5 = 0.5, loss
    log(1 + e^-0.5) = 0.474077; a tie (-1, -1): z = -0.5, loss log(1 + e^0.5) = 0.974077.
    Label smoothing 0.1: 0.9 * (-log sigmoid(z)) + 0.1 * (-log sigmoid(-z)); since
    log(1 + e^z) = z + log(1 + e^-z): 0.474077 + 0.1 * 0.5 = 0.524077 and
    0.974077 - 0.1 * 0.5 = 0.924077."""
    pc, pr = t([-1.0, -1.0]), t([-1.5, -1.0])
    a, b = math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.5))
    torch.testing.assert_close(simpo_loss(pc, pr, 2.0, 0.5), t([a, b]))
    smoothed = simpo_loss(pc, pr, 2.0, 0.5, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, t([0.9 * a + 0.1 * b, 0.9 * b + 0.1 * a]))
    torch.testing.assert_close(smoothed, t([0.524077, 0.924077]))


def test_kto_kl_by_hand():
    """Policy minus reference on the mismatched rows: [-3, -4] - [-4, -4] = [1, 0], mean 0.5;
    [-3, -5] - [-4, -4] = [1, -1], mean 0; [-5, -5] - [-4, -4] = [-1, -1], mean -1, clamped to 0.
    No gradient flows through it."""
    ref = t([-4.0, -4.0])
    policy = t([-3.0, -4.0], requires_grad=True)
    kl = kto_kl(policy, ref)
    assert float(kl) == 0.5 and not kl.requires_grad
    assert float(kto_kl(t([-3.0, -5.0]), ref)) == 0.0
    assert float(kto_kl(t([-5.0, -5.0]), ref)) == 0.0


def test_kto_loss_by_hand():
    """beta 0.5, kl 0.5, weights 1.5 (desirable) and 0.5 (undesirable); r = policy - reference =
    [2, 2, -2], labels [desirable, undesirable, undesirable].
    Row 0: 1.5 * (1 - sigmoid(0.5 * (2 - 0.5))) = 1.5 * sigmoid(-0.75) = 1.5 * 0.320821 = 0.481232.
    Row 1: 0.5 * (1 - sigmoid(0.5 * (0.5 - 2))) = 0.5 * sigmoid(0.75) = 0.339589.
    Row 2: 0.5 * (1 - sigmoid(0.5 * (0.5 + 2))) = 0.5 * sigmoid(-1.25) = 0.111350.
    Rewards beta * r = [1, 1, -1]."""
    policy = t([-2.0, -2.0, -6.0], requires_grad=True)
    ref = t([-4.0, -4.0, -4.0])
    desirable = t([True, False, False])
    losses, rewards = kto_loss(policy, ref, desirable, t(0.5), 0.5, 1.5, 0.5)
    expected = [1.5 * sigmoid(-0.75), 0.5 * sigmoid(0.75), 0.5 * sigmoid(-1.25)]
    torch.testing.assert_close(losses, t(expected))
    torch.testing.assert_close(losses, t([0.481232, 0.339589, 0.111350]))
    torch.testing.assert_close(rewards, t([1.0, 1.0, -1.0]))
    assert not rewards.requires_grad


# -- against TRL: KTO -------------------------------------------------------------------------------
def trl_kto_self():
    """What ``KTOTrainer._compute_loss`` reads of its trainer: precomputed reference log-probs,
    the KL term on, beta 0.5, weights 1.33 / 0.7 (as in the tests' own calls)."""
    from accelerate import Accelerator
    from trl import KTOTrainer

    ns = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=Accelerator(cpu=True),
        precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=0.5,
        desirable_weight=1.33, undesirable_weight=0.7, aux_loss_enabled=False,
        _total_train_tokens=0, _tp_size=1,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
    )  # fmt: skip
    ns._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(ns, m, b)
    return ns


def test_kto_loss_matches_trl():
    """TRL 1.16's ``KTOTrainer._compute_loss`` (precomputed reference log-probs) with a fake
    policy whose log-prob of a token is ``table[token]``, against ``kto_kl`` on the mismatched
    completions (each prompt with the previous example's completion, as TRL rotates them) and
    ``kto_loss`` averaged over examples. beta 0.5, weights 1.33 / 0.7, a reference point > 0.
    Loss, the ``kl`` metric and the gradient on the table agree."""
    pytest.importorskip("trl")
    from trl import KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    g = torch.Generator().manual_seed(0)
    table = -torch.rand(16, generator=g) * 3
    theirs_table, ours_table = table.clone().requires_grad_(), table.clone().requires_grad_()

    def fake_model(input_ids=None, attention_mask=None, labels=None, **kw):
        lab = labels[:, 1:]
        lp = theirs_table[lab.clamp(min=0)] * (lab != -100)
        z = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, aux_loss=None)

    prompts = [[3, 4], [7], [9, 10, 11], [2]]
    completions = [[5, 6, 1], [8, 1], [12, 13, 14, 1], [15, 1]]
    mismatched = [completions[-1]] + completions[:-1]
    labels = [True, False, True, False]
    ref = t([-4.0, -2.5, -6.0, -3.0])
    ref_kl = t([-9.5, -11.0, -8.0, -10.5])
    examples = [
        {"prompt_ids": p, "completion_ids": c, "KL_completion_ids": k, "label": lab,
         "ref_logps": r, "ref_KL_logps": rk}
        for p, c, k, lab, r, rk in zip(
            prompts, completions, mismatched, labels, ref.tolist(), ref_kl.tolist(), strict=True
        )
    ]  # fmt: skip
    batch = DataCollatorForUnpairedPreference(pad_token_id=0)(examples)
    ns = trl_kto_self()
    theirs = KTOTrainer._compute_loss(ns, fake_model, batch, return_outputs=False)

    policy = torch.stack([ours_table[c].sum() for c in completions])
    with torch.no_grad():
        policy_kl = torch.stack([ours_table[c].sum() for c in mismatched])
    kl = kto_kl(policy_kl, ref_kl)
    assert float(kl) > 0
    losses, _ = kto_loss(policy, ref, t(labels), kl, 0.5, 1.33, 0.7)
    ours = losses.mean()
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert math.isclose(float(kl), ns._metrics["train"]["kl"][-1], rel_tol=1e-5)
    torch.testing.assert_close(ours_table.grad, theirs_table.grad, rtol=1e-5, atol=1e-7)
    assert ours_table.grad.ne(0).sum() == 8  # the completions' 8 distinct tokens, no prompt's


# -- against TRL: ORPO and SimPO on sequence log-probs -----------------------------------------------
def trl_self(**attrs):
    return SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        is_encoder_decoder=False,
        aux_loss_enabled=False,
        **attrs,
    )


def test_orpo_loss_matches_trl_odds_ratio_loss():
    """TRL's ``ORPOTrainer.odds_ratio_loss`` returns ``beta * log sigmoid(log_odds)`` (the
    trainer subtracts its mean): ours is its negative, per pair, with the same gradients; the
    mean log-odds agree. Mean log-probs from -2.1 to -0.05, on both sides of -ln 2 (where TRL's
    ``log1mexp`` switches branch)."""
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(0)
    pc = torch.cat([-torch.rand(6, generator=g) * 2 - 0.05, t([-0.3, -0.9])])
    pr = torch.cat([-torch.rand(6, generator=g) * 2 - 0.05, t([-0.9, -0.3])])
    ours_c, theirs_c = pc.clone().requires_grad_(), pc.clone().requires_grad_()
    losses, log_odds = orpo_loss(ours_c, pr, beta=0.1)
    trl_losses, _, _, _, trl_mean_log_odds = ORPOTrainer.odds_ratio_loss(
        trl_self(beta=0.1), theirs_c, pr
    )
    torch.testing.assert_close(losses, -trl_losses, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(log_odds.mean(), trl_mean_log_odds, rtol=1e-5, atol=1e-6)
    losses.sum().backward()
    (-trl_losses).sum().backward()
    torch.testing.assert_close(ours_c.grad, theirs_c.grad, rtol=1e-5, atol=1e-7)


def test_orpo_loss_near_certain_chosen_matches_trl():
    """A chosen response the model is nearly sure of: mean log-prob -1e-6 and -1e-4 (p =
    0.999999 and 0.9999). log(1 - p) must come from expm1 there (TRL's ``log1mexp``):
    ``log1p(-exp(x))`` in fp32 rounds exp(x) first. Exact (float64) losses with rejected -1:
    0.1 * log(1 + e^-log_odds) = 5.81977e-8 and 5.81989e-6."""
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    pc, pr = t([-1e-6, -1e-4]), t([-1.0, -1.0])
    exact = []
    for c in (-1e-6, -1e-4):
        log_odds = (c - -1.0) - (math.log(-math.expm1(c)) - math.log(-math.expm1(-1.0)))
        exact.append(0.1 * math.log1p(math.exp(-log_odds)))
    trl_losses = ORPOTrainer.odds_ratio_loss(trl_self(beta=0.1), pc, pr)[0]
    torch.testing.assert_close(-trl_losses, t(exact), rtol=1e-5, atol=0)
    torch.testing.assert_close(orpo_loss(pc, pr, 0.1)[0], -trl_losses, rtol=1e-5, atol=0)


def test_orpo_gradient_is_finite_for_a_certain_chosen_response():
    """Every chosen token at log-prob 0.0 (a margin over ~17 nats rounds log-softmax to 0 in
    fp32): p = 1, the odds are infinite and the loss is 0, but the gradient has a finite limit.
    With e^-log_odds = (1 - p_c) / p_c * odds(y_l), d loss / d log p_c at p_c = 1 is
    -beta * odds(y_l) = -0.1 * e^-1 / (1 - e^-1) = -0.0581977. A NaN here poisons every weight.
    (TRL 1.16 gives NaN as well: its torch.where evaluates log1p(-exp(0)) = -inf on the unused
    branch.)"""
    pc = t([0.0], requires_grad=True)
    losses, _ = orpo_loss(pc, t([-1.0]), 0.1)
    losses.sum().backward()
    assert float(losses) == pytest.approx(0.0, abs=1e-7)
    assert pc.grad.isfinite().all(), pc.grad
    torch.testing.assert_close(pc.grad, t([-0.1 * math.exp(-1) / (1 - math.exp(-1))]))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_loss_matches_trl_cpo_loss(label_smoothing):
    """TRL's ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"``, beta 2, simpo_gamma 0.5: the
    same per-pair losses and gradients."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(1)
    pc = -torch.rand(8, generator=g) * 2 - 0.05
    pr = -torch.rand(8, generator=g) * 2 - 0.05
    ours_c, theirs_c = pc.clone().requires_grad_(), pc.clone().requires_grad_()
    ns = trl_self(
        beta=2.0, simpo_gamma=0.5, label_smoothing=label_smoothing, loss_type="simpo", alpha=0.0
    )
    trl_losses = CPOTrainer.cpo_loss(ns, theirs_c, pr)[0]
    losses = simpo_loss(ours_c, pr, 2.0, 0.5, label_smoothing)
    torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=1e-7)
    losses.sum().backward()
    trl_losses.sum().backward()
    torch.testing.assert_close(ours_c.grad, theirs_c.grad, rtol=1e-5, atol=1e-7)


# -- against TRL: ORPO and SimPO on the tiny model ----------------------------------------------------
PAIRS = [
    ("Capital of Peru?", "Answer: Lima", "Lima!"),
    ("2 plus 2?", "Answer: 4", "It is four, I think, but let me check."),
    ("Name a colour.", "Blue is a colour.", "No."),
]


@pytest.fixture(scope="module")
def tiny():
    """The built-in tiny Llama (random weights) and the real tokenizer; tests leave it as is."""
    from tuneforge.models import load_model

    model, tok, _ = load_model("tiny-llama", dtype="float32", device="cpu")
    return model, tok


@pytest.fixture(scope="module")
def pairs_setup(tiny):
    """The tiny Llama, our batch of the pairs, and TRL's chosen_* / rejected_* batch of the same
    token ids and labels (each side padded on its own, as TRL's collator leaves them)."""
    from tuneforge.data.preference import Preference, collate_pairs, pad_rows, render_pair

    model, tok = tiny
    prefs = [Preference([{"role": "user", "content": q}], c, r, "t") for q, c, r in PAIRS]
    pairs = [render_pair(tok, p, 128)[0] for p in prefs]
    ours = collate_pairs(pairs, tok.pad_token_id)
    theirs = {}
    for side in ("chosen", "rejected"):
        rows = pad_rows([getattr(p, side) for p in pairs], tok.pad_token_id)
        theirs.update({f"{side}_{k}": v for k, v in rows.items()})
    assert theirs["chosen_input_ids"].shape != theirs["rejected_input_ids"].shape
    return model, tok.pad_token_id, ours, theirs


def trl_pair_loss(cls, model, batch, **attrs):
    """``get_batch_loss_metrics`` of TRL's ORPO or CPO trainer with a SimpleNamespace ``self``;
    also returns what its loss function got and gave (the per-pair losses, with gradient)."""
    ns = trl_self(**attrs)
    ns.concatenated_inputs = cls.concatenated_inputs
    ns.get_batch_logps = cls.get_batch_logps
    ns.concatenated_forward = functools.partial(cls.concatenated_forward, ns)
    seen = {}
    inner = cls.odds_ratio_loss if hasattr(cls, "odds_ratio_loss") else cls.cpo_loss

    def recorded(pc, pr):
        out = inner(ns, pc, pr)
        seen.update(chosen=pc.detach(), rejected=pr.detach(), losses=out[0])
        return out

    ns.odds_ratio_loss = ns.cpo_loss = recorded
    loss, metrics = cls.get_batch_loss_metrics(ns, model, batch)
    return loss, metrics, seen


def assert_grads_close(ours: list[torch.Tensor], theirs: list[torch.Tensor]):
    """Weight by weight, to 1e-5 of each tensor's largest entry (float32 sums in another order)."""
    assert any(g.abs().max() > 0 for g in theirs)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def chosen_response_ce(model, batch, n_pairs: int) -> torch.Tensor:
    """Mean cross-entropy over the chosen responses' labelled tokens, from the full logits."""
    ids, mask, labels = (batch[k][:n_pairs] for k in ("input_ids", "attention_mask", "labels"))
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE
    )


def test_orpo_objective_matches_trl_on_the_same_model(pairs_setup):
    """``ReferenceFreeObjective("orpo", 0.25)`` against TRL's ``ORPOTrainer.get_batch_loss_metrics``
    on the same pairs. The mean response log-probs TRL scores agree with ours, and so do the
    odds-ratio terms: TRL's (loss - its nll_loss metric) and its gradient, against our pairs term
    over the number of pairs.

    The NLL terms differ by design: TRL's ORPO NLL averages over every non-padding token of the
    chosen sequences, prompt included ("orpo chosen nll loss is computed over the full prompt and
    response"); ours, as the ORPO paper (eq. 2) and our SFT, over the chosen response tokens only.
    So our NLL term over its token count is checked against the mean cross-entropy over the
    chosen response tokens computed directly from the model's logits."""
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    from tuneforge.train.policy import labelled_logprobs, response_token_counts
    from tuneforge.train.ref_free import ReferenceFreeObjective

    model, pad_id, ours_batch, trl_batch = pairs_setup
    B = len(PAIRS)
    objective = ReferenceFreeObjective("orpo", 0.25)
    units = objective.units(ours_batch)
    assert units == {
        "pairs": B,
        "tokens": int(response_token_counts(ours_batch["labels"][:B]).sum()),
    }
    sums, metrics = objective.loss_sum(model, ours_batch)
    odds_term = sums["pairs"] / units["pairs"]
    odds_term.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    loss, trl_metrics, seen = trl_pair_loss(
        ORPOTrainer, model, trl_batch, beta=0.25, padding_value=pad_id
    )
    (-seen["losses"].mean()).backward()
    theirs_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    with torch.no_grad():
        mean = labelled_logprobs(model, ours_batch).sum(-1) / response_token_counts(
            ours_batch["labels"]
        )
    torch.testing.assert_close(
        mean, torch.cat([seen["chosen"], seen["rejected"]]), rtol=1e-5, atol=1e-5
    )
    # loss ~ 11 (the NLL of a random model) minus nll: its float32 rounding is ~1e-6
    torch.testing.assert_close(
        odds_term.detach(), loss.detach() - trl_metrics["nll_loss"], rtol=1e-5, atol=2e-6
    )
    torch.testing.assert_close(
        odds_term.detach(), -seen["losses"].detach().mean(), rtol=1e-5, atol=1e-7
    )
    assert math.isclose(
        float(metrics["log_odds_chosen"]) / B, trl_metrics["log_odds_chosen"], rel_tol=1e-4
    )
    assert_grads_close(ours_grads, theirs_grads)

    with torch.no_grad():
        nll = sums["tokens"] / units["tokens"]
        torch.testing.assert_close(
            nll, chosen_response_ce(model, ours_batch, B), rtol=1e-5, atol=1e-5
        )
        assert abs(float(nll) - trl_metrics["nll_loss"]) > 1e-2  # TRL's includes the prompt


def test_simpo_objective_matches_trl_cpo_on_the_same_model(pairs_setup):
    """``ReferenceFreeObjective("simpo", 2.0, 0.5, cpo_alpha=1.0)`` against TRL's
    ``CPOTrainer.get_batch_loss_metrics`` with loss_type simpo and cpo_alpha 1 (CPO-SimPO): the
    pairs term over the pairs plus the NLL term over the chosen response tokens is TRL's loss
    (CPO's NLL covers completion tokens only), with the same gradients on every weight."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    from tuneforge.train.ref_free import ReferenceFreeObjective

    model, pad_id, ours_batch, trl_batch = pairs_setup
    objective = ReferenceFreeObjective("simpo", 2.0, 0.5, cpo_alpha=1.0)
    units = objective.units(ours_batch)
    sums, _ = objective.loss_sum(model, ours_batch)
    ours = sums["pairs"] / units["pairs"] + sums["tokens"] / units["tokens"]
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    theirs, metrics, _ = trl_pair_loss(
        CPOTrainer, model, trl_batch, beta=2.0, simpo_gamma=0.5, label_smoothing=0.0,
        loss_type="simpo", alpha=0.0, cpo_alpha=1.0, pad_token_id=pad_id, aux_loss_coef=0.0,
    )  # fmt: skip
    theirs.backward()
    theirs_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    nll = float(sums["tokens"]) / units["tokens"]
    assert math.isclose(nll, metrics["nll_loss"], rel_tol=1e-5)
    assert_grads_close(ours_grads, theirs_grads)


# -- against TRL: KTO on the tiny model -----------------------------------------------------------
def fused_head_view(lm):
    """``lm`` as TRL's KTO calls a model (``fused_lm_head=True``): per-token log-probs of the
    shifted labels, 0 where a label is -100, from the full logits."""

    def forward(input_ids=None, attention_mask=None, labels=None, **kw):
        logits = lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        lab = labels[:, 1:]
        logp = torch.log_softmax(logits.float(), -1)
        lp = logp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (lab != -100)
        z = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, aux_loss=None)

    return forward


def test_kto_objective_matches_trl_on_the_same_model(tiny):
    """``KTOObjective`` on a ``collate_labelled`` batch against TRL's ``KTOTrainer._compute_loss``
    on TRL's collated batch of the same prompt and completion tokens (the completion being the
    labelled tokens; TRL rotates the completions for its mismatched pairs, we pair prompt i with
    completion i - 1 in the collator). The reference is a perturbed copy of the tiny Llama; TRL
    is given its log-probs precomputed on TRL's own rows. Loss and reference point agree."""
    pytest.importorskip("trl")
    from trl import KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from tuneforge.data.labelled import Labelled, collate_labelled, render_labelled
    from tuneforge.train.kto import KTOObjective

    model, tok = tiny
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move the reference away from the policy
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    items = [
        Labelled([{"role": "user", "content": "Capital of Peru?"}], "Lima.", True, "a"),
        Labelled([{"role": "user", "content": "2 plus 2?"}], "Five, I think.", False, "b"),
        Labelled([{"role": "user", "content": "Name a colour."}], "Blue is one.", True, "c"),
        Labelled([{"role": "user", "content": "Say hi."}], "No.", False, "d"),
    ]
    samples, _ = render_labelled(tok, items, 128)
    ours_batch = collate_labelled(samples, tok.pad_token_id, 128)
    examples = []
    for x in samples:
        ids, labels, p = x.sample.input_ids, x.sample.labels, x.prompt_length
        completion = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE]
        assert ids[p : p + len(completion)] == completion
        examples.append({"prompt_ids": ids[:p], "completion_ids": completion, "label": x.desirable})
    completions = [e["completion_ids"] for e in examples]
    for e, other in zip(examples, [completions[-1]] + completions[:-1], strict=True):
        e["KL_completion_ids"] = other
    trl_batch = DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id)(examples)
    ref_view = fused_head_view(reference)
    with torch.no_grad():
        for key in ("", "KL_"):
            labels = trl_batch[f"{key}input_ids"].masked_fill(
                trl_batch[f"{key}completion_mask"] == 0, -100
            )
            out = ref_view(trl_batch[f"{key}input_ids"], trl_batch[f"{key}attention_mask"], labels)
            trl_batch[f"ref_{key}logps"] = out.log_probs.sum(-1)
        ns = trl_kto_self()
        theirs = KTOTrainer._compute_loss(ns, fused_head_view(model), trl_batch, False)

        objective = KTOObjective(0.5, 1.33, 0.7, reference=reference)
        loss_sum, metrics = objective.loss_sum(model, ours_batch)
        ours = loss_sum / objective.units(ours_batch)
    kl = float(metrics["kl"]) / len(samples)
    assert kl > 0
    assert math.isclose(kl, ns._metrics["train"]["kl"][-1], rel_tol=1e-4)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

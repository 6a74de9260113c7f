"""PPO: the KL that is logged is the KL in the reward (and is KL against the adapter-disabled
model), rewards from a function or a reward model, checkpoint + resume equal to an
uninterrupted run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import MethodConfig, TrainingConfig
from tuneforge.data.preference import load_prompts
from tuneforge.errors import TuneforgeError
from tuneforge.methods import apply_method
from tuneforge.models import load_model
from tuneforge.train import train
from tuneforge.train.policy import labelled_logprobs
from tuneforge.train.ppo import PolicyWithValue, PPOTrainer, rollout_metrics
from tuneforge.train.reward import make_reward

from ..conftest import ROOT, tiny_config

PREFS = ROOT / "examples" / "prefs"
REWARD_FILE = "def score(prompts, responses):\n    return [len(r) % 7 / 7 for r in responses]\n"


def test_logged_kl_is_the_kl_in_the_reward_and_the_kl_to_the_adapter_disabled_model(tmp_path):
    torch.manual_seed(0)
    lm, tok, _ = load_model("tiny-llama")
    lm = apply_method(lm, MethodConfig(name="lora", r=4, lora_alpha=8, lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: policy != reference, so KL != 0
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    cfg = TrainingConfig(
        rollout_batch_size=4, batch_size=2, response_length=6, kl_coef=0.3, temperature=0.8,
        max_steps=1, progress=False,
    )  # fmt: skip
    prompts = load_prompts(str(PREFS / "test.jsonl"))[:8]

    def reward(prompts, responses):
        return torch.tensor([len(r) / 10 for r in responses])

    trainer = PPOTrainer(
        PolicyWithValue(lm), tok, reward, prompts, [], cfg, tmp_path, torch.device("cpu"), True
    )
    r = trainer.make_rollout(0)
    logged = rollout_metrics(r)["kl"]
    # Independently: full-logits log-probs of the sampled tokens, adapter on minus adapter off.
    with torch.no_grad():
        policy = labelled_logprobs(lm, r.batch, 0.8, plain=True)
        with lm.disable_adapter():
            reference = labelled_logprobs(lm, r.batch, 0.8, plain=True)
    per_response = ((policy - reference) * r.mask).sum(-1)
    assert abs(logged) > 1e-3
    assert logged == pytest.approx(float(per_response.mean()), rel=1e-4, abs=1e-6)
    # The reward is exactly score - kl_coef * (that KL): nothing else is hidden in it.
    torch.testing.assert_close(
        r.rewards.sum(-1), r.scores - 0.3 * per_response, rtol=1e-4, atol=1e-5
    )
    last = r.mask.long().cumsum(-1).argmax(-1)
    rows = torch.arange(4)
    torch.testing.assert_close(r.rewards[rows, last], r.scores - 0.3 * r.kl[rows, last])
    assert (r.advantages[~r.mask] == 0).all() and (r.returns[~r.mask] == 0).all()


def test_reward_function_errors_are_one_line(tmp_path):
    with pytest.raises(TuneforgeError, match="file nope.py not found"):
        make_reward(TrainingConfig(reward_function="nope.py:score"))
    with pytest.raises(TuneforgeError, match="has no function 'missing'"):
        make_reward(TrainingConfig(reward_function=f"{PREFS / 'reward.py'}:missing"))
    bad = tmp_path / "bad.py"
    bad.write_text("def score(prompts, responses):\n    return [1.0]\n")
    f = make_reward(TrainingConfig(reward_function=f"{bad}:score"))
    with pytest.raises(TuneforgeError, match="must return one finite number per response"):
        f([[{"role": "user", "content": "q"}]] * 2, ["a", "b"])


def test_ppo_run_logs_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    """Three PPO steps with a rule-based reward from a file; a crash inside step 3 and a resume
    from the step-2 checkpoint end bitwise equal to the uninterrupted run (sampling included)."""
    reward_file = tmp_path / "rule.py"
    reward_file.write_text(REWARD_FILE)

    def config(name):
        return tiny_config(
            tmp_path, PREFS / "test.jsonl",
            **{"output_dir": str(tmp_path / name), "training.objective": "ppo",
               "training.reward_function": f"{reward_file}:score", "training.max_steps": 3,
               "training.rollout_batch_size": 4, "training.batch_size": 2,
               "training.response_length": 5, "training.save_steps": 1,
               "training.whiten_rewards": True, "method.lora_dropout": 0.1},
        )  # fmt: skip

    summary = train(config("clean"))
    assert summary["steps"] == 3
    original = PPOTrainer.optimise

    def crashing(self, rollout, step):
        if step == 2:
            raise RuntimeError("crash")
        return original(self, rollout, step)

    monkeypatch.setattr(PPOTrainer, "optimise", crashing)
    with pytest.raises(RuntimeError, match="crash"):
        train(config("killed"))
    monkeypatch.setattr(PPOTrainer, "optimise", original)
    train(config("killed"), resume=True)
    for f in ("adapter/adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(tmp_path / "clean" / f)), load_file(str(tmp_path / "killed" / f))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), f

    def log(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]

    clean = log("clean")
    assert clean == log("killed") and [x["step"] for x in clean] == [1, 2, 3]
    keys = {"reward", "kl", "entropy", "clip_fraction", "policy_loss", "value_loss"}
    assert keys <= clean[0].keys()
    assert clean[0]["kl"] == 0.0  # the adapter starts at zero: policy == reference
    assert any(x["kl"] != 0.0 for x in clean[1:])  # and moves away once trained


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "set exactly one for objective ppo"),
        (["training.reward_function=f.py:g", "training.reward_model=runs/rm"], "set exactly one"),
        (["training.reward_function=nocolon"], "must look like module:function"),
        (
            ["training.reward_function=f.py:g", "training.rollout_batch_size=6"],
            "must be a multiple",
        ),
        (["training.reward_function=f.py:g", "data.packing=true"], "applies to objective sft only"),
    ],
)
def test_ppo_config_errors_name_the_key(overrides, message):
    from tuneforge.config import load_config

    base = ["model=tiny-llama", "output_dir=o", "data.train=t.jsonl", "training.objective=ppo"]
    with pytest.raises(TuneforgeError, match=message):
        load_config(None, base + ["training.batch_size=4"] + overrides)

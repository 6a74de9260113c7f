"""FSDP2 state helpers, in this process on a one-rank gloo group (parameters are real DTensors;
the 2-rank runs through the CLI are in test_distributed.py)."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tuneforge.config import TrainingConfig
from tuneforge.models import load_model
from tuneforge.train.checkpoint import load_trainable_state, trainable_state
from tuneforge.train.distributed import Dist
from tuneforge.train.fsdp import (
    full_optimizer_state,
    full_weights,
    gather_full,
    grad_norm,
    is_sharded,
    load_full_optimizer_state,
    load_full_weights,
    shard_model,
)
from tuneforge.train.loop import build_optimizer


@pytest.fixture
def group():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield Dist(0, 1, 0)
    finally:
        dist.destroy_process_group()


def tiny():
    model, _, _ = load_model("tiny-llama", "float32", "cpu", False, None)
    return model


def one_step(model, opt):
    ids = torch.tensor([[1, 200, 300, 400, 500, 2], [1, 250, 350, 450, 550, 2]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def test_sharded_state_has_the_single_process_layout(group):
    cfg = TrainingConfig(learning_rate=1e-2)
    plain = tiny()
    plain_opt = build_optimizer(plain, cfg)
    sharded = tiny()
    shard_model(sharded, group, torch.device("cpu"))
    assert is_sharded(sharded) and not is_sharded(plain)
    assert isinstance(sharded.model.embed_tokens.weight, DTensor)
    assert sharded.lm_head.weight is sharded.model.embed_tokens.weight  # still tied
    opt = build_optimizer(sharded, cfg)
    one_step(plain, plain_opt)
    one_step(sharded, opt)
    plain_grads = [p.grad.norm() for p in plain.parameters()]
    assert grad_norm(list(sharded.parameters())) == pytest.approx(
        float(torch.stack(plain_grads).norm()), rel=1e-5
    )
    weights = full_weights(sharded)
    assert weights.keys() == trainable_state(plain).keys()  # the tied head once
    for k, t in trainable_state(plain).items():
        assert not isinstance(weights[k], DTensor)
        torch.testing.assert_close(weights[k], t, rtol=1e-5, atol=1e-6)
    state, want = full_optimizer_state(sharded, opt), plain_opt.state_dict()
    assert state["param_groups"] == want["param_groups"]
    assert state["state"].keys() == want["state"].keys()
    for i, s in want["state"].items():
        for name, t in s.items():
            torch.testing.assert_close(state["state"][i][name], t, rtol=1e-5, atol=1e-7)
    # a fresh sharded model and optimizer load it back exactly
    again = tiny()
    shard_model(again, group, torch.device("cpu"))
    again_opt = build_optimizer(again, cfg)
    load_full_weights(again, weights)
    load_full_optimizer_state(again, again_opt, state)
    assert all(w.equal(weights[k]) for k, w in full_weights(again).items())
    reloaded = full_optimizer_state(again, again_opt)
    for i, s in state["state"].items():
        for name, t in s.items():
            assert reloaded["state"][i][name].equal(t), (i, name)


def test_best_weights_kept_sharded_gathered_and_restored(group):
    model = tiny()
    shard_model(model, group, torch.device("cpu"))
    best = trainable_state(model)  # what the loop keeps in memory: DTensor shards
    assert all(isinstance(t, DTensor) for t in best.values())
    full = gather_full(best)  # what a checkpoint's best.safetensors holds
    assert all(not isinstance(t, DTensor) for t in full.values())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    load_trainable_state(model, full)  # from a checkpoint file: full tensors, this rank's shard
    assert all(w.equal(full[k]) for k, w in full_weights(model).items())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    load_trainable_state(model, best)  # from memory: shards
    assert all(w.equal(full[k]) for k, w in full_weights(model).items())


def test_unknown_weight_is_a_clear_error(group):
    from tuneforge.errors import TuneforgeError

    model = tiny()
    shard_model(model, group, torch.device("cpu"))
    with pytest.raises(TuneforgeError, match="unknown weight lora_A"):
        load_full_weights(model, {"lora_A": torch.zeros(2)})


def test_bitsandbytes_optimizer_refused_before_the_run():
    """bitsandbytes' 8-bit AdamW fails on DTensor shards (checked: 'mixed torch.Tensor and
    DTensor'); train() says so in one line before loading anything."""
    from tuneforge.errors import TuneforgeError
    from tuneforge.train import check_fsdp_optimizer

    cpu = torch.device("cpu")
    with pytest.raises(TuneforgeError, match="training.optimizer adamw_8bit cannot update"):
        check_fsdp_optimizer(TrainingConfig(optimizer="adamw_8bit"), cpu)
    check_fsdp_optimizer(TrainingConfig(optimizer="adamw"), cpu)
    check_fsdp_optimizer(TrainingConfig(optimizer="paged_adamw"), cpu)  # plain AdamW on CPU

"""Packing: each sample in a packed row sees only itself; packed == unpacked loss and gradients."""

import pytest
import torch

from tuneforge.data.batching import collate_packed, collate_padded, micro_batches, pack_rows
from tuneforge.data.render import Sample
from tuneforge.models import load_model
from tuneforge.train.sft import SFTObjective


def make_samples(n=7, seed=0, lo=6, hi=40):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(lo, hi, (1,), generator=g))
        ids = [1] + torch.randint(10, 5000, (T - 1,), generator=g).tolist()
        k = T // 3
        out.append(Sample(ids, [-100] * k + ids[k:]))
    return out


def test_pack_rows_uses_every_sample_once_within_max_length():
    samples = make_samples(40)
    rows = pack_rows(samples, 64, seed=3, epoch=0)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(40))
    assert all(sum(len(samples[i]) for i in r) <= 64 for r in rows)
    assert rows == pack_rows(samples, 64, seed=3, epoch=0)  # deterministic
    assert len(rows) < 40  # it actually packs
    fill = sum(len(s) for s in samples) / (len(rows) * 64)
    assert fill > 0.8


@torch.no_grad()
def check_packed_logits_equal_alone(model, samples, pad_id, atol):
    model.eval()
    packed = collate_packed([samples], pad_id)
    logits = model(
        input_ids=packed["input_ids"],
        attention_mask=packed["attention_mask"],
        position_ids=packed["position_ids"],
    ).logits[0]
    pos = 0
    for s in samples:
        alone = model(input_ids=torch.tensor([s.input_ids])).logits[0]
        torch.testing.assert_close(logits[pos : pos + len(s)], alone, atol=atol, rtol=1e-4)
        pos += len(s)
    # Negative control: restarting position ids alone does NOT isolate samples (transformers 5).
    leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
    second = slice(len(samples[0]), len(samples[0]) + len(samples[1]))
    assert (leaky[second] - logits[second]).abs().max() > atol * 10


def test_packed_logits_equal_each_sample_alone_tiny():
    model, tok, _ = load_model("tiny-llama")
    check_packed_logits_equal_alone(model, make_samples(4), tok.pad_token_id, atol=1e-5)


@pytest.mark.slow
def test_packed_logits_equal_each_sample_alone_real_model():
    model, tok, _ = load_model("smollm2-135m-instruct")
    check_packed_logits_equal_alone(model, make_samples(3), tok.pad_token_id, atol=2e-4)


@pytest.mark.parametrize("selective", [True, False])
def test_packed_and_padded_give_the_same_loss_and_gradients(selective):
    torch.manual_seed(0)
    model, tok, _ = load_model("tiny-llama")
    model.train()
    samples = make_samples(9)
    obj = SFTObjective(selective=selective)
    results = []
    for batch in (
        collate_padded(samples, tok.pad_token_id),
        collate_packed([[s for s in samples[:5]], [s for s in samples[5:]]], tok.pad_token_id),
    ):
        model.zero_grad()
        loss = obj.loss_sum(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), obj.units(batch), grads))
    (l1, u1, g1), (l2, u2, g2) = results
    assert u1 == u2 == sum(s.supervised_token_count for s in samples)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-4)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-5)


def test_group_by_length_reduces_padding():
    samples = make_samples(64, lo=5, hi=200)

    def padded_tokens(batches):
        return sum(len(b) * max(len(samples[i]) for i in b) for b in batches)

    plain = micro_batches(samples, 8, seed=0, epoch=0)
    grouped = micro_batches(samples, 8, seed=0, epoch=0, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(64))
    assert padded_tokens(grouped) < 0.8 * padded_tokens(plain)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_train_with_packing_end_to_end_matches_padded_loss(tmp_path, dates_rows, attn):
    """Through train(): with packing on, every sample is seen once per epoch and the first step's
    loss equals the padded run's first step on the same samples (1 row = the whole window). sdpa
    takes the per-sample attention path (tuneforge.accel.attention), eager an additive block mask."""
    from ..conftest import train_and_read_metrics, write_jsonl

    data = write_jsonl(tmp_path / "t.jsonl", dates_rows[:12])
    first = {}
    for packing in (False, True):
        _, lines = train_and_read_metrics(
            tmp_path,
            data,
            f"run-{packing}",
            **{
                "data.packing": packing,
                "data.max_length": 1024,
                "training.attn_implementation": attn,
                "training.batch_size": 12 if not packing else 1,
                "training.max_steps": 1,
            },
        )
        first[packing] = (lines[0]["loss"], lines[0]["tokens"])
    assert first[True][1] == first[False][1]
    assert first[True][0] == pytest.approx(first[False][0], rel=1e-5)

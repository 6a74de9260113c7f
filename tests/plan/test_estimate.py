"""The memory estimate against what torch and peft really hold, and the recommendation rules.

Activation counts are checked exactly against the tensors autograd saves
(``saved_tensors_hooks``) in a real Llama model; trainable counts against peft; the 4-bit weight
size against bitsandbytes. Peak RSS of real training is compared in bench/estimate_bench.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from tuneforge.config import MethodConfig
from tuneforge.errors import TuneforgeError
from tuneforge.plan.estimate import (
    FIT_MARGIN,
    MethodSettings,
    layer_activations,
    model_shape,
    trainable_params,
)

from ..conftest import tiny_config, write_jsonl


@pytest.fixture(scope="module")
def shape():
    return model_shape("tiny-llama")


def _tiny_model(layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneforge.models import resolve_model

    cfg = AutoConfig.from_pretrained(resolve_model("tiny-llama"))
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _saved_bytes(model, T: int, packed: bool = False) -> tuple[int, int]:
    """Bytes of the distinct non-parameter tensors autograd saves in one SFT forward: all but
    int64 ones, and the int64 ones (dropout's dropped positions, a random count). ``packed``:
    two samples in one row through tuneforge's per-sample SDPA, as the trainer runs them."""
    from tuneforge.accel.attention import cu_seq_lens, register
    from tuneforge.train.sft import SFTObjective

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = (t.untyped_storage().nbytes(), t.dtype == torch.int64)
        return t

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if packed:
        model.config._attn_implementation = register()
        half = torch.arange(T // 2)
        batch = {
            "input_ids": ids,
            "position_ids": torch.cat([half, half]).unsqueeze(0),
            "labels": labels,
        }
        batch["cu_seq_lens_q"] = cu_seq_lens(batch["position_ids"])
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        SFTObjective().loss_sum(model, batch)
    return (
        sum(n for n, index in seen.values() if not index),
        sum(n for n, index in seen.values() if index),
    )


@pytest.mark.parametrize(
    "method,dropout,targets",
    [
        ("full", 0.0, None),
        ("lora", 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("lora", 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("lora", 0.0, "all-linear"),
        ("lora", 0.1, "all-linear"),
        ("lora", 0.1, ["v_proj", "down_proj"]),
    ],
)
@pytest.mark.parametrize(
    "fused,packed", [(False, False), (True, False), (True, "sdpa"), (True, "kernel")]
)
def test_layer_activations_equal_what_autograd_saves(
    shape, method, dropout, targets, fused, packed
):
    """One more decoder layer adds exactly the bytes ``layer_activations`` predicts (fp32), with
    the models' own code, with tuneforge's fused ops (training.fused_ops), and with two samples
    packed in a row through SDPA per sample or the C++ attention kernel."""
    from tuneforge.accel import kernels
    from tuneforge.accel.fused import fused_ops
    from tuneforge.methods import apply_method

    if packed == "kernel" and not kernels.attention_expected():
        pytest.skip("the fused CPU kernels are not built here")

    def context():
        return kernels.disabled() if packed == "sdpa" else contextlib.nullcontext()

    T = 32
    kw = {} if targets is None else {"target_modules": targets}
    cfg = MethodConfig(name=method, r=4, lora_dropout=dropout, **kw)
    saved = []
    for layers in (2, 3):
        model = apply_method(_tiny_model(layers), cfg)
        with fused_ops(model, fused) as on, context():
            assert on == fused
            saved.append(_saved_bytes(model, T, bool(packed)))
    settings = MethodSettings.from_config(cfg)
    per_sample = packed == "sdpa"
    fp32, elems = layer_activations(shape, settings, fused, fused, fused, packed_sdpa=per_sample)
    # dropped positions: 8 bytes for each of p * T * (inputs of the adapted layers), binomial
    inputs = sum(x.in_features for x in shape.targets(settings.target_modules)) if dropout else 0
    index_bytes = 8 * dropout * T * inputs
    assert saved[1][0] - saved[0][0] == pytest.approx(T * (fp32 + elems) * 4 - index_bytes)
    n, p = T * inputs, dropout
    # the 2- and 3-layer counts are independent: 5 layers of variance
    assert abs(saved[1][1] - saved[0][1] - index_bytes) <= 8 * 6 * (5 * n * p * (1 - p)) ** 0.5


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_trainable_counts_match_peft(shape, targets):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from tuneforge.methods import trainable_parameters

    s = MethodSettings("lora", r=8, target_modules=targets, num_virtual_tokens=10)
    peft_configs = {
        "lora": LoraConfig(r=8, target_modules=targets),
        "dora": LoraConfig(r=8, target_modules=targets, use_dora=True),
        "ia3": IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
    }
    for name, pc in peft_configs.items():
        model = get_peft_model(_tiny_model(2), pc)
        s.name = name
        assert trainable_params(shape, s) == trainable_parameters(model)[0], name
    s.name = "full"
    assert trainable_params(shape, s) == trainable_parameters(_tiny_model(2))[1]


def test_qlora_weights_match_bitsandbytes(shape):
    """NF4 + double quantization as bitsandbytes stores it (CPU): the estimate's weight bytes
    equal the quantized model's parameter and buffer bytes within 1%."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tuneforge.models import resolve_model
    from tuneforge.plan.estimate import Workload, weight_bytes

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model("tiny-llama"), quantization_config=quant, dtype=torch.float32
    )
    actual = model.get_memory_footprint()
    work = Workload(device="cpu", dtype_bytes=4, batch_size=1, seq_len=8, supervised_per_batch=4)
    settings = MethodSettings("qlora", quantize_embeddings=False)
    predicted = weight_bytes(shape, work, settings, trainable=0)
    assert abs(predicted - actual) / actual < 0.01, (predicted, actual)


def test_qlora_weights_with_4bit_embeddings_match_the_tensors_held(shape):
    """method.quantize_embeddings (the default): the tied embedding / head in NF4 + double quant
    too; the estimate equals every tensor tuneforge's 4-bit base holds within 2% (the estimate
    leaves out each 4-bit tensor's small fixed tables, ~1 KiB: 1.0% of this tiny model)."""
    from tuneforge.methods.quantize import base_footprint, load_quantized_model
    from tuneforge.plan.estimate import Workload, weight_bytes

    model, _, _ = load_quantized_model("tiny-llama", device="cpu", method=MethodConfig("qlora"))
    fp = base_footprint(model)
    actual = fp["linear_bytes"] + fp["other_bytes"]
    work = Workload(device="cpu", dtype_bytes=4, batch_size=1, seq_len=8, supervised_per_batch=4)
    predicted = weight_bytes(shape, work, MethodSettings("qlora"), trainable=0)
    assert abs(predicted - actual) / actual < 0.02, (predicted, actual)
    unquantized = weight_bytes(shape, work, MethodSettings("qlora", quantize_embeddings=False), 0)
    assert unquantized > 3 * predicted  # the 49152 x 64 table dominates this tiny model


def test_parse_memory():
    from tuneforge.plan.recommend import parse_memory

    assert parse_memory("24GB") == parse_memory("24GiB") == parse_memory("24g") == 24 * 2**30
    assert parse_memory("512MB") == 512 * 2**20
    assert parse_memory("1.5 GB") == 1.5 * 2**30
    for bad in ("", "lots", "-3GB", "0GB", "24 parsecs"):
        with pytest.raises(TuneforgeError, match="not a size"):
            parse_memory(bad)


def test_estimate_cli_reads_data_and_lists_every_method(tmp_path, capsys):
    from tuneforge.cli import main
    from tuneforge.plan.estimate import ALL_METHODS

    rows = [
        {"instruction": f"Say {i} twice", "output": f"{i} {i} " * (1 + i % 5)} for i in range(20)
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = tiny_config(tmp_path, train)
    import yaml

    from tuneforge.config import to_dict

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["estimate", str(path), "--memory", "1GB", "training.batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 2 x" in out and "epoch: 10 micro-batches" in out
    table = [line for line in out.splitlines() if line.startswith("| ")][2:]
    assert [r.split("|")[1].strip().split()[0].strip("*") for r in table] == [
        "lora",
        *[m for m in ALL_METHODS if m != "lora"],
    ]
    assert "(configured)" in table[0] and all(" yes |" in r for r in table)
    assert main(["estimate", str(path), "--memory", "lots"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --memory 'lots' is not a size")


def test_recommend_follows_the_choice_table(tmp_path):
    """Memory budgets are placed between the estimates themselves, so each rule must fire."""
    from transformers import AutoConfig

    from tuneforge.models import resolve_model
    from tuneforge.plan.recommend import recommend

    big = 1e12
    r = recommend("tiny-llama", big, device="cpu")
    peaks = {e.label: e.peak for e in r.candidates}
    assert r.settings.name == "lora" and "also fits" in r.reason  # default: LoRA
    assert recommend("tiny-llama", big, goal="quality", device="cpu").settings.name == "full"
    quick = recommend("tiny-llama", big, goal="speed", device="cpu")
    assert quick.settings.name == "lora" and quick.settings.r == 8
    tasks = recommend("tiny-llama", big, tasks=3, device="cpu")
    assert tasks.settings.name == "lora" and "3 tasks" in tasks.reason
    # tiny-llama's weights are mostly its 49152 x 64 embedding: in 4 bits it saves less than the
    # head's dequantized temporary costs, so QLoRA never needs less than LoRA there (checked).
    assert peaks["qlora r16 all-linear"] > peaks["lora r16 all-linear"]
    # A shape (config only, built on the meta device) whose weights are mostly linear layers:
    # between QLoRA's and LoRA's peak, only the 4-bit base fits.
    cfg = AutoConfig.from_pretrained(resolve_model("tiny-llama"))
    cfg.update({"vocab_size": 512, "intermediate_size": 8192, "num_hidden_layers": 4})
    cfg.save_pretrained(tmp_path)
    peaks = {e.label: e.peak for e in recommend(str(tmp_path), big, device="cpu").candidates}
    room = 1 + FIT_MARGIN  # "fits" asks for the margin on top of the estimate
    tight = (peaks["qlora r16 all-linear"] + peaks["lora r16 all-linear"]) / 2 * room
    limited = recommend(str(tmp_path), tight, device="cpu")
    assert limited.settings.name == "qlora" and "limited memory" in limited.reason
    assert limited.choice.peak * room <= tight and not limited.workload.gradient_checkpointing
    # Only LoRA r8 on q/v fits without checkpointing: the default goal's choices (LoRA r16,
    # QLoRA) do not, so it moves to checkpointing instead of naming one that does not fit.
    assert peaks["lora r8 q/v"] < min(peaks["lora r16 all-linear"], peaks["qlora r16 all-linear"])
    budget = (peaks["lora r8 q/v"] + peaks["lora r16 all-linear"]) / 2 * room
    budget = min(budget, (peaks["lora r8 q/v"] + peaks["qlora r16 all-linear"]) / 2 * room)
    moved = recommend(str(tmp_path), budget, device="cpu")
    assert moved.workload.gradient_checkpointing and "gradient checkpointing" in moved.reason
    assert moved.choice.peak * room <= budget
    # Less than anything needs even at batch 1 with gradient checkpointing.
    none = recommend("tiny-llama", 1e6, device="cpu")
    assert none.choice is None and "nothing fits" in none.reason
    with pytest.raises(TuneforgeError, match="--tasks"):
        recommend("tiny-llama", big, tasks=0)


@pytest.mark.parametrize("packing", [True, False])
def test_the_estimate_measures_the_trainers_batch_plan(tmp_path, dates_rows, packing):
    """One batch plan (data/batching.py): the estimate sizes the epoch the trainer will run."""
    from tuneforge.data.dataset import prepare_sft_data
    from tuneforge.models import load_model
    from tuneforge.plan.estimate import workload_from_config
    from tuneforge.train.loop import Trainer
    from tuneforge.train.sft import SFTObjective

    train = write_jsonl(tmp_path / "train.jsonl", dates_rows[:40])
    cfg = tiny_config(tmp_path, train, **{"data.packing": packing, "data.max_length": 96})
    work = workload_from_config(cfg, "cpu")
    model, tok, _ = load_model("tiny-llama")
    samples = prepare_sft_data(cfg.data, tok, cfg.training.seed).train
    trainer = Trainer(
        model, SFTObjective(), samples, [], cfg.training, tmp_path, tok.pad_token_id,
        torch.device("cpu"), packing=packing, max_length=96,
    )  # fmt: skip
    shapes = trainer.plan.shapes(0)
    assert work.micro_batches_per_epoch == len(trainer.epoch_micro_batches(0)) == len(shapes) > 1
    assert work.tokens_per_epoch == sum(rows * length for rows, length, _ in shapes)
    assert sorted(i for _, _, ids in shapes for i in ids) == list(range(len(samples)))


@pytest.mark.parametrize("master", [True, False])
def test_full_fine_tuning_in_bf16_counts_the_weights_as_training_holds_them(shape, master):
    """training.dtype bfloat16: with master weights (the default) full fine-tuning holds every
    weight in fp32, so weights, gradients and AdamW's two moments take 16 bytes a weight; held
    in bf16, 8. The weight bytes equal what load_base + keep_master_weights hold."""
    from tuneforge.config import load_config
    from tuneforge.methods import apply_method, load_base
    from tuneforge.plan.estimate import Workload, estimate_method, weight_bytes
    from tuneforge.train.precision import Precision

    cfg = load_config(None, [
        "model=tiny-llama", "output_dir=x", "data.train=x.jsonl", "method.name=full",
        "training.dtype=bfloat16", f"training.master_weights={master}",
    ])  # fmt: skip
    cpu = torch.device("cpu")
    model = apply_method(load_base(cfg, cpu)[0], cfg.method)
    Precision.of(cfg.training, cpu).keep_master_weights(model)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    work = Workload(device="cuda", dtype_bytes=2, batch_size=1, seq_len=8, supervised_per_batch=4,
                    master_weights=master)  # fmt: skip
    full = MethodSettings("full")
    assert weight_bytes(shape, work, full, shape.params) == pytest.approx(held, rel=0.01)
    est = estimate_method(shape, work, full, 1e12)
    per_weight = (est.weights + est.gradients + est.optimizer) / shape.params
    assert per_weight == pytest.approx(16 if master else 8, rel=0.01)

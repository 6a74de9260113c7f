"""QLoRA's 4-bit base (methods/quantize.py): what is stored, what the layers compute with, that
only the fp32 adapters train and all of them get gradients, and the bad setups (exit 2)."""

import sys

import pytest
import torch
import yaml

from tuneforge.cli import main
from tuneforge.config import MethodConfig, TrainingConfig
from tuneforge.data.render import Sample
from tuneforge.methods import apply_method, trainable_parameters
from tuneforge.methods.quantize import (
    base_footprint,
    dequantize_base,
    linear_4bit_layers,
    load_quantized_model,
)
from tuneforge.models import load_tokenizer, tiny_path
from tuneforge.train import prepare_for_speed
from tuneforge.train.loop import Trainer
from tuneforge.train.sft import SFTObjective

from ..conftest import write_jsonl

QLORA = MethodConfig(name="qlora", r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
# tiny-llama's linear layers per decoder layer (out x in): q, k, v, o, gate, up, down; 2 layers
TINY_LINEARS = [64 * 64, 32 * 64, 32 * 64, 64 * 64, 128 * 64, 128 * 64, 64 * 128] * 2


def load_tiny(**method):
    model, tok, _ = load_quantized_model(
        "tiny-llama", device="cpu", method=MethodConfig(name="qlora", **method)
    )
    return model, tok


@pytest.mark.parametrize("double_quant", [True, False])
def test_stored_bytes_match_the_nf4_layout_by_hand(double_quant):
    """Blocks of 64 weights: 4-bit codes (n/2 bytes) + one absmax per block, fp32 (4 bytes) or,
    double-quantized, uint8 (1 byte) plus per layer one fp32 scale per 256 blocks (every tiny
    layer has <= 256 blocks: 4 bytes), a 256-entry fp32 code table (1024) and an fp32 offset (4).
    Every layer also keeps the 16-entry fp32 NF4 code table (64 bytes)."""
    model, _ = load_tiny(double_quant=double_quant, quantize_embeddings=False)
    layers = linear_4bit_layers(model)
    assert len(layers) == len(TINY_LINEARS)  # every decoder linear layer is 4-bit...
    assert not isinstance(model.lm_head.weight, type(layers[0][1].weight))  # ...the head is not
    assert model.get_input_embeddings().weight.dtype == torch.float32
    n = sum(TINY_LINEARS)
    per_block = n // 64 * (1 if double_quant else 4)
    per_layer = 64 + (4 + 1024 + 4 if double_quant else 0)
    fp = base_footprint(model)
    assert fp["linear_params"] == n
    assert fp["linear_bytes"] == n // 2 + per_block + per_layer * len(TINY_LINEARS)
    # embeddings (tied with the head) 49152 x 64, 5 norms of 64, 2 rotary buffers of 8: all fp32
    assert fp["other_bytes"] == 4 * (49152 * 64 + 5 * 64 + 2 * 8)
    assert trainable_parameters(model)[1] == n + 49152 * 64 + 5 * 64  # weights, not packed bytes


def test_dequantized_weights_are_exactly_what_the_4bit_layer_computes_with():
    """The merge base: dequantize_base's fp32 weights reproduce each 4-bit layer bitwise
    (identity input -> W^T, no rounding), so merging adds the adapter to the trained-on base."""
    model, _ = load_tiny()
    layers = dict(linear_4bit_layers(model))
    eye = {name: torch.eye(m.in_features) for name, m in layers.items()}
    with torch.no_grad():
        model.eval()  # bitsandbytes' bf16 repack for eval on AVX512-BF16 CPUs must stay off
        computed = {name: m(eye[name]) for name, m in layers.items()}
        plain = dequantize_base(model)
        for name, out in computed.items():
            linear = plain.get_submodule(name)
            assert type(linear) is torch.nn.Linear and linear.weight.dtype == torch.float32
            assert torch.equal(linear(eye[name]), out), name
    assert not hasattr(plain.config, "quantization_config")


def samples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(10, 1000, (6 + 2 * i,), generator=g).tolist()
        out.append(Sample(ids, [-100] * 3 + ids[3:]))
    return out


def gradients_after_one_step(tmp_path, checkpointing: bool, evaluate_first: bool):
    torch.manual_seed(0)
    model, tok = load_tiny()
    model.config.use_cache = False
    model = apply_method(model, QLORA)
    prepare_for_speed(model, TrainingConfig(gradient_checkpointing=checkpointing))
    t = TrainingConfig(batch_size=4, max_steps=3, learning_rate=1e-2, progress=False)
    data = samples()
    trainer = Trainer(
        model, SFTObjective(), data, data[:2], t, tmp_path, tok.pad_token_id, torch.device("cpu")
    )
    if evaluate_first:
        trainer.evaluate()
    trainer.train_step(0)  # lora_B starts at zero (so lora_A's first gradient is zero): step once
    trainer.accumulate_gradients(1)
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, model


def test_gradient_checkpointing_gives_every_adapter_a_gradient(tmp_path):
    """With checkpointing on (and an evaluation before training, which on AVX512-BF16 CPUs
    used to switch bitsandbytes to a kernel without backward), every trainable parameter has a
    non-zero gradient after one step, equal to the one without checkpointing."""
    grads, model = gradients_after_one_step(tmp_path, checkpointing=True, evaluate_first=True)
    reference, _ = gradients_after_one_step(tmp_path, checkpointing=False, evaluate_first=False)
    assert len(grads) == 2 * len(TINY_LINEARS)  # lora_A and lora_B of every 4-bit layer
    assert all("lora_" in n and model.get_parameter(n).dtype == torch.float32 for n in grads)
    for name, g in grads.items():
        assert g is not None and g.abs().max() > 0, name
        torch.testing.assert_close(g, reference[name], rtol=1e-5, atol=1e-8)


# -- bad setups: one line, exit 2, nothing written --------------------------------------------


def write_config(tmp_path, model="tiny-llama", **method):
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "output": "b"}] * 4)
    cfg = {
        "model": str(model),
        "output_dir": str(tmp_path / "out"),
        "method": {"name": "qlora", **method},
        "data": {"train": str(train)},
        "training": {"max_steps": 1, "progress": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_line_error(tmp_path, capsys, config) -> str:
    capsys.readouterr()  # what making the test's model folder printed is not the command's
    code = main(["train", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "out").exists()
    return err[0]


def tiny_model_folder(tmp_path, model_type, **overrides):
    """A real randomly initialised model of another shape, with the built-in tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = load_tokenizer(str(tiny_path("tiny-llama")))
    spec = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    spec.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok), **overrides)
    folder = tmp_path / model_type
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **spec)).save_pretrained(
        folder
    )
    tok.save_pretrained(folder)
    return folder


def test_unsupported_quant_type(tmp_path, capsys):
    err = one_line_error(tmp_path, capsys, write_config(tmp_path, quant_type="int4"))
    assert err.endswith("'method.quant_type' is 'int4'; choose one of nf4, fp4")


def test_bitsandbytes_not_installed(tmp_path, capsys, monkeypatch):
    """It is installed here; a None entry in sys.modules makes it unimportable, as if absent."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    err = one_line_error(tmp_path, capsys, write_config(tmp_path))
    assert "qlora needs bitsandbytes, which is not installed: pip install" in err
    assert err.endswith("or use method.name: lora")


def test_bitsandbytes_cannot_run_on_the_device(tmp_path, capsys, monkeypatch):
    """Mocked: every device here has bitsandbytes kernels, so quantize_4bit is made to fail the
    way torch's dispatcher does for a backend with no kernel."""
    import bitsandbytes

    def no_kernel(*args, **kwargs):
        raise NotImplementedError(
            "Could not run 'bitsandbytes::quantize_4bit' with arguments from the 'CPU' backend."
        )

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_kernel)
    err = one_line_error(tmp_path, capsys, write_config(tmp_path))
    assert "cannot run nf4 4-bit weights on cpu (Could not run 'bitsandbytes::" in err
    assert err.endswith("run on a CPU or CUDA GPU, or use method.name: lora")


def test_mixture_of_experts_weights_cannot_be_quantized(tmp_path, capsys):
    """transformers 5 keeps Mixtral's experts as 3-D tensors, which bitsandbytes leaves alone."""
    folder = tiny_model_folder(tmp_path, "mixtral", num_local_experts=4, num_experts_per_tok=2)
    err = one_line_error(tmp_path, capsys, write_config(tmp_path, model=folder))
    assert "% of its decoder weights are in linear layers bitsandbytes can quantize" in err
    assert "model.layers.0.mlp.experts.gate_up_proj (4, 256, 64)" in err
    assert err.endswith("would stay in full precision); use method.name: lora")


def test_model_without_quantizable_layers(tmp_path, capsys):
    folder = tiny_model_folder(tmp_path, "llama", num_hidden_layers=0)
    err = one_line_error(tmp_path, capsys, write_config(tmp_path, model=folder))
    assert "has no linear layers bitsandbytes can quantize" in err


def test_gguf_file_cannot_be_loaded_in_4_bits(tmp_path, capsys):
    from tuneforge.models import _builtin_gguf

    err = one_line_error(tmp_path, capsys, write_config(tmp_path, model=_builtin_gguf()))
    assert "a GGUF file cannot be loaded into a 4-bit base" in err
    assert err.endswith("or use method.name: lora")


def test_compute_dtype_auto_is_the_runs_compute_dtype():
    """method.compute_dtype auto: the dtype training.dtype resolves to (bfloat16 where asked or
    on a GPU that has it, float32 on a CPU), so 4-bit matmuls run in the loop's dtype."""
    for training_dtype, expect in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        model, _, _ = load_quantized_model(
            "tiny-llama", training_dtype, "cpu", method=MethodConfig(name="qlora")
        )
        layers = linear_4bit_layers(model)
        assert layers and {m.compute_dtype for _, m in layers} == {expect}
        assert model.get_output_embeddings().compute_dtype == expect  # the 4-bit head too

"""Bottleneck adapters (ours): identity at step 0, the Houlsby parameter count, the PEFT-like
file layout, several named adapters on one model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import MethodConfig
from tuneforge.errors import TuneforgeError
from tuneforge.methods import (
    apply_method,
    disabled_adapters,
    load_adapter,
    load_adapters,
    set_active_adapter,
    trainable_parameters,
)

from .test_methods import batch, fresh, logits_of, train_one_step


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("placement", ["both", "mlp"])
def test_logits_equal_the_base_model_at_step_0(family, placement):
    base, _ = fresh(family)
    expected = logits_of(base, batch())
    model = apply_method(base, MethodConfig(name="adapter", placement=placement))
    assert model.get_base_model() is base  # injected into the model, not a copy of it
    torch.testing.assert_close(logits_of(model, batch()), expected, rtol=0, atol=0)
    # ...and the model really runs through the adapters: a non-zero up-projection changes it.
    _, layer = next(model.layers())
    with torch.no_grad():
        layer.adapter_up["default"].bias.fill_(0.1)
    assert (logits_of(model, batch()) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("placement, per_layer", [("both", 2), ("mlp", 1)])
def test_parameter_count_is_houlsby_formula(placement, per_layer):
    """Each adapter: down (h x b + b) + up (b x h + h); h = 64, b = 64 // 16 = 4, 2 layers."""
    model = apply_method(fresh("tiny-llama")[0], MethodConfig(name="adapter", placement=placement))
    h, b, layers = 64, 4, 2
    trainable, _ = trainable_parameters(model)
    assert trainable == layers * per_layer * (h * b + b + b * h + h)
    names = [n for n, _ in model.layers()]
    expected = ["mlp"] if placement == "mlp" else ["self_attn", "mlp"]
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == sorted(expected * layers)


def test_saved_like_peft_and_reloaded_exactly(tmp_path):
    cfg = MethodConfig(name="adapter", bottleneck_size=8, non_linearity="gelu")
    model, _, _ = train_one_step(apply_method(fresh("tiny-qwen2")[0], cfg))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["task_type"] == "CAUSAL_LM"
    assert (config["bottleneck_size"], config["non_linearity"], config["placement"]) == (
        8,
        "gelu",
        "both",
    )
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    expected = {
        f"base_model.model.model.layers.{i}.{block}.adapter_{part}.{t}"
        for i in range(2)
        for block in ("self_attn", "mlp")
        for part in ("down", "up")
        for t in ("weight", "bias")
    }
    assert keys == expected
    reloaded = load_adapter(fresh("tiny-qwen2")[0], tmp_path)
    torch.testing.assert_close(
        logits_of(reloaded, batch()), logits_of(model, batch()), rtol=0, atol=0
    )


def test_several_named_adapters_switch_and_disable(tmp_path):
    singles = {}
    for name, placement in (("a", "both"), ("b", "mlp")):
        torch.manual_seed(len(name) + ord(name))
        model, _, _ = train_one_step(
            apply_method(fresh("tiny-llama")[0], MethodConfig(name="adapter", placement=placement))
        )
        model.save_pretrained(tmp_path / name)
        singles[name] = logits_of(model, batch())
    base = fresh("tiny-llama")[0]
    base_logits = logits_of(base, batch())
    model = load_adapters(base, {"a": tmp_path / "a", "b": tmp_path / "b"})
    torch.testing.assert_close(logits_of(model, batch()), singles["a"], rtol=0, atol=0)
    set_active_adapter(model, "b")
    torch.testing.assert_close(logits_of(model, batch()), singles["b"], rtol=0, atol=0)
    with disabled_adapters(model):
        torch.testing.assert_close(logits_of(model, batch()), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(logits_of(model, batch()), singles["b"], rtol=0, atol=0)
    with pytest.raises(TuneforgeError, match="no adapter named 'c' is loaded; loaded: a, b"):
        set_active_adapter(model, "c")
    lora = apply_method(fresh("tiny-llama")[0], MethodConfig(name="lora", r=2))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(TuneforgeError, match="lora adapter; it cannot join the adapter"):
        load_adapter(model, tmp_path / "lora", "c")

"""Several adapters on one model (peft-backed), the weighted LoRA combination checked against the
update computed by hand, and the CLI: `adapters combine`, `generate --add-adapter --adapter`."""

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuneforge.cli import main
from tuneforge.config import MethodConfig
from tuneforge.infer.generate import generate
from tuneforge.infer.runs import load_for_inference
from tuneforge.methods import apply_method, disabled_adapters, set_active_adapter
from tuneforge.methods.combine import combine_runs

from .test_methods import batch, fresh, logits_of, train_one_step


def make_run(root, run_name, seed, **method):
    """A run folder as `tuneforge train` leaves it (config.yaml + adapter/ with tokenizer)."""
    base, tok = fresh("tiny-llama")
    torch.manual_seed(seed)
    model = apply_method(base, MethodConfig(**{"lora_dropout": 0.0, **method}))
    model, _, _ = train_one_step(model, lr=0.02)
    run = root / run_name
    model.save_pretrained(run / "adapter")
    tok.save_pretrained(run / "adapter")
    cfg = {"model": "tiny-llama", "output_dir": str(run), "method": method}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run, logits_of(model, batch())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a = make_run(root, "run_a", 1, name="lora", r=2, lora_alpha=8, target_modules=["q_proj"])
    b = make_run(
        root,
        "run_b",
        2,
        name="lora",
        r=4,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["q_proj"],
    )
    return root, a, b


def test_several_lora_adapters_switch_and_disable(runs):
    _, (run_a, logits_a), (run_b, logits_b) = runs
    model, _ = load_for_inference(str(run_a), adapters={"b": str(run_b)})
    torch.testing.assert_close(logits_of(model, batch()), logits_a, rtol=0, atol=1e-6)
    set_active_adapter(model, "b")
    torch.testing.assert_close(logits_of(model, batch()), logits_b, rtol=0, atol=1e-6)
    with disabled_adapters(model):
        base = logits_of(model, batch())
    torch.testing.assert_close(base, logits_of(fresh("tiny-llama")[0], batch()), rtol=0, atol=0)
    assert (logits_a - logits_b).abs().max() > 1e-3 and (base - logits_a).abs().max() > 1e-3


def test_combination_equals_the_weighted_update_computed_by_hand(runs, tmp_path):
    """Hand-worked: delta W = 0.7 * (8 / 2) * B_a A_a + (-0.3) * (4 / sqrt(4)) * B_b A_b per layer
    (run_b uses rsLoRA: scale alpha / sqrt(r))."""
    _, (run_a, _), (run_b, _) = runs
    out = combine_runs([run_a, run_b], [0.7, -0.3], tmp_path / "combined")
    sa = load_file(str(run_a / "adapter" / "adapter_model.safetensors"))
    sb = load_file(str(run_b / "adapter" / "adapter_model.safetensors"))
    base = fresh("tiny-llama")[0]
    by_hand = {}
    for key in sa:
        if key.endswith("lora_A.weight"):
            kb = key.replace("lora_A", "lora_B")
            layer = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            by_hand[layer] = 0.7 * 4.0 * (sa[kb] @ sa[key]) + (-0.3) * 2.0 * (sb[kb] @ sb[key])
    assert len(by_hand) == 2  # q_proj in each of the 2 layers

    combined, _ = load_for_inference(str(out))
    merged = combined.merge_and_unload()
    params = dict(base.named_parameters())
    for layer, delta in by_hand.items():
        got = dict(merged.named_parameters())[f"{layer}.weight"] - params[f"{layer}.weight"]
        torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-6)
    # And the combined adapter (unmerged) runs the base model with W + delta W.
    with torch.no_grad():
        for layer, delta in by_hand.items():
            params[f"{layer}.weight"] += delta
    combined, _ = load_for_inference(str(out))
    torch.testing.assert_close(
        logits_of(combined, batch()), logits_of(base, batch()), rtol=1e-5, atol=1e-5
    )


def test_cli_combine_and_generate_with_a_named_adapter(runs, tmp_path, capsys):
    root, (run_a, _), (run_b, _) = runs
    out = tmp_path / "mix"
    code = main(
        [
            "adapters",
            "combine",
            str(run_a),
            str(run_b),
            "--weights",
            "0.5",
            "0.5",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*"))

    prompt = "Give this date in ISO format.\n\nMay 4th 1999"
    capsys.readouterr()
    args = ["generate", str(run_a), "--add-adapter", f"mix={out}", "--adapter", "mix"]
    assert main([*args, "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    reply = capsys.readouterr().out.strip()
    model, tok = load_for_inference(str(out))
    [expected] = generate(model, tok, [[{"role": "user", "content": prompt}]], max_new_tokens=6)
    assert reply == expected.strip()

    assert main([*args[:-1], "nope", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: no adapter named 'nope' is loaded; loaded: run_a, mix"]


def test_combine_refuses_what_does_not_add_linearly(runs, tmp_path, capsys):
    root, (run_a, _), _ = runs
    dora, _ = make_run(root, "dora", 3, name="dora", r=2, lora_alpha=4)
    code = main(
        [
            "adapters",
            "combine",
            str(run_a),
            str(dora),
            "--weights",
            "1",
            "1",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds a dora adapter; only lora adapters" in err[0]
    assert (
        main(["adapters", "combine", str(run_a), str(run_a), "--weights", "1", "--out", "y"]) == 2
    )
    assert "--weights has 1 values for 2 runs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

"""A model overfit on one example generates it and then stops (end of turn is learned)."""

import pytest
import torch

from tuneforge.infer.generate import generate
from tuneforge.infer.runs import load_for_inference
from tuneforge.train import train

from ..conftest import tiny_config, write_jsonl

EXAMPLE = {"instruction": "What is the secret word?", "output": "The secret word is pumpkin."}


def overfit(tmp_path, model, method, steps, lr, **extra):
    data = write_jsonl(tmp_path / "one.jsonl", [EXAMPLE])
    cfg = tiny_config(
        tmp_path,
        data,
        **{
            "model": model,
            "method.name": method,
            "training.max_steps": steps,
            "training.learning_rate": lr,
            "training.batch_size": 1,
            "training.lr_scheduler": "constant",
            **extra,
        },
    )
    train(cfg)
    return load_for_inference(cfg.output_dir)


def check_generates_and_stops(model, tokenizer):
    messages = [{"role": "user", "content": EXAMPLE["instruction"]}]
    [reply] = generate(model, tokenizer, [messages], max_new_tokens=40)
    assert reply == EXAMPLE["output"]
    # It stopped on its own: the raw continuation ends with the end-of-turn token well before 40.
    from tuneforge.data.render import end_of_turn_ids, render_prompt

    ids = torch.tensor([render_prompt(tokenizer, messages)])
    out = model.generate(
        input_ids=ids,
        max_new_tokens=40,
        do_sample=False,
        eos_token_id=end_of_turn_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    assert new[-1] in end_of_turn_ids(tokenizer) and len(new) < 40


def test_tiny_model_overfit_on_one_example_generates_it_and_stops(tmp_path):
    model, tok = overfit(tmp_path, "tiny-llama", "full", 60, 3e-3)
    check_generates_and_stops(model, tok)


@pytest.mark.slow
def test_real_model_lora_overfit_generates_it_and_stops(tmp_path):
    model, tok = overfit(
        tmp_path,
        "smollm2-135m-instruct",
        "lora",
        30,
        3e-3,
        **{"method.r": 16, "method.lora_alpha": 32},
    )
    check_generates_and_stops(model, tok)

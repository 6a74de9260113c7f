"""Why tuneforge generates for prefix / prompt tuning itself: peft's generate vs the forward.

For each tiny model and method, a random adapter (entries ~ N(0, 1)) generates greedily with
``PeftModel.generate`` and with ``tuneforge.infer.generate.generate_tokens``. At each step, the logits the
generator acted on are compared with ``PeftModel.forward`` over the same tokens (what training
computes). Prints the largest absolute difference per step; numbers are printed, never asserted.

    python bench/prompt_learning_generate_check.py
"""

from __future__ import annotations

import warnings

import torch

from tuneforge.config import MethodConfig
from tuneforge.infer.generate import generate_tokens
from tuneforge.methods import apply_method
from tuneforge.models import load_model


@torch.no_grad()
def step_differences(model, use_peft: bool, steps: int = 3) -> list[float]:
    prompt = torch.tensor([[1, 520, 33, 4000, 17]])
    mask = torch.ones_like(prompt)
    kw = dict(
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=2,
        output_logits=True,
        return_dict_in_generate=True,
    )
    if use_peft:
        out = model.generate(input_ids=prompt, attention_mask=mask, **kw)
    else:
        out = generate_tokens(model, prompt, mask, **kw)
    diffs = []
    for i in range(steps):
        seq = out.sequences[:, : prompt.shape[1] + i]
        forward = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1]
        diffs.append(float((out.logits[i][0] - forward).abs().max()))
    return diffs


def main() -> None:
    warnings.simplefilter("ignore")
    print("max |generate logits - forward logits| at generation steps 1, 2, 3")
    for family in ("tiny-llama", "tiny-qwen2"):
        for method in ("prefix", "prompt"):
            torch.manual_seed(0)
            base, tok, _ = load_model(family)
            model = apply_method(base, MethodConfig(name=method, num_virtual_tokens=5), tok)
            model.eval()
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.normal_(0, 1.0)
            for label, use_peft in (("peft generate", True), ("tuneforge", False)):
                d = step_differences(model, use_peft)
                print(f"{family:11} {method:7} {label:14} " + " ".join(f"{x:.2e}" for x in d))


if __name__ == "__main__":
    main()

"""training.optimizer: 8-bit AdamW runs on CPU and resumes exactly; paged optimizers fall back to
the unpaged ones without CUDA, with one notice; the no-decay groups are kept for every choice."""

import io

import pytest
import torch

from tuneforge.config import TrainingConfig
from tuneforge.train.loop import build_optimizer


class TwoLayers(torch.nn.Module):
    """A weight of 64 x 128 = 8192 values (>= 4096: 8-bit states) and a bias (1-D: no decay)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(128, 64)


def run_steps(optimizer: str, steps: int, restart_at: int | None = None) -> torch.Tensor:
    """``steps`` updates with seeded gradients; at ``restart_at`` the optimizer is rebuilt from
    its saved state_dict, as a resumed run does."""
    model = TwoLayers()
    t = TrainingConfig(optimizer=optimizer, learning_rate=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, t)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        if step + 1 == restart_at:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            opt = build_optimizer(model, t)
            opt.load_state_dict(torch.load(buf, weights_only=True))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_adamw_8bit_keeps_groups_quantizes_state_and_resumes_exactly():
    import bitsandbytes

    model = TwoLayers()
    opt = build_optimizer(model, TrainingConfig(optimizer="adamw_8bit", weight_decay=0.1))
    assert isinstance(opt, bitsandbytes.optim.AdamW8bit)
    assert [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups] == [(1, 0.1), (1, 0.0)]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = {p.ndim: opt.state[p]["state1"].dtype for p in model.parameters()}
    assert state == {2: torch.uint8, 1: torch.float32}  # 8-bit moments; 64 values stay 32-bit
    start = torch.cat([p.detach().flatten() for p in TwoLayers().parameters()])
    straight = run_steps("adamw_8bit", 6)
    assert torch.equal(straight, run_steps("adamw_8bit", 6, restart_at=3))
    # the update is AdamW's up to 8-bit state rounding: within 10% of torch's total movement
    reference = run_steps("adamw", 6)
    assert (straight - reference).norm() < 0.1 * (reference - start).norm()


@pytest.mark.parametrize(
    ("paged", "plain"), [("paged_adamw", "adamw"), ("paged_adamw_8bit", "adamw_8bit")]
)
def test_paged_optimizer_falls_back_on_cpu_with_one_notice(paged, plain, capsys):
    opt = build_optimizer(TwoLayers(), TrainingConfig(optimizer=paged))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"notice: training.optimizer {paged}: paged optimizers need a CUDA GPU (this run is on "
        f"cpu); using {plain}"
    ]
    assert type(opt) is type(build_optimizer(TwoLayers(), TrainingConfig(optimizer=plain)))
    assert torch.equal(run_steps(paged, 3), run_steps(plain, 3))


def test_8bit_optimizer_without_bitsandbytes_is_a_config_error(tmp_path, monkeypatch):
    """Installed here; a None entry in sys.modules makes it unimportable, as if absent."""
    import sys

    from tuneforge.config import load_config
    from tuneforge.errors import TuneforgeError

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    overrides = ["model=tiny-llama", "output_dir=x", "data.train=t.jsonl"]
    with pytest.raises(TuneforgeError, match=r"'training.optimizer' adamw_8bit needs bitsandbytes"):
        load_config(None, [*overrides, "training.optimizer=adamw_8bit"])
    cfg = load_config(None, [*overrides, "training.optimizer=paged_adamw"])  # falls back: fine
    assert cfg.training.optimizer == "paged_adamw"

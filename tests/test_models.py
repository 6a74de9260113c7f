"""``training.dtype: auto`` and ``training.attn_implementation: auto`` on GPUs, without one: the
CUDA queries are faked, flash-attn is a stand-in package on ``sys.path``."""

import importlib
import sys

import pytest
import torch

from tuneforge import models
from tuneforge.models import _attn_implementation, pick_dtype

CUDA = torch.device("cuda")


def test_auto_dtype_is_bf16_only_where_the_gpu_has_it(monkeypatch):
    # a T4 / V100: torch says yes when emulation counts, which is slower than fp32 there
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)  # fmt: skip
    assert pick_dtype("auto", CUDA) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert pick_dtype("auto", CUDA) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # asked for: as asked


@pytest.fixture
def flash_attn(tmp_path, monkeypatch):
    """Install a stand-in flash_attn package (``good`` imports, ``broken`` fails as a wheel built
    for another torch does); yields the installer."""

    def install(kind: str) -> None:
        folder = tmp_path / kind / "flash_attn"
        folder.mkdir(parents=True)
        body = "" if kind == "good" else "raise ImportError('undefined symbol: _ZN3c104cuda')\n"
        (folder / "__init__.py").write_text(body)
        monkeypatch.syspath_prepend(str(tmp_path / kind))
        sys.modules.pop("flash_attn", None)
        importlib.invalidate_caches()

    monkeypatch.setattr(models, "_flash_warned", False)
    yield install
    sys.modules.pop("flash_attn", None)


def test_auto_attention_takes_flash_attn_only_where_it_runs(monkeypatch, flash_attn, capsys):
    flash_attn("good")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _attn_implementation("auto", CUDA, torch.bfloat16) == "flash_attention_2"
    assert _attn_implementation("auto", CUDA, torch.float32) == "sdpa"  # flash: half precision
    assert _attn_implementation("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    assert _attn_implementation("eager", CUDA, torch.bfloat16) == "eager"  # asked for
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4
    assert _attn_implementation("auto", CUDA, torch.float16) == "sdpa"
    assert capsys.readouterr().err == ""


def test_a_flash_attn_that_does_not_import_gives_sdpa_and_one_warning(
    monkeypatch, flash_attn, capsys
):
    flash_attn("broken")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _attn_implementation("auto", CUDA, torch.bfloat16) == "sdpa"
    assert _attn_implementation("auto", CUDA, torch.bfloat16) == "sdpa"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "warning: training.attn_implementation auto: flash-attn is installed but does not "
        "import (undefined symbol: _ZN3c104cuda); using sdpa"
    ]


def test_a_gpu_load_goes_straight_to_the_device_and_master_weights_keep_flash_attn(
    monkeypatch, flash_attn
):
    """On a GPU the weights load onto it (``device_map``), not onto the CPU first; full
    fine-tuning's float32 master weights still get flash-attn, which autocast feeds in bf16.
    No GPU here: ``from_pretrained`` is a stand-in that records what it was asked."""
    from transformers import AutoModelForCausalLM

    from tuneforge.config import load_config
    from tuneforge.methods import load_base

    flash_attn("good")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    asked = {}

    class Loaded(torch.nn.Module):
        def to(self, *args, **kwargs):
            asked["to"] = args
            return self

    def from_pretrained(path, **kwargs):
        asked.update(kwargs)
        return Loaded()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(models, "load_tokenizer", lambda *a: None)
    for method, dtype in (("full", torch.float32), ("lora", torch.bfloat16)):
        asked.clear()
        cfg = load_config(
            None,
            ["model=tiny-llama", "output_dir=x", "data.train=x.jsonl", f"method.name={method}"],
        )
        load_base(cfg, CUDA)
        assert asked["device_map"] == {"": CUDA}
        assert asked["dtype"] == dtype  # full: float32 master weights under bf16 autocast
        assert asked["attn_implementation"] == "flash_attention_2"
    assert models.placement(torch.device("cpu")) == {}  # mapped views of the file: not on a CPU

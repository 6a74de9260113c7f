"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

Each adapter is down-projection -> non-linearity -> up-projection with a residual connection,
``h + up(act(down(h)))``, applied to the output of a block before the layer's own residual add.
``placement: both`` puts one after the attention block and one after the MLP block of every layer
(Houlsby); ``placement: mlp`` only after the MLP (Pfeiffer et al. 2020). The up-projection starts
at zero, so the adapted model equals the base model until the first update.

They are injected the peft way: each attention / MLP module is swapped for a
``BottleneckLayer`` that keeps the original as ``base_layer``; ``BottleneckModel`` holds the
transformers model (``get_base_model``) and offers peft's adapter API (``save_pretrained``,
``load_adapter``, ``set_adapter``, ``disable_adapter``). Files are laid out like PEFT's:
``adapter_config.json`` (``peft_type: BOTTLENECK``) + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.adapter_down.weight`` (the adapter name left out, as peft does).
No library usable with transformers 5 provides these (the ``adapters`` package pins 4.x).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneforge.config import MethodConfig
from tuneforge.errors import TuneforgeError

PEFT_TYPE = "BOTTLENECK"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
ACTIVATIONS = {
    "relu": torch.nn.ReLU,
    "gelu": torch.nn.GELU,
    "silu": torch.nn.SiLU,
    "tanh": torch.nn.Tanh,
}
KEY_PREFIX = "base_model.model."


class BottleneckLayer(torch.nn.Module):
    """A block (attention or MLP) followed by named bottleneck adapters; one is active at a time.

    ``adapter_down[name]`` (hidden -> b) and ``adapter_up[name]`` (b -> hidden) mirror peft's
    ``lora_A[name]`` / ``lora_B[name]`` layout.
    """

    def __init__(self, base_layer: torch.nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapter_down = torch.nn.ModuleDict()
        self.adapter_up = torch.nn.ModuleDict()
        self.adapter_act: dict[str, torch.nn.Module] = {}
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str, hidden: int, size: int, non_linearity: str) -> None:
        p = next(self.base_layer.parameters())
        down = torch.nn.Linear(hidden, size, device=p.device, dtype=p.dtype)
        up = torch.nn.Linear(size, hidden, device=p.device, dtype=p.dtype)
        # Near-identity init (Houlsby sec. 2.1); a zero up-projection makes it exactly identity.
        torch.nn.init.normal_(down.weight, std=1e-2)
        torch.nn.init.zeros_(down.bias)
        torch.nn.init.zeros_(up.weight)
        torch.nn.init.zeros_(up.bias)
        self.adapter_down[name] = down
        self.adapter_up[name] = up
        self.adapter_act[name] = ACTIVATIONS[non_linearity]()
        self.active_adapter = name

    def adapt(self, h: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if self.disabled or name is None or name not in self.adapter_down:
            return h
        down, up = self.adapter_down[name], self.adapter_up[name]
        return h + up(self.adapter_act[name](down(h)))  # (B, T, C)

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, tuple):  # attention returns (output, weights)
            return (self.adapt(out[0]), *out[1:])
        return self.adapt(out)


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of transformer blocks (``model.model.layers``, ``transformer.h``, ...)."""
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise TuneforgeError(
        f"method 'adapter': cannot find the {n} transformer layers of this "
        f"{model.config.model_type} model"
    )


def _block_name(layer: torch.nn.Module, names: tuple[str, ...], what: str, model_type: str) -> str:
    for name in names:
        if isinstance(getattr(layer, name, None), torch.nn.Module):
            return name
    raise TuneforgeError(
        f"method 'adapter': a {model_type} layer has no {what} block named "
        f"{' or '.join(names)}; bottleneck adapters do not support this architecture"
    )


def bottleneck_width(hidden: int, cfg: MethodConfig) -> int:
    return cfg.bottleneck_size or max(1, hidden // cfg.reduction_factor)


class BottleneckModel(torch.nn.Module):
    """A transformers causal LM with bottleneck adapters injected into its layers."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.base_model = model
        self.adapter_configs: dict[str, dict] = {}
        self.active_adapter: str | None = None
        self._adapters_disabled = False

    # -- transformers model surface -------------------------------------------------------------
    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return self.base_model.device

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> torch.nn.Module:
        return self.base_model

    # -- adapters -------------------------------------------------------------------------------
    def layers(self) -> Iterator[tuple[str, BottleneckLayer]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, BottleneckLayer):
                yield name, module

    def add_adapter(self, name: str, config: dict) -> None:
        """Inject (or extend) wrappers and add adapter ``name`` with ``config``'s shape."""
        if name in self.adapter_configs:
            raise TuneforgeError(f"an adapter named '{name}' is already loaded")
        model_type = self.base_model.config.model_type
        blocks = []
        for layer in _decoder_layers(self.base_model):
            attn = _block_name(layer, ATTENTION_NAMES, "attention", model_type)
            mlp = _block_name(layer, MLP_NAMES, "MLP", model_type)
            blocks += [(layer, attn)] if config["placement"] == "both" else []
            blocks.append((layer, mlp))
        for layer, block in blocks:
            module = getattr(layer, block)
            if not isinstance(module, BottleneckLayer):
                module = BottleneckLayer(module)
                setattr(layer, block, module)
            module.add_adapter(
                name, config["hidden_size"], config["bottleneck_size"], config["non_linearity"]
            )
        self.adapter_configs[name] = config
        self.set_adapter(name)

    def set_adapter(self, name: str) -> None:
        if name not in self.adapter_configs:
            raise TuneforgeError(
                f"no adapter named '{name}'; loaded: {', '.join(self.adapter_configs)}"
            )
        for _, layer in self.layers():
            layer.active_adapter = name if name in layer.adapter_down else None
        for pname, p in self.named_parameters():
            p.requires_grad_(f".adapter_down.{name}." in pname or f".adapter_up.{name}." in pname)
        self.active_adapter = name

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model: every adapter is skipped inside the block."""
        was = self._adapters_disabled
        layers = [layer for _, layer in self.layers()]
        for layer in layers:
            layer.disabled = True
        self._adapters_disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = was
            self._adapters_disabled = was

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT-style keys (adapter name removed)."""
        out = {}
        for pname, p in self.base_model.named_parameters():
            for part in ("adapter_down", "adapter_up"):
                tag = f".{part}.{name}."
                if tag in pname:
                    out[KEY_PREFIX + pname.replace(tag, f".{part}.")] = p.detach()
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, **_) -> None:
        """``adapter_config.json`` + ``adapter_model.safetensors`` of the active adapter."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        name = self.active_adapter
        tensors = {k: v.contiguous() for k, v in self.adapter_state_dict(name).items()}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        (path / CONFIG_NAME).write_text(json.dumps(self.adapter_configs[name], indent=2) + "\n")

    def load_adapter(self, adapter_dir: str | os.PathLike, name: str = "default") -> None:
        """Add adapter ``name`` from a folder written by ``save_pretrained``; strict."""
        path = Path(adapter_dir)
        config = read_bottleneck_config(path)
        hidden = self.base_model.config.get_text_config().hidden_size
        if config["hidden_size"] != hidden:
            raise TuneforgeError(
                f"{path}: adapter made for hidden size {config['hidden_size']}, this model has "
                f"{hidden}; load it onto the model it was trained from"
            )
        self.add_adapter(name, config)
        state = load_file(str(path / WEIGHTS_NAME))
        mine = self.adapter_state_dict(name)
        if set(state) != set(mine):
            diff = sorted(set(state) ^ set(mine))[0]
            raise TuneforgeError(f"{path / WEIGHTS_NAME}: does not fit this model ({diff})")
        with torch.no_grad():
            for key, tensor in state.items():
                mine[key].copy_(tensor)


def bottleneck_config(model: torch.nn.Module, cfg: MethodConfig) -> dict:
    """The adapter_config.json content for ``cfg`` on ``model``."""
    hidden = model.config.get_text_config().hidden_size
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "library": "tuneforge",
        "base_model_name_or_path": getattr(model.config, "name_or_path", None),
        "placement": cfg.placement,
        "hidden_size": hidden,
        "bottleneck_size": bottleneck_width(hidden, cfg),
        "reduction_factor": cfg.reduction_factor,
        "non_linearity": cfg.non_linearity,
    }


def read_bottleneck_config(path: Path) -> dict:
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        raise TuneforgeError(f"{path / CONFIG_NAME}: missing or not JSON") from None
    need = ("placement", "hidden_size", "bottleneck_size", "non_linearity")
    missing = [k for k in need if k not in config]
    if config.get("peft_type") != PEFT_TYPE or missing:
        raise TuneforgeError(
            f"{path / CONFIG_NAME}: not a bottleneck adapter config"
            + (f" ('{missing[0]}' is missing)" if missing else "")
        )
    return config


def apply_bottleneck(model: torch.nn.Module, cfg: MethodConfig) -> BottleneckModel:
    """Freeze ``model`` and inject one trainable bottleneck adapter named ``default``."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = BottleneckModel(model)
    wrapped.add_adapter("default", bottleneck_config(model, cfg))
    return wrapped


def load_bottleneck(
    model: torch.nn.Module, adapter_dir: str | os.PathLike, name: str = "default"
) -> BottleneckModel:
    """Load a saved bottleneck adapter onto ``model`` (a plain model or a ``BottleneckModel``)."""
    if not isinstance(model, BottleneckModel):
        for p in model.parameters():
            p.requires_grad_(False)
        model = BottleneckModel(model)
    model.load_adapter(adapter_dir, name)
    return model

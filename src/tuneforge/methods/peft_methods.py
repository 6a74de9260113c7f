"""LoRA, DoRA, rsLoRA, IA3, prefix tuning and prompt tuning through the ``peft`` library.

``peft`` injects the layers and defines the file format. Two pieces are ours:

* generation for prefix / prompt tuning (``generate_prompt_learning``): with peft 0.21 and
  transformers 5, ``PeftModel.generate`` gives other logits than ``PeftModel.forward`` (prefix: the
  prefill step runs without the prefix in its causal mask; prompt: the decode steps get the
  positions of the whole soft prompt). We call the base model's ``generate`` with the prefix cache
  or the soft-prompt embeddings ourselves, so generation sees exactly what training saw;
* the weighted combination of LoRA adapters (``combine_lora_weights``), exact by construction.
"""

from __future__ import annotations

import inspect
import math

import torch

from tuneforge.accel.fast_dropout import use_fast_dropout
from tuneforge.config import MethodConfig
from tuneforge.errors import TuneforgeError


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the linear layers a method can target (the LM head excluded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(cfg: MethodConfig):
    """``LoraConfig`` for lora / dora (``use_dora``), with ``use_rslora`` as configured."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        bias="none",
        use_dora=cfg.name == "dora",
        use_rslora=cfg.use_rslora,
    )


def ia3_config(cfg: MethodConfig):
    """``IA3Config``: learned vectors rescale the outputs of ``target_modules`` and the inputs of
    ``feedforward_modules`` (Liu et al. 2022); the latter are targeted too."""
    from peft import IA3Config, TaskType

    targets = cfg.target_modules
    if isinstance(targets, list):
        targets = list(dict.fromkeys([*targets, *cfg.feedforward_modules]))
    return IA3Config(
        task_type=TaskType.CAUSAL_LM,
        target_modules=targets,
        feedforward_modules=list(cfg.feedforward_modules),
    )


def prefix_config(cfg: MethodConfig, model: torch.nn.Module):
    from peft import PrefixTuningConfig, TaskType

    hidden = model.config.get_text_config().hidden_size
    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.encoder_hidden_size or hidden,
    )


def prompt_config(cfg: MethodConfig):
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    # Without prompt_init_text: embeddings of random vocabulary tokens; peft's RANDOM draws
    # N(0, 1) vectors, which (its docs warn) may lie outside the embedding manifold.
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
    )


def _check_targets(model: torch.nn.Module, cfg: MethodConfig, extra: list[str] = ()) -> None:
    available = linear_module_names(model)
    if isinstance(cfg.target_modules, list):
        wanted = [*cfg.target_modules, *extra]
        missing = [t for t in wanted if t not in available]
        if len(missing) == len(wanted):
            raise TuneforgeError(
                f"'method.target_modules' {cfg.target_modules} matches no layer of this model; "
                f"its linear layers are: {', '.join(available)} (or use 'all-linear')"
            )
        if extra and any(t not in available for t in extra):
            raise TuneforgeError(
                f"'method.feedforward_modules' {list(extra)} names a layer this model lacks; "
                f"its linear layers are: {', '.join(available)}"
            )


def apply_peft_method(model: torch.nn.Module, cfg: MethodConfig, tokenizer=None) -> torch.nn.Module:
    """Wrap ``model`` in a ``PeftModel`` for lora / dora / ia3 / prefix / prompt.

    Args:
        tokenizer: needed for ``prompt_init_text`` (the text the soft prompt or the prefix
            starts from).
    """
    # The user's mistakes are checked before peft is imported: importing it can print notices
    # (e.g. bitsandbytes' about missing CPU kernels) that would spoil the one-line error.
    if cfg.name in ("lora", "dora", "qlora"):
        _check_targets(model, cfg)
    elif cfg.name == "ia3":
        _check_targets(model, cfg, list(cfg.feedforward_modules))
    from peft import get_peft_model

    if cfg.name in ("lora", "dora", "qlora"):  # qlora: LoRA on a 4-bit base
        peft_cfg = lora_config(cfg)
    elif cfg.name == "ia3":
        peft_cfg = ia3_config(cfg)
    elif cfg.name == "prefix":
        peft_cfg = prefix_config(cfg, model)
    elif cfg.name == "prompt":
        peft_cfg = prompt_config(cfg)
    else:
        raise ValueError(f"not a peft method: {cfg.name}")
    try:
        peft_model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise TuneforgeError(f"method '{cfg.name}': {str(e).splitlines()[0]}") from None
    use_fast_dropout(peft_model)  # LoRA / DoRA dropout as sparse positions (fast_dropout.py)
    if cfg.name == "prompt" and cfg.prompt_init_text:
        init_soft_prompt_from_text(peft_model, cfg.prompt_init_text, tokenizer)
    if cfg.name == "prefix" and not cfg.prefix_projection:
        init_prefix_from_activations(peft_model, _init_ids(peft_model, cfg, tokenizer))
    return peft_model


def _init_ids(peft_model, cfg: MethodConfig, tokenizer) -> list[int]:
    """``num_virtual_tokens`` ids: the init text's (repeated or cut), else random vocabulary."""
    V = cfg.num_virtual_tokens
    if cfg.prompt_init_text:
        if tokenizer is None:
            raise ValueError("prompt_init_text needs the tokenizer")
        ids = tokenizer(cfg.prompt_init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise TuneforgeError("'method.prompt_init_text' has no tokens")
        return (ids * math.ceil(V / len(ids)))[:V]
    vocab = peft_model.get_base_model().get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (V,)).tolist()


@torch.no_grad()
def init_prefix_from_activations(peft_model, ids: list[int]) -> None:
    """Start the prefix as the keys/values the frozen model computes for ``ids`` in every layer
    (Li & Liang 2021, sec. 7.2: real-word activations train far more stably than random ones;
    peft's default N(0, 1) entries start at ~10x the base model's loss on the dates task).

    The prefix then equals a real context of those tokens at positions 0..V-1, which is where the
    training forward places it (the input's positions start at V).
    """
    cfg = peft_model.active_peft_config
    base = peft_model.get_base_model()
    device = base.get_input_embeddings().weight.device
    out = base(input_ids=torch.tensor([ids], device=device), use_cache=True)
    cache = out.past_key_values
    per_layer = []
    for layer in range(cfg.num_layers):
        k, v = cache.layers[layer].keys, cache.layers[layer].values  # (1, H_kv, V, hd)
        per_layer += [k[0].transpose(0, 1), v[0].transpose(0, 1)]  # (V, H_kv, hd) each
    # peft views the embedding as (V, num_layers * 2, H_kv, hd): key, value per layer in turn.
    weight = torch.stack(per_layer, dim=1).reshape(len(ids), -1)  # (V, L * 2 * H_kv * hd)
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    if weight.shape != embedding.weight.shape:
        raise ValueError(f"prefix layout {tuple(weight.shape)} != {tuple(embedding.weight.shape)}")
    embedding.weight.copy_(weight.float())


def init_soft_prompt_from_text(peft_model, text: str, tokenizer) -> None:
    """Set the soft prompt to the embeddings of ``text``'s tokens, repeated or cut to length
    (Lester et al. 2021, section 3.2; the same rule as peft's TEXT init, without peft loading a
    tokenizer by name)."""
    from peft import PromptTuningInit

    cfg = peft_model.active_peft_config
    ids = _init_ids(
        peft_model,
        MethodConfig(prompt_init_text=text, num_virtual_tokens=cfg.num_virtual_tokens),
        tokenizer,
    )
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    words = peft_model.word_embeddings
    with torch.no_grad():
        init = words(torch.tensor(ids, device=words.weight.device)).detach().float()
        embedding.weight.copy_(init)
    # Recorded in adapter_config.json; peft insists on a tokenizer reference next to TEXT (it
    # reads it only to initialise a new, trainable prompt).
    cfg.prompt_tuning_init = PromptTuningInit.TEXT
    cfg.prompt_tuning_init_text = text
    cfg.tokenizer_name_or_path = getattr(tokenizer, "name_or_path", None) or "unknown"


def load_peft_adapter(
    model: torch.nn.Module, adapter_dir: str, name: str = "default", is_trainable: bool = False
):
    """Load a PEFT adapter folder onto ``model`` (a plain model, or a ``PeftModel`` that already
    holds other adapters of the same kind) under ``name``."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(adapter_dir, adapter_name=name, is_trainable=is_trainable)
    else:
        model = PeftModel.from_pretrained(
            model, adapter_dir, adapter_name=name, is_trainable=is_trainable
        )
    if is_trainable:
        use_fast_dropout(model)
    return model


def load_adapter(model: torch.nn.Module, adapter_dir: str, is_trainable: bool = False):
    """The foundation's entry point, kept for its callers; ``tuneforge.methods.load_adapter``
    also loads bottleneck adapters and named adapters."""
    return load_peft_adapter(model, adapter_dir, is_trainable=is_trainable)


def apply_lora(model: torch.nn.Module, cfg: MethodConfig) -> torch.nn.Module:
    """The foundation's entry point, kept for its callers: LoRA (or DoRA) through peft."""
    return apply_peft_method(model, cfg)


# -- prefix / prompt tuning: virtual tokens ------------------------------------------------------
def is_prompt_learning(model: torch.nn.Module) -> bool:
    """True for a ``PeftModel`` whose active adapter is prefix or prompt tuning (and enabled)."""
    config = getattr(model, "active_peft_config", None)
    return bool(
        config is not None
        and config.is_prompt_learning
        and not getattr(model, "_adapters_disabled", False)
    )


def virtual_token_count(model: torch.nn.Module) -> int:
    """Positions the active adapter adds in front of the input logits (prompt tuning only)."""
    if not is_prompt_learning(model):
        return 0
    from peft import PeftType

    config = model.active_peft_config
    return 0 if config.peft_type == PeftType.PREFIX_TUNING else config.num_virtual_tokens


@torch.no_grad()
def generate_prompt_learning(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs
) -> torch.Tensor:
    """``generate`` for prefix / prompt tuning that matches the training forward exactly.

    Same inputs and output as ``model.generate``: ``(B, T)`` prompt ids (left padded) and mask in,
    ``(B, T + new)`` ids out (or an output object with those ``sequences``). The virtual tokens are always attended to; positions come from the
    extended attention mask, so a left-padded row gets the positions of its unpadded self.
    """
    from peft import PeftType

    config = model.active_peft_config
    V, B = config.num_virtual_tokens, input_ids.shape[0]
    base = model.get_base_model()
    mask = torch.cat([attention_mask.new_ones(B, V), attention_mask], dim=1)  # (B, V+T)
    if config.peft_type == PeftType.PREFIX_TUNING:
        # A cache already holding the V prefix positions; ``generate`` skips the input ids the
        # cache covers, so V placeholder ids stand for them.
        # transformers renamed ``past_key_values`` to ``cache`` during 5.x.
        cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else None
        cache = {cache_arg or "past_key_values": model.get_prompt(batch_size=B)}
        placeholders = input_ids.new_zeros(B, V)
        out = base.generate(
            input_ids=torch.cat([placeholders, input_ids], dim=1),
            attention_mask=mask,
            **cache,
            **kwargs,
        )
        return _with_sequences(out, lambda ids: ids[:, V:])
    embeds = model.word_embeddings(input_ids)  # (B, T, C)
    prompts = model.get_prompt(batch_size=B).to(embeds.dtype)  # (B, V, C)
    out = base.generate(
        inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask, **kwargs
    )
    return _with_sequences(out, lambda new: torch.cat([input_ids, new], dim=1))


def _with_sequences(out, fix):
    """Apply ``fix`` to the ids ``generate`` returned (a tensor, or ``.sequences`` of the output
    object when ``return_dict_in_generate`` is set)."""
    if isinstance(out, torch.Tensor):
        return fix(out)
    out.sequences = fix(out.sequences)
    return out


# -- several LoRA adapters into one -------------------------------------------------------------
def lora_scale(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def combine_lora_weights(
    configs: list[dict], states: list[dict[str, torch.Tensor]], weights: list[float]
) -> tuple[dict, dict[str, torch.Tensor]]:
    """One LoRA adapter whose update is the weighted sum of the given adapters' updates.

    For every adapted layer, delta W = sum_i w_i * s_i * B_i A_i with s_i each adapter's scale.
    Concatenating along the rank gives exactly that (no SVD, no approximation):
    A = [w_1 s_1 A_1; ...; w_n s_n A_n] (sum r_i x in), B = [B_1 ... B_n] (out x sum r_i), and the
    new adapter has r = lora_alpha = sum r_i, so its own scale is 1.

    Args:
        configs: each adapter's ``adapter_config.json`` (LoRA, without DoRA).
        states: each adapter's tensors, keys as in ``adapter_model.safetensors``.
        weights: one weight per adapter (any sign).

    Returns:
        (adapter_config dict, tensors) of the combined adapter.
    """
    keys = set(states[0])
    for i, s in enumerate(states[1:], start=1):
        if set(s) != keys:
            only = sorted(set(s) ^ keys)[0]
            raise TuneforgeError(
                f"adapters 1 and {i + 1} adapt different layers (e.g. {only}); only adapters "
                "with the same target_modules can be combined"
            )
    out: dict[str, torch.Tensor] = {}
    for key in sorted(k for k in keys if ".lora_A." in k):
        key_b = key.replace(".lora_A.", ".lora_B.")
        a_blocks = [
            (w * lora_scale(c)) * s[key].float()
            for c, s, w in zip(configs, states, weights, strict=True)
        ]
        out[key] = torch.cat(a_blocks, dim=0)  # (sum r, in)
        out[key_b] = torch.cat([s[key_b].float() for s in states], dim=1)  # (out, sum r)
    r_total = sum(c["r"] for c in configs)
    config = dict(configs[0])
    config.update(
        r=r_total,
        lora_alpha=r_total,
        use_rslora=False,
        use_dora=False,
        lora_dropout=0.0,
        rank_pattern={},
        alpha_pattern={},
        target_modules=sorted({m for c in configs for m in _as_list(c.get("target_modules"))}),
    )
    return config, out


def _as_list(x) -> list:
    if x is None:
        return []
    return [x] if isinstance(x, str) else list(x)

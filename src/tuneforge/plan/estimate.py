"""Peak memory and time per epoch of a training run, per method, before training.

Parameter counts are exact: the model is built from its config on the ``meta`` device (no
weights are read or allocated). Memory is the sum of what a training step keeps alive:

  peak = weights + optimizer state + max(backward, optimizer step)
  backward       = activations + LM-head logits + gradients alive while the backward runs
  optimizer step = gradients + AdamW's temporary (torch's foreach AdamW makes one parameter-sized
                   copy for sqrt(v))

Activations are counted tensor by tensor from what autograd saves in a Llama-family decoder layer
(RMSNorm, rotary attention through SDPA's flash kernels, SiLU-gated MLP); ``tests/plan/test_estimate.py``
checks the count against ``torch.autograd.graph.saved_tensors_hooks`` on a real model. There is no
(T x T) term: SDPA's flash kernels (CPU and CUDA) keep only a log-sum-exp per head and position.

Not counted: the process baseline (Python, torch and the libraries, ~0.4-0.6 GB of RSS on CPU; on
CUDA the ~0.5 GB context is added as ``overhead``), the data pipeline, and allocator slack.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from tuneforge.errors import TuneforgeError

GIB = 2**30
ADAPTER_METHODS = ("lora", "qlora", "dora", "ia3", "adapter", "prefix", "prompt")
ALL_METHODS = ("full", *ADAPTER_METHODS)
# bitsandbytes NF4 with double quantization: 4 bits per weight, one 8-bit absmax per block of 64,
# one fp32 constant per 256 blocks (Dettmers et al. 2023, QLoRA, section 3).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
SELECTIVE_CHUNK = 1024  # losses.selective_lm_loss_sum's chunk of supervised positions
# Copies of a (positions x vocab) fp32 tensor alive at once in cross-entropy's backward:
# log-softmax output (saved), the incoming gradient and the gradient it produces.
LOGITS_COPIES = 3
# tuneforge's selective loss (losses._LinearCrossEntropy) turns its chunk's logits into their
# gradient in place, in forward: one copy, freed before the layers' backward starts.
SELECTIVE_LOGITS_COPIES = 1
ATTN_INPUTS = ("q_proj", "k_proj", "v_proj")
MLP_INPUTS = ("gate_proj", "up_proj")
# Peak dense bf16 tensor-core TFLOP/s by GPU name (vendor data sheets, no sparsity).
GPU_TFLOPS = {
    "H200": 989,
    "H100": 989,
    "A100": 312,
    "L40S": 362,
    "L40": 181,
    "A10": 125,
    "L4": 121,
    "4090": 165,
    "3090": 71,
    "A6000": 155,
    "V100": 125,
    "T4": 65,
}
GPU_MFU = 0.35  # model FLOP utilisation typical of fine-tuning small batches on one GPU
# Fraction of the matmul probe's fp32 rate a CPU training step reaches, both per CPU second:
# 0.59 and 0.93 in two runs on the built-in model with packed rows and fused ops (LoRA,
# bench/estimate_bench.py; the probe is noisy on a shared machine), 0.51-0.54 by wall time in
# bench/sft_bench.py. Until the bench stepped inside Trainer.running() it measured the
# unfused, whole-row-mask path and found ~0.2.
CPU_MFU = 0.5
# bitsandbytes dequantizes each 4-bit weight for every matmul, forward and backward: 1.10x and
# 1.38x LoRA's CPU time per step in two runs on CPU (bench/estimate_bench.py; 1.2-1.6x on the
# unfused path); the CUDA figure is an assumption (fused kernels; not measured here, no GPU).
QLORA_SLOWDOWN = {"cpu": 1.25, "cuda": 1.3}
# Measured peaks came out 8-16% above the estimate (bench/estimate_bench.py: allocator overhead
# and memory allocated at the first step), so "fits" asks for this much room on top.
FIT_MARGIN = 0.15
MEMORY_BANDWIDTH = {"cpu": 10e9, "cuda": 2e12}  # bytes/s, for the optimizer step


# -- the model's shape -----------------------------------------------------------------------------
@dataclass
class Linear:
    name: str  # leaf name, e.g. q_proj
    in_features: int
    out_features: int
    count: int  # how many layers have it


@dataclass
class ModelShape:
    """What the estimate needs to know about a model, counted from its config."""

    name: str
    model_type: str
    params: int  # unique parameters (tied weights once)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # num_key_value_heads * head_dim
    vocab: int
    tied: bool
    linears: list[Linear] = field(default_factory=list)  # in decoder layers (not the LM head)

    @property
    def linear_params(self) -> int:
        return sum(x.in_features * x.out_features * x.count for x in self.linears)

    def targets(self, target_modules: list[str] | str) -> list[Linear]:
        if target_modules == "all-linear":
            return list(self.linears)
        return [x for x in self.linears if x.name in target_modules]


def model_shape(ref: str, trust_remote_code: bool = False) -> ModelShape:
    """Count a model's parameters and linear layers without loading its weights.

    Raises:
        TuneforgeError: the reference cannot be resolved or its config read.
    """
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneforge.models import _quiet_transformers, resolve_model

    resolved = resolve_model(ref)
    _quiet_transformers()
    path = Path(resolved)
    try:
        if path.suffix == ".gguf":
            cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        else:
            cfg = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TuneforgeError(f"model '{ref}': could not read its config ({first})") from None
    head = model.get_output_embeddings()
    seen: set[int] = set()
    params = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    by_name: dict[tuple, Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            leaf = name.rsplit(".", 1)[-1]
            key = (leaf, module.in_features, module.out_features)
            by_name.setdefault(key, Linear(leaf, module.in_features, module.out_features, 0))
            by_name[key].count += 1
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelShape(
        name=ref,
        model_type=cfg.model_type,
        params=params,
        layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        intermediate=getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size,
        heads=heads,
        kv_dim=(getattr(cfg, "num_key_value_heads", None) or heads) * head_dim,
        vocab=cfg.vocab_size,
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        linears=list(by_name.values()),
    )


# -- the workload --------------------------------------------------------------------------------
@dataclass
class Workload:
    """One micro-batch at its largest, and how many of them make an epoch."""

    device: str  # cpu | cuda
    dtype_bytes: int  # 4 (fp32) or 2 (bf16/fp16): the compute dtype, frozen weights
    batch_size: int
    seq_len: int  # tokens per row of the largest micro-batch
    supervised_per_batch: int  # supervised positions in that micro-batch
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    micro_batches_per_epoch: int = 0  # 0: unknown (no data read)
    tokens_per_epoch: int = 0  # positions processed, padding included
    supervised_per_epoch: int = 0
    mean_row_len: float = 0.0
    packing: bool = False
    fused_ops: bool = True  # training.fused_ops (tuneforge/accel/fused.py)
    master_weights: bool = True  # training.master_weights: what trains is fp32 (train/precision.py)

    @property
    def train_bytes(self) -> int:
        """Bytes per element of what trains in full fine-tuning: its weights, gradients and
        AdamW moments (fp32 master weights under bf16 / fp16, else the compute dtype)."""
        return 4 if self.master_weights else self.dtype_bytes

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


def workload_from_config(cfg, device: str, with_data: bool = True) -> Workload:
    """The configured batch shape; with ``with_data`` the data is read to size the epoch exactly."""
    from tuneforge.models import pick_device, pick_dtype

    dev = "cuda" if device.startswith("cuda") else "cpu"
    if dev == "cuda":
        import torch

        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        dtype_bytes = 4 if cfg.training.dtype == "float32" else 2
        if cfg.training.dtype == "auto" and torch.cuda.is_available() and not bf16:
            dtype_bytes = 4
    else:
        dtype_bytes = pick_dtype(cfg.training.dtype, pick_device("cpu")).itemsize
    t, d = cfg.training, cfg.data
    work = Workload(
        device=dev,
        dtype_bytes=dtype_bytes,
        batch_size=t.batch_size,
        seq_len=d.max_length,
        supervised_per_batch=t.batch_size * d.max_length,
        gradient_accumulation=t.gradient_accumulation,
        gradient_checkpointing=t.gradient_checkpointing,
        packing=d.packing,
        fused_ops=t.fused_ops,
        master_weights=t.master_weights,
    )
    if with_data:
        _size_epoch(work, cfg)
    return work


def _size_epoch(work: Workload, cfg) -> None:
    """Render the training data as training would and measure every micro-batch of epoch 0,
    formed by the trainer's own batch plan (data/batching.py)."""
    from tuneforge.data.batching import BatchPlan
    from tuneforge.data.dataset import prepare_sft_data
    from tuneforge.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(cfg.model), cfg.trust_remote_code)
    samples = prepare_sft_data(cfg.data, tok, cfg.training.seed).train
    plan = BatchPlan(
        samples,
        work.batch_size,
        cfg.training.seed,
        packing=cfg.data.packing,
        max_length=cfg.data.max_length,
        group_by_length=cfg.data.group_by_length,
    )
    shapes = plan.shapes(0)
    sup = [sum(samples[i].supervised_token_count for i in ids) for _, _, ids in shapes]
    largest = max(range(len(shapes)), key=lambda k: (shapes[k][0] * shapes[k][1], sup[k]))
    work.batch_size, work.seq_len = shapes[largest][0], shapes[largest][1]
    work.supervised_per_batch = max(sup)
    work.micro_batches_per_epoch = len(shapes)
    work.tokens_per_epoch = sum(n * t for n, t, _ in shapes)
    work.supervised_per_epoch = sum(sup)
    lengths = [len(s) for s in samples]
    work.mean_row_len = cfg.data.max_length if cfg.data.packing else sum(lengths) / len(lengths)


def _input_group(name: str) -> str:
    """Linear layers that read the same tensor (q/k/v read the first norm's output)."""
    if name in ATTN_INPUTS:
        return "attn_in"
    if name in MLP_INPUTS:
        return "mlp_in"
    return "attn_out" if name == "o_proj" else name


# -- one method -----------------------------------------------------------------------------------
@dataclass
class MethodSettings:
    """The knobs of a method that change its size (defaults where a config does not set them)."""

    name: str
    r: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    num_virtual_tokens: int = 20
    bottleneck_size: int = 64
    quantize_embeddings: bool = True  # qlora: the embedding / head in 4 bits too

    @classmethod
    def from_config(cls, m, name: str | None = None) -> MethodSettings:
        """Settings from a ``MethodConfig`` (fields added by newer methods are read if present)."""
        base = cls(name=name or m.name)
        keys = ("r", "lora_dropout", "target_modules", "num_virtual_tokens", "quantize_embeddings")
        for key in keys:
            if hasattr(m, key):
                setattr(base, key, getattr(m, key))
        size = getattr(m, "bottleneck_size", None) or getattr(m, "adapter_size", None)
        if size:
            base.bottleneck_size = size
        return base


@dataclass
class Estimate:
    method: str
    trainable: int
    weights: float  # bytes
    gradients: float
    optimizer: float
    activations: float
    logits: float  # selective head, at the backward's start
    hf_logits: float  # what full (B, T, V) logits would take instead
    overhead: float
    peak: float
    seconds_per_epoch: float | None
    seconds_per_step: float
    note: str = ""
    label: str = ""  # how tables name it (defaults to the method)

    def __post_init__(self) -> None:
        self.label = self.label or self.method

    def fits(self, memory: float | None) -> bool | None:
        """Whether the peak, with ``FIT_MARGIN`` on top, stays within ``memory``."""
        return None if memory is None else self.peak * (1 + FIT_MARGIN) <= memory


def trainable_params(shape: ModelShape, s: MethodSettings) -> int:
    """Trainable parameters of a method, by the formula each method's paper gives."""
    d, L = shape.hidden, shape.layers
    targets = shape.targets(s.target_modules)
    if s.name == "full":
        return shape.params
    if s.name in ("lora", "rslora", "qlora"):  # rsLoRA changes the scale, not the size
        return sum(s.r * (x.in_features + x.out_features) * x.count for x in targets)
    if s.name == "dora":  # LoRA + one magnitude per output feature (Liu et al. 2024)
        lora = sum(s.r * (x.in_features + x.out_features) * x.count for x in targets)
        return lora + sum(x.out_features * x.count for x in targets)
    if s.name == "ia3":  # a scale on k and v outputs and on the down projection's input
        total = 0
        for x in shape.linears:
            if x.name in ("k_proj", "v_proj"):
                total += x.out_features * x.count
            elif x.name == "down_proj":
                total += x.in_features * x.count
        return total
    if s.name == "adapter":  # two bottlenecks per layer (Houlsby et al. 2019): down, up, biases
        b = s.bottleneck_size
        return L * 2 * (2 * d * b + b + d)
    if s.name == "prefix":  # a key and a value per virtual token per layer (Li & Liang 2021)
        return s.num_virtual_tokens * L * 2 * shape.kv_dim
    if s.name == "prompt":  # one embedding per virtual token (Lester et al. 2021)
        return s.num_virtual_tokens * d
    raise TuneforgeError(f"no estimate for method '{s.name}' (known: {', '.join(ALL_METHODS)})")


def layer_activations(
    shape: ModelShape,
    s: MethodSettings,
    fused_norms: bool = False,
    fused_mlp: bool = False,
    fused_lora: bool = False,
    cpu: bool = True,
    packed_sdpa: bool = False,
) -> tuple[float, float]:
    """(fp32 elements, compute-dtype elements) autograd keeps per token per decoder layer.

    Frozen base, gradient flowing: each RMSNorm keeps its input (fp32 upcast) and 1/rms; SDPA keeps
    q, k, v, its output and a log-sum-exp per head; the gated MLP keeps gate, up and SiLU(gate).
    A trainable base also keeps each norm's normalised value, the inputs of q/k/v and gate/up (the
    norm outputs) and the down projection's input. A LoRA layer keeps its rank-r hidden and its
    input (shared by q/k/v, by gate/up). With dropout, on a CPU (``accel/fast_dropout.py``)
    each adapted layer keeps the int64 positions it dropped (``8p`` bytes per input element,
    counted as ``2p`` fp32 elements) and its own dropped input; elsewhere ``F.dropout`` keeps a
    one-byte mask (a quarter of an fp32 element) and the dropped input. ``fused_norms``: RMSNorm
    runs as ``fused.rms_norm``, which recomputes the normalised value in backward instead of
    keeping it (full fine-tuning only; a frozen norm weight never needed it). ``fused_mlp``: the
    MLP's activation runs as ``fused.swiglu``, which recomputes SiLU(gate) in backward instead
    of keeping it. ``fused_lora``: LoRA layers run as ``accel/fused.py``'s, which on a CPU keep the
    shared input and the dropped positions but no dropped copy. ``packed_sdpa``: packed rows
    through ``attention.varlen_sdpa`` calling SDPA per sample, where each sample's SDPA keeps its
    own output and the output projection reads a joined copy: one more ``hidden`` per token
    wherever that projection keeps its input (LoRA on o_proj, full fine-tuning). The C++
    ``varlen_attention`` kernel (fused CPU kernels built) keeps what SDPA keeps, and its output is
    the projection's input: ``packed_sdpa`` False.
    """
    d, I, kv, H = shape.hidden, shape.intermediate, shape.kv_dim, shape.heads  # noqa: E741
    norm = 2 * d + 2 + H  # norm inputs, 1/rms, log-sum-exp (fp32)
    base = 2 * d + 2 * kv + (2 if fused_mlp else 3) * I  # q, attention out, k, v, gate, up, silu
    joined = d if packed_sdpa else 0  # o_proj's input is not SDPA's output (see above)
    if s.name == "full":
        return norm, base + (2 if fused_norms else 4) * d + I + joined
    if s.name in ("lora", "rslora", "qlora", "dora"):
        extra = masks = 0.0
        groups: dict[str, list[Linear]] = {}
        for x in shape.targets(s.target_modules):
            groups.setdefault(_input_group(x.name), []).append(x)
        p = s.lora_dropout
        copies = p > 0 and not (fused_lora and cpu and s.name in ("lora", "rslora"))
        for group, members in groups.items():
            extra += s.r * len(members)
            inputs = sum(x.in_features for x in members)
            if p > 0:
                masks += inputs * (2 * p if cpu else 1 / 4)
            if copies:  # each adapted layer's dropped input
                extra += inputs
            elif group != "attn_out":
                extra += members[0].in_features  # one shared input per group
            else:  # o_proj's input is SDPA's output, kept anyway, unless joined from samples
                extra += joined
        if s.name == "dora":  # DoRA rescales the base output: keeps it and the LoRA output
            extra += sum(2 * x.out_features for x in shape.targets(s.target_modules))
        return norm + masks, base + extra
    if s.name == "ia3":  # scaled k, v and down input are kept for the scale's gradient
        return norm, base + 2 * kv + 2 * I
    if s.name == "adapter":  # per bottleneck: its input, hidden and activation
        return norm, base + 2 * (d + 2 * s.bottleneck_size)
    return norm, base  # prefix, prompt: only the frozen path (prompt adds tokens, see rows)


def _tokens_per_row(work: Workload, s: MethodSettings) -> int:
    return work.seq_len + (s.num_virtual_tokens if s.name == "prompt" else 0)


def activation_bytes(shape: ModelShape, work: Workload, s: MethodSettings) -> float:
    """Bytes autograd keeps for one micro-batch (the largest) when its backward starts."""
    d, L = shape.hidden, shape.layers
    tokens = work.batch_size * _tokens_per_row(work, s)
    from tuneforge.accel.fused import FAMILIES

    fused = work.fused_ops and shape.model_type in FAMILIES
    cpu = work.device == "cpu"
    # on a CPU, packed rows and SFT micro-batches go through attention.varlen_sdpa (a GPU with
    # packing: flash-attn's kernel), by SDPA per sample unless the fused CPU kernels run them
    from tuneforge.accel import kernels

    per_sample = cpu and not (work.dtype_bytes == 4 and kernels.attention_expected())
    fp32_elems, elems = layer_activations(
        shape, s, fused and work.dtype_bytes == 4, fused, fused, cpu, per_sample
    )
    per_layer = fp32_elems * 4 + elems * work.dtype_bytes
    if work.gradient_checkpointing:
        # Each layer keeps only its input; one layer at a time is recomputed in the backward.
        layers = L * d * work.dtype_bytes + per_layer
    else:
        layers = L * per_layer
    # After the layers: the final norm and the hidden states at supervised positions (the
    # selective head's input); a packed batch also holds its (B, 1, T, T) boolean mask.
    outside = (d * 4 + (d * work.dtype_bytes if s.name == "full" else 0)) * tokens
    outside += work.supervised_per_batch * d * work.dtype_bytes
    mask = work.batch_size * work.seq_len**2 if work.packing else 0
    return tokens * layers + outside + mask


def logits_bytes(shape: ModelShape, work: Workload) -> tuple[float, float]:
    """(selective, full) bytes of LM-head logits alive at once: at the end of the forward pass
    (selective, on top of all activations) or in the loss's backward (full).

    tuneforge's SFT loss applies the head to at most ``SELECTIVE_CHUNK`` supervised positions at
    a time (fp32); HF-style training materialises (B, T, V) logits (plus an fp32 upcast in bf16).
    """
    selective = (
        SELECTIVE_LOGITS_COPIES * min(SELECTIVE_CHUNK, work.supervised_per_batch) * shape.vocab * 4
    )
    full_copies = LOGITS_COPIES + (1 if work.dtype_bytes < 4 else 0)
    hf = full_copies * work.tokens * shape.vocab * 4
    return selective, hf


def weight_bytes(shape: ModelShape, work: Workload, s: MethodSettings, trainable: int) -> float:
    """Base weights in the compute dtype (4-bit NF4 linears for qlora) plus fp32 adapters; for
    full fine-tuning every weight as it trains (fp32 master weights by default)."""
    if s.name == "full":
        return shape.params * work.train_bytes
    adapters = trainable * 4  # peft keeps adapter weights in fp32
    if s.name == "qlora":
        quantized = shape.linear_params + _quantized_embedding_params(shape, s)
        return (
            quantized * NF4_BYTES_PER_PARAM
            + (shape.params - quantized) * work.dtype_bytes
            + adapters
        )
    return shape.params * work.dtype_bytes + adapters


def _quantized_embedding_params(shape: ModelShape, s: MethodSettings) -> int:
    """qlora with ``quantize_embeddings``: the embedding table, and an untied head, in 4 bits."""
    if s.name != "qlora" or not s.quantize_embeddings:
        return 0
    return shape.vocab * shape.hidden * (1 if shape.tied else 2)


def matmul_flops_per_second(device: str, tflops: float | None = None) -> tuple[float, str]:
    """Sustained training FLOP/s: a quick matmul probe on CPU, the GPU's data sheet on CUDA."""
    import torch

    if tflops:
        return tflops * 1e12 * (
            GPU_MFU if device == "cuda" else CPU_MFU
        ), f"{tflops:g} TFLOP/s given"
    if device == "cuda":
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            for key, peak in GPU_TFLOPS.items():
                if key in name:
                    return peak * 1e12 * GPU_MFU, f"{name}, {peak} TFLOP/s bf16 peak"
            return 100e12 * GPU_MFU, f"{name} (unknown: 100 TFLOP/s assumed; pass --tflops)"
        return 100e12 * GPU_MFU, "no GPU here: 100 TFLOP/s bf16 assumed (pass --tflops)"
    # Timed in CPU seconds per thread, not wall seconds: on a shared machine that is the speed
    # the step will run at whenever it has the cores (wall time stretches with the load).
    threads = torch.get_num_threads()
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    reps = 20
    start = time.process_time()
    for _ in range(reps):
        a @ b
    per_thread = max(time.process_time() - start, 1e-6) / threads
    peak = reps * 2 * 1024**3 / per_thread
    return peak * CPU_MFU, (
        f"this CPU, {threads} threads, {peak / 1e9:.0f} GFLOP/s fp32 matmul (measured, per CPU "
        "second: wall time is longer while the machine is shared)"
    )


def flops_per_position(
    shape: ModelShape, work: Workload, s: MethodSettings, trainable: int
) -> tuple[float, float]:
    """(FLOPs per token position, extra FLOPs per supervised position) of forward + backward.

    2 per weight per token forward, 2 more for input gradients and 2 more for weight gradients
    where the weights train; causal attention; the head only at supervised positions (its
    gradients are taken in forward, nothing is recomputed).
    """
    d, L, V = shape.hidden, shape.layers, shape.vocab
    train_base = s.name == "full"
    per_token = (6 if train_base else 4) * shape.linear_params
    if not train_base:
        per_token += 6 * trainable  # adapters: forward and both gradients
    row = work.mean_row_len or _tokens_per_row(work, s)
    attn_fwd = 2 * L * d * row  # QK^T and AV, 2 FLOPs each, over half the row on average
    per_token += 3 * attn_fwd
    if work.gradient_checkpointing:
        per_token += 2 * shape.linear_params + attn_fwd
    return per_token, d * V * 2 * (3 if train_base else 2)


def estimate_method(
    shape: ModelShape, work: Workload, s: MethodSettings, flops_per_s: float
) -> Estimate:
    """Peak memory and time of one method on one workload (see the module docstring)."""
    trainable = trainable_params(shape, s)
    train_bytes = work.train_bytes if s.name == "full" else 4
    weights = weight_bytes(shape, work, s, trainable)
    grads = trainable * train_bytes
    optimizer = 2 * trainable * train_bytes  # AdamW exp_avg and exp_avg_sq
    step_temp = trainable * train_bytes  # foreach AdamW's sqrt(exp_avg_sq)
    acts = activation_bytes(shape, work, s)
    logits, hf_logits = logits_bytes(shape, work)
    if _quantized_embedding_params(shape, s):
        # a 4-bit head is dequantized whole (compute dtype) inside each chunk of the loss: one
        # (vocab x hidden) temporary beside the logits
        logits += shape.vocab * shape.hidden * work.dtype_bytes
    if s.name == "full":
        # Backward goes from the top: the (tied) head's gradient exists first, then layer
        # gradients grow while layer activations are freed, so the peak is at either end.
        head_grad = shape.vocab * shape.hidden * train_bytes
        if work.gradient_accumulation > 1:
            backward = acts + logits + grads
        else:
            backward = max(acts + logits + head_grad, grads)
    else:
        backward = acts + logits + grads
    overhead = 0.5 * GIB if work.device == "cuda" else 0.0  # CUDA context
    peak = weights + optimizer + max(backward, grads + step_temp) + overhead
    per_token, per_supervised = flops_per_position(shape, work, s, trainable)
    slowdown = QLORA_SLOWDOWN[work.device] if s.name == "qlora" else 1.0
    rows = work.batch_size * _tokens_per_row(work, s)
    micro = (rows * per_token + work.supervised_per_batch * per_supervised) / flops_per_s
    micro *= slowdown
    optimizer_time = 7 * 4 * trainable * train_bytes / MEMORY_BANDWIDTH[work.device]
    per_step = micro * work.gradient_accumulation + optimizer_time
    per_epoch = None
    if work.micro_batches_per_epoch:
        steps = math.ceil(work.micro_batches_per_epoch / work.gradient_accumulation)
        epoch_flops = work.tokens_per_epoch * per_token + work.supervised_per_epoch * per_supervised
        per_epoch = epoch_flops / flops_per_s * slowdown + steps * optimizer_time
    note = "rough: peft variant of LoRA" if s.name in ("dora", "ia3", "prefix", "prompt") else ""
    if s.name == "adapter":
        note = "rough: bottleneck adapters"
    return Estimate(
        method=s.name,
        trainable=trainable,
        weights=weights,
        gradients=grads,
        optimizer=optimizer,
        activations=acts,
        logits=logits,
        hf_logits=hf_logits,
        overhead=overhead,
        peak=peak,
        seconds_per_epoch=per_epoch,
        seconds_per_step=per_step,
        note=note,
    )


def settings_for(cfg_method, name: str) -> MethodSettings:
    """The configured method's settings; the alternatives keep its LoRA rank and targets."""
    return MethodSettings.from_config(cfg_method, name)


def estimate_config(
    cfg, device: str | None = None, tflops: float | None = None, with_data: bool = True
) -> tuple[ModelShape, Workload, list[Estimate], str]:
    """Estimates for the configured method first, then every other method at the same batch.

    Returns:
        (shape, workload, estimates, throughput description)
    """
    dev = device or cfg.training.device
    if dev == "auto":
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
    dev = "cuda" if dev.startswith("cuda") else "cpu"
    shape = model_shape(cfg.model, cfg.trust_remote_code)
    work = workload_from_config(cfg, dev, with_data)
    rate, how = matmul_flops_per_second(dev, tflops)
    names = [cfg.method.name] + [m for m in ALL_METHODS if m != cfg.method.name]
    return (
        shape,
        work,
        [estimate_method(shape, work, settings_for(cfg.method, n), rate) for n in names],
        how,
    )

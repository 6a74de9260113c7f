"""QLoRA's token embedding and LM head in 4 bits (``method.quantize_embeddings``).

bitsandbytes quantizes linear layers only; on a small model the embedding table (tied with the LM
head on most of them) is a large share of the weights: 28.3M of SmolLM2-135M's 134.5M. Here it is
quantized like the linear layers (NF4 or FP4, blocks of 64, double quantization as configured)
and held once: the embedding looks up and dequantizes only the rows it needs; a tied head reads
the same packed codes, dequantizing the whole table to ``compute_dtype`` for each matmul as a
4-bit linear layer does. Only the LoRA adapters train, so no gradient ever reaches these weights.

bitsandbytes' own ``nn.Embedding4bit`` is not used: it has no double quantization on its
row-lookup path and cannot share its weights with a head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tuneforge.methods.quantize import DTYPES, import_bitsandbytes
from tuneforge.models import weights_dtype

BLOCKSIZE = 64


def quantize_weight(weight: torch.Tensor, quant_type: str, double_quant: bool):
    """``weight`` (rows x columns) as a bitsandbytes ``Params4bit``: packed codes + quant_state."""
    bnb = import_bitsandbytes()
    packed, state = bnb.functional.quantize_4bit(
        weight.detach().contiguous(),
        blocksize=BLOCKSIZE,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    return bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=BLOCKSIZE,
        compress_statistics=double_quant,
        quant_type=quant_type,
        bnb_quantized=True,
    )


def dequantize_weight(weight: torch.nn.Parameter) -> torch.Tensor:
    """The full (rows x columns) weight a ``Params4bit`` holds, in the dtype it was quantized from."""
    bnb = import_bitsandbytes()
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


class QuantizedEmbedding(torch.nn.Module):
    """A frozen token embedding held as 4-bit codes; looks up rows, then dequantizes only them.

    Gives bitwise the rows of the fully dequantized table (tested), in the dtype the table was
    quantized from (the model's dtype, which the residual stream keeps).
    """

    def __init__(self, embedding: torch.nn.Embedding, quant_type: str, double_quant: bool):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        self.weight = quantize_weight(embedding.weight, quant_type, double_quant)

    def extra_repr(self) -> str:
        qs = self.weight.quant_state
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, {qs.quant_type}, "
            f"double_quant={qs.nested}"
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        qs = self.weight.quant_state
        if self.embedding_dim % qs.blocksize:  # blocks straddle rows: dequantize the table
            return F.embedding(input_ids, dequantize_weight(self.weight))
        bnb = import_bitsandbytes()
        absmax = qs.absmax
        if qs.nested:  # as bitsandbytes' dequantize_4bit does, before picking the rows
            absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        absmax = absmax.float().view(self.num_embeddings, -1)
        codes = self.weight.data.view(torch.uint8).view(self.num_embeddings, -1)
        rows_state = bnb.functional.QuantState(
            absmax=F.embedding(input_ids, absmax).reshape(-1),
            shape=torch.Size((*input_ids.shape, self.embedding_dim)),
            code=qs.code,
            blocksize=qs.blocksize,
            quant_type=qs.quant_type,
            dtype=qs.dtype,
        )
        rows = F.embedding(input_ids, codes).reshape(-1, 1)
        return bnb.functional.dequantize_4bit(rows, rows_state)


class QuantizedHead(torch.nn.Module):
    """A bias-free LM head over 4-bit weights: ``x @ W.T`` with W dequantized to ``compute_dtype``
    for each call (as bitsandbytes' ``Linear4bit`` does); the output has ``x``'s dtype.

    Tied: ``weight`` is the embedding's own ``Params4bit`` (one copy, one parameter).
    """

    def __init__(self, weight: torch.nn.Parameter, compute_dtype: torch.dtype):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.quant_state.shape
        self.bias = None
        self.compute_dtype = compute_dtype

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 4-bit"

    def dequantized_weight(self) -> torch.Tensor:
        """(vocab, hidden) in ``compute_dtype``: a temporary, made anew on every call."""
        return dequantize_weight(self.weight).to(self.compute_dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.to(self.compute_dtype), self.dequantized_weight()).to(hidden.dtype)


def head_weight(head: torch.nn.Module) -> torch.Tensor | Callable[[], torch.Tensor]:
    """What ``losses.selective_lm_loss_sum`` multiplies by: a plain head's weight, or for a 4-bit
    head a function that dequantizes it (called inside each checkpointed chunk, so the full
    weight is a temporary of that chunk, not kept for the backward)."""
    return head.dequantized_weight if isinstance(head, QuantizedHead) else head.weight


@torch.no_grad()
def quantize_embeddings(model: torch.nn.Module, method) -> None:
    """Replace ``model``'s input embedding (and its LM head) by 4-bit modules, as ``method``
    says (quant_type, double_quant, compute_dtype). A head tied to the embedding shares its
    codes; an untied bias-free head is quantized on its own; any other head stays as it is."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if not isinstance(embedding, torch.nn.Embedding):
        return
    # auto: the run's compute dtype, which the unquantized weights (norms) are held in
    compute = DTYPES.get(method.compute_dtype) or weights_dtype(model)
    quantized = QuantizedEmbedding(embedding, method.quant_type, method.double_quant)
    tied = head is not None and head.weight is embedding.weight
    model.set_input_embeddings(quantized)
    if tied:
        model.set_output_embeddings(QuantizedHead(quantized.weight, compute))
    elif type(head) is torch.nn.Linear and head.bias is None:
        weight = quantize_weight(head.weight, method.quant_type, method.double_quant)
        model.set_output_embeddings(QuantizedHead(weight, compute))


@torch.no_grad()
def dequantize_embeddings(model: torch.nn.Module) -> None:
    """Undo ``quantize_embeddings`` for a merge: fp32 ``nn.Embedding`` / ``nn.Linear`` holding
    exactly the weights the 4-bit modules computed with; a tied head stays tied."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    plain_embedding = None
    if isinstance(embedding, QuantizedEmbedding):
        plain_embedding = torch.nn.Embedding(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            device=embedding.weight.device,
            dtype=torch.float32,
        )
        plain_embedding.weight.copy_(dequantize_weight(embedding.weight).float())
        model.set_input_embeddings(plain_embedding)
    if isinstance(head, QuantizedHead):
        linear = torch.nn.Linear(
            head.in_features, head.out_features, bias=False, device=head.weight.device
        )
        if plain_embedding is not None and head.weight is embedding.weight:
            linear.weight = plain_embedding.weight  # tied, as before
        else:
            linear.weight.copy_(dequantize_weight(head.weight).float())
        model.set_output_embeddings(linear)

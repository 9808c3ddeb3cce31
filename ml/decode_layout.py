"""Weights laid out for decoding: each output dimension in contiguous column blocks.

Decoding multiplies a few rows (one per live sequence) by every weight matrix, streaming the whole model from memory
each step. CPU BLAS runs those few-row products well for one row but poorly for 2-16 in either stored layout; with
the columns in blocks of 512, each block's product stays in cache and the cost stays that of reading the weights.
Measured on 2 cores, fp32, with SmolLM2-135M's shapes streamed from memory (ms a product):

    rows                                          1      4      8     16
    MLP gate/up 576 x 3072, x @ W               0.43   1.01   0.74   1.03
                            F.linear (out, in)  0.76   0.79   0.69   0.89
                            blocks of 512       0.44   0.41   0.49   0.64
    LM head 576 x 49,152,   x @ W               6.4   25.9   23.3   25.3
                            F.linear            13.3  23.8   23.4   26.6
                            blocks of 1,024      5.3    9.9   12.4   14.6

`pack_for_decoding(model)` turns a model that will only decode (the served one) into this layout in place, every
Linear, the same maths; `DecodeHead(model)` is a blocked snapshot of the LM head alone, for a model that keeps
training between calls (the Engine builds one per call).

Try it:
    python -c "import torch; from ml.model import *; from ml.decode_layout import DecodeHead; \
m = Transformer(ModelConfig.tiny()); x = torch.randn(3, 64); print((DecodeHead(m)(x) - m.lm_head(x)).abs().max())"
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from ml.model import Linear, Transformer


def blocked(weight: Tensor, block: int) -> Tensor:
    """An (in, out) weight as (n_blocks, in, width), width at most `block`, as even as the blocks can be (576
    columns are two blocks of 288, not 512 and a padded 512), the last one padded with zero columns."""
    n_in, n_out = weight.shape
    n_blocks = math.ceil(n_out / block)
    block = 16 * math.ceil(n_out / n_blocks / 16)
    padded = weight.new_zeros(n_in, n_blocks * block)
    padded[:, :n_out] = weight
    return padded.view(n_in, n_blocks, block).transpose(0, 1).contiguous()


def blocked_matmul(x: Tensor, blocks: Tensor, n_out: int) -> Tensor:
    """(..., in) @ blocked (n_blocks, in, block) -> (..., n_out)."""
    rows = x.reshape(-1, x.size(-1))  # (N, in)
    y = torch.matmul(rows if rows.dtype == blocks.dtype else rows.to(blocks.dtype), blocks)  # (n_blocks, N, block)
    y = y.transpose(0, 1).reshape(rows.size(0), -1)  # (N, n_blocks * block)
    return (y if y.size(1) == n_out else y[:, :n_out]).view(*x.shape[:-1], n_out)


class BlockedLinear(nn.Module):
    """ml.model.Linear with its weight in column blocks: for a model that only decodes."""

    def __init__(self, linear: Linear, block: int = 512) -> None:
        super().__init__()
        self.n_out = linear.weight.size(1)
        self.register_buffer("blocks", blocked(linear.effective_weight(), block))  # a LoRA update folded in
        self.bias = linear.bias.detach() if linear.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = blocked_matmul(x, self.blocks, self.n_out)
        return y + self.bias if self.bias is not None else y


MIN_PACK_SIZE = 2**18  # smaller matrices stay: their products cost less than the extra reshapes


def _packable(module: nn.Module) -> bool:
    return isinstance(module, Linear) and module.weight.numel() >= MIN_PACK_SIZE


@torch.no_grad()
def pack_for_decoding(model: Transformer, block: int = 512) -> Transformer:
    """Replace every Linear of at least MIN_PACK_SIZE weights by a BlockedLinear, in place: the model can no longer
    be trained or saved as a checkpoint, so do it to a served copy only. (Packing the demo model's 128-wide layers
    too took its 1-chat rate from 453 to 251 tok/s.)

    Measured in a real `flywheel serve` of SmolLM2 (aggregate tok/s at 1 / 4 / 8 streaming chats, two runs each):
    nothing packed 18.8 / 32.6 / 60.5 and 18.2 / 33.7 / 57.5; the MLP's gate/up only 16.7 / 38.8 / 65.0 and
    16.6 / 37.6 / 68.9; every Linear 17.3 / 52.3 / 77.5 and 15.1 / 44.3 / 69.2.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if _packable(child):
                setattr(module, name, BlockedLinear(child, block))
    return model


@torch.no_grad()
def packed_view(model: Transformer, block: int = 512) -> Transformer:
    """A decoding-only twin of a model that goes on training: the same modules and parameters (shared, not
    copied), except that its large Linears are blocked snapshots. Costs one copy of those weights while it lives."""

    def twin(module: nn.Module) -> nn.Module:
        if _packable(module):
            return BlockedLinear(module, block)
        if not any(_packable(m) for m in module.modules()):
            return module  # nothing to pack here or below: share it as it is
        clone = copy.copy(module)  # shares parameters and buffers; gets its own table of children
        clone._modules = {name: twin(child) for name, child in module._modules.items()}
        return clone

    return twin(model)


class DecodeHead:
    """logits = x @ lm_head.weight.T for (N, n_embd) rows, from a blocked copy of the weight (a snapshot)."""

    def __init__(self, model: Transformer, block: int = 1024) -> None:
        weight = model.lm_head.weight.detach()  # (vocab, n_embd)
        self.vocab = weight.size(0)
        self.blocks = blocked(weight.t(), block)  # (n_blocks, n_embd, block)

    def __call__(self, x: Tensor) -> Tensor:
        """(N, n_embd) -> (N, vocab)."""
        return blocked_matmul(x, self.blocks, self.vocab)

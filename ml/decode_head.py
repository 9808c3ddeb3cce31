"""The language-model head laid out for decoding: vocabulary columns in contiguous blocks.

Decoding multiplies a few rows (one per live sequence) by the (n_embd, vocab) head, the largest matrix of a small
chat model (SmolLM2-135M: 49,152 x 576, a fifth of its weights). CPU BLAS runs that product poorly in either of the
stored layouts once there is more than one row; on 2 cores, fp32, measured with SmolLM2's shape (ms a product):

    rows                        1     4     8    16
    x @ W, W (n_embd, vocab)   6.4  25.9  23.3  25.3
    F.linear, W (vocab, n_embd) 13.3 23.8  23.4  26.6
    blocks of 1,024 columns     5.3   9.9  12.4  14.6

so the head is copied once into (n_blocks, n_embd, 1024) and each block's product stays in cache. The copy is a
snapshot: build it again after the weights change (the Engine does, per call; a served model never changes).

Try it:
    python -c "import torch; from ml.model import *; from ml.decode_head import DecodeHead; \
m = Transformer(ModelConfig.tiny()); x = torch.randn(3, 64); print((DecodeHead(m)(x) - m.lm_head(x)).abs().max())"
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ml.model import Transformer

BLOCK = 1024


class DecodeHead:
    """logits = x @ lm_head.weight.T for (N, n_embd) rows, from a blocked copy of the weight."""

    def __init__(self, model: Transformer, block: int = BLOCK) -> None:
        weight = model.lm_head.weight.detach()  # (vocab, n_embd)
        self.vocab, n_embd = weight.shape
        n_blocks = math.ceil(self.vocab / block)
        padded = weight.new_zeros(n_blocks * block, n_embd)
        padded[: self.vocab] = weight
        self.blocks = padded.view(n_blocks, block, n_embd).transpose(1, 2).contiguous()  # (n_blocks, n_embd, block)

    def __call__(self, x: Tensor) -> Tensor:
        """(N, n_embd) -> (N, vocab)."""
        y = torch.matmul(x.to(self.blocks.dtype), self.blocks)  # (n_blocks, N, block)
        return y.transpose(0, 1).reshape(x.size(0), -1)[:, : self.vocab]

"""The gMLP model's forward in token-major layout, over the plain model's own parameters.

`stages.model.GMLPBlock` computes X + Proj_out(value * (W LayerNorm(gate) + b)), W mixing the
tokens. Held as (batch, tokens, channels), that token product runs on a transposed copy and the
gate's product multiplies two strided tensors. Held as (tokens, batch, channels), W acts on a
contiguous (tokens, batch x channels) operand as one product and every other step works on the
last axis, so nothing is transposed; under bf16 autocast that is what a step gains on the CPU.
"""

import torch
from torch import nn

from stages.fast.notebook import patchify_token_major
from stages.model import GMLPBlock, MixerClassifier


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`stages.model.DropPath` for x (tokens, batch, channels): the same draws, one per image."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape[1], 1, device=x.device) >= p
    return x * keep / (1.0 - p)


class FastGMLPModel(nn.Module):
    """`model`'s function in token-major layout; `model` stays the owner of the parameters."""

    def __init__(self, model: MixerClassifier):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model.stem(patchify_token_major(images, model.patch_size))  # (tokens, batch, ch)
        for block in model.blocks:
            x = x + self.branch(block, x)
        return model.classifier(model.head_norm(x).mean(dim=0))

    def branch(self, block: GMLPBlock, x: torch.Tensor) -> torch.Tensor:
        y = block.activation(block.channel_in(block.norm(x)))
        value, gate = y.chunk(2, dim=-1)
        gate = block.gate.norm(gate)
        mixing = block.gate.token_mixing
        rows = gate.reshape(gate.shape[0], -1)  # (tokens, batch x channels / 2)
        mixed = torch.addmm(mixing.bias.unsqueeze(1), mixing.weight, rows).view(gate.shape)
        y = block.dropout(block.channel_out(value * mixed))
        return drop_path(y, block.drop_path.p, block.training)

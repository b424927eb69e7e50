"""The notebook model's forward on the fast path, over the plain model's own parameters.

`stages.model.MixerClassifier` with notebook blocks computes, per block,
    channel_norm(channel_mixing(dropout(token_norm(token_mixing(x^T))^T))).
`FastNotebookModel` computes the same in token-major layout: the token MLP, its BatchNorm and
the dropout as one fused function (with the patch stem inside the first block's token kernel),
the channel MLP's products on oneDNN, its BatchNorm on torch's kernel over the token rows.
"""

import torch
from torch import nn

from stages.fast.functions import (
    BatchNormDropoutFunction,
    TokenHalfFunction,
    TokenMLPFunction,
    linear,
    token_linear,
)
from stages.model import MixerClassifier, NotebookBlock


def patchify_token_major(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(batch, 1, 28, 28) -> (patches, batch, patch_size**2), patches in row-major order."""
    b, grid = images.shape[0], images.shape[-1] // patch_size
    x = images.reshape(b, grid, patch_size, grid, patch_size)
    return x.permute(1, 3, 0, 2, 4).reshape(grid * grid, b, patch_size * patch_size)


def relu_mlp(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Linear, ReLU, Linear[, ReLU]...: each Linear with the ReLU after it in one oneDNN call."""
    modules = list(layers)
    for i, layer in enumerate(modules):
        if isinstance(layer, nn.Linear):
            follows = modules[i + 1] if i + 1 < len(modules) else None
            x = linear(x, layer, relu=isinstance(follows, nn.ReLU))
    return x


def update_running_stats(norm: nn.BatchNorm1d, mean, var, rows: int) -> None:
    """As torch's BatchNorm1d in training: running statistics move towards the batch's by
    momentum, the variance unbiased."""
    with torch.no_grad():
        norm.running_mean.lerp_(mean, norm.momentum)
        norm.running_var.lerp_(var * (rows / (rows - 1)), norm.momentum)
        norm.num_batches_tracked.add_(1)


def dropout_seed() -> int:
    """A seed for a kernel's dropout mask, from torch's generator (so manual_seed fixes it)."""
    return torch.empty((), dtype=torch.int64).random_().item()


class FastNotebookModel(nn.Module):
    """`model`'s function on the fused CPU kernels; `model` stays the owner of the parameters
    (train/eval mode and state_dict go through it)."""

    def __init__(self, model: MixerClassifier, token_kernel: bool, stem_in_kernel: bool):
        super().__init__()
        self.model = model
        self.token_kernel = token_kernel
        self.stem_in_kernel = token_kernel and stem_in_kernel and len(model.stem) == 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = patchify_token_major(images, model.patch_size)  # (patches, batch, pixels)
        stem_inside = self.stem_in_kernel and model.training and not x.requires_grad
        if not stem_inside:
            x = relu_mlp(model.stem, x)
        for i, block in enumerate(model.blocks):
            x = self.block(block, x, model.stem[0] if stem_inside and i == 0 else None)
        return linear(x.mean(dim=2).t(), model.classifier)  # one value per token row

    def block(self, block: NotebookBlock, x: torch.Tensor, stem: nn.Linear | None):
        """The block of x (tokens, batch, channels), or of relu(stem(x)) for x the patches."""
        rows = self.token_half(block, x, stem)  # (tokens' * batch, channels)
        first, _, second = block.channel_mixing
        o2 = linear(linear(rows, first, relu=True), second)
        tokens_out = block.channel_norm.num_features
        o2 = block.channel_norm(o2.view(1, tokens_out, -1))  # statistics per token row
        return o2.view(tokens_out, x.shape[1], -1)

    def token_half(self, block: NotebookBlock, x: torch.Tensor, stem: nn.Linear | None):
        """dropout(token_norm(token_mixing(x))) as (tokens' * batch, channels) rows."""
        first, _, second = block.token_mixing
        norm, p = block.token_norm, block.dropout.p
        if not norm.training:  # evaluation: no dropout, BatchNorm on its running statistics
            if self.token_kernel:
                keep_hidden = torch.is_grad_enabled()
                y = TokenMLPFunction.apply(
                    x, first.weight, first.bias, second.weight, second.bias, keep_hidden
                )
            else:
                y = token_linear(token_linear(x, first, relu=True), second)
            return norm(y.flatten(0, 1))
        if self.token_kernel:
            out, mean, var = TokenHalfFunction.apply(
                x, None if stem is None else stem.weight, None if stem is None else stem.bias,
                first.weight, first.bias, second.weight, second.bias, norm.weight, norm.bias,
                norm.eps, p, dropout_seed(),
            )
        else:
            y = token_linear(token_linear(x, first, relu=True), second).flatten(0, 1)
            out, mean, var = BatchNormDropoutFunction.apply(
                y.contiguous(), norm.weight, norm.bias, norm.eps, p, dropout_seed()
            )
        update_running_stats(norm, mean, var, rows=out.shape[0])
        return out

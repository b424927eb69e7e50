"""The report's model laid out as the notebook wrote it, for the benchmark's seed-style paths.

The notebook held activations as (batch, tokens, channels), transposed before each MLP and used
torch's nn.Dropout. `NotebookModel` runs that forward on the parameters of a report-block
`stages.model.MixerClassifier`, so the benchmark's paths train one and the same model and differ
only in layout, dropout mask and matrix-multiply library (torch's own `linear` here, as in the
notebook); tests/test_model.py checks that both compute the same function.
"""

import torch
from torch import nn
from torch.nn.functional import linear

from stages.config import IMAGE_SIZE
from stages.model import MixerClassifier


class NotebookModel(nn.Module):
    def __init__(
        self,
        model: MixerClassifier,
        dropout: type[nn.Dropout] = nn.Dropout,
        torch_linear: bool = True,
    ):
        super().__init__()
        self.model = model
        self.dropout = dropout(model.blocks[0].dropout.p)  # every block has the run's p
        self.torch_linear = torch_linear  # False: the model's own Linear layers (oneDNN)

    def mlp(self, layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """`layers` on x, with torch's own `linear` for each Linear if `torch_linear`."""
        for layer in layers:
            plain = self.torch_linear and isinstance(layer, nn.Linear)
            x = linear(x, layer.weight, layer.bias) if plain else layer(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model, p = self.model, self.model.patch_size
        b, grid = images.shape[0], IMAGE_SIZE // p
        patches = images.reshape(b, grid, p, grid, p).permute(0, 1, 3, 2, 4)
        x = self.mlp(model.stem, patches.reshape(b, grid * grid, p * p))  # (batch, tokens, ch)
        for block in model.blocks:
            first, act, second = block.token_mixing
            o1 = linear(act(linear(x.transpose(1, 2), first.weight, first.bias)),
                        second.weight, second.bias)  # (batch, channels, tokens')  # fmt: skip
            o1 = self.dropout(block.token_norm(o1).transpose(1, 2))  # (batch, tokens', channels)
            x = block.channel_norm(self.mlp(block.channel_mixing, o1))  # (batch, tokens', ch')
        return self.mlp([model.classifier], x.mean(dim=-1))  # one value per token row

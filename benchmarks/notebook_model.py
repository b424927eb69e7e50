"""The report's model laid out as the notebook wrote it, for the benchmark's seed-style paths.

The notebook held activations as (batch, tokens, channels), transposed before each MLP and used
torch's nn.Dropout. `NotebookModel` runs that forward on the parameters of a report-block
`stages.model.MixerClassifier`, so the benchmark's paths train one and the same model and differ
only in layout and dropout mask; tests/test_model.py checks that both compute the same function.
"""

import torch
from torch import nn
from torch.nn.functional import linear

from stages.config import IMAGE_SIZE
from stages.model import MixerClassifier


class NotebookModel(nn.Module):
    def __init__(self, model: MixerClassifier, dropout: type[nn.Dropout] = nn.Dropout):
        super().__init__()
        self.model = model
        self.dropout = dropout(model.blocks[0].dropout.p)  # every block has the run's p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model, p = self.model, self.model.patch_size
        b, grid = images.shape[0], IMAGE_SIZE // p
        patches = images.reshape(b, grid, p, grid, p).permute(0, 1, 3, 2, 4)
        x = model.stem(patches.reshape(b, grid * grid, p * p))  # (batch, tokens, channels)
        for block in model.blocks:
            first, act, second = block.token_mixing
            o1 = linear(act(linear(x.transpose(1, 2), first.weight, first.bias)),
                        second.weight, second.bias)  # (batch, channels, tokens')  # fmt: skip
            o1 = self.dropout(block.token_norm(o1).transpose(1, 2))  # (batch, tokens', channels)
            x = block.channel_norm(block.channel_mixing(o1))  # (batch, tokens', channels')
        return model.classifier(x.mean(dim=-1))  # one value per token row

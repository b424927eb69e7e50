"""The report's all-MLP classifier, and two residual blocks that go beyond it.

Each image is cut into patches and a stem maps every patch to a feature vector: X of shape
(patches, features) per image, held here as (batch, tokens, channels). N blocks follow, then the
mean feature and a linear classifier (the softmax lives in the loss). `block` in params.yaml
picks the block:

- `notebook`: the report's block, as its notebook ran it. O1 = g(X^T W1) W2 mixes the patches,
  O2 = g(O1^T W3) W4 the features; BatchNorm after each MLP, dropout between them. Widths may
  change from block to block.
- `mixer`: MLP-Mixer's residual block (Tolstikhin et al., 2021, arXiv:2105.01601).
- `gmlp`: gMLP's residual block with its spatial gating unit (Liu et al., 2021,
  arXiv:2105.08050).

This module is the model's meaning and the reference the tests hold the CPU fast path
(`stages.fast`) to; it knows nothing of that path.
"""

import itertools

import torch
from torch import nn

from stages.config import IMAGE_SIZE, NUM_CLASSES, ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(batch, 1, 28, 28) -> (batch, patches, patch_size**2), patches in row-major order."""
    b, grid = images.shape[0], IMAGE_SIZE // patch_size
    x = images.reshape(b, grid, patch_size, grid, patch_size)
    return x.permute(0, 1, 3, 2, 4).reshape(b, grid * grid, patch_size * patch_size)


def mlp(width_in: int, hidden: int, width_out: int, activation: str) -> nn.Sequential:
    """Linear, non-linearity g, Linear: the two-layer MLP of the specification."""
    return nn.Sequential(
        nn.Linear(width_in, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, width_out)
    )


def batch_norm(kind: str, features: int) -> nn.Module:
    return nn.BatchNorm1d(features) if kind == "batch" else nn.Identity()


def layer_norm(kind: str, features: int) -> nn.Module:
    return nn.LayerNorm(features) if kind == "layer" else nn.Identity()


class NotebookBlock(nn.Module):
    """The report's block: an MLP across the patches, then one across the features."""

    def __init__(
        self,
        tokens: int,
        channels: int,
        token_mlp: tuple[int, int],
        channel_mlp: tuple[int, int],
        cfg: ModelConfig,
    ):
        super().__init__()
        (token_hidden, tokens_out), (channel_hidden, channels_out) = token_mlp, channel_mlp
        self.token_mixing = mlp(tokens, token_hidden, tokens_out, cfg.activation)
        self.token_norm = batch_norm(cfg.norm, channels)  # over the features, as the notebook
        self.dropout = nn.Dropout(cfg.dropout)
        self.channel_mixing = mlp(channels, channel_hidden, channels_out, cfg.activation)
        self.channel_norm = batch_norm(cfg.norm, tokens_out)  # over the token rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, tokens, channels)
        o1 = self.token_norm(self.token_mixing(x.transpose(1, 2)))  # (batch, channels, tokens')
        o1 = self.dropout(o1.transpose(1, 2))  # (batch, tokens', channels)
        return self.channel_norm(self.channel_mixing(o1))  # (batch, tokens', channels')


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch for a random subset of the batch."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)


def spatial_shift(x: torch.Tensor, grid: int, group: int) -> torch.Tensor:
    """Move four groups of `group` channels by one patch: down, up, right, left (S2-MLP, Yu et
    al., 2022); the rest stay. A channel MLP after it then sees each patch's neighbours, the
    local view that a token MLP with one weight per position lacks. Zeros shift in at the edges.

    x: (batch, tokens, channels), tokens in row-major order on a grid x grid patch grid.
    """
    if group == 0:
        return x
    g = x.view(x.shape[0], grid, grid, x.shape[2])
    a, b, c, d = (slice(i * group, (i + 1) * group) for i in range(4))
    out = torch.zeros_like(g)
    out[:, 1:, :, a] = g[:, :-1, :, a]  # each patch gets the values of the patch above it
    out[:, :-1, :, b] = g[:, 1:, :, b]  # ... of the patch below
    out[:, :, 1:, c] = g[:, :, :-1, c]  # ... of the patch to its left
    out[:, :, :-1, d] = g[:, :, 1:, d]  # ... of the patch to its right
    out[..., 4 * group :] = g[..., 4 * group :]
    return out.view(x.shape)


class MixerBlock(nn.Module):
    """MLP-Mixer's block: X + TokenMLP(LayerNorm(X)^T)^T, then X + ChannelMLP(LayerNorm(X)),
    each branch through dropout and stochastic depth; optionally S2-MLP's shift before the
    channel MLP."""

    def __init__(
        self,
        tokens: int,
        channels: int,
        token_hidden: int,
        channel_hidden: int,
        drop_path: float,
        cfg: ModelConfig,
    ):
        super().__init__()
        self.token_norm = layer_norm(cfg.norm, channels)
        self.token_mixing = mlp(tokens, token_hidden, tokens, cfg.activation)
        self.channel_norm = layer_norm(cfg.norm, channels)
        self.channel_mixing = mlp(channels, channel_hidden, channels, cfg.activation)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)
        self.grid = IMAGE_SIZE // cfg.patch_size  # patches per row and per column
        self.shift_group = int(cfg.spatial_shift * channels) // 4  # channels per direction

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, tokens, channels)
        y = self.token_mixing(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.drop_path(self.dropout(y))
        y = self.channel_mixing(spatial_shift(self.channel_norm(x), self.grid, self.shift_group))
        return x + self.drop_path(self.dropout(y))


class SpatialGatingUnit(nn.Module):
    """gMLP's gate: half of the channels, normalised and mixed across the tokens, multiplies the
    other half. It starts as the identity gate (token weights near 0, biases 1, set by
    `init_weights`), so a deep stack trains like plain channel MLPs at first."""

    def __init__(self, tokens: int, width: int, norm: str):
        super().__init__()
        self.norm = layer_norm(norm, width)
        self.token_mixing = nn.Linear(tokens, tokens)

    def reset_to_identity(self) -> None:
        nn.init.uniform_(self.token_mixing.weight, -1e-3, 1e-3)
        nn.init.ones_(self.token_mixing.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, tokens, 2 * width)
        value, gate = x.chunk(2, dim=-1)
        return value * self.token_mixing(self.norm(gate).transpose(1, 2)).transpose(1, 2)


class GMLPBlock(nn.Module):
    """gMLP's block: X + Proj_out(SGU(g(Proj_in(LayerNorm(X))))), its only token mixing the one
    layer inside the gate."""

    def __init__(
        self, tokens: int, channels: int, hidden: int, drop_path: float, cfg: ModelConfig
    ):
        super().__init__()
        self.norm = layer_norm(cfg.norm, channels)
        self.channel_in = nn.Linear(channels, hidden)
        self.activation = ACTIVATIONS[cfg.activation]()
        self.gate = SpatialGatingUnit(tokens, hidden // 2, cfg.norm)
        self.channel_out = nn.Linear(hidden // 2, channels)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, tokens, channels)
        y = self.gate(self.activation(self.channel_in(self.norm(x))))
        return x + self.drop_path(self.dropout(self.channel_out(y)))


def patch_stem(cfg: ModelConfig) -> nn.Sequential:
    """Each patch's pixels to a feature vector: one Linear and g, or a one-hidden-layer MLP."""
    act, pixels = ACTIVATIONS[cfg.activation], cfg.patch_size**2
    if cfg.stem_hidden is None:
        return nn.Sequential(nn.Linear(pixels, cfg.stem_width), act())
    return nn.Sequential(
        nn.Linear(pixels, cfg.stem_hidden), act(), nn.Linear(cfg.stem_hidden, cfg.stem_width), act()
    )


class MixerClassifier(nn.Module):
    """Patch stem, blocks, mean feature, linear classifier: logits for the 10 classes."""

    def __init__(self, cfg: ModelConfig, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.stem = patch_stem(cfg)
        tokens, channels = cfg.num_patches, cfg.stem_width
        blocks: list[nn.Module] = []
        for i, (token_mlp, channel_mlp) in enumerate(
            zip(cfg.token_mlp, cfg.channel_mlp, strict=True)
        ):
            drop_path = cfg.drop_path * i / max(cfg.blocks - 1, 1)  # deeper: dropped more
            if cfg.block == "notebook":
                blocks.append(NotebookBlock(tokens, channels, token_mlp, channel_mlp, cfg))
                tokens, channels = token_mlp[1], channel_mlp[1]
            elif cfg.block == "mixer":
                blocks.append(
                    MixerBlock(tokens, channels, token_mlp[0], channel_mlp[0], drop_path, cfg)
                )
            else:
                blocks.append(GMLPBlock(tokens, channels, channel_mlp[0], drop_path, cfg))
        self.blocks = nn.Sequential(*blocks)
        # The notebook averages over the features, one value per token row; the residual
        # designs normalise, then average over the patches.
        self.pool_over_features = cfg.block == "notebook"
        pooled = tokens if self.pool_over_features else channels
        self.head_norm = layer_norm("none" if self.pool_over_features else cfg.norm, channels)
        self.classifier = nn.Linear(pooled, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(patchify(images, self.patch_size)))  # (batch, tokens, ch)
        x = self.head_norm(x)
        return self.classifier(x.mean(dim=2) if self.pool_over_features else x.mean(dim=1))


def init_weights(model: nn.Module, scheme: str, std: float) -> None:
    """Re-initialise every Linear layer's weights; biases start at zero, as in the report, except
    in gMLP's gates, which start as the identity. `default` keeps PyTorch's own initialisation."""
    if scheme == "default":
        return
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if scheme == "xavier_uniform":
                nn.init.xavier_uniform_(module.weight)
            elif scheme == "normal":
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif scheme == "kaiming_uniform":
                nn.init.kaiming_uniform_(module.weight, a=0.0, nonlinearity="relu")
            else:
                raise ValueError(f"unknown init scheme {scheme!r}")
            nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, SpatialGatingUnit):
            module.reset_to_identity()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(cfg: ModelConfig) -> int:
    """Multiply-adds x 2 of the Linear layers for one image's forward pass."""
    pixels = cfg.patch_size**2
    tokens, channels = cfg.num_patches, cfg.stem_width
    widths = [pixels, cfg.stem_width] if cfg.stem_hidden is None else [
        pixels, cfg.stem_hidden, cfg.stem_width
    ]
    flops = sum(a * b for a, b in itertools.pairwise(widths)) * tokens
    for (t_hidden, t_out), (c_hidden, c_out) in zip(cfg.token_mlp, cfg.channel_mlp, strict=True):
        if cfg.block == "gmlp":  # C -> hidden, the gate's tokens -> tokens on hidden / 2, back
            flops += tokens * (channels * c_hidden + c_hidden // 2 * c_out)
            flops += c_hidden // 2 * tokens * tokens
            continue
        flops += channels * (tokens * t_hidden + t_hidden * t_out)
        flops += t_out * (channels * c_hidden + c_hidden * c_out)
        tokens, channels = t_out, c_out
    flops += (tokens if cfg.block == "notebook" else channels) * 10
    return 2 * flops

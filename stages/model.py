"""The coursework's all-MLP model: patch stem, N token/channel-mixing blocks, mean, classifier.

Shapes follow the specification in the report: an image becomes X of shape (patches, features);
a block computes O1 = g(X^T W1) W2 across patches, transposes back, then O2 = g(O1 W3) W4 across
features. Widths may change inside a block, so a block's output need not match its input.

Activations are held as (tokens, batch, channels). In that layout token mixing is one matrix
multiply W @ X over a contiguous (tokens, batch * channels) operand and channel mixing one over
(tokens * batch, channels): the specification's transposes become the choice of axis, and no
step copies a transposed tensor (docs/speed.md measures what that saves).

`block: pre_norm` swaps in the residual block of MLP-Mixer (Tolstikhin et al., 2021):
X + MLP(LayerNorm(X)^T)^T, then X + MLP(LayerNorm(X)), with a final LayerNorm and a mean over
the patches instead of over the features. `block: gated` is gMLP's residual block (Liu et al.,
2021), whose token mixing is one layer inside a multiplicative gate.
"""

import itertools

import torch
from torch import nn

from stages import kernels
from stages.config import IMAGE_SIZE, NUM_CLASSES, ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(batch, 1, 28, 28) -> (patches, batch, patch_size**2), patches in row-major order."""
    b = images.shape[0]
    grid = IMAGE_SIZE // patch_size
    x = images.reshape(b, grid, patch_size, grid, patch_size)
    return x.permute(1, 3, 0, 2, 4).reshape(grid * grid, b, patch_size * patch_size)


def _find_onednn_linear():
    """torch's oneDNN linear kernel, where this build of torch has one (x86 and ARM CPU builds)."""
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


ONEDNN_LINEAR = _find_onednn_linear()


# A Linear's weight gradient goes to oneDNN (with the fused kernel writing g^T) from this input
# width on: the patch stem's 16 inputs make a product too small to pay for the copy of g^T
# (docs/speed.md times both ways).
WIDE_INPUT = 64


def _onednn_applies(x: torch.Tensor) -> bool:
    """fp32 on a CPU with autocast off, eager: where oneDNN's products beat torch's own (MKL).
    Under torch.compile, inductor picks the kernels (it cannot lower this call)."""
    return (
        ONEDNN_LINEAR is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _onednn_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a @ b_t^T on oneDNN; a: (m, k) contiguous rows, b_t: (n, k), any strides (read in place)."""
    return ONEDNN_LINEAR(a, b_t, None, "none", [], "")


def _relu_backward(grad: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The gradient through a ReLU from its output (None: there was no ReLU)."""
    if out is None:
        return grad
    return torch.ops.aten.threshold_backward(grad.reshape(out.shape), out, 0)


class _OneDNNLinearFunction(torch.autograd.Function):
    """y = x W^T + b, then ReLU if `relu`, with the forward and input-gradient products on
    oneDNN (the ReLU applied as the product is written). Where the fused kernels are built, the
    ReLU's backward and the bias sums take one pass, which for a layer wide enough to pay for
    the copy also writes g^T, so that the weight gradient g^T x runs on oneDNN too (without the
    kernels: on torch's mm). A narrow layer's weight gradient is (x^T g)^T on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias, relu):
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = ONEDNN_LINEAR(rows, weight, bias, "relu" if relu else "none", [], "")
        ctx.save_for_backward(x, weight, out if relu else None)
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        x_rows = x.reshape(-1, x.shape[-1])
        grad_x = grad_weight = grad_bias = grad_t = None
        wide = x.shape[-1] >= WIDE_INPUT
        fused = kernels.fused() if ctx.needs_input_grad[1] else None
        if fused is not None:
            grad_rows, grad_t, grad_bias = fused.linear_grad(
                grad.reshape(-1, weight.shape[0]).contiguous(),
                out if out is not None else grad.new_empty(0),
                wide,
            )
        else:
            grad_rows = _relu_backward(grad, out).reshape(-1, weight.shape[0]).contiguous()
            if ctx.needs_input_grad[2]:
                grad_bias = grad_rows.sum(0)
        if ctx.needs_input_grad[1]:
            if not wide:  # (x^T g)^T: the copy of a narrow x^T is cheap (0.52 ms against mm's
                # 0.73 for the stem's 12544 x 16 inputs, docs/speed.md)
                grad_weight = _onednn_mm(x_rows.t().contiguous(), grad_rows.t()).t()
            elif grad_t is not None:
                grad_weight = _onednn_mm(grad_t, x_rows.t())
            else:
                grad_weight = grad_rows.t().mm(x_rows)
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_mm(grad_rows, weight.t().contiguous()).view(x.shape)
        return grad_x, grad_weight, grad_bias, None


class _OneDNNTokenLinearFunction(torch.autograd.Function):
    """Y = W X + b over the first axis of x, X = x as (in, rest), then ReLU if `relu`, on oneDNN.

    oneDNN computes W X as (W) (X^T)^T, reading the token-major X in place as the transposed
    operand; that ran the report model's token-mixing products 1.3-1.7x faster than torch's
    addmm/mm (MKL) at the step's shapes, the weight gradient included (docs/speed.md).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, relu):
        rows = x.reshape(weight.shape[1], -1)  # (in, batch * channels)
        out = _onednn_mm(weight, rows.t())
        fused = kernels.fused()
        if fused is not None:  # the bias and the ReLU in one pass
            fused.bias_relu_rows_(out, bias.detach(), relu)
        else:
            out.add_(bias.unsqueeze(1))
            if relu:
                out.relu_()
        ctx.save_for_backward(rows, weight, out if relu else None)
        ctx.x_shape = x.shape
        return out.view(-1, *x.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        rows, weight, out = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        fused = kernels.fused() if out is not None else None
        if fused is not None:  # the ReLU's backward and the bias sums in one pass
            grad_rows, grad_bias = fused.relu_grad_row_sums(
                grad.reshape(out.shape).contiguous(), out
            )
        else:
            grad_rows = _relu_backward(grad, out).reshape(weight.shape[0], -1)
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_mm(weight.t().contiguous(), grad_rows.t()).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # a (rows x K) @ (K x rows) product, K = batch x channels:
            # oneDNN ran it 1.3x faster than mm with the taller operand as its input rows
            if weight.shape[0] >= weight.shape[1]:
                grad_weight = _onednn_mm(grad_rows.contiguous(), rows)
            else:
                grad_weight = _onednn_mm(rows.contiguous(), grad_rows).t()
        if ctx.needs_input_grad[2] and grad_bias is None:
            grad_bias = grad_rows.sum(1)
        return grad_x, grad_weight, grad_bias, None


class Linear(nn.Linear):
    """nn.Linear, with fp32 matrix multiplies on a CPU run by oneDNN instead of MKL.

    The same function and parameters. MKL 2024.2 runs some of the report model's shapes at half
    the machine's speed (the channel MLP's input gradient, (15360 x 200) @ (200 x 300): 20.7 ms
    against 10.2 ms on oneDNN, AMD EPYC, 2 threads; docs/speed.md). Other devices and dtypes,
    and bf16 autocast (which already uses oneDNN), take torch's own path, as does any layer
    with `onednn = False` (the benchmark's comparison). `relu=True` adds the ReLU that follows
    in an `MLP`: in the same pass on oneDNN.
    """

    onednn = True

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        if self.onednn and _onednn_applies(x):
            return _OneDNNLinearFunction.apply(x, self.weight, self.bias, relu)
        y = super().forward(x)
        return torch.relu(y) if relu else y


class TokenLinear(Linear):
    """Linear along the first axis, (in, *rest) -> (out, *rest): mixes the token rows."""

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        if self.onednn and _onednn_applies(x):
            return _OneDNNTokenLinearFunction.apply(x, self.weight, self.bias, relu)
        rows = x.reshape(self.in_features, -1)
        y = torch.addmm(self.bias.unsqueeze(1), self.weight, rows).view(-1, *x.shape[1:])
        return torch.relu(y) if relu else y


class MLP(nn.Sequential):
    """Layers applied in order, as nn.Sequential (the same parameters and names), except that a
    Linear followed by a ReLU is one call: on oneDNN the ReLU costs no pass of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers, i = list(self), 0
        while i < len(layers):
            fuse = (
                isinstance(layers[i], Linear)
                and i + 1 < len(layers)
                and isinstance(layers[i + 1], nn.ReLU)
            )
            x = layers[i](x, relu=True) if fuse else layers[i](x)
            i += 2 if fuse else 1
        return x


class _FusedTokenMLPFunction(torch.autograd.Function):
    """W2 relu(W1 X + b1) + b2 over the first axis of x, X = x as (tokens, batch * channels), on
    the fused kernel of `kernels.cpp`: column tile by column tile, the hidden layer used while
    in cache (docs/speed.md)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, keep_hidden):
        rows = x.reshape(x.shape[0], -1).contiguous()
        out, hidden, _ = kernels.load().token_mlp_forward(
            rows, w1.detach(), b1.detach(), w2.detach(), b2.detach(), 0, keep_hidden, []
        )
        ctx.save_for_backward(rows, hidden, w1, w2)
        ctx.x_shape = x.shape
        return out.view(-1, *x.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        rows, hidden, w1, w2 = ctx.saved_tensors
        grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = kernels.load().token_mlp_backward(
            grad.reshape(w2.shape[0], -1).contiguous(),
            rows,
            hidden,
            w1.detach(),
            w2.detach(),
            ctx.needs_input_grad[0],
            [],
            [],
        )
        grad_x = grad_x.view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None


class TokenMLP(MLP):
    """The MLP along the token axis: TokenLinear, ReLU, TokenLinear runs as one fused kernel
    where it applies (fp32 on a CPU with AVX-512, eager, the kernels built), else layer by
    layer, as always with `fused = False` (the benchmark's comparison)."""

    fused = True

    def fused_applies(self, x: torch.Tensor) -> bool:
        first, activation, second = self
        return (
            self.fused
            and isinstance(activation, nn.ReLU)
            and first.onednn
            and second.onednn
            and _onednn_applies(x)
            and kernels.fused_token_mlp() is not None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_applies(x):
            first, _, second = self
            # without a backward to come (evaluation), the hidden layer is not written
            keep_hidden = torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.parameters())
            )
            return _FusedTokenMLPFunction.apply(
                x, first.weight, first.bias, second.weight, second.bias, keep_hidden
            )
        return super().forward(x)


def mlp(
    width_in: int, hidden: int, width_out: int, activation: str, linear: type = Linear
) -> MLP:
    """Linear, non-linearity g, Linear: the two-layer MLP of the specification."""
    layers = (linear(width_in, hidden), ACTIVATIONS[activation](), linear(hidden, width_out))
    return TokenMLP(*layers) if linear is TokenLinear else MLP(*layers)


def norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm1d(channels) if kind == "batch" else nn.Identity()


class Dropout(nn.Dropout):
    """nn.Dropout on a CPU, the same behaviour from a cheaper mask.

    As torch's CPU dropout: each value is zeroed with probability p and the rest are multiplied
    by a mask of 1 / (1 - p) in the input's dtype. The mask comes from 16-bit random integers,
    four from each 64-bit draw: torch's `bernoulli_` mask cost about a fifth of a training step
    of the report model on the CPU (docs/speed.md). p is thus rounded to a multiple of 2**-16.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return _DropoutFunction.apply(x, self.p)


class _DropoutFunction(torch.autograd.Function):
    """x * keep / (1 - p) and its gradient, each in one pass over a 0/1 mask in x's dtype (which
    the comparison writes directly), instead of converting, scaling, then multiplying."""

    @staticmethod
    def forward(ctx, x, p):
        keep = torch.empty_like(x, memory_format=torch.contiguous_format)
        torch.ge(random_int16(x.shape, x.device), -(2**15) + round(p * 2**16), out=keep)
        ctx.scale = dropout_scale(p, x.dtype)
        ctx.save_for_backward(keep)
        return torch.addcmul(x.new_zeros(()), x, keep, value=ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, keep, value=ctx.scale), None


def dropout_scale(p: float, dtype: torch.dtype) -> float:
    """1 / (1 - p), rounded to dtype as torch's CPU dropout rounds it."""
    return torch.tensor(1.0 / (1.0 - p), dtype=dtype).item()


def random_int16(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Uniform random int16 values from torch's default generator (so manual_seed fixes them)."""
    numel = shape.numel()
    draws = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    return draws.random_(-(2**63), None).view(torch.int16)[:numel].view(shape)


_NO_SUMS = torch.empty(0, dtype=torch.float64)  # batch_norm_dropout_forward takes its own


def _dropout_threshold_and_scale(p: float, dtype: torch.dtype) -> tuple[int, float]:
    """The kernels' dropout: keep where 16 random bits >= threshold (p rounded to a multiple of
    2**-16, as Dropout does), kept values times scale."""
    return round(p * 2**16), dropout_scale(p, dtype) if p else 1.0


class _BatchNormDropoutFunction(torch.autograd.Function):
    """dropout(batch_norm(x)) in training mode over the columns of x (rows, channels), on the
    fused kernels of `kernels.cpp`; also returns the batch mean and biased variance."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, p, seed):
        threshold, scale = _dropout_threshold_and_scale(p, x.dtype)
        y, keep, mean, var, invstd = kernels.load().batch_norm_dropout_forward(
            x, weight.detach(), bias.detach(), eps, threshold, scale, seed, _NO_SUMS
        )
        ctx.save_for_backward(x, keep, mean, invstd, weight)
        ctx.scale = scale
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var):
        x, keep, mean, invstd, weight = ctx.saved_tensors
        fused, grad = kernels.load(), grad.contiguous()
        grad_weight, grad_bias, *terms = fused.batch_norm_dropout_grad_terms(
            grad, x, keep, mean, invstd, weight.detach(), ctx.scale
        )
        grad_x = fused.batch_norm_dropout_grad_input(grad, x, keep, *terms)
        return grad_x, grad_weight, grad_bias, None, None, None


def _fused_applies(x: torch.Tensor, norm: nn.Module, dropout: nn.Module) -> bool:
    """Training on fp32 rows on a CPU, eager, a BatchNorm with running statistics, the
    project's Dropout (whose mask the kernel draws the same way: p in steps of 2**-16), and the
    kernels built: where `batch_norm_dropout` replaces torch's passes with its fused ones."""
    return (
        norm.training
        and isinstance(dropout, Dropout)
        and isinstance(norm, nn.BatchNorm1d)
        and norm.affine
        and norm.track_running_stats
        and norm.momentum is not None
        and x.dim() == 2
        and x.shape[0] > 1
        and _onednn_applies(x)  # fp32, CPU, no autocast, not compiling
        and kernels.fused() is not None
    )


def batch_norm_dropout(x: torch.Tensor, norm: nn.Module, dropout: nn.Dropout) -> torch.Tensor:
    """dropout(norm(x)), as one fused pass where `_fused_applies` (else torch's modules).

    The same function: batch statistics, running statistics updated as torch's BatchNorm1d
    updates them, each value dropped with probability p and the rest scaled by 1 / (1 - p); the
    dropout mask comes from the fused kernel's own generator, seeded from torch's.
    """
    if not _fused_applies(x, norm, dropout):
        return dropout(norm(x))
    p, seed = _dropout_rate_and_seed(dropout)
    y, mean, var = _BatchNormDropoutFunction.apply(
        x.contiguous(), norm.weight, norm.bias, norm.eps, p, seed
    )
    _update_running_stats(norm, mean, var, rows=y.shape[0])
    return y


def _dropout_rate_and_seed(dropout: nn.Dropout) -> tuple[float, int]:
    """p, and a seed for the kernel's mask from torch's generator (so manual_seed fixes it)."""
    seed = torch.empty((), dtype=torch.int64).random_().item()
    return dropout.p if dropout.training else 0.0, seed


def _update_running_stats(norm: nn.BatchNorm1d, mean, var, rows: int) -> None:
    """As torch's BatchNorm1d in training: running statistics move towards the batch's by
    momentum, the variance unbiased."""
    with torch.no_grad():
        norm.running_mean.lerp_(mean, norm.momentum)
        norm.running_var.lerp_(var * (rows / (rows - 1)), norm.momentum)
        norm.num_batches_tracked.add_(1)


class _TokenMixingNormDropoutFunction(torch.autograd.Function):
    """dropout(batch_norm(token MLP(x))) of the report block in training mode, on the fused
    kernels: the token MLP's kernel also sums the BatchNorm's statistics as it writes its output,
    and its backward forms the BatchNorm's input gradient tile by tile, two passes over the
    (tokens' x batch x channels) activations fewer than running the two functions in turn.

    With a stem (its weight and bias; else None), x holds the patches and the token MLP's input
    is relu(stem(x)), computed tile by tile inside the kernel and never stored; no gradient
    reaches the patches."""

    @staticmethod
    def forward(
        ctx, x, stem_weight, stem_bias, w1, b1, w2, b2, norm_weight, norm_bias, eps, p, seed
    ):
        fused = kernels.load()
        stem = [] if stem_weight is None else [stem_weight.detach(), stem_bias.detach()]
        channels = x.shape[-1] if stem_weight is None else stem_weight.shape[0]
        rows = x.reshape(x.shape[0], -1).contiguous()
        y, hidden, sums = fused.token_mlp_forward(
            rows, w1.detach(), b1.detach(), w2.detach(), b2.detach(), channels, True, stem
        )
        y = y.view(-1, channels)
        threshold, scale = _dropout_threshold_and_scale(p, x.dtype)
        out, keep, mean, var, invstd = fused.batch_norm_dropout_forward(
            y, norm_weight.detach(), norm_bias.detach(), eps, threshold, scale, seed, sums
        )
        ctx.save_for_backward(
            rows, hidden, w1, w2, y, keep, mean, invstd, norm_weight, stem_weight, stem_bias
        )
        ctx.scale, ctx.x_shape = scale, x.shape
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var):
        rows, hidden, w1, w2, y, keep, mean, invstd, norm_weight, stem_weight, stem_bias = (
            ctx.saved_tensors
        )
        stem = [] if stem_weight is None else [stem_weight.detach(), stem_bias.detach()]
        fused, grad = kernels.load(), grad.contiguous()
        grad_norm_weight, grad_norm_bias, *terms = fused.batch_norm_dropout_grad_terms(
            grad, y, keep, mean, invstd, norm_weight.detach(), ctx.scale
        )
        grad_x, grad_w1, grad_b1, grad_w2, grad_b2, *grad_stem = fused.token_mlp_backward(
            grad.view(w2.shape[0], -1),
            rows,
            hidden,
            w1.detach(),
            w2.detach(),
            ctx.needs_input_grad[0],
            [y, keep, *terms],
            stem,
        )
        grad_x = grad_x.view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_stem_weight, grad_stem_bias = grad_stem or (None, None)
        return (
            grad_x, grad_stem_weight, grad_stem_bias, grad_w1, grad_b1, grad_w2, grad_b2,
            grad_norm_weight, grad_norm_bias, None, None, None,
        )


def token_mixing_norm_dropout(
    x: torch.Tensor,
    token_mixing: "TokenMLP",
    norm: nn.Module,
    dropout: nn.Dropout,
    stem: Linear | None = None,
) -> torch.Tensor:
    """dropout(norm(token_mixing(x))) as (tokens' * batch, channels) rows: one fused function
    where both the token MLP's kernel and `batch_norm_dropout`'s apply, else the two in turn.
    With a `stem`, x holds the patches and the token MLP's input is relu(stem(x)): inside the
    fused function where it applies too (no gradient wanted at the patches)."""
    fused = token_mixing.fused_applies(x) and _fused_applies(x.flatten(0, 1), norm, dropout)
    if stem is not None and not (fused and stem.onednn and not x.requires_grad):
        x, stem = stem(x, relu=True), None
    if not fused:
        return batch_norm_dropout(token_mixing(x).flatten(0, 1), norm, dropout)
    first, _, second = token_mixing
    p, seed = _dropout_rate_and_seed(dropout)
    out, mean, var = _TokenMixingNormDropoutFunction.apply(
        x, None if stem is None else stem.weight, None if stem is None else stem.bias,
        first.weight, first.bias, second.weight, second.bias, norm.weight, norm.bias,
        norm.eps, p, seed,
    )
    _update_running_stats(norm, mean, var, rows=out.shape[0])
    return out


class MixerBlock(nn.Module):
    """One block of the backbone: token mixing across patches, then channel mixing."""

    def __init__(
        self,
        tokens: int,
        channels: int,
        token_mlp: tuple[int, int],
        channel_mlp: tuple[int, int],
        cfg: ModelConfig,
    ):
        super().__init__()
        token_hidden, self.tokens_out = token_mlp
        channel_hidden, self.channels_out = channel_mlp
        self.token_mixing = mlp(
            tokens, token_hidden, self.tokens_out, cfg.activation, linear=TokenLinear
        )
        self.token_norm = norm(cfg.norm, channels)  # over feature channels, as in the notebook
        self.dropout = Dropout(cfg.dropout)
        self.channel_mixing = mlp(channels, channel_hidden, self.channels_out, cfg.activation)
        self.channel_norm = norm(cfg.norm, self.tokens_out)  # over the token rows

    def forward(self, x: torch.Tensor, stem: Linear | None = None) -> torch.Tensor:
        """The block of x (tokens, batch, channels), or with a `stem` of relu(stem(x)) for
        x the patches (tokens, batch, pixels)."""
        # (tokens' * batch, channels), normalised per channel
        o1 = token_mixing_norm_dropout(x, self.token_mixing, self.token_norm, self.dropout, stem)
        o2 = self.channel_mixing(o1).view(1, self.tokens_out, -1)  # (1, tokens', batch * ch')
        o2 = self.channel_norm(o2)  # statistics per token row
        return o2.view(self.tokens_out, x.shape[1], self.channels_out)


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch for a random subset of the batch."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(1, x.shape[1], 1, device=x.device) >= self.p  # x: (tokens, batch, ch)
        return x * keep / (1.0 - self.p)


def spatial_shift(x: torch.Tensor, grid: int, group: int) -> torch.Tensor:
    """Move four groups of `group` channels by one patch: down, up, right, left (S2-MLP, Yu et
    al., 2022); the rest stay. A channel MLP after it sees each patch's neighbours, the local
    view a token MLP with one weight per position lacks. No parameters, no multiply-adds.

    x: (tokens, batch, channels) with tokens in row-major order on a grid x grid patch grid;
    patches shifted in from outside the image are zero.
    """
    g = x.view(grid, grid, *x.shape[1:])
    a, b, c, d = (slice(i * group, (i + 1) * group) for i in range(4))
    out = torch.zeros_like(g)
    out[1:, :, :, a] = g[:-1, :, :, a]  # each patch gets the values of the patch above it
    out[:-1, :, :, b] = g[1:, :, :, b]  # ... of the patch below
    out[:, 1:, :, c] = g[:, :-1, :, c]  # ... of the patch to its left
    out[:, :-1, :, d] = g[:, 1:, :, d]  # ... of the patch to its right
    out[..., 4 * group :] = g[..., 4 * group :]
    return out.view(x.shape)


class PreNormMixerBlock(nn.Module):
    """A residual Mixer block: token mixing, then channel mixing, each on a normalised input."""

    def __init__(
        self, tokens: int, channels: int, token_hidden: int, channel_hidden: int, drop_path: float,
        cfg: ModelConfig,
    ):
        super().__init__()
        layer_norm = nn.LayerNorm if cfg.norm == "layer" else lambda _: nn.Identity()
        self.token_norm = layer_norm(channels)
        self.token_mixing = mlp(tokens, token_hidden, tokens, cfg.activation, linear=TokenLinear)
        self.channel_norm = layer_norm(channels)
        self.channel_mixing = mlp(channels, channel_hidden, channels, cfg.activation)
        self.dropout = Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)
        self.grid = IMAGE_SIZE // cfg.patch_size  # patches per row and per column
        self.shift_group = int(cfg.spatial_shift * channels) // 4  # channels per direction

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (tokens, batch, channels)
        x = x + self.drop_path(self.dropout(self.token_mixing(self.token_norm(x))))
        y = self.channel_norm(x)
        if self.shift_group:
            y = spatial_shift(y, self.grid, self.shift_group)
        return x + self.drop_path(self.dropout(self.channel_mixing(y)))


class SpatialGatingUnit(nn.Module):
    """gMLP's gate (Liu et al., 2021): half of the channels, normalised and mixed across the
    tokens, multiplies the other half. It starts as the identity gate (token weights near 0,
    biases 1, set by `init_weights`), so a deep stack trains like plain channel MLPs at first."""

    def __init__(self, tokens: int, width: int, layer_norm):
        super().__init__()
        self.norm = layer_norm(width)
        self.token_mixing = TokenLinear(tokens, tokens)

    def reset_to_identity(self) -> None:
        nn.init.uniform_(self.token_mixing.weight, -1e-3, 1e-3)
        nn.init.ones_(self.token_mixing.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (tokens, batch, 2 * width)
        value, gate = x.chunk(2, dim=-1)
        return value * self.token_mixing(self.norm(gate).contiguous())


class GatedMixerBlock(nn.Module):
    """A gMLP block: X + Proj_out(SGU(GELU(Proj_in(LayerNorm(X))))), with one token-mixing layer
    inside the gate instead of a separate token MLP."""

    def __init__(
        self, tokens: int, channels: int, hidden: int, drop_path: float, cfg: ModelConfig
    ):
        super().__init__()
        layer_norm = nn.LayerNorm if cfg.norm == "layer" else lambda _: nn.Identity()
        self.norm = layer_norm(channels)
        self.channel_in = Linear(channels, hidden)
        self.activation = ACTIVATIONS[cfg.activation]()
        self.gate = SpatialGatingUnit(tokens, hidden // 2, layer_norm)
        self.channel_out = Linear(hidden // 2, channels)
        self.dropout = Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (tokens, batch, channels)
        y = self.gate(self.activation(self.channel_in(self.norm(x))))
        return x + self.drop_path(self.dropout(self.channel_out(y)))


class MixerClassifier(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.patch_size = cfg.patch_size
        patch_pixels = cfg.patch_size**2
        act = ACTIVATIONS[cfg.activation]
        if cfg.stem_hidden is None:
            self.stem = MLP(Linear(patch_pixels, cfg.stem_width), act())
        else:
            self.stem = MLP(
                Linear(patch_pixels, cfg.stem_hidden),
                act(),
                Linear(cfg.stem_hidden, cfg.stem_width),
                act(),
            )
        blocks = []
        tokens, channels = cfg.num_patches, cfg.stem_width
        if cfg.block == "report":
            for token_mlp, channel_mlp in zip(cfg.token_mlp, cfg.channel_mlp, strict=True):
                blocks.append(MixerBlock(tokens, channels, token_mlp, channel_mlp, cfg))
                tokens, channels = token_mlp[1], channel_mlp[1]
            self.head_norm = nn.Identity()
            # The notebook averages over the last (feature) axis, one value per token row.
            self.pool_over_features, pooled = True, tokens
        else:
            for i, ((token_hidden, _), (channel_hidden, _)) in enumerate(
                zip(cfg.token_mlp, cfg.channel_mlp, strict=True)
            ):
                drop_path = cfg.drop_path * i / max(cfg.blocks - 1, 1)  # deeper: dropped more
                if cfg.block == "gated":
                    block = GatedMixerBlock(tokens, channels, channel_hidden, drop_path, cfg)
                else:
                    block = PreNormMixerBlock(
                        tokens, channels, token_hidden, channel_hidden, drop_path, cfg
                    )
                blocks.append(block)
            self.head_norm = nn.LayerNorm(channels) if cfg.norm == "layer" else nn.Identity()
            self.pool_over_features, pooled = False, channels  # mean over the patches
        self.blocks = nn.Sequential(*blocks)
        self.classifier = Linear(pooled, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = patchify(images, self.patch_size)  # (patches, batch, pixels)
        blocks = list(self.blocks)
        # a one-layer stem is the first block's to compute, inside its token kernel where that
        # applies: the stem's output and the gradient at it are then never stored
        x = blocks.pop(0)(x, stem=self.stem[0]) if self.stem_in_first_block() else self.stem(x)
        for block in blocks:
            x = block(x)
        x = self.head_norm(x)
        pooled = x.mean(dim=2).t() if self.pool_over_features else x.mean(dim=0)
        return self.classifier(pooled)  # logits; softmax lives in the loss

    def stem_in_first_block(self) -> bool:
        """Where the stem is one Linear and a ReLU and the first block a report block, which
        then computes it (`token_mixing_norm_dropout`)."""
        return (
            len(self.stem) == 2
            and isinstance(self.stem[0], Linear)
            and isinstance(self.stem[1], nn.ReLU)
            and isinstance(self.blocks[0], MixerBlock)
        )


def init_weights(model: nn.Module, scheme: str, std: float) -> None:
    """Re-initialise every Linear layer's weights; biases start at zero, as in the report, except
    in gMLP's gates, which start as the identity (`SpatialGatingUnit`).

    `default` keeps PyTorch's own initialisation (weights and biases) untouched.
    """
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
    flops = 0
    patch_pixels = cfg.patch_size**2
    tokens, channels = cfg.num_patches, cfg.stem_width
    stem = (
        [patch_pixels, cfg.stem_width]
        if cfg.stem_hidden is None
        else [patch_pixels, cfg.stem_hidden, cfg.stem_width]
    )
    flops += sum(a * b for a, b in itertools.pairwise(stem)) * tokens
    for (t_hidden, t_out), (c_hidden, c_out) in zip(cfg.token_mlp, cfg.channel_mlp, strict=True):
        if cfg.block == "gated":  # C -> hidden, the gate's tokens -> tokens on hidden / 2, back
            flops += tokens * (channels * c_hidden + c_hidden // 2 * c_out)
            flops += c_hidden // 2 * tokens * tokens
            continue
        flops += channels * (tokens * t_hidden + t_hidden * t_out)
        flops += t_out * (channels * c_hidden + c_hidden * c_out)
        tokens, channels = t_out, c_out
    flops += (tokens if cfg.block == "report" else channels) * 10
    return 2 * flops


__all__ = [
    "Dropout",
    "MixerClassifier",
    "count_parameters",
    "forward_flops",
    "init_weights",
    "patchify",
]

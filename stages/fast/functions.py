"""Autograd functions of the fast path: oneDNN's products and the fused kernels of `kernels.cpp`.

Each computes what a plain torch expression computes (named in its docstring) over the same
parameters; tests/test_fast.py holds every one to that expression. Activations are token-major:
(tokens, batch, channels), so that token mixing is one product over a contiguous
(tokens, batch * channels) operand and channel mixing one over (tokens * batch, channels), with
no transposed copy.
"""

import torch
from torch import nn

from stages.fast.kernels import load


def _onednn_linear():
    """torch's oneDNN linear kernel, where this build of torch has one (x86 and ARM builds)."""
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


ONEDNN_LINEAR = _onednn_linear()

# From this input width on, a layer's weight gradient runs on oneDNN as g^T x with g^T written by
# the fused ReLU-backward pass; a narrower layer (the 16-pixel stem) computes (x^T g)^T instead.
WIDE_INPUT = 64


def _mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a @ b_t^T on oneDNN; a: (m, k) contiguous rows, b_t: (n, k), any strides (read in place)."""
    return ONEDNN_LINEAR(a, b_t, None, "none", [], "")


class LinearFunction(torch.autograd.Function):
    """relu(x W^T + b) if `relu`, else x W^T + b, over the last axis of x, on oneDNN; the ReLU's
    backward and the bias sums take one fused pass."""

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
        wide = x.shape[-1] >= WIDE_INPUT
        grad_rows, grad_t, grad_bias = load().linear_grad(
            grad.reshape(-1, weight.shape[0]).contiguous(),
            out if out is not None else grad.new_empty(0),
            wide,
        )
        if wide:
            grad_weight = _mm(grad_t, x_rows.t())
        else:
            grad_weight = _mm(x_rows.t().contiguous(), grad_rows.t()).t()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm(grad_rows, weight.t().contiguous()).view(x.shape)
        return grad_x, grad_weight, grad_bias, None


class TokenLinearFunction(torch.autograd.Function):
    """relu(W X + b) if `relu`, else W X + b, over the first axis of x (X = x as (in, rest)), on
    oneDNN, which reads the token-major X in place as its transposed operand."""

    @staticmethod
    def forward(ctx, x, weight, bias, relu):
        rows = x.reshape(weight.shape[1], -1)  # (in, batch * channels)
        out = _mm(weight, rows.t())
        load().bias_relu_rows_(out, bias.detach(), relu)
        ctx.save_for_backward(rows, weight, out if relu else None)
        ctx.x_shape = x.shape
        return out.view(-1, *x.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        rows, weight, out = ctx.saved_tensors
        if out is not None:  # the ReLU's backward and the bias sums in one pass
            grad_rows, grad_bias = load().relu_grad_row_sums(
                grad.reshape(out.shape).contiguous(), out
            )
        else:
            grad_rows = grad.reshape(weight.shape[0], -1)
            grad_bias = grad_rows.sum(1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm(weight.t().contiguous(), grad_rows.t()).view(ctx.x_shape)
        # a (rows x K) @ (K x rows) product with K = batch x channels: the taller operand first
        if weight.shape[0] >= weight.shape[1]:
            grad_weight = _mm(grad_rows.contiguous(), rows)
        else:
            grad_weight = _mm(rows.contiguous(), grad_rows).t()
        return grad_x, grad_weight, grad_bias, None


def linear(x: torch.Tensor, layer: nn.Linear, relu: bool = False) -> torch.Tensor:
    return LinearFunction.apply(x, layer.weight, layer.bias, relu)


def token_linear(x: torch.Tensor, layer: nn.Linear, relu: bool = False) -> torch.Tensor:
    return TokenLinearFunction.apply(x, layer.weight, layer.bias, relu)


class TokenMLPFunction(torch.autograd.Function):
    """W2 relu(W1 X + b1) + b2 over the first axis of x as one kernel, column tile by column
    tile, the hidden layer used while in cache."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, keep_hidden):
        rows = x.reshape(x.shape[0], -1).contiguous()
        out, hidden, _ = load().token_mlp_forward(
            rows, w1.detach(), b1.detach(), w2.detach(), b2.detach(), 0, keep_hidden, []
        )
        ctx.save_for_backward(rows, hidden, w1, w2)
        ctx.x_shape = x.shape
        return out.view(-1, *x.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        rows, hidden, w1, w2 = ctx.saved_tensors
        grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = load().token_mlp_backward(
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


def dropout_threshold_and_scale(p: float) -> tuple[int, float]:
    """The kernels' dropout: keep where 16 random bits >= threshold (p rounded to a multiple of
    2**-16), kept values times 1 / (1 - p) rounded to fp32 as torch's CPU dropout rounds it."""
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).item() if p else 1.0
    return round(p * 2**16), scale


class BatchNormDropoutFunction(torch.autograd.Function):
    """dropout(batch_norm(x)) in training mode over the columns of x (rows, channels); also
    returns the batch mean and biased variance. The mask comes from the kernel's generator."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, p, seed):
        threshold, scale = dropout_threshold_and_scale(p)
        no_sums = torch.empty(0, dtype=torch.float64)  # the kernel takes its own statistics
        y, keep, mean, var, invstd = load().batch_norm_dropout_forward(
            x, weight.detach(), bias.detach(), eps, threshold, scale, seed, no_sums
        )
        ctx.save_for_backward(x, keep, mean, invstd, weight)
        ctx.scale = scale
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var):
        x, keep, mean, invstd, weight = ctx.saved_tensors
        ops, grad = load(), grad.contiguous()
        grad_weight, grad_bias, *terms = ops.batch_norm_dropout_grad_terms(
            grad, x, keep, mean, invstd, weight.detach(), ctx.scale
        )
        grad_x = ops.batch_norm_dropout_grad_input(grad, x, keep, *terms)
        return grad_x, grad_weight, grad_bias, None, None, None


class TokenHalfFunction(torch.autograd.Function):
    """dropout(batch_norm(W2 relu(W1 X + b1) + b2)) in training mode: the token kernel also sums
    the BatchNorm's statistics as it writes its output, and its backward forms the BatchNorm's
    input gradient tile by tile. With a stem (its weight and bias; else None), x holds the
    patches and X = relu(stem(x)), computed tile by tile and never stored; no gradient reaches
    the patches."""

    @staticmethod
    def forward(
        ctx, x, stem_weight, stem_bias, w1, b1, w2, b2, norm_weight, norm_bias, eps, p, seed
    ):
        ops = load()
        stem = [] if stem_weight is None else [stem_weight.detach(), stem_bias.detach()]
        channels = x.shape[-1] if stem_weight is None else stem_weight.shape[0]
        rows = x.reshape(x.shape[0], -1).contiguous()
        y, hidden, sums = ops.token_mlp_forward(
            rows, w1.detach(), b1.detach(), w2.detach(), b2.detach(), channels, True, stem
        )
        y = y.view(-1, channels)
        threshold, scale = dropout_threshold_and_scale(p)
        out, keep, mean, var, invstd = ops.batch_norm_dropout_forward(
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
        ops, grad = load(), grad.contiguous()
        grad_norm_weight, grad_norm_bias, *terms = ops.batch_norm_dropout_grad_terms(
            grad, y, keep, mean, invstd, norm_weight.detach(), ctx.scale
        )
        grad_x, grad_w1, grad_b1, grad_w2, grad_b2, *grad_stem = ops.token_mlp_backward(
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

"""The CPU fast path: everything in the project that exists only for speed, behind `accelerate`.

`accelerate(model, cfg, device)` returns the module to train and evaluate with, and a line
saying which path runs. With `cpu_kernels: auto` on a CPU, for the notebook model in fp32 that
module is `FastNotebookModel`: the same function over the same parameters, in token-major
layout on oneDNN's products and the fused kernels of `kernels.cpp` (the token MLP, BatchNorm and
dropout in one kernel, the patch stem inside the first block's); for the gMLP model it is
`FastGMLPModel`, the same function in token-major layout. Everywhere else it is the plain model
itself. The notebook model's two paths draw their dropout masks from different random streams,
so their results agree as two seeds do, not bitwise (docs/speed.md).
"""

from dataclasses import dataclass

import torch
from torch import nn

from stages.config import RunConfig
from stages.fast import kernels
from stages.fast.functions import ONEDNN_LINEAR
from stages.fast.gmlp import FastGMLPModel
from stages.fast.notebook import FastNotebookModel
from stages.model import MixerClassifier


@dataclass(frozen=True)
class Options:
    """Parts of the fast path that the benchmark turns off to measure what each gives."""

    token_kernel: bool | None = None  # the token MLP as one kernel; None: where the CPU is fast
    stem_in_kernel: bool = True  # the patch stem computed inside the first token kernel


def why_not(cfg: RunConfig, device: torch.device) -> str | None:
    """Why no fast path applies to this configuration here, or None if one does. The
    token-major gMLP needs nothing more than a CPU; the notebook model needs the kernels."""
    m = cfg.model
    if cfg.cpu_kernels == "off":
        return "cpu_kernels: off"
    if device.type != "cpu":
        return f"device {device.type}"
    if m.block == "gmlp":
        return None
    reasons = {
        "block mixer": m.block == "mixer",
        f"norm {m.norm}": m.norm != "batch",
        f"activation {m.activation}": m.activation != "relu",
        f"precision {cfg.precision}": cfg.precision != "fp32",
        "this torch has no oneDNN": ONEDNN_LINEAR is None,
    }
    reason = next((reason for reason, applies in reasons.items() if applies), None)
    if reason is None and kernels.load() is None:
        return "fused kernels unavailable"
    return reason


def accelerate(
    model: MixerClassifier, cfg: RunConfig, device: torch.device, options: Options = Options()
) -> tuple[nn.Module, str]:
    """The module that computes `model` fastest here, and the path it runs, for the summary."""
    if (reason := why_not(cfg, device)) is not None:
        return model, f"plain torch ({reason})"
    if cfg.model.block == "gmlp":
        return FastGMLPModel(model), "token-major gMLP"
    token_kernel = kernels.token_kernel_is_fast() if options.token_kernel is None else (
        options.token_kernel
    )
    fast = FastNotebookModel(model, token_kernel, options.stem_in_kernel)
    parts = ["token MLP kernel" if token_kernel else "token MLP on oneDNN"]
    if fast.stem_in_kernel:
        parts.append("stem inside it")
    return fast, f"fused CPU kernels ({', '.join(parts)})"


__all__ = ["Options", "accelerate"]

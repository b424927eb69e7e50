"""Time each Linear layer of the report model's training step with torch's own products and with
`stages.model.Linear` and `TokenLinear` (oneDNN on a CPU), at the step's real shapes.

    python benchmarks/linear_shapes.py [--repeats 20] [--run final]

For every Linear (the stem, the token and channel MLPs, the classifier) it times the forward
product and the input-gradient product, both on oneDNN in `stages.model.Linear` and
`TokenLinear` (the token layers' weight gradient is on oneDNN too, the other layers' on torch's
`mm`; not timed here). Freed memory is kept as `fit` keeps it, so fresh pages do not blur the
comparison.
"""

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from stages import kernels
from stages.config import resolve_run
from stages.model import ONEDNN_LINEAR, Linear, TokenLinear, _onednn_mm
from stages.training import build_model, keep_freed_memory

REPO = Path(__file__).resolve().parents[1]


def seconds(fn, repeats: int) -> float:
    """Best of three rounds of `repeats` calls, per call."""
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def linear_inputs(cfg) -> dict[str, tuple[Linear, torch.Tensor]]:
    """Each `stages.model.Linear` of the run's model with the input it gets in a training step."""
    model = build_model(cfg, seed=0)
    captured = {}

    def capture(name: str):
        def hook(module, args, output) -> None:
            captured[name] = (module, args[0])

        return hook

    hooks = [
        module.register_forward_hook(capture(name))
        for name, module in model.named_modules()
        if isinstance(module, Linear)
    ]
    kernels.use = False  # layer by layer: the fused token MLP does not call its layers
    try:
        with torch.no_grad():
            model(torch.rand(cfg.batch_size, 1, 28, 28))
    finally:
        kernels.use = True
        for hook in hooks:
            hook.remove()
    return captured


def products(layer: Linear, x: torch.Tensor) -> dict[str, tuple[str, Callable, Callable]]:
    """The forward and input-gradient products of `layer` on input x: (shape, torch's, oneDNN's)."""
    weight, bias = layer.weight.detach(), layer.bias.detach()
    weight_t = weight.t().contiguous()
    if isinstance(layer, TokenLinear):  # along the first axis: W @ X, X = (in, batch * channels)
        rows = x.reshape(layer.in_features, -1).contiguous()
        grad = torch.randn(layer.out_features, rows.shape[1])
        return {
            "forward": (
                f"W @ {tuple(rows.shape)}",
                lambda: torch.addmm(bias.unsqueeze(1), weight, rows),
                lambda: _onednn_mm(weight, rows.t()).add_(bias[:, None]),
            ),
            "dgrad": (
                f"W^T @ {tuple(grad.shape)}",
                lambda: torch.mm(weight.t(), grad),
                lambda: _onednn_mm(weight_t, grad.t()),
            ),
        }
    rows = x.reshape(-1, layer.in_features).contiguous()
    grad = torch.randn(rows.shape[0], layer.out_features)
    return {
        "forward": (
            f"{tuple(rows.shape)} @ W^T",
            lambda: torch.addmm(bias, rows, weight.t()),
            lambda: ONEDNN_LINEAR(rows, weight, bias, "none", [], ""),
        ),
        "dgrad": (
            f"{tuple(grad.shape)} @ W",
            lambda: torch.mm(grad, weight),
            lambda: _onednn_mm(grad, weight_t),
        ),
    }


def compare(name: str, layer: Linear, x: torch.Tensor, repeats: int) -> None:
    """Print the forward and input-gradient products' times, torch's and oneDNN's."""
    for product, (shape, torchs, onednn) in products(layer, x).items():
        print(
            f"{name:28s} {product:8s} {shape:24s} {seconds(torchs, repeats) * 1e3:8.3f} "
            f"{seconds(onednn, repeats) * 1e3:8.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="final", help="a run of params.yaml")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if ONEDNN_LINEAR is None:
        raise SystemExit("this build of torch has no oneDNN linear; nothing to compare")
    keep_freed_memory()
    cfg = resolve_run(yaml.safe_load((REPO / "params.yaml").read_text()), args.run)
    print(f"run {args.run}, batch {cfg.batch_size}, {torch.get_num_threads()} threads, ms per call")
    print(f"{'layer':28s} {'product':8s} {'shape':24s} {'torch':>8s} {'oneDNN':>8s}")
    for name, (layer, x) in linear_inputs(cfg).items():
        compare(name, layer, x, args.repeats)


if __name__ == "__main__":
    main()

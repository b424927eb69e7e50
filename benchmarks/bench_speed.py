"""Seconds per training epoch of the report model, three ways, in one process and one run.

  (a) seed-style: torchvision DataLoader + ToTensor, per-batch transfer, `.item()` every step,
      the notebook's layout and torch's nn.Dropout (`notebook_model.py`), as the report trained;
  (b) plain eager loop over in-memory tensors, `.item()` every step, as (a) otherwise;
  (c) the project's path: `stages.training.train_epoch` (data on the device, no per-step sync,
      token-major layout, `stages.model.Dropout`, freed memory kept by malloc, oneDNN products,
      the fused CPU kernels of `stages/kernels.cpp`), and to show what each of those changes
      gives, (c0) the same with torch's nn.Dropout, (c1) in the notebook's layout, (c2) with
      glibc's default malloc settings, (c3) with torch's own products (MKL) instead of oneDNN's,
      (c4) with torch's element-wise kernels instead of the fused ones and (c5) with the token
      MLP layer by layer (oneDNN's products) instead of the fused token-MLP kernel (and the
      stem run before it rather than inside it);
  with --compile (d) the same under torch.compile, with --bf16 (e) the same with bf16 autocast
  (AMX on recent x86 CPUs, tensor cores on GPUs), and with both (f) (e) under torch.compile.

Also measures the machine's fp32 matrix-multiply peak (the best of five rounds of 2048x2048
products on torch.mm and on oneDNN, the larger), then again on the faster library in every
round beside the paths, and prints achieved GFLOP/s (the model's Linear-layer FLOPs, forward +
backward = 3x forward), each path's share of the peak measured in its own round (the median
over rounds) and ratios.

Timing: every path warms up (`--warmup` steps), then runs `--rounds` rounds of `--steps`
optimizer steps, the paths taking turns within each round, so that a slow spell of a shared
machine falls on all of them; each row shows the median round (and the range), extrapolated to
an epoch of 60,000 images and labelled so. (a), (b) and (c2) run in a second process, with
glibc's default malloc settings as the notebook had (`keep_freed_memory` holds for a whole
process), taking their turn in each round when this process asks.
Needs only torch, torchvision and pyyaml (and a C++ compiler for the fused kernels: their build
or cached load is timed and printed; without them (c) is (c4)).

    python benchmarks/bench_speed.py                  # CPU
    python benchmarks/bench_speed.py --device cuda    # GPU, if present
    python benchmarks/bench_speed.py --device cuda --grid   # + every run of params.yaml, whole

`--grid` trains every run of params.yaml for its full epochs with the project's loop (no
dvclive, no checkpoints) and prints each run's wall time and test accuracy.
"""

import argparse
import itertools
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from torch import nn
from torchvision import datasets, transforms

from notebook_model import NotebookModel  # benchmarks/, the script's folder
from stages import kernels
from stages.config import resolve_run
from stages.data import load_dataset
from stages.model import ONEDNN_LINEAR, Dropout, Linear, TokenMLP, _onednn_mm, forward_flops
from stages.training import (
    allow_tf32,
    build_model,
    fit,
    keep_freed_memory,
    make_optimizer,
    train_epoch,
)

REPO = Path(__file__).resolve().parents[1]
EPOCH_IMAGES = 60_000


def cpu_name() -> str:
    """The CPU's model name and whether it has AMX-BF16 (what makes bf16 fast on a CPU)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())  # fmt: skip
    amx = "yes" if "amx_bf16" in info else "no"
    return f"{name}, {os.cpu_count()} logical CPUs, AMX-BF16 {amx}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_products(device: torch.device, dtype, n: int) -> dict[str, Callable[[], object]]:
    """n x n multiplies per library: torch.mm and, in fp32 on a CPU, oneDNN (the project's
    Linear layers use it, and on some CPUs it runs fp32 twice as fast as torch.mm's MKL)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    products = {"torch.mm": lambda: torch.mm(a, b)}
    if ONEDNN_LINEAR is not None and device.type == "cpu" and dtype == torch.float32:
        products["oneDNN"] = lambda: _onednn_mm(a, b.t())
    return products


def matmul_gflops(device: torch.device, product, n: int, rounds: int, repeats=4) -> float:
    """GFLOP/s of the best of `rounds` rounds of `repeats` n x n products."""
    product()
    best = 0.0
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            product()
        sync(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def with_torch_dropout(model: nn.Module) -> nn.Module:
    """The model with torch's own nn.Dropout (a `bernoulli_` mask), as the notebook had."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Dropout):
                setattr(parent, name, nn.Dropout(child.p))
    return model


def notebook_layout(model: nn.Module) -> nn.Module:
    """The model in the notebook's (batch, tokens, channels) layout, with the project's Dropout
    and Linear layers."""
    return NotebookModel(model, dropout=Dropout, torch_linear=False)


def with_torch_linear(model: nn.Module) -> nn.Module:
    """The model with torch's own products (MKL on x86) in every `stages.model.Linear` (token
    mixing included) instead of oneDNN's."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.onednn = False
    return model


def with_token_layers(model: nn.Module) -> nn.Module:
    """The model with each token MLP run layer by layer (oneDNN products, the fused bias and
    ReLU passes) instead of the fused token-MLP kernel, and so the stem before it instead of
    inside it."""
    for module in model.modules():
        if isinstance(module, TokenMLP):
            module.fused = False
    return model


def timer(device, run: Callable[[int], None]) -> Callable[[int], float]:
    """`time_steps(n)`: the seconds `run(n)` takes, the device synchronised at both ends."""

    def time_steps(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        run(n)
        sync(device)
        return time.perf_counter() - start

    return time_steps


def seed_style(cfg, root: Path, device, warmup: int) -> Callable[[int], float]:
    """(a): a DataLoader loop as the notebook trained; returns `time_steps(n)` -> seconds."""
    dataset = datasets.FashionMNIST(str(root), train=True, transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=2, persistent_workers=True
    )
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch
    model = NotebookModel(build_model(cfg, seed=0)).to(device)
    optimizer = make_optimizer(cfg, model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    running_loss, correct = 0.0, 0

    def run(n: int) -> None:
        nonlocal running_loss, correct
        for _ in range(n):
            images, labels = next(batches)
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            logits = model(images)
            loss = loss_fn(logits, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            correct += (logits.argmax(1) == labels).sum().item()

    time_steps = timer(device, run)
    time_steps(warmup)
    return time_steps


def plain_eager(cfg, images, labels, device, warmup: int) -> Callable[[int], float]:
    """(b): in-memory tensors, a per-step `.item()` for the running loss."""
    model = NotebookModel(build_model(cfg, seed=0)).to(device)
    optimizer = make_optimizer(cfg, model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    batches = torch.randperm(len(labels), device=device).split(cfg.batch_size)
    step, running_loss = 0, 0.0

    def run(n: int) -> None:
        nonlocal step, running_loss
        for _ in range(n):
            idx = batches[step % (len(batches) - 1)]  # whole batches only
            step += 1
            optimizer.zero_grad()
            loss = loss_fn(model(images[idx]), labels[idx])
            loss.backward()
            optimizer.step()
            running_loss += loss.item()

    time_steps = timer(device, run)
    time_steps(warmup)
    return time_steps


def project_path(
    cfg, train, device, warmup: int, compiled: bool = False, variant=None, fused: bool = True
) -> tuple[Callable[[int], float], float]:
    """(c): the project's `train_epoch`, each call on a slice of exactly n batches.

    `variant` rebuilds the model another way (c0, c1, c3, c5); `fused=False` turns the fused CPU
    kernels off while this path runs (c4). With `compiled`, the model runs under
    `torch.compile`. Returns `time_steps(n)` and the warm-up's seconds, which include the
    compilation, so the compile cost is reported, not hidden.
    """
    model = build_model(cfg, seed=0)
    model = (variant(model) if variant else model).to(device)
    optimizer = make_optimizer(cfg, model.parameters())
    step_model = torch.compile(model) if compiled else model
    shuffle = torch.Generator().manual_seed(0)

    def run(n: int) -> None:
        kernels.use = fused
        try:
            train_epoch(step_model, optimizer, train.head(n * cfg.batch_size), cfg, shuffle)
        finally:
            kernels.use = True

    time_steps = timer(device, run)
    return time_steps, time_steps(warmup)


def final_run(data_dir: Path, device: torch.device):
    """params.yaml, the report's final run and its data split, on the device."""
    allow_tf32(device)  # every path, as in `fit`
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg = resolve_run(params, "final")
    data = load_dataset(data_dir, val_size=cfg.val_size, split_seed=cfg.split_seed)
    return params, cfg, data


BASELINES = {
    "(a)": "(a) seed-style DataLoader loop",
    "(b)": "(b) plain eager, in-memory",
    "(c2)": "(c2) (c) with glibc's malloc defaults",
}


def baseline_process(conn, data_dir: Path, device_name: str, warmup: int) -> None:
    """(a), (b) and (c2), in a process of their own where glibc's malloc keeps its default
    settings, as in the notebook (`keep_freed_memory` holds for a whole process): each time the
    parent sends a number of steps, it times one round of them and sends the seconds back."""
    device = torch.device(device_name)
    _, cfg, data = final_run(data_dir, device)
    train = data.train.to(device)
    paths = {
        BASELINES["(a)"]: seed_style(cfg, data_dir, device, warmup),
        BASELINES["(b)"]: plain_eager(cfg, train.images, train.labels, device, warmup),
        BASELINES["(c2)"]: project_path(cfg, train, device, warmup)[0],
    }
    conn.send("ready")
    while (steps := conn.recv()) is not None:
        conn.send({name: time_steps(steps) for name, time_steps in paths.items()})


def time_in_rounds(
    paths: dict, baselines, peaks: dict[str, Callable[[], float]], steps: int, rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds of `steps` steps of each path and each precision's matmul peak, round after
    round; within a round the baseline process times its paths, then this one measures the
    peaks and times its own paths, one after the other, so a slow spell of a shared machine
    hits every path and the peak it is compared with rather than one of them."""
    seconds = {name: [] for name in [*BASELINES.values(), *paths]}
    peak_gflops = {precision: [] for precision in peaks}
    for _ in range(rounds):
        baselines.send(steps)
        for name, elapsed in baselines.recv().items():
            seconds[name].append(elapsed)
        for precision, measure in peaks.items():
            peak_gflops[precision].append(measure())
        for name, (time_steps, _precision) in paths.items():
            seconds[name].append(time_steps(steps))
    baselines.send(None)
    return seconds, peak_gflops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "fashion-mnist")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--peak-size",
        type=int,
        default=2048,
        help="n of the n x n products that measure the matmul peak (smaller: quicker, lower)",
    )
    parser.add_argument("--compile", action="store_true", help="also time (c) compiled")
    parser.add_argument(
        "--bf16", action="store_true", help="also time (c) with precision=bf16 (autocast)"
    )
    parser.add_argument("--grid", action="store_true", help="also time every run, whole")
    parser.add_argument("--epochs", type=int, help="with --grid: override the epochs")
    args = parser.parse_args()

    device = torch.device(args.device)
    params, cfg, data = final_run(args.data, device)
    train = data.train.to(device)
    steps_per_epoch = EPOCH_IMAGES / cfg.batch_size
    flops_per_step = 3 * forward_flops(cfg.model) * cfg.batch_size

    print(
        f"machine: {cpu_name()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    )
    precisions = {"fp32": torch.float32} | ({"bf16": torch.bfloat16} if args.bf16 else {})
    peaks = {}  # precision: a measurement of its peak on the faster library, for every round
    for precision, dtype in precisions.items():
        products = matmul_products(device, dtype, args.peak_size)
        by_library = {
            library: matmul_gflops(device, product, args.peak_size, rounds=5)
            for library, product in products.items()
        }
        fastest = products[max(by_library, key=by_library.get)]
        peaks[precision] = lambda product=fastest: matmul_gflops(
            device, product, args.peak_size, rounds=2
        )
        each = ", ".join(f"{library} {gflops:.1f}" for library, gflops in by_library.items())
        print(
            f"{precision} matmul peak (best of 5 x 4 {args.peak_size}x{args.peak_size} products): "
            f"{max(by_library.values()):.1f} GFLOP/s ({each})"
        )
    print(
        f"report model: {flops_per_step * steps_per_epoch / 1e12:.2f} TFLOP per epoch; "
        f"{args.rounds} rounds of {args.steps} timed steps of batch {cfg.batch_size} per path, "
        f"the paths taking turns; epoch = {steps_per_epoch:.1f} steps (extrapolated from the "
        "median round)"
    )

    spawn = multiprocessing.get_context("spawn")  # a fresh process: glibc's malloc defaults
    baselines, child_end = spawn.Pipe()
    child = spawn.Process(
        target=baseline_process, args=(child_end, args.data, args.device, args.warmup)
    )
    child.start()
    child_end.close()  # so that a failed child ends `recv` with EOFError instead of a hang
    try:
        baselines.recv()  # its paths are built and warmed up
    except EOFError:
        raise SystemExit("bench_speed: the baseline process failed (its error is above)") from None
    keep_freed_memory()  # as `fit` does, in this process only

    if device.type == "cpu":
        started = time.perf_counter()
        available = kernels.load() is not None
        print(
            f"fused CPU kernels: {'built or loaded' if available else 'unavailable'} in "
            f"{time.perf_counter() - started:.1f} s"
        )

    def project(variant=None, run_cfg=cfg, compiled=False, fused=True):
        time_steps, warmup_seconds = project_path(
            run_cfg, train, device, args.warmup, compiled=compiled, variant=variant, fused=fused
        )
        if compiled:
            print(f"compile + {args.warmup} warm-up steps took {warmup_seconds:.1f} s")
        return time_steps

    paths = {  # name: (time_steps, precision of the matrix multiplies)
        "(c) project path": (project(), "fp32"),
        "(c0) (c) with torch's nn.Dropout": (project(with_torch_dropout), "fp32"),
        "(c1) (c) in the notebook's layout": (project(notebook_layout), "fp32"),
        "(c3) (c) with torch's nn.Linear": (project(with_torch_linear), "fp32"),
        "(c4) (c) without the fused kernels": (project(fused=False), "fp32"),
        "(c5) (c) with the token MLP by layers": (project(with_token_layers), "fp32"),
    }
    if args.compile:
        paths["(d) (c) under torch.compile"] = (project(compiled=True), "fp32")
    if args.bf16:
        bf16 = replace(cfg, precision="bf16")
        paths["(e) (c) with bf16 autocast"] = (project(run_cfg=bf16), "bf16")
        if args.compile:
            paths["(f) (e) under torch.compile"] = (project(run_cfg=bf16, compiled=True), "bf16")
    seconds, round_peaks = time_in_rounds(paths, baselines, peaks, args.steps, args.rounds)
    child.join()
    precisions = {name: precision for name, (_, precision) in paths.items()}
    for precision, gflops in round_peaks.items():
        print(
            f"{precision} matmul peak in each round (best of 2 x 4, the faster library): "
            + ", ".join(f"{g:.1f}" for g in gflops)
            + " GFLOP/s; a row's % of peak is the median over rounds of its GFLOP/s over its "
            "round's peak"
        )

    def share_of_peak(name: str, precision: str) -> float:
        return statistics.median(
            flops_per_step * args.steps / s / 1e9 / peak
            for s, peak in zip(seconds[name], round_peaks[precision], strict=True)
        )

    order = [
        "(a)", "(b)", "(c)", "(c0)", "(c1)", "(c2)", "(c3)", "(c4)", "(c5)", "(d)", "(e)", "(f)"
    ]  # fmt: skip
    base = statistics.median(seconds[BASELINES["(a)"]])
    for name in sorted(seconds, key=lambda name: order.index(name.split()[0])):
        median = statistics.median(seconds[name])
        per_epoch = [s / args.steps * steps_per_epoch for s in seconds[name]]
        gflops = flops_per_step * args.steps / median / 1e9
        precision = precisions.get(name, "fp32")
        print(
            f"{name:38s} {statistics.median(per_epoch):6.1f} s/epoch "
            f"({min(per_epoch):.1f}-{max(per_epoch):.1f})  {gflops:6.1f} GFLOP/s "
            f"({share_of_peak(name, 'fp32'):5.1%} of fp32 peak"
            + (f", {share_of_peak(name, 'bf16'):5.1%} of bf16 peak" if precision == "bf16" else "")
            + f")  {base / median:4.2f}x vs (a)"
        )
    if args.grid:
        time_grid(params, data, device, args.epochs)


def time_grid(params: dict, data, device: torch.device, epochs: int | None) -> None:
    """Every run of params.yaml, trained whole by `stages.training.fit`, timed."""
    total = 0.0
    for run in params["runs"]:
        changes = dict(params["runs"][run] or {})
        if epochs is not None:
            changes["epochs"] = epochs
        cfg = resolve_run({**params, "runs": {run: changes}}, run)
        sync(device)
        start = time.perf_counter()
        _, summary = fit(
            cfg, data, seed=0, live_dir=None, checkpoint=None, device=device, label=run
        )
        sync(device)
        seconds = time.perf_counter() - start
        total += seconds
        accuracy = summary["final"]["test/accuracy"] if summary["final"] else float("nan")
        print(f"grid: {run:14s} {cfg.epochs} epochs in {seconds:7.1f} s, test acc {accuracy:.4f}")
    print(f"grid: all {len(params['runs'])} runs in {total:.1f} s")


if __name__ == "__main__":
    main()

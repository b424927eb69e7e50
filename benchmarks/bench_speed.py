"""Seconds per training epoch of the report's final model, path by path, in one paired run.

  (a)  seed-style: torchvision DataLoader + ToTensor, per-batch transfer, `.item()` every step,
       the plain model, as the report's notebook trained;
  (b)  the project's loop (`stages.training.train_epoch`: data on the device, no per-step
       sync) on the plain model: `cpu_kernels: off`;
  (c)  the project's path: (b) through `stages.fast.accelerate` (`cpu_kernels: auto`): the
       fused CPU kernels, the token MLP as one kernel where the CPU is fast at it, the stem
       inside it;
  (c1) (c) with the token MLP layer by layer on oneDNN (what (c) runs on an AVX2 CPU);
  (c2) (c) with the stem run before the token kernel instead of inside it;
  (m)  the modern Mixer (run `mixer`: gMLP blocks, bf16 autocast, batch 64) on the plain model;
  (m1) (m) through `accelerate`: the same model in token-major layout;
  with --bf16, (e) (b) under bf16 autocast (the notebook's fast path is fp32 only), and with
  --compile, (d) (b) under torch.compile.

Timing: every path warms up (`--warmup` steps), then `--rounds` rounds of `--steps` optimizer
steps, the paths taking turns in each round, so that a slow spell of a shared machine falls on
all of them; each row shows the median round (and the range), extrapolated to an epoch of
60,000 images. The last lines give each part of the fast path's gain as a ratio of two rows of
this one run.

    python benchmarks/bench_speed.py                       # CPU
    python benchmarks/bench_speed.py --device cuda --grid  # GPU: + every run of params.yaml

Needs torch, torchvision and pyyaml (and a C++ compiler for the fused kernels).
"""

import argparse
import itertools
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

from stages.config import resolve_run
from stages.data import load_dataset
from stages.fast import Options, accelerate
from stages.training import allow_tf32, build_model, fit, make_optimizer, train_epoch

REPO = Path(__file__).resolve().parents[1]
EPOCH_IMAGES = 60_000
ORDER = ["(a)", "(b)", "(c)", "(c1)", "(c2)", "(d)", "(e)", "(m)", "(m1)"]
GAINS = [  # what each part of the fast path gives: (faster row, slower row)
    ("the fast path as a whole", "(c)", "(b)"),
    ("the token MLP as one kernel", "(c)", "(c1)"),
    ("the stem inside the token kernel", "(c)", "(c2)"),
    ("the token-major gMLP", "(m1)", "(m)"),
]


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())  # fmt: skip
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{name}, {os.cpu_count()} logical CPUs, {isa}, AMX-BF16 {'amx_bf16' in info}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timer(device, run: Callable[[int], None], warmup: int) -> Callable[[int], float]:
    """`time_steps(n)`: the seconds `run(n)` takes, the device synchronised at both ends."""

    def time_steps(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        run(n)
        sync(device)
        return time.perf_counter() - start

    time_steps(warmup)
    return time_steps


def seed_style(cfg, root: Path, device, warmup: int) -> Callable[[int], float]:
    """(a): a DataLoader loop as the notebook trained."""
    dataset = datasets.FashionMNIST(str(root), train=True, transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=2, persistent_workers=True
    )
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch
    model = build_model(cfg, seed=0).to(device).train()
    optimizer = make_optimizer(cfg, model.parameters())
    running_loss = 0.0

    def run(n: int) -> None:
        nonlocal running_loss
        for _ in range(n):
            images, labels = next(batches)
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()

    return timer(device, run, warmup)


def project_loop(cfg, train, device, warmup: int, options: Options | None = None, compiled=False):
    """The project's `train_epoch`, each call on exactly n batches; `options` None: the plain
    model, else the model through `accelerate` with those options."""
    model = build_model(cfg, seed=0).to(device)
    net = model if options is None else accelerate(model, cfg, device, options)[0]
    net = torch.compile(net) if compiled else net
    optimizer = make_optimizer(cfg, model.parameters())
    shuffle = torch.Generator().manual_seed(0)

    def run(n: int) -> None:
        train_epoch(net, optimizer, train.head(n * cfg.batch_size), cfg, shuffle)

    return timer(device, run, warmup)


def final_run(data_dir: Path, device: torch.device):
    """params.yaml, the report's final run and its data split."""
    allow_tf32(device)  # every path, as in `fit`
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg = resolve_run(params, "final")
    return params, cfg, load_dataset(data_dir, val_size=cfg.val_size, split_seed=cfg.split_seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "fashion-mnist")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time (b) compiled")
    parser.add_argument("--bf16", action="store_true", help="also time (b) in bf16 autocast")
    parser.add_argument("--grid", action="store_true", help="also train every run, whole")
    parser.add_argument("--epochs", type=int, help="with --grid: override the epochs")
    args = parser.parse_args()

    device = torch.device(args.device)
    params, cfg, data = final_run(args.data, device)
    train = data.train.to(device)
    print(
        f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    )
    print(
        f"{args.rounds} rounds of {args.steps} timed steps per path (batch 256; the modern "
        "Mixer's 64), the paths taking turns; seconds per epoch of 60,000 images"
    )
    started = time.perf_counter()
    path = accelerate(build_model(cfg, seed=0).to(device), cfg, device)[1]
    print(f"(c) runs: {path} (ready in {time.perf_counter() - started:.1f} s)")
    paths = {
        "(a) seed-style DataLoader loop": seed_style(cfg, args.data, device, args.warmup),
        "(b) plain model (cpu_kernels: off)": project_loop(cfg, train, device, args.warmup),
    }
    if device.type == "cpu":
        fast = {
            "(c) project path (cpu_kernels: auto)": Options(),
            "(c1) (c) with the token MLP by layers": Options(token_kernel=False),
            "(c2) (c) with the stem before the kernel": Options(stem_in_kernel=False),
        }
        paths |= {name: project_loop(cfg, train, device, args.warmup, options)
                  for name, options in fast.items()}  # fmt: skip
    if args.compile:
        paths["(d) (b) under torch.compile"] = project_loop(
            cfg, train, device, args.warmup, compiled=True
        )
    if args.bf16:
        bf16 = replace(cfg, precision="bf16")
        paths["(e) (b) with bf16 autocast"] = project_loop(bf16, train, device, args.warmup)
    mixer = resolve_run(params, "mixer")
    batch = {name.split()[0]: cfg.batch_size for name in ORDER}
    if device.type == "cpu":
        batch["(m)"] = batch["(m1)"] = mixer.batch_size
        paths["(m) modern Mixer, plain model"] = project_loop(mixer, train, device, args.warmup)
        paths["(m1) (m) through accelerate"] = project_loop(
            mixer, train, device, args.warmup, Options()
        )

    seconds = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, time_steps in paths.items():
            seconds[name].append(time_steps(args.steps))

    per_epoch = {
        key: [s / args.steps * EPOCH_IMAGES / batch[key] for s in rounds]
        for key, rounds in ((name.split()[0], rounds) for name, rounds in seconds.items())
    }
    median = {key: statistics.median(values) for key, values in per_epoch.items()}
    for name in sorted(seconds, key=lambda name: ORDER.index(name.split()[0])):
        key = name.split()[0]
        low, high = min(per_epoch[key]), max(per_epoch[key])
        print(
            f"{name:44s} {median[key]:6.1f} s/epoch ({low:.1f}-{high:.1f})  "
            f"{median['(a)'] / median[key]:4.2f}x vs (a)"
        )
    for what, fast, slow in GAINS:
        if fast in median and slow in median:
            print(f"gain of {what}: {median[slow] / median[fast]:.2f}x ({slow} / {fast})")
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

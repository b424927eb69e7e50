"""Where a training step of a run spends its time, on the path `fit` takes: torch.profiler's table.

python benchmarks/profile_step.py [--device cuda] [--steps 10] [--precision bf16] [--run mixer]
"""

import argparse
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.profiler import ProfilerActivity, profile

from stages.config import resolve_run
from stages.fast import accelerate
from stages.training import autocast, build_model, make_optimizer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--run", default="final", help="a run of params.yaml")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: the run's")
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = resolve_run(yaml.safe_load((REPO / "params.yaml").read_text()), args.run)
    cfg = replace(cfg, precision=args.precision or cfg.precision)
    model = build_model(cfg, seed=0).to(device)
    net, path = accelerate(model, cfg, device)  # as `fit` does
    optimizer = make_optimizer(cfg, model.parameters())
    images = torch.rand(cfg.batch_size, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (cfg.batch_size,), device=device)

    def step() -> None:
        with autocast(cfg, device):
            logits = net(images)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(
        f"run {args.run}, {cfg.precision}, {path}: {args.steps} steps, batch {cfg.batch_size}, "
        f"{torch.get_num_threads()} threads"
    )
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()

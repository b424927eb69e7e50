"""The training loop: whole data set on the device, one checkpoint per epoch, dvclive curves.

Read `fit` top to bottom: seed, build, maybe resume, then per epoch train, evaluate, step the
scheduler on the validation split, log, checkpoint. The test set is evaluated every epoch for
the report's curves only; nothing in training looks at it.
"""

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from stages.augment import augment, augments, batch_mixer
from stages.config import RunConfig
from stages.data import Dataset, Split
from stages.fast import accelerate
from stages.files import atomic_write
from stages.model import MixerClassifier, init_weights
from stages.sources import code_digest

PROGRESS_EVERY = 25  # steps between progress-bar loss updates (each one syncs the device)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def allow_tf32(device: torch.device) -> None:
    """On a CUDA GPU, let fp32 matrix multiplies use TF32 tensor cores (CPU results unchanged)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def load_trained(model_file: Path) -> tuple[MixerClassifier, RunConfig]:
    """The model a `train` stage saved (model.pt: its config and weights), on the CPU."""
    saved = torch.load(model_file, map_location="cpu", weights_only=False)
    cfg = RunConfig.from_dict(saved["config"], str(model_file))
    model = MixerClassifier(cfg.model)
    model.load_state_dict(saved["state_dict"])
    return model, cfg


def build_model(cfg: RunConfig, seed: int) -> MixerClassifier:
    torch.manual_seed(seed)
    model = MixerClassifier(cfg.model)
    init_weights(model, cfg.init, cfg.init_std)
    return model


def make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    """Adam and AdamW run torch's fused kernel (one per parameter, on the CPU too), which gives
    the same updates as its loop over parameters to fp32 rounding, in less time."""
    if cfg.optimizer == "adamw":
        # Decoupled weight decay on the weight matrices only, not on biases and norm gains.
        params = list(params)
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "radam":
        return torch.optim.RAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear from 0 to 1 over the warm-up, then a cosine down to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """`plateau` steps once per epoch on a validation metric; `cosine` steps after every batch."""
    if cfg.scheduler == "none":
        return None
    if cfg.scheduler == "cosine":
        warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total)
        )
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=cfg.plateau_mode, factor=cfg.plateau_factor, patience=cfg.plateau_patience
    )


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 products run in hardware: on a GPU, or on a CPU where oneDNN has bf16
    instructions (AVX-512 or AMX); elsewhere they are emulated, far slower than fp32."""
    return device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def precision_warning(cfg: RunConfig, device: torch.device, label: str) -> str | None:
    """The one-line warning for `precision: bf16` where bf16 is emulated, else None."""
    if cfg.precision != "bf16" or bf16_is_native(device):
        return None
    return (
        f"warning: {label}: precision bf16 is emulated on a CPU without bf16 instructions, many "
        f"times slower than fp32; for speed: dvc exp run -S runs.<run>.precision=fp32"
    )


def autocast(cfg: RunConfig, device: torch.device) -> torch.autocast:
    """bf16 matrix multiplies where `precision: bf16` (tensor cores, or AMX on recent CPUs);
    weights, optimizer state and reductions stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


@torch.no_grad()
def predict(model: nn.Module, split: Split, cfg: RunConfig) -> torch.Tensor:
    """Logits for a whole split, in eval mode (dropout off, BatchNorm running statistics)."""
    model.eval()
    n = cfg.eval_batch_size
    with autocast(cfg, split.labels.device):
        return torch.cat(
            [model(split.images[i : i + n]).float() for i in range(0, len(split), n)]
        )


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy."""
    loss = nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy


def evaluate(model: nn.Module, split: Split, cfg: RunConfig) -> tuple[float, float]:
    return evaluate_logits(predict(model, split, cfg), split.labels)


@dataclass
class EpochResult:
    loss: float  # running mean over the epoch, model in training mode (as the report measured)
    accuracy: float


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    split: Split,
    cfg: RunConfig,
    shuffle: torch.Generator,
    step_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> EpochResult:
    """One pass over `split` in shuffled, augmented batches; `step_scheduler` (if any) steps
    after every batch. The running loss and accuracy stay on the device until the end, so the
    loop never waits for it (unless `on_step` reads the loss)."""
    model.train()
    device = split.labels.device
    order = torch.randperm(len(split), generator=shuffle).to(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    mix_batch = batch_mixer(cfg)
    for step, start in enumerate(range(0, len(split), cfg.batch_size)):
        idx = order[start : start + cfg.batch_size]
        images, labels = split.images[idx], split.labels[idx]
        if augments(cfg):
            images = augment(images, cfg)
        images, targets = mix_batch(images, labels)
        with autocast(cfg, device):
            logits = model(images)
        loss = nn.functional.cross_entropy(
            logits.float(), targets, label_smoothing=cfg.label_smoothing
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step_scheduler is not None:
            step_scheduler.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == labels).sum()
        if on_step is not None:
            on_step(step, loss)
    return EpochResult(loss_sum.item() / len(split), correct.item() / len(split))


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at `path` if it belongs to this very run (config, seed and code)."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("key") != key:
        print(f"ignoring checkpoint {path}: it belongs to another configuration or code version")
        return None
    return state


def _open_live(live_dir: Path, history: list[dict[str, float]]):
    """A fresh dvclive folder holding the curves of the epochs already done (on a resume)."""
    # Imported here so that this module imports without dvclive (the GPU benchmark machine has
    # torch but no dvclive).
    from dvclive import Live

    live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False)
    for record in history:
        _log_epoch(live, record)
    return live


def _log_epoch(live, record: dict[str, float]) -> None:
    live.step = record["epoch"]  # the curves' x axis is the epoch number, from 1
    for name, value in record.items():
        if name != "epoch":
            live.log_metric(name, value)
    live.next_step()


def fit(
    cfg: RunConfig,
    data: Dataset,
    *,
    seed: int,
    live_dir: Path | None,
    checkpoint: Path | None,
    device: torch.device,
    label: str = "train",
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one run; resume from `checkpoint` if it holds completed epochs of this same run.

    `live_dir=None` logs no dvclive curves and `checkpoint=None` keeps no checkpoint: the
    benchmark times the bare loop that way.
    """
    fit_started = time.perf_counter()
    allow_tf32(device)
    if warning := precision_warning(cfg, device, label):
        print(warning, file=sys.stderr)
    model = build_model(cfg, seed).to(device)
    net, cpu_kernels = accelerate(model, cfg, device)  # the same parameters, maybe a faster path
    optimizer = make_optimizer(cfg, model.parameters())
    steps = math.ceil(len(data.train) / cfg.batch_size)
    scheduler = make_scheduler(cfg, optimizer, steps)
    per_batch = scheduler if cfg.scheduler == "cosine" else None
    shuffle = torch.Generator().manual_seed(seed)
    train, val, test = (s.to(device) for s in (data.train, data.val, data.test))
    history: list[dict[str, float]] = []
    diverged_epoch = None

    key = {"config": cfg.to_dict(), "seed": seed, "code": code_digest("stages.train")}
    state = _load_checkpoint(checkpoint, key) if checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        shuffle.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
        history = state["history"]
        print(f"{label}: resuming after epoch {len(history)} from {checkpoint}")

    live = _open_live(live_dir, history) if live_dir is not None else None

    bar = tqdm(
        total=cfg.epochs * steps,
        initial=len(history) * steps,
        desc=label,
        disable=None,  # no bar when the output is not a terminal (CI logs); epoch lines remain
        mininterval=1.0,
    )
    setup_seconds, eval_seconds = time.perf_counter() - fit_started, []
    with bar:

        def progress(step: int, loss: torch.Tensor) -> None:
            bar.update(1)
            if step % PROGRESS_EVERY == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)

        for epoch in range(len(history) + 1, cfg.epochs + 1):
            bar.set_description(f"{label} epoch {epoch}/{cfg.epochs}")
            started = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            result = train_epoch(net, optimizer, train, cfg, shuffle, per_batch, progress)
            if not math.isfinite(result.loss):
                diverged_epoch = epoch
                print(
                    f"{label}: loss is {result.loss} in epoch {epoch}: the run diverged, stopping"
                )
                break
            train_time = time.perf_counter() - started
            val_loss, val_accuracy = evaluate(net, val, cfg)
            test_loss, test_accuracy = evaluate(net, test, cfg)
            eval_seconds.append(time.perf_counter() - started - train_time)
            if cfg.scheduler == "plateau":
                scheduler.step(val_accuracy if cfg.plateau_metric == "val_accuracy" else val_loss)
            record = {
                "epoch": epoch,
                "train/loss": result.loss,
                "train/accuracy": result.accuracy,
                "val/loss": val_loss,
                "val/accuracy": val_accuracy,
                "test/loss": test_loss,
                "test/accuracy": test_accuracy,
                "lr": lr,
                "epoch_seconds": train_time,
            }
            history.append(record)
            if live is not None:
                _log_epoch(live, record)
            tqdm.write(
                f"{label} epoch {epoch}: train loss {result.loss:.4f} acc {result.accuracy:.4f}"
                f" | val acc {val_accuracy:.4f} | test acc {test_accuracy:.4f}"
                f" | lr {lr:.2g} | {train_time:.1f} s"
            )
            if checkpoint is None:
                continue
            _save_checkpoint(
                checkpoint,
                {
                    "key": key,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "shuffle_rng": shuffle.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                    "history": history,
                },
            )
    if live is not None:
        live.end()

    summary = {
        "epochs_completed": len(history),
        "diverged": diverged_epoch is not None,
        "diverged_epoch": diverged_epoch,
        "final": history[-1] if history else None,
        "seconds_per_epoch": (
            sum(r["epoch_seconds"] for r in history) / len(history) if history else None
        ),
        # this process's start-up and per-epoch evaluation, for cost estimates (stages/cost.py)
        "setup_seconds": setup_seconds,
        "eval_seconds_per_epoch": sum(eval_seconds) / len(eval_seconds) if eval_seconds else None,
        "device": str(device),
        "cpu_kernels": cpu_kernels,  # the path that ran: its dropout masks are its own
        "history": history,
    }
    return model, summary

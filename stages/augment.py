"""Data augmentation on whole batches of image tensors, on the device that holds them.

Per-image transforms through a DataLoader would put the CPU back in the loop; these draw one
random number tensor per batch from torch's global generator, so a seeded run is repeatable
and a resumed run (which restores that generator) continues the same sequence.
"""

import math
from collections.abc import Callable

import torch
from torch.nn import functional
from torchvision.transforms import v2

from stages.config import NUM_CLASSES, RunConfig

ERASE_AREA = (0.02, 0.33)  # fraction of the image erased, as torchvision's RandomErasing
ERASE_ASPECT = (0.3, 3.3)  # height / width of the erased rectangle


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Shift each image by up to `padding` pixels each way, filling with zeros (background)."""
    b, _, h, w = images.shape
    padded = functional.pad(images, (padding, padding, padding, padding))
    device = images.device
    top = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=device)
    left = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=device)
    rows = top + torch.arange(h, device=device).view(1, h, 1)
    cols = left + torch.arange(w, device=device).view(1, 1, w)
    batch = torch.arange(b, device=device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, images.flip(-1), images)


def random_erasing(images: torch.Tensor, probability: float) -> torch.Tensor:
    """Zero one random rectangle in each image with the given probability.

    Area and aspect ratio are drawn as in torchvision's RandomErasing; where torchvision
    redraws a rectangle that does not fit, this clips it to the image.
    """
    b, _, h, w = images.shape
    device = images.device
    draws = torch.rand(5, b, device=device)
    area = h * w * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * draws[0])
    log_low, log_high = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    aspect = torch.exp(log_low + (log_high - log_low) * draws[1])
    height = torch.sqrt(area * aspect).round().clamp(1, h)
    width = torch.sqrt(area / aspect).round().clamp(1, w)
    top = (draws[2] * (h - height + 1)).floor()
    left = (draws[3] * (w - width + 1)).floor()
    erase = draws[4] < probability
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside = (
        (rows >= top.view(b, 1, 1))
        & (rows < (top + height).view(b, 1, 1))
        & (cols >= left.view(b, 1, 1))
        & (cols < (left + width).view(b, 1, 1))
        & erase.view(b, 1, 1)
    )
    return images.masked_fill(inside.unsqueeze(1), 0.0)


def augment(images: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """The augmentations `cfg` switches on, in the usual order: crop, flip, erase."""
    if cfg.crop_padding:
        images = random_crop(images, cfg.crop_padding)
    if cfg.hflip:
        images = random_flip(images)
    if cfg.random_erasing:
        images = random_erasing(images, cfg.random_erasing)
    return images


def augments(cfg: RunConfig) -> bool:
    return bool(cfg.crop_padding or cfg.hflip or cfg.random_erasing)


def batch_mixer(
    cfg: RunConfig,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """`mix(images, labels)`: MixUp and/or CutMix (torchvision's; one chosen per batch when both
    are on) returning soft targets of shape (batch, classes); with neither, the batch and its
    class indices as given. Built once per epoch, called on every batch.

    torchvision draws one weight per batch and pairs each image with its neighbour in the batch,
    from torch's global generator, so a seeded run stays repeatable.
    """
    mixers = []
    if cfg.mixup_alpha:
        mixers.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=NUM_CLASSES))
    if cfg.cutmix_alpha:
        mixers.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=NUM_CLASSES))
    if not mixers:
        return lambda images, labels: (images, labels)
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

"""On-device augmentation: each transform's geometry, probabilities and repeatability."""

import copy
from pathlib import Path

import pytest
import torch
import yaml

from stages.augment import augment, augments, random_crop, random_erasing, random_flip
from stages.config import resolve_run

REPO = Path(__file__).resolve().parents[1]


def numbered(b: int = 64, h: int = 28, w: int = 28) -> torch.Tensor:
    """Images whose pixels are all distinct and non-zero, so moves and erasures show."""
    return (torch.arange(b * h * w, dtype=torch.float32) + 1).reshape(b, 1, h, w)


def test_random_crop_is_a_shift_with_zero_fill():
    torch.manual_seed(0)
    images = numbered()
    out = random_crop(images, padding=2)
    assert out.shape == images.shape
    shifts = set()
    for original, cropped in zip(images[:, 0], out[:, 0], strict=True):
        found = None
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                padded = torch.nn.functional.pad(original, (2, 2, 2, 2))
                window = padded[2 + dy : 2 + dy + 28, 2 + dx : 2 + dx + 28]
                if torch.equal(window, cropped):
                    found = (dy, dx)
        assert found is not None  # every output is the image shifted by at most 2 pixels
        shifts.add(found)
    assert len(shifts) > 10  # and the shifts vary across the batch (25 possible)


def test_random_flip_mirrors_about_half():
    torch.manual_seed(0)
    images = numbered(b=400)
    out = random_flip(images)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each one or the other
    assert 150 < sum(flipped) < 250


@pytest.mark.parametrize("probability", [0.0, 0.5, 1.0])
def test_random_erasing_zeroes_one_rectangle_with_the_given_probability(probability):
    torch.manual_seed(0)
    images = numbered(b=400)
    out = random_erasing(images, probability)
    erased = 0
    for original, result in zip(images[:, 0], out[:, 0], strict=True):
        zero = result == 0
        assert torch.equal(result[~zero], original[~zero])  # untouched outside the rectangle
        if zero.any():
            erased += 1
            rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
            box = zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all()  # the zeros form one solid rectangle
            area = box.numel() / original.numel()
            assert 0.01 <= area <= 0.4, area
    assert abs(erased / 400 - probability) < 0.08


def config(**changes):
    params = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    params.update(changes)
    return resolve_run(params, "final")


def test_augment_is_off_by_default_and_repeatable_under_a_seed():
    assert not augments(config())
    cfg = config(crop_padding=2, hflip=True, random_erasing=0.5)
    assert augments(cfg)
    images = numbered(b=32)
    torch.manual_seed(7)
    first = augment(images, cfg)
    torch.manual_seed(7)
    second = augment(images, cfg)
    torch.manual_seed(8)
    third = augment(images, cfg)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)
    assert not torch.equal(first, images)

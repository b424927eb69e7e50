"""On-device augmentation: each transform's geometry, probabilities and repeatability."""

import copy
from pathlib import Path

import pytest
import torch
import yaml

from stages.augment import (
    augment,
    augments,
    batch_mixer,
    random_crop,
    random_erasing,
    random_flip,
)
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


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, 10).float()


def test_batch_mixer_is_off_by_default():
    images, labels = numbered(b=8), torch.arange(8)
    out, targets = batch_mixer(config())(images, labels)
    assert out is images and targets is labels  # class indices, untouched


def test_mixup_blends_each_image_with_its_neighbour_and_the_targets_alike():
    torch.manual_seed(0)
    images, labels = numbered(b=16), torch.arange(16) % 10
    out, targets = batch_mixer(config(mixup_alpha=0.4))(images, labels)
    neighbour = images.roll(1, 0)
    lam = ((out - neighbour) / (images - neighbour))[0, 0, 0, 0]  # one weight for the batch
    assert 0.0 < lam < 1.0
    assert torch.allclose(out, lam * images + (1 - lam) * neighbour, rtol=1e-4)
    expected = lam * one_hot(labels) + (1 - lam) * one_hot(labels.roll(1, 0))
    assert torch.allclose(targets, expected, atol=1e-5)


def test_cutmix_pastes_one_rectangle_and_weights_the_targets_by_its_area():
    torch.manual_seed(3)
    images, labels = numbered(b=16), torch.arange(16) % 10
    out, targets = batch_mixer(config(cutmix_alpha=1.0))(images, labels)
    pasted = out != images  # every pixel differs from its neighbour's in `numbered`
    assert torch.equal(out[pasted], images.roll(1, 0)[pasted])
    rows, cols = pasted[0, 0].any(1).nonzero(), pasted[0, 0].any(0).nonzero()
    box = pasted[0, 0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all() and 0 < pasted[0, 0].sum() < 28 * 28  # one whole rectangle
    assert torch.equal(pasted, pasted[:1].expand_as(pasted))  # the same box for the batch
    kept = 1 - pasted[0, 0].float().mean()
    expected = kept * one_hot(labels) + (1 - kept) * one_hot(labels.roll(1, 0))
    assert torch.allclose(targets, expected, atol=1e-6)


def test_batch_mixer_is_repeatable_under_a_seed_and_picks_either_mixer_when_both_are_on():
    mix_batch = batch_mixer(config(mixup_alpha=0.4, cutmix_alpha=1.0))
    images, labels = numbered(b=8), torch.arange(8)
    kinds = set()
    for seed in range(12):
        torch.manual_seed(seed)
        first = mix_batch(images, labels)
        torch.manual_seed(seed)
        second = mix_batch(images, labels)
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
        changed = first[0] != images
        pasted = torch.equal(first[0][changed], images.roll(1, 0)[changed])
        kinds.add("cutmix" if pasted else "mixup")
    assert kinds == {"cutmix", "mixup"}

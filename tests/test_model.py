"""The plain model (stages/model.py), its initialisation, optimizers and schedulers, on tiny
random tensors only. tests/test_fast.py holds the fast path to this model."""

import copy
import dataclasses
import itertools
import math

import pytest
import torch
from run_configs import config, repo_params
from torch import nn

from stages.config import resolve_run
from stages.errors import UserError
from stages.model import (
    MixerClassifier,
    count_parameters,
    forward_flops,
    patchify,
    spatial_shift,
)
from stages.training import autocast, build_model, make_optimizer, make_scheduler


@pytest.fixture(scope="module")
def params() -> dict:
    return repo_params()


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in linears(model)]


def batchnorm_sizes(model: nn.Module) -> list[int]:
    return [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm1d)]


def counted_flops(model: nn.Module, images: torch.Tensor) -> int:
    """Multiply-adds x 2 of every Linear actually run, per image, measured with hooks."""
    total = 0

    def hook(module, inputs, _output):
        nonlocal total
        rows = inputs[0].numel() // module.in_features
        total += rows * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in linears(model)]
    try:
        model.eval()
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return 2 * total // images.shape[0]


# ---------------------------------------------------------------- patchify


def notebook_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(batch, patches, pixels) cut out one patch at a time, row-major, as the notebook did."""
    grid = 28 // patch_size
    crops = [
        images[:, 0, r * patch_size : (r + 1) * patch_size, c * patch_size : (c + 1) * patch_size]
        for r in range(grid)
        for c in range(grid)
    ]
    return torch.stack([crop.reshape(len(images), -1) for crop in crops], dim=1)


def test_patchify_shape_and_row_major_patches():
    images = torch.randn(2, 1, 28, 28)
    patches = patchify(images, 4)
    assert patches.shape == (2, 49, 16)  # (batch, patches, pixels)
    for b in range(2):
        for k in (0, 1, 6, 7, 8, 20, 42, 48):
            row, col = divmod(k, 7)
            crop = images[b, 0, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]
            assert torch.equal(patches[b, k], crop.reshape(16)), (b, k)
    assert torch.equal(patches, notebook_patches(images, 4))


def test_patchify_other_patch_size_keeps_every_pixel_once():
    images = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    patches = patchify(images, 7)
    assert patches.shape == (2, 16, 49)
    # patch 5 of image 1: grid row 1, column 1
    assert torch.equal(patches[1, 5], images[1, 0, 7:14, 7:14].reshape(49))
    assert torch.equal(patches.flatten().sort().values, images.flatten().sort().values)


# ---------------------------------------------------------------- the report's model

REPORT_LINEARS = [(16, 300), (49, 80), (80, 60), (300, 200), (200, 60), (60, 10)]


def test_report_preset_parameters_and_output(params):
    cfg = config(params)
    assert cfg.model.blocks == 1
    model = MixerClassifier(cfg.model)
    # stem 16*300+300, token 49*80+80 + 80*60+60, BN(300), channel 300*200+200 + 200*60+60,
    # BN(60), classifier 60*10+10
    assert count_parameters(model) == 87_550
    assert count_parameters(model) == (5100 + 4000 + 4860 + 2 * 300 + 60200 + 12060 + 2 * 60 + 610)
    model.eval()
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_report_preset_layer_shapes(params):
    model = MixerClassifier(config(params).model)
    assert linear_shapes(model) == REPORT_LINEARS
    stem = model.stem
    assert isinstance(stem[0], nn.Linear) and (stem[0].in_features, stem[0].out_features) == (
        16,
        300,
    )
    assert sum(isinstance(m, nn.Linear) for m in stem.modules()) == 1
    assert isinstance(stem[1], nn.ReLU)
    block = model.blocks[0]
    assert linear_shapes(block.token_mixing) == [(49, 80), (80, 60)]
    assert linear_shapes(block.channel_mixing) == [(300, 200), (200, 60)]
    assert isinstance(block.token_norm, nn.BatchNorm1d) and block.token_norm.num_features == 300
    assert isinstance(block.channel_norm, nn.BatchNorm1d)
    assert block.channel_norm.num_features == 60
    assert batchnorm_sizes(model) == [300, 60]
    assert (model.classifier.in_features, model.classifier.out_features) == (60, 10)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in dropouts] == [0.1]


def test_report_preset_flops(params):
    cfg = config(params)
    # per image: stem 49*16*300, token 300*(49*80 + 80*60), channel 60*(300*200 + 200*60), 60*10
    macs = 49 * 16 * 300 + 300 * (49 * 80 + 80 * 60) + 60 * (300 * 200 + 200 * 60) + 60 * 10
    assert macs == 7_171_800
    assert forward_flops(cfg.model) == 2 * macs
    assert forward_flops(cfg.model) == pytest.approx(2 * 7.17e6, rel=2e-3)
    model = MixerClassifier(cfg.model)
    assert counted_flops(model, torch.rand(2, 1, 28, 28)) == forward_flops(cfg.model)


# ---------------------------------------------------------------- more blocks

# Each later block: tokens 60 -> 80 -> 60, features 60 -> 200 -> 60, BatchNorm(60) twice.
LATER_BLOCK = (60 * 80 + 80) + (80 * 60 + 60) + 2 * 60 + (60 * 200 + 200) + (200 * 60 + 60) + 2 * 60


@pytest.mark.parametrize(("run", "blocks"), [("blocks-2", 2), ("blocks-3", 3)])
def test_later_blocks_follow_the_documented_rule(params, run, blocks):
    cfg = config(params, run)
    assert cfg.model.blocks == blocks
    model = MixerClassifier(cfg.model)
    assert LATER_BLOCK == 34_240
    assert count_parameters(model) == 87_550 + (blocks - 1) * LATER_BLOCK
    assert count_parameters(model) == {2: 121_790, 3: 156_030}[blocks]
    assert len(model.blocks) == blocks
    for block in model.blocks[1:]:
        assert linear_shapes(block.token_mixing) == [(60, 80), (80, 60)]
        assert linear_shapes(block.channel_mixing) == [(60, 200), (200, 60)]
        assert block.token_norm.num_features == 60
        assert block.channel_norm.num_features == 60
    assert model.classifier.in_features == 60
    model.eval()
    x = torch.rand(2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    # each later block adds 60*(60*80 + 80*60) + 60*(60*200 + 200*60) multiply-adds
    later_macs = 60 * (60 * 80 + 80 * 60) + 60 * (60 * 200 + 200 * 60)
    assert forward_flops(cfg.model) == 2 * (7_171_800 + (blocks - 1) * later_macs)
    assert counted_flops(model, x) == forward_flops(cfg.model)


def test_per_block_widths_are_honoured(params):
    cfg = config(
        params,
        blocks=2,
        preset={"token_mlp": [[32, 20], [16, 10]], "channel_mlp": [[100, 50], [40, 30]]},
    )
    assert cfg.model.token_mlp == ((32, 20), (16, 10))
    assert cfg.model.channel_mlp == ((100, 50), (40, 30))
    model = MixerClassifier(cfg.model)
    first, second = model.blocks
    assert linear_shapes(first.token_mixing) == [(49, 32), (32, 20)]
    assert linear_shapes(first.channel_mixing) == [(300, 100), (100, 50)]
    assert linear_shapes(second.token_mixing) == [(20, 16), (16, 10)]
    assert linear_shapes(second.channel_mixing) == [(50, 40), (40, 30)]
    # token norm over the incoming features, channel norm over the outgoing token rows
    assert batchnorm_sizes(model) == [300, 20, 50, 10]
    assert (model.classifier.in_features, model.classifier.out_features) == (10, 10)
    expected = (
        (16 * 300 + 300)
        + (49 * 32 + 32) + (32 * 20 + 20) + 2 * 300 + (300 * 100 + 100) + (100 * 50 + 50) + 2 * 20
        + (20 * 16 + 16) + (16 * 10 + 10) + 2 * 50 + (50 * 40 + 40) + (40 * 30 + 30) + 2 * 10
        + (10 * 10 + 10)
    )  # fmt: skip
    assert count_parameters(model) == expected
    model.eval()
    x = torch.rand(4, 1, 28, 28)
    assert model(x).shape == (4, 10)
    assert model.blocks(model.stem(patchify(x, 4))).shape == (4, 10, 30)  # (batch, tokens, ch)
    assert counted_flops(model, x) == forward_flops(cfg.model)


def test_token_widths_per_block_with_shared_channel_widths(params):
    cfg = config(params, blocks=2, preset={"token_mlp": [[32, 20], [16, 10]]})
    model = MixerClassifier(cfg.model)
    assert linear_shapes(model.blocks[1].token_mixing) == [(20, 16), (16, 10)]
    assert linear_shapes(model.blocks[1].channel_mixing) == [(60, 200), (200, 60)]
    assert model.classifier.in_features == 10
    model.eval()
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


# ---------------------------------------------------------------- the specification


def linear_on(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return nn.functional.linear(x, layer.weight, layer.bias)


def test_notebook_blocks_compute_the_specification(params):
    """O1 = g(X^T W1) W2 with BatchNorm over the features, transpose back, dropout (off here),
    O2 = g(O1 W3) W4 with BatchNorm over the token rows, mean feature per token row: written
    out with functional ops, two blocks whose widths change."""
    cfg = config(params, blocks=2, preset={"token_mlp": [[32, 20], [16, 10]], "dropout": 0.0})
    torch.manual_seed(0)
    model = MixerClassifier(cfg.model).double().train()
    images = torch.rand(8, 1, 28, 28, dtype=torch.float64)
    x = torch.relu(linear_on(notebook_patches(images, 4), model.stem[0]))
    for block in model.blocks:
        w1, _, w2 = block.token_mixing
        w3, _, w4 = block.channel_mixing
        o1 = linear_on(torch.relu(linear_on(x.transpose(1, 2), w1)), w2)  # (batch, ch, tokens')
        o1 = nn.functional.batch_norm(
            o1, None, None, block.token_norm.weight, block.token_norm.bias, training=True
        ).transpose(1, 2)
        o2 = linear_on(torch.relu(linear_on(o1, w3)), w4)  # (batch, tokens', channels')
        x = nn.functional.batch_norm(
            o2, None, None, block.channel_norm.weight, block.channel_norm.bias, training=True
        )
    expected = model.classifier(x.mean(dim=2))
    assert torch.allclose(model(images), expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- architecture options


def test_mlp_stem(params):
    model = MixerClassifier(config(params, preset={"stem_hidden": 64}).model)
    stem_linears = [m for m in model.stem.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in stem_linears] == [(16, 64), (64, 300)]
    model.eval()
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    cfg = config(params, preset={"stem_hidden": 64}).model
    assert counted_flops(model, torch.rand(2, 1, 28, 28)) == forward_flops(cfg)


def test_norm_none_has_no_batchnorm(params):
    model = MixerClassifier(config(params, preset={"norm": "none"}).model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert count_parameters(model) == 87_550 - 2 * 300 - 2 * 60
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_gelu_activation(params):
    model = MixerClassifier(config(params, preset={"activation": "gelu"}).model)
    kinds = {type(m) for m in model.modules()}
    assert nn.GELU in kinds
    assert nn.ReLU not in kinds
    relu_model = MixerClassifier(config(params).model)
    assert nn.GELU not in {type(m) for m in relu_model.modules()}


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5])
def test_dropout_value_honoured(params, p):
    model = MixerClassifier(config(params, "blocks-2", preset={"dropout": p}).model)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 2
    assert all(d.p == p for d in dropouts)



# ---------------------------------------------------------------- initialisation


def test_xavier_uniform_init(params):
    model = build_model(config(params, init="xavier_uniform"), seed=0)
    for layer in linears(model):
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = layer.weight.detach()
        assert w.abs().max().item() <= bound + 1e-7
        assert w.var().item() == pytest.approx(2 / (fan_in + fan_out), rel=0.2), layer
        assert torch.count_nonzero(layer.bias) == 0
    big = model.blocks[0].channel_mixing[0]  # 300 -> 200
    assert big.weight.var().item() == pytest.approx(2 / 500, rel=0.05)
    assert big.weight.abs().max().item() > 0.95 * math.sqrt(6 / 500)


@pytest.mark.parametrize("std", [1.0, 0.02])
def test_normal_init(params, std):
    model = build_model(config(params, init="normal", init_std=std), seed=0)
    big = model.blocks[0].channel_mixing[0]
    assert big.weight.shape == (200, 300)
    assert big.weight.std().item() == pytest.approx(std, rel=0.1)
    assert big.weight.mean().item() == pytest.approx(0.0, abs=0.05 * std)
    for layer in linears(model):
        assert layer.weight.std().item() == pytest.approx(std, rel=0.25), layer
        assert torch.count_nonzero(layer.bias) == 0


def test_kaiming_uniform_init(params):
    model = build_model(config(params, init="kaiming_uniform"), seed=0)
    for layer in linears(model):
        fan_in = layer.in_features
        bound = math.sqrt(6 / fan_in)
        w = layer.weight.detach()
        assert w.abs().max().item() <= bound + 1e-7
        assert w.var().item() == pytest.approx(2 / fan_in, rel=0.2), layer
        assert torch.count_nonzero(layer.bias) == 0
    big = model.blocks[0].channel_mixing[0]
    assert big.weight.abs().max().item() > 0.95 * math.sqrt(6 / 300)


def test_default_init_keeps_pytorch_biases(params):
    model = build_model(config(params, init="default"), seed=0)
    for layer in linears(model):
        bound = 1 / math.sqrt(layer.in_features)  # PyTorch's default for Linear
        assert torch.count_nonzero(layer.bias) > 0, layer
        assert layer.bias.abs().max().item() <= bound + 1e-7
        assert layer.weight.abs().max().item() <= bound + 1e-7


@pytest.mark.parametrize("init", ["xavier_uniform", "normal", "kaiming_uniform", "default"])
def test_seed_fixes_the_weights(params, init):
    cfg = config(params, init=init)
    a = build_model(cfg, seed=3).state_dict()
    b = build_model(cfg, seed=3).state_dict()
    c = build_model(cfg, seed=4).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if k.endswith("weight") and a[k].dim() == 2]
    assert len(weights) == 6
    assert all(not torch.equal(a[k], c[k]) for k in weights)


# ---------------------------------------------------------------- optimizer and scheduler


@pytest.mark.parametrize(
    ("name", "kind", "lr", "momentum", "weight_decay"),
    [
        ("adam", torch.optim.Adam, 0.01, 0.0, 0.0),
        ("adam", torch.optim.Adam, 0.001, 0.0, 1e-4),
        ("radam", torch.optim.RAdam, 0.003, 0.0, 5e-4),
        ("sgd", torch.optim.SGD, 0.05, 0.9, 5e-4),
        ("sgd", torch.optim.SGD, 0.1, 0.0, 0.0),
    ],
)
def test_make_optimizer(params, name, kind, lr, momentum, weight_decay):
    cfg = config(params, optimizer=name, lr=lr, momentum=momentum, weight_decay=weight_decay)
    model = MixerClassifier(cfg.model)
    opt = make_optimizer(cfg, model.parameters())
    assert type(opt) is kind
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["lr"] == lr
    assert group["weight_decay"] == weight_decay
    assert not group.get("decoupled_weight_decay", False)  # Adam/RAdam, not AdamW-style
    assert bool(group.get("fused")) == (name == "adam")  # torch's fused kernel, CPU included
    if name == "sgd":
        assert group["momentum"] == momentum
        assert group["nesterov"] is False
    assert sum(p.numel() for p in group["params"]) == 87_550


@pytest.mark.parametrize(
    ("mode", "factor", "patience"), [("min", 0.1, 10), ("max", 0.5, 3), ("min", 0.2, 0)]
)
def test_make_scheduler_plateau(params, mode, factor, patience):
    cfg = config(params, plateau_mode=mode, plateau_factor=factor, plateau_patience=patience)
    opt = make_optimizer(cfg, MixerClassifier(cfg.model).parameters())
    sched = make_scheduler(cfg, opt, steps_per_epoch=10)
    assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert sched.mode == mode
    assert sched.factor == factor
    assert sched.patience == patience
    assert sched.optimizer is opt


def test_make_scheduler_none(params):
    cfg = config(params, scheduler="none")
    opt = make_optimizer(cfg, MixerClassifier(cfg.model).parameters())
    assert make_scheduler(cfg, opt, steps_per_epoch=10) is None


def test_plateau_min_on_rising_accuracy_is_a_step_decay(params):
    """The report's quirk: mode 'min' fed a rising accuracy cuts lr by 10x every 11 epochs."""
    cfg = config(params)
    assert (cfg.lr, cfg.plateau_mode, cfg.plateau_factor, cfg.plateau_patience) == (
        0.01, "min", 0.1, 10
    )  # fmt: skip
    opt = make_optimizer(cfg, MixerClassifier(cfg.model).parameters())
    sched = make_scheduler(cfg, opt, steps_per_epoch=10)
    lrs = []
    for epoch in range(12):
        sched.step(0.5 + 0.01 * epoch)  # accuracy keeps rising
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:11] == [0.01] * 11  # patience + 1 = 11 steps without a cut
    assert lrs[11] == pytest.approx(0.001, rel=1e-12)
    cuts = sum(1 for a, b in itertools.pairwise(lrs) if b < a)
    assert cuts == 1
    for epoch in range(12, 23):
        sched.step(0.5 + 0.01 * epoch)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0001, rel=1e-12)  # next cut 11 later


def test_plateau_max_on_rising_accuracy_never_cuts(params):
    cfg = config(params, plateau_mode="max")
    opt = make_optimizer(cfg, MixerClassifier(cfg.model).parameters())
    sched = make_scheduler(cfg, opt, steps_per_epoch=10)
    for epoch in range(30):
        sched.step(0.5 + 0.01 * epoch)
    assert opt.param_groups[0]["lr"] == 0.01


# ---------------------------------------------------------------- one training step


@pytest.mark.parametrize("optimizer", ["adam", "radam", "sgd"])
def test_one_training_step(params, optimizer):
    cfg = config(params, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0)
    model = build_model(cfg, seed=0)
    model.train()
    opt = make_optimizer(cfg, model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(8, 1, 28, 28, generator=gen)
    labels = torch.randint(0, 10, (8,), generator=gen)
    loss = nn.functional.cross_entropy(model(images), labels)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    for name, _ in model.named_parameters():
        assert name in changed, name
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(images)).all()


# ---------------------------------------------------------------- the residual blocks


def mixer_config(params: dict, blocks: int = 3, **preset):
    """The mixer run with MLP-Mixer's block instead of the preset's gMLP block."""
    p = copy.deepcopy(params)
    p["models"]["mixer"].update(block="mixer", token_mlp=[96, 49], channel_mlp=[256, 128])
    p["models"]["mixer"].update(preset)
    p["runs"]["mixer"] = dict(p["runs"]["mixer"], blocks=blocks)
    return resolve_run(p, "mixer")


def test_mlp_mixer_shapes_parameters_and_flops(params):
    cfg = mixer_config(params)
    model = MixerClassifier(cfg.model)
    assert [type(b).__name__ for b in model.blocks] == ["MixerBlock"] * 3
    block = model.blocks[0]
    assert isinstance(block.token_norm, nn.LayerNorm)
    assert block.token_norm.normalized_shape == (128,)
    assert linear_shapes(model.stem) == [(16, 64), (64, 128)]
    assert linear_shapes(block.token_mixing) == [(49, 96), (96, 49)]
    assert linear_shapes(block.channel_mixing) == [(128, 256), (256, 128)]
    assert isinstance(model.head_norm, nn.LayerNorm)
    assert model.classifier.in_features == 128  # mean over the patches, not the features
    # stem 16 -> 64 -> 128; per block 2 LayerNorms + token MLP + channel MLP; head norm; classifier
    stem = 16 * 64 + 64 + 64 * 128 + 128
    per_block = 2 * 256 + (49 * 96 + 96 + 96 * 49 + 49) + (128 * 256 + 256 + 256 * 128 + 128)
    assert count_parameters(model) == stem + 3 * per_block + 256 + 128 * 10 + 10 == 238_909
    images = torch.rand(4, 1, 28, 28)
    assert model(images).shape == (4, 10)
    assert forward_flops(cfg.model) == counted_flops(model, images)
    report = resolve_run(params, "final")
    assert forward_flops(cfg.model) <= 2 * forward_flops(report.model)  # the cost cap


def test_mlp_mixer_block_is_residual_in_both_mixings(params):
    """With both MLPs' output layers zeroed, a block must be the identity."""
    cfg = mixer_config(params, blocks=1)
    block = MixerClassifier(cfg.model).blocks[0].eval()
    x = torch.randn(2, 49, 128)  # (batch, tokens, channels)
    for mixing in (block.token_mixing, block.channel_mixing):
        nn.init.zeros_(mixing[2].weight)
        nn.init.zeros_(mixing[2].bias)
    assert torch.equal(block(x), x)
    nn.init.normal_(block.token_mixing[2].weight)  # token branch only: mixes across patches
    y = block(x)
    x2 = x.clone()
    x2[:, 0] += torch.linspace(0.0, 1.0, 128)  # change patch 0 only (not by a constant, which
    # the LayerNorm over its channels would remove)
    assert not torch.allclose(block(x2)[:, 1], y[:, 1])  # patch 1 feels it


def test_mlp_mixer_computes_the_papers_equations(params):
    """MixerClassifier with MLP-Mixer's blocks, written out with functional ops."""
    cfg = mixer_config(params, blocks=2)
    torch.manual_seed(0)
    model = MixerClassifier(cfg.model).double().eval()
    images = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    x = model.stem(notebook_patches(images, 4))
    for block in model.blocks:
        first, gelu, second = block.token_mixing
        hidden = gelu(linear_on(block.token_norm(x).transpose(1, 2), first))
        x = x + linear_on(hidden, second).transpose(1, 2)
        x = x + block.channel_mixing(block.channel_norm(x))
    expected = model.classifier(model.head_norm(x).mean(dim=1))
    assert torch.allclose(model(images), expected, rtol=1e-10, atol=1e-12)


def gmlp_config(params: dict, blocks: int = 3, hidden: int = 416):
    return mixer_config(
        params, blocks=blocks, block="gmlp", token_mlp=[49, 49], channel_mlp=[hidden, 128]
    )


def test_gmlp_preset_shapes_parameters_and_flops(params):
    """The preset's gMLP blocks: hidden 416 costs MLP-Mixer's FLOPs."""
    cfg = resolve_run(params, "mixer")
    assert cfg.model == gmlp_config(params).model
    model = build_model(cfg, seed=0)
    assert [type(b).__name__ for b in model.blocks] == ["GMLPBlock"] * 3
    block = model.blocks[0]
    assert linear_shapes(block) == [(128, 416), (49, 49), (208, 128)]
    stem = 16 * 64 + 64 + 64 * 128 + 128
    per_block = 256 + (128 * 416 + 416) + 2 * 208 + (49 * 49 + 49) + (208 * 128 + 128)
    assert count_parameters(model) == stem + 3 * per_block + 256 + 128 * 10 + 10 == 261_568
    images = torch.rand(4, 1, 28, 28)
    assert forward_flops(cfg.model) == counted_flops(model, images)
    mixer = forward_flops(mixer_config(params).model)
    assert forward_flops(cfg.model) <= mixer <= 1.001 * forward_flops(cfg.model)  # equal cost
    report = resolve_run(params, "final")
    assert forward_flops(cfg.model) <= 2 * forward_flops(report.model)  # the cost cap


def test_gmlp_starts_with_identity_gates_and_computes_gmlp(params):
    """The gate starts near 1 (gMLP's initialisation), and the block equals gMLP written out
    with functional ops once its gate weights are not small."""
    cfg = gmlp_config(params, blocks=2, hidden=64)
    model = build_model(cfg, seed=0).double().eval()
    gate = model.blocks[0].gate
    assert torch.equal(gate.token_mixing.bias, torch.ones(49, dtype=torch.float64))
    assert gate.token_mixing.weight.abs().max() <= 1e-3
    x = torch.randn(3, 49, 64, dtype=torch.float64)
    assert torch.allclose(gate(x), x[..., :32], rtol=0.1, atol=0.1)  # value x (1 + small)
    for block in model.blocks:
        nn.init.normal_(block.gate.token_mixing.weight, std=0.3)
    images = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    x = model.stem(notebook_patches(images, 4))  # (batch, tokens, channels)
    for block in model.blocks:
        value, gate_half = block.activation(block.channel_in(block.norm(x))).chunk(2, dim=-1)
        mixed = linear_on(block.gate.norm(gate_half).transpose(1, 2), block.gate.token_mixing)
        x = x + block.channel_out(value * mixed.transpose(1, 2))
    expected = model.classifier(model.head_norm(x).mean(dim=1))
    assert torch.allclose(model(images), expected, rtol=1e-10, atol=1e-12)
    x2 = images.clone()
    x2[:, :, :4, :4] += 0.5  # patch 0 only: through the gate, every patch feels it
    first = model.blocks[0]
    changed, unchanged = (first(model.stem(patchify(i, 4)))[:, 1] for i in (x2, images))
    assert not torch.allclose(changed, unchanged)
    nn.functional.cross_entropy(model.train()(images), torch.arange(4)).backward()
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())  # every layer learns


def test_gmlp_block_needs_a_token_by_token_gate_and_an_even_hidden_width(params):
    with pytest.raises(UserError, match=r"token_mlp\[0\] = \[96, ...\].*use \[49, 49\]"):
        mixer_config(params, block="gmlp")
    with pytest.raises(UserError, match="hidden width 415 is odd"):
        gmlp_config(params, hidden=415)


def test_spatial_shift_moves_four_channel_groups_one_patch_each_way():
    grid, group = 3, 2
    x = torch.arange(1 * 9 * 10, dtype=torch.float32).view(1, 9, 10)  # (batch, tokens, ch)
    g, out = x.view(3, 3, 10), spatial_shift(x, grid, group).view(3, 3, 10)
    centre = out[1, 1]
    assert torch.equal(centre[0:2], g[0, 1, 0:2])  # from the patch above
    assert torch.equal(centre[2:4], g[2, 1, 2:4])  # from the patch below
    assert torch.equal(centre[4:6], g[1, 0, 4:6])  # from the patch to the left
    assert torch.equal(centre[6:8], g[1, 2, 6:8])  # from the patch to the right
    assert torch.equal(out[..., 8:], g[..., 8:])  # the rest stay
    assert (out[0, :, 0:2] == 0).all() and (out[2, :, 2:4] == 0).all()  # image edges
    assert (out[:, 0, 4:6] == 0).all() and (out[:, 2, 6:8] == 0).all()
    assert spatial_shift(x, grid, 0) is x  # no shift: the input itself


def test_spatial_shift_lets_channel_mixing_see_the_neighbours(params):
    """Token branch off: without the shift a patch's output depends on that patch only; with
    spatial_shift=0.5 (16 channels each way at C = 128) on its four neighbours too."""
    x = torch.randn(2, 49, 128)
    for shift, felt in ((0.0, False), (0.5, True)):
        block = MixerClassifier(mixer_config(params, blocks=1, spatial_shift=shift).model).blocks[0]
        assert block.shift_group == (16 if shift else 0)
        nn.init.zeros_(block.token_mixing[2].weight)
        nn.init.zeros_(block.token_mixing[2].bias)
        block.eval()
        x2 = x.clone()
        x2[:, 24] += torch.linspace(0.0, 1.0, 128)  # the centre patch of the 7 x 7 grid
        changed = (block(x2) - block(x)).abs().amax(dim=(0, 2)) > 0
        assert changed[[17, 23, 25, 31]].tolist() == [felt] * 4  # above, left, right, below
        assert changed.sum().item() == (5 if felt else 1)


def test_mlp_mixer_without_norm_has_no_layernorm(params):
    model = MixerClassifier(mixer_config(params, norm="none").model)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())


def test_drop_path_rates_grow_with_depth_and_act_only_in_training(params):
    cfg = mixer_config(params, blocks=3, drop_path=0.2)
    model = MixerClassifier(cfg.model)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2])
    drop = model.blocks[2].drop_path
    x = torch.ones(2000, 3, 4)  # (batch, tokens, channels)
    torch.manual_seed(0)
    out = drop.train()(x)
    per_sample = out[:, 0, 0]
    assert per_sample.unique().tolist() == pytest.approx([0.0, 1 / 0.8])
    assert (out == out[:, :1, :1]).all()  # the whole sample's branch is kept or dropped
    assert abs((per_sample == 0).float().mean().item() - 0.2) < 0.03
    assert torch.equal(drop.eval()(x), x)


def test_adamw_decays_weight_matrices_only(params):
    cfg = mixer_config(params)
    model = MixerClassifier(cfg.model)
    opt = make_optimizer(cfg, model.parameters())
    assert type(opt) is torch.optim.AdamW
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == cfg.weight_decay == 0.05
    assert decayed["fused"] and plain["fused"]
    assert plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"])
    assert all(p.ndim == 1 for p in plain["params"])  # biases and LayerNorm gains
    total = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert total == count_parameters(model)


def lr_trace(cfg, steps_per_epoch: int) -> tuple[list[float], torch.optim.Optimizer]:
    """The learning rate of every step of a whole run, stepping as `train_epoch` does."""
    opt = make_optimizer(cfg, MixerClassifier(cfg.model).parameters())
    sched = make_scheduler(cfg, opt, steps_per_epoch=steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs, opt


def test_cosine_schedule_warms_up_then_decays_to_zero(params):
    cfg = mixer_config(params)  # lr 0.002, 3 warm-up epochs of 60
    lrs, opt = lr_trace(cfg, steps_per_epoch=10)
    assert len(lrs) == 600
    assert lrs[0] == pytest.approx(0.002 / 30)
    assert lrs[29] == pytest.approx(0.002)  # end of warm-up: the peak
    assert all(a < b for a, b in itertools.pairwise(lrs[:30]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[30:]))
    assert lrs[30 + 285] == pytest.approx(0.001, rel=1e-3)  # half way through the decay
    assert lrs[-1] < 1e-6
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]  # both groups follow


def test_short_cosine_run_only_warms_up(params):
    cfg = dataclasses.replace(mixer_config(params), epochs=2)  # quick run: 2 of 3 warm-up epochs
    lrs, _ = lr_trace(cfg, steps_per_epoch=5)
    assert all(a < b for a, b in itertools.pairwise(lrs))
    assert lrs[-1] == pytest.approx(0.002 * 10 / 15)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mixer_training_step_learns(params, precision):
    """A few steps on one fixed batch must lower the loss, in either precision."""
    cfg = dataclasses.replace(mixer_config(params, blocks=2), precision=precision, lr=0.003)
    model = build_model(cfg, seed=0)
    opt = make_optimizer(cfg, model.parameters())
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(32, 1, 28, 28, generator=gen)
    labels = torch.randint(0, 10, (32,), generator=gen)
    losses = []
    for _ in range(15):
        with autocast(cfg, torch.device("cpu")):
            logits = model(images)
        assert logits.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert losses[-1] < 0.5 * losses[0], losses


"""The CPU fast path (stages/fast) computes the plain model (stages/model.py).

Each fused function is held to the plain torch expression it replaces, mostly against float64;
the whole fast model to the plain model over the same parameters. The token kernel is tested on
every CPU, also where `accelerate` would not pick it (AVX2).
"""

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_configs import config, repo_params
from torch import nn

from stages.config import resolve_run
from stages.fast import Options, accelerate, kernels
from stages.fast.functions import (
    WIDE_INPUT,
    BatchNormDropoutFunction,
    TokenHalfFunction,
    TokenMLPFunction,
    linear,
    token_linear,
)
from stages.fetch import fetch
from stages.model import MixerClassifier, mlp
from stages.training import autocast, build_model

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def params() -> dict:
    return repo_params()


def test_fused_kernels_build_here():
    """CI installs a compiler: the fused path must be what the tests below exercise."""
    assert kernels.load() is not None


def test_every_checkout_shares_one_kernel_build(tmp_path, monkeypatch):
    """The build reruns when the source's path changes; a copy at a path named by the content
    keeps two checkouts of the same code (or DVC's experiment workspaces) from rebuilding."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    code = kernels.SOURCE.read_bytes()
    first = kernels.shared_source(code, "kernels_abc", "unused")
    assert first == tmp_path / "sources" / "kernels_abc.cpp"
    assert first.read_bytes() == code
    assert kernels.shared_source(code, "kernels_abc", "unused") == first
    assert list(first.parent.iterdir()) == [first]  # no partial file left behind


# ---------------------------------------------------------------- oneDNN products


@pytest.mark.parametrize("relu", [False, True])
# both ways of the token weight gradient; and a layer wide enough for its weight gradient as g^T x
@pytest.mark.parametrize("features", [(30, 20), (20, 30), (WIDE_INPUT, 40)])
@pytest.mark.parametrize("axis", ["last", "first"])
def test_onednn_linear_computes_torchs_linear(axis, relu, features):
    """`linear` (along the last axis) and `token_linear` (along the first) give torch's Linear,
    with or without the ReLU after it: outputs and all gradients, up to fp32 rounding."""
    torch.manual_seed(0)
    layer = nn.Linear(*features)
    with torch.no_grad():
        layer.bias.uniform_(-0.5, 0.5)
    x = torch.randn(features[0], 8, features[0], requires_grad=True)

    def plain(x):
        y = layer(x) if axis == "last" else layer(x.movedim(0, -1)).movedim(-1, 0)
        return torch.relu(y) if relu else y

    fast = linear if axis == "last" else token_linear
    grad = torch.randn(plain(x).shape[::-1]).permute(2, 1, 0)  # a non-contiguous gradient
    results = []
    for f in (lambda x: fast(x, layer, relu=relu), plain):
        out = f(x)
        out.backward(grad)
        results.append((out, x.grad, layer.weight.grad, layer.bias.grad))
        x.grad = layer.weight.grad = layer.bias.grad = None
    for ours, torchs in zip(*results, strict=True):
        assert ours.shape == torchs.shape
        assert torch.allclose(ours, torchs, rtol=1e-5, atol=1e-4)  # sums of 512 terms: order
    assert (results[0][0] == 0).any() == relu  # the ReLU ran, and only when asked


# ---------------------------------------------------------------- BatchNorm and dropout


def norm_and_input(rows: int = 3000, channels: int = 70) -> tuple[nn.BatchNorm1d, torch.Tensor]:
    """A BatchNorm with non-trivial affine parameters and running statistics, and rows of
    activations far from zero mean and unit variance."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(rows, channels) * torch.linspace(0.5, 4.0, channels) + 3.0
    return norm, x


def fused_norm_dropout(norm, x, p, grad, seed=0):
    """dropout(norm(x)) on the fused kernel: output, and the input, weight and bias gradients."""
    norm, x = copy.deepcopy(norm), x.clone().requires_grad_()
    y, _, _ = BatchNormDropoutFunction.apply(x, norm.weight, norm.bias, norm.eps, p, seed)
    y.backward(grad)
    return y.detach(), (x.grad, norm.weight.grad, norm.bias.grad)


def test_fused_batch_norm_computes_torchs_batch_norm():
    """Without dropout the kernel is torch's BatchNorm1d in training mode: outputs and gradients
    equal up to fp32 rounding, against float64."""
    norm, x = norm_and_input()
    grad = torch.randn(x.shape)
    y, grads = fused_norm_dropout(norm, x, 0.0, grad)
    reference = copy.deepcopy(norm).double()
    x_ref = x.double().requires_grad_()
    y_ref = reference(x_ref)
    y_ref.backward(grad.double())
    assert torch.allclose(y.double(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    ref_grads = (x_ref.grad, reference.weight.grad, reference.bias.grad)
    for ours, ref in zip(grads, ref_grads, strict=True):
        assert torch.allclose(ours.double(), ref, rtol=1e-4, atol=1e-4)


def test_fused_dropout_drops_at_rate_p_and_scales_the_rest():
    """Each value is zeroed with probability p, the rest are BatchNorm's output times 1 / (1 - p),
    and the gradients are those of torch's BatchNorm times the same mask (in float64)."""
    p = 0.25
    norm, x = norm_and_input(rows=4000, channels=250)
    grad = torch.randn(x.shape)
    y, grads = fused_norm_dropout(norm, x, p, grad)
    kept = (y != 0).float()
    assert abs(1 - kept.mean().item() - p) < 0.003
    assert (1 - kept.mean(0) - p).abs().max().item() < 0.04  # in every column too
    reference = copy.deepcopy(norm).double()
    x_ref = x.double().requires_grad_()
    y_ref = reference(x_ref) * kept.double() / (1 - p)
    y_ref.backward(grad.double())
    assert torch.allclose(y.double(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    ref_grads = (x_ref.grad, reference.weight.grad, reference.bias.grad)
    for ours, ref in zip(grads, ref_grads, strict=True):
        assert torch.allclose(ours.double(), ref, rtol=1e-4, atol=1e-4)


def test_fused_dropout_mask_is_fixed_by_its_seed():
    norm, x = norm_and_input()
    grad = torch.ones(x.shape)
    first, _ = fused_norm_dropout(norm, x, 0.5, grad, seed=7)
    again, _ = fused_norm_dropout(norm, x, 0.5, grad, seed=7)
    other, _ = fused_norm_dropout(norm, x, 0.5, grad, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first == 0, other == 0)


# ---------------------------------------------------------------- the token MLP kernel


def token_mlp_and_input(tokens, hidden, out, batch, channels):
    torch.manual_seed(0)
    layers = mlp(tokens, hidden, out, "relu")
    with torch.no_grad():
        for layer in (layers[0], layers[2]):
            layer.bias.uniform_(-0.5, 0.5)
    return layers, torch.randn(tokens, batch, channels)


def plain_token_mlp(layers, x):
    """The MLP along the first axis of x (tokens, batch, channels), with torch's modules."""
    return layers(x.movedim(0, -1)).movedim(-1, 0)


def fused_token_mlp(layers, x):
    first, _, second = layers
    return TokenMLPFunction.apply(x, first.weight, first.bias, second.weight, second.bias, True)


def token_mlp_grads(f, layers, x, grad):
    x = x.clone().requires_grad_()
    y = f(layers, x)
    y.backward(grad)
    grads = [x.grad] + [p.grad for p in layers.parameters()]
    layers.zero_grad(set_to_none=True)
    return y, grads


# batch * channels: a multiple of the kernel's 64-column tile, one with a partial last tile, and
# fewer columns than one tile
@pytest.mark.parametrize(
    "shape", [(49, 80, 60, 16, 300), (49, 80, 60, 8, 300), (20, 16, 10, 3, 5)]
)
def test_token_mlp_kernel_computes_the_layers(shape):
    """The token MLP as one kernel over column tiles gives the layers' outputs and all five
    gradients, against float64 up to fp32 rounding."""
    layers, x = token_mlp_and_input(*shape)
    grad = torch.randn(shape[2], *x.shape[1:])
    y, grads = token_mlp_grads(fused_token_mlp, layers, x, grad)
    reference = copy.deepcopy(layers).double()
    ref_y, ref_grads = token_mlp_grads(plain_token_mlp, reference, x.double(), grad.double())
    hidden = reference[0](x.double().movedim(0, -1))
    assert 0.2 < (hidden <= 0).double().mean() < 0.8  # the first layer's ReLU matters
    assert torch.allclose(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(grads, ref_grads, strict=True):
        assert ours.shape == ref.shape
        assert torch.allclose(ours.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
    with torch.no_grad():  # evaluation: the same output, without keeping the hidden layer
        first, _, second = layers
        y_eval = TokenMLPFunction.apply(
            x, first.weight, first.bias, second.weight, second.bias, False
        )
        assert torch.equal(y_eval, y.detach())


def token_half(layers, norm, x, grad, combined, stem=None, seed=5):
    """dropout(norm(token MLP(x))), or with a stem of relu(stem(x)) for x the patches: its
    output, the gradients (the input's, or the stem's) and the norm's running statistics, as one
    fused function or as the stem, the token MLP's kernel, then the fused norm and dropout."""
    layers, norm, stem = copy.deepcopy(layers), copy.deepcopy(norm), copy.deepcopy(stem)
    x = x.clone().requires_grad_(stem is None)
    first, _, second = layers
    if combined:
        y, mean, var = TokenHalfFunction.apply(
            x, None if stem is None else stem.weight, None if stem is None else stem.bias,
            first.weight, first.bias, second.weight, second.bias, norm.weight, norm.bias,
            norm.eps, 0.1, seed,
        )
    else:
        x_in = x if stem is None else linear(x, stem, relu=True)
        y, mean, var = BatchNormDropoutFunction.apply(
            fused_token_mlp(layers, x_in).flatten(0, 1).contiguous(),
            norm.weight, norm.bias, norm.eps, 0.1, seed,
        )
    y.backward(grad)
    first_grads = [x.grad] if stem is None else [stem.weight.grad, stem.bias.grad]
    grads = [*first_grads, *(p.grad for p in layers.parameters()), norm.weight.grad, norm.bias.grad]
    return y, grads, (mean, var)


def test_token_half_computes_the_token_mlp_then_norm_and_dropout():
    """The notebook block's token half as one function (the token kernel summing the BatchNorm's
    statistics, its backward forming the BatchNorm's input gradient tile by tile): the same
    output, dropout mask, gradients and batch statistics as the two functions in turn."""
    layers, x = token_mlp_and_input(49, 80, 60, 8, 300)
    norm, _ = norm_and_input(channels=300)
    grad = torch.randn(60 * 8, 300)
    y, grads, stats = token_half(layers, norm, x, grad, combined=True)
    ref_y, ref_grads, ref_stats = token_half(layers, norm, x, grad, combined=False)
    assert torch.equal(y == 0, ref_y == 0)  # the same mask
    assert 0.05 < (y == 0).double().mean() < 0.15
    assert torch.allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(grads + list(stats), ref_grads + list(ref_stats), strict=True):
        assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5 * ref.abs().max())


# (tokens, hidden, out, batch, pixels, channels): the report's shapes, a partial last tile, and
# fewer channels than a vector's 16 lanes (each lane's image found on its own)
@pytest.mark.parametrize(
    "shape", [(49, 80, 60, 16, 16, 300), (49, 80, 60, 8, 16, 300), (20, 16, 10, 7, 9, 5)]
)
def test_token_half_computes_the_stem_inside_the_kernel(shape):
    """With the patch stem inside the token kernel (relu(stem(patches)) computed tile by tile,
    never stored): the outputs, mask, gradients (the stem's included) and statistics of the
    stem run first."""
    tokens, hidden, out, batch, pixels, channels = shape
    layers, _ = token_mlp_and_input(tokens, hidden, out, batch, channels)
    stem = nn.Linear(pixels, channels)
    with torch.no_grad():
        stem.bias.uniform_(-0.5, 0.5)
    patches = torch.rand(tokens, batch, pixels)
    assert 0.2 < (stem(patches) <= 0).double().mean() < 0.8  # the stem's ReLU matters
    norm, _ = norm_and_input(channels=channels)
    grad = torch.randn(out * batch, channels)
    y, grads, stats = token_half(layers, norm, patches, grad, combined=True, stem=stem)
    ref_y, ref_grads, ref_stats = token_half(layers, norm, patches, grad, False, stem=stem)
    assert torch.equal(y == 0, ref_y == 0)
    assert torch.allclose(y, ref_y, rtol=1e-4, atol=1e-4)
    for ours, ref in zip(grads + list(stats), ref_grads + list(ref_stats), strict=True):
        assert ours.shape == ref.shape
        assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max())


def test_kernel_sums_are_the_same_with_any_thread_count():
    """Weight gradients and the BatchNorm's statistics are sums over a fixed number of column
    chunks: one thread and two give the same bits."""
    layers, x = token_mlp_and_input(49, 80, 60, 16, 300)
    grad = torch.randn(60, *x.shape[1:])
    norm, _ = norm_and_input(channels=300)
    norm_grad = torch.randn(60 * 16, 300)
    stem, patches = nn.Linear(16, 300), torch.rand(49, 16, 16)
    runs = [
        lambda: token_mlp_grads(fused_token_mlp, layers, x, grad),
        lambda: token_half(layers, norm, x, norm_grad, combined=True),
        lambda: token_half(layers, norm, patches, norm_grad, True, stem=stem),
    ]
    threads = torch.get_num_threads()
    try:
        for run in runs:
            results = []
            for n in (1, 2):
                torch.set_num_threads(n)
                results.append(run())
            (y1, grads1, *_), (y2, grads2, *_) = results
            assert torch.equal(y1, y2)
            assert all(torch.equal(a, b) for a, b in zip(grads1, grads2, strict=True))
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- the whole model


def step(net, model, images, labels):
    """Logits and every parameter's gradient of one training step's loss through `net`."""
    model.zero_grad(set_to_none=True)
    logits = net(images)
    nn.functional.cross_entropy(logits, labels).backward()
    return [logits.detach()] + [p.grad for p in model.parameters()]


OPTIONS = [Options(token_kernel=True), Options(token_kernel=True, stem_in_kernel=False),
           Options(token_kernel=False)]  # fmt: skip


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize(
    "run, preset",
    [
        ("final", {}),
        ("blocks-2", {"token_mlp": [[32, 20], [16, 10]]}),
        ("final", {"stem_hidden": 24}),
    ],
)
def test_fast_model_computes_the_plain_model(params, run, preset, options):
    """Over the same parameters: the same logits, gradients and BatchNorm running statistics in
    training (dropout off: each path draws its own masks), and the same logits in evaluation."""
    cfg = config(params, run, preset={"dropout": 0.0, **preset})
    model = build_model(cfg, seed=0)
    fast, path = accelerate(model, cfg, CPU, options)
    assert path.startswith("fused CPU kernels")
    reference = copy.deepcopy(model)
    images, labels = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    ours, theirs = step(fast, model, images, labels), step(reference, reference, images, labels)
    assert len(ours) == len(theirs) > 10
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max())
    for (name, a), b in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6), name
    fast.eval()
    with torch.no_grad():
        assert torch.allclose(fast(images), reference.eval()(images), rtol=1e-4, atol=1e-5)


def test_fast_model_drops_with_the_runs_rate_and_its_own_masks(params):
    """With dropout 0.1 the fast path trains (its kernels draw the masks from torch's seed):
    the same seed gives the same step, and its logits differ from the plain model's only as two
    dropout masks do."""
    cfg = config(params)
    model = build_model(cfg, seed=0)
    fast, _ = accelerate(model, cfg, CPU, Options(token_kernel=True))
    images, labels = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    torch.manual_seed(3)
    first = step(fast, model, images, labels)
    torch.manual_seed(3)
    again = step(fast, model, images, labels)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    torch.manual_seed(4)
    other = step(fast, model, images, labels)
    assert not torch.equal(first[0], other[0])


def test_state_dicts_are_interchangeable_between_the_paths(params):
    """The fast path trains the plain model's own parameters: after a step, the plain model's
    state_dict loaded into a fresh plain model gives the fast path's evaluation."""
    cfg = config(params)
    model = build_model(cfg, seed=0)
    fast, _ = accelerate(model, cfg, CPU)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    images, labels = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    fast.train()
    nn.functional.cross_entropy(fast(images), labels).backward()
    optimizer.step()
    fresh = MixerClassifier(cfg.model)
    fresh.load_state_dict(model.state_dict())
    fast.eval()
    with torch.no_grad():
        assert torch.allclose(fast(images), fresh.eval()(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "run, change, reason",
    [
        ("final", {"cpu_kernels": "off"}, "cpu_kernels: off"),
        ("final", {"precision": "bf16"}, "precision bf16"),
        ("mixer", {"cpu_kernels": "off"}, "cpu_kernels: off"),
    ],
)
def test_the_plain_model_runs_where_the_fast_path_does_not_apply(params, run, change, reason):
    cfg = resolve_run({**params, **change}, run)
    model = build_model(cfg, seed=0)
    net, path = accelerate(model, cfg, CPU)
    assert net is model
    assert path == f"plain torch ({reason})"


def test_mlp_mixer_blocks_run_the_plain_model(params):
    p = copy.deepcopy(params)
    p["models"]["mixer"].update(block="mixer", token_mlp=[96, 49], channel_mlp=[256, 128])
    cfg = resolve_run(p, "mixer")
    model = build_model(cfg, seed=0)
    assert accelerate(model, cfg, CPU) == (model, "plain torch (block mixer)")


@pytest.mark.parametrize(
    "preset, reason", [({"activation": "gelu"}, "activation gelu"), ({"norm": "none"}, "norm none")]
)
def test_gelu_or_no_norm_runs_the_plain_model(params, preset, reason):
    cfg = config(params, preset=preset)
    model = build_model(cfg, seed=0)
    assert accelerate(model, cfg, CPU) == (model, f"plain torch ({reason})")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_token_major_gmlp_computes_the_plain_gmlp(params, precision):
    """The modern Mixer's preset (gMLP blocks, stochastic depth on) through `accelerate`: the
    same logits and (in fp32) gradients as the plain model, its drop-path masks the same
    draws."""
    cfg = dataclasses.replace(resolve_run(params, "mixer"), precision=precision)
    model = build_model(cfg, seed=0)
    for block in model.blocks:  # gates away from the identity, so token mixing matters
        nn.init.normal_(block.gate.token_mixing.weight, std=0.2)
    fast, path = accelerate(model, cfg, CPU)
    assert path == "token-major gMLP"
    reference = copy.deepcopy(model)
    images, labels = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    results = []
    for net, owner in ((fast, model), (reference, reference)):
        torch.manual_seed(9)
        with autocast(cfg, CPU):
            results.append(step(net, owner, images, labels))
    if precision == "bf16":  # rounded at other points: the logits agree to bf16's precision,
        # gradients that are small sums of cancelling terms (norm biases) only roughly
        results = [r[:1] for r in results]
    tolerance = 1e-5 if precision == "fp32" else 2e-2  # relative, of the whole tensor
    for a, b in zip(*results, strict=True):
        assert (a.float() - b.float()).norm() <= tolerance * b.float().norm()
    assert model.blocks[2].drop_path.p > 0  # the masks were drawn, and alike


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, fashion_mnist) -> Path:
    out = tmp_path_factory.mktemp("data") / "fashion-mnist"
    fetch([str(fashion_mnist)], out)
    return out


def test_without_a_compiler_training_warns_once_and_runs_torchs_kernels(
    tmp_path, params, data_dir, printout
):
    """The real fallback: no usable C++ compiler and an empty extension cache. Building fails,
    one warning line names it, and the run trains the plain model: its loss drops."""
    script = (
        "import sys, torch, yaml\n"
        "from pathlib import Path\n"
        "from stages.config import resolve_run\n"
        "from stages.data import load_dataset\n"
        "from stages.fast import accelerate\n"
        "from stages.training import build_model, evaluate, make_optimizer, train_epoch\n"
        "cfg = resolve_run(yaml.safe_load(open('params.yaml')), 'final')\n"
        "model = build_model(cfg, seed=0)\n"
        "net, path = accelerate(model, cfg, torch.device('cpu'))\n"
        "print(path, net is model)\n"
        "data = load_dataset(Path(sys.argv[1]), val_size=2000, split_seed=cfg.split_seed,\n"
        "                    train_limit=24 * cfg.batch_size)\n"  # a few dozen batches
        "before, _ = evaluate(net, data.val, cfg)\n"
        "optimizer = make_optimizer(cfg, model.parameters())\n"
        "train_epoch(net, optimizer, data.train, cfg, torch.Generator().manual_seed(0))\n"
        "after, _ = evaluate(net, data.val, cfg)\n"
        "print(before, after)\n"
    )
    env = {
        **os.environ,
        "CXX": "false",
        "CC": "false",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    path_line, loss_line = proc.stdout.strip().splitlines()
    assert path_line == "plain torch (fused kernels unavailable) True"
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    before, after = map(float, loss_line.split())
    printout(
        f"without a compiler: {' | '.join(warnings)}\n"
        f"validation loss before training {before:.4f}, after 24 batches {after:.4f}"
    )
    assert len(warnings) == 1 and "fused CPU kernels unavailable" in warnings[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert after < 0.7 * before, (before, after)

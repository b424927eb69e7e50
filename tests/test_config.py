"""Validation of params.yaml (stages/config.py, stages/configure.py) and the configure stage."""

import copy
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from stage_cli import run_stage_cli

from stages import config
from stages.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RUNS = ["final", "blocks-2", "blocks-3", "radam", "sgd", "init-normal", "init-kaiming", "mixer"]


@pytest.fixture(scope="module")
def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def params(repo_params) -> dict:
    return copy.deepcopy(repo_params)


def configure(params_path: Path, out: Path, own_process: bool = False):
    args = ["--params", str(params_path), "--out", str(out)]
    return run_stage_cli("stages.configure", *args, own_process=own_process)


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# ---------------------------------------------------------------- the repository's params.yaml


def test_repo_params_resolve_to_every_run(repo_params):
    configs = config.resolve_all(repo_params)
    assert list(configs) == RUNS
    assert all(isinstance(c, config.RunConfig) for c in configs.values())
    final = configs["final"]
    assert final.model_name == "report"
    assert final.model.token_mlp == ((80, 60),)
    assert final.model.channel_mlp == ((200, 60),)
    assert (final.optimizer, final.init, final.lr, final.epochs) == (
        "adam",
        "xavier_uniform",
        0.01,
        60,
    )
    assert configs["radam"].optimizer == "radam"
    assert configs["sgd"].optimizer == "sgd"
    assert configs["init-normal"].init == "normal"
    assert configs["init-kaiming"].init == "kaiming_uniform"
    assert config.seeds(repo_params) == [0, 1, 2]


def without_widths(cfg: config.RunConfig) -> dict:
    data = cfg.to_dict()
    for key in ("token_mlp", "channel_mlp"):
        del data["model"][key]
    return data


@pytest.mark.parametrize(("run", "blocks"), [("blocks-2", 2), ("blocks-3", 3)])
def test_blocks_runs_differ_from_final_only_in_blocks(repo_params, run, blocks):
    configs = config.resolve_all(repo_params)
    final, other = configs["final"], configs[run]
    assert final.model.blocks == 1
    assert other.model.blocks == blocks
    assert other.model.token_mlp == ((80, 60),) * blocks
    assert other.model.channel_mlp == ((200, 60),) * blocks
    assert without_widths(other) == without_widths(final)
    assert other != final


def test_config_dict_round_trip(repo_params):
    for cfg in config.resolve_all(repo_params).values():
        text = json.dumps(cfg.to_dict(), sort_keys=True)
        assert config.RunConfig.from_dict(json.loads(text), "test") == cfg


def test_config_of_another_code_version_is_a_clear_error(repo_params):
    data = config.resolve_all(repo_params)["mixer"].to_dict()
    del data["cutmix_alpha"]
    data["old_key"] = 1
    with pytest.raises(config.UserError) as err:
        config.RunConfig.from_dict(data, "runs/mixer-0/train/model.pt")
    message = str(err.value)
    assert message.startswith("runs/mixer-0/train/model.pt holds a run configuration of another")
    assert "missing: cutmix_alpha; unknown: old_key" in message


def test_run_file_unchanged_when_a_key_it_overrides_changes(tmp_path, params):
    first = configure(write_params(tmp_path / "a.yaml", params), tmp_path / "a")
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(f"{r}.json" for r in RUNS)

    params["optimizer"] = "sgd"
    second = configure(write_params(tmp_path / "b.yaml", params), tmp_path / "b")
    assert second.returncode == 0, second.stderr

    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "radam.json").read_bytes() == (b / "radam.json").read_bytes()
    assert (a / "final.json").read_bytes() != (b / "final.json").read_bytes()
    assert json.loads((a / "final.json").read_text())["optimizer"] == "adam"
    assert json.loads((b / "final.json").read_text())["optimizer"] == "sgd"
    assert json.loads((b / "radam.json").read_text())["optimizer"] == "radam"
    # the file is exactly the resolved config
    radam = json.loads((b / "radam.json").read_text())
    assert config.RunConfig.from_dict(radam, "radam.json") == config.resolve_run(params, "radam")


def test_configure_replaces_an_existing_output_folder(tmp_path, params):
    out = tmp_path / "configs"
    out.mkdir()
    (out / "stale.json").write_text("{}")
    proc = configure(write_params(tmp_path / "p.yaml", params), out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{r}.json" for r in RUNS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs", "p.yaml"]


# ---------------------------------------------------------------- bad input


def set_key(params: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = value


BAD = [
    # (id, dotted key, value, substrings the message must contain)
    ("optimizer", "optimizer", "adamax", ["optimizer", "'adamax'", "adam, radam, sgd, adamw"]),
    ("init", "init", "he", ["init", "'he'", "xavier_uniform, normal, kaiming_uniform, default"]),
    ("scheduler", "scheduler", "step", ["scheduler", "'step'", "plateau, cosine, none"]),
    ("activation", "models.report.activation", "tanh", ["models.report.activation", "relu, gelu"]),
    ("norm", "models.report.norm", "layer", ["models.report.norm", "batch, none"]),
    ("plateau_mode", "plateau_mode", "up", ["plateau_mode", "min, max"]),
    ("plateau_metric", "plateau_metric", "test_accuracy", ["plateau_metric", "val_loss"]),
    ("epochs-0", "epochs", 0, ["epochs=0", ">= 1"]),
    ("epochs-negative", "epochs", -1, ["epochs=-1", ">= 1"]),
    ("epochs-bool", "epochs", True, ["epochs=True", "integer"]),
    ("epochs-float", "epochs", 2.5, ["epochs=2.5", "integer"]),
    ("batch_size-0", "batch_size", 0, ["batch_size=0", ">= 1"]),
    ("blocks-0", "blocks", 0, ["blocks=0", ">= 1"]),
    ("lr-0", "lr", 0, ["lr=0", "(0.0, inf)"]),
    ("lr-negative", "lr", -0.1, ["lr=-0.1", "(0.0, inf)"]),
    ("lr-text", "lr", "abc", ["lr='abc'", "number"]),
    ("lr-bool", "lr", True, ["lr=True", "number"]),
    ("lr-nan", "lr", float("nan"), ["lr=nan", "(0.0, inf)"]),
    ("init_std-0", "init_std", 0.0, ["init_std=0.0", "(0.0, inf)"]),
    ("weight_decay-negative", "weight_decay", -1e-4, ["weight_decay=-0.0001", "[0.0, inf)"]),
    ("momentum-1", "momentum", 1.0, ["momentum=1.0", "[0.0, 1.0)"]),
    ("plateau_factor-1", "plateau_factor", 1.0, ["plateau_factor=1.0", "(0.0, 1.0)"]),
    ("plateau_patience-negative", "plateau_patience", -1, ["plateau_patience=-1", ">= 0"]),
    ("train_limit-0", "train_limit", 0, ["train_limit=0", ">= 1"]),
    ("split_seed-negative", "split_seed", -1, ["split_seed=-1", ">= 0"]),
    ("dropout", "models.report.dropout", 1.5, ["models.report.dropout=1.5", "[0.0, 1.0)"]),
    (
        "patch_size",
        "models.report.patch_size",
        5,
        ["models.report.patch_size=5", "1, 2, 4, 7, 14, 28"],
    ),
    (
        "token_mlp-pairs",
        "models.report.token_mlp",
        [[80, 60], [80, 60]],
        ["models.report.token_mlp", "2 [hidden, out] pairs", "blocks=1"],
    ),
    (
        "channel_mlp-single",
        "models.report.channel_mlp",
        [200],
        ["models.report.channel_mlp=[200]", "[hidden, out]"],
    ),
    (
        "channel_mlp-triple",
        "models.report.channel_mlp",
        [[200, 60, 10]],
        ["models.report.channel_mlp[0]", "[hidden, out] pair"],
    ),
    (
        "token_mlp-zero-width",
        "models.report.token_mlp",
        [80, 0],
        ["models.report.token_mlp[0]=0", ">= 1"],
    ),
    ("model-missing", "model", "big", ["model='big'", "report"]),
    ("seeds-empty", "seeds", [], ["seeds=[]", "non-empty list"]),
    ("seeds-repeated", "seeds", [0, 1, 0], ["seeds=[0, 1, 0]", "repeats"]),
    ("seeds-negative", "seeds", [-1], ["seeds=-1", ">= 0"]),
    ("seeds-not-a-list", "seeds", 0, ["seeds=0", "list"]),
    (
        "study-missing-run",
        "studies.blocks.blocks-4",
        "4 blocks",
        ["studies.blocks", "'blocks-4'", "final, blocks-2"],
    ),
    ("runs-empty", "runs", {}, ["runs", "non-empty"]),
    ("hflip-text", "hflip", "yes", ["hflip='yes'", "true or false"]),
    ("random_erasing-above-1", "random_erasing", 1.5, ["random_erasing=1.5", "[0.0, 1.0]"]),
    ("mixup_alpha-negative", "mixup_alpha", -0.2, ["mixup_alpha=-0.2", "[0.0, inf)"]),
    ("cutmix_alpha-text", "cutmix_alpha", "strong", ["cutmix_alpha='strong'", "a number"]),
    ("label_smoothing-1", "label_smoothing", 1.0, ["label_smoothing=1.0", "[0.0, 1.0)"]),
    ("crop_padding-negative", "crop_padding", -2, ["crop_padding=-2", ">= 0"]),
    ("warmup_epochs-negative", "warmup_epochs", -1, ["warmup_epochs=-1", ">= 0"]),
    ("precision", "precision", "fp16", ["precision='fp16'", "fp32, bf16"]),
    ("block", "models.report.block", "resnet", ["models.report.block", "notebook, mixer, gmlp"]),
    ("cpu_kernels", "cpu_kernels", "on", ["cpu_kernels='on'", "auto, off"]),
    (
        "gmlp-with-batchnorm",
        "models.mixer.norm",
        "batch",
        ["models.mixer.norm (block=gmlp)='batch'", "layer, none"],
    ),
    (
        "drop_path-on-report-block",
        "models.report.drop_path",
        0.1,
        ["models.report.drop_path=0.1", "a residual block (mixer or gmlp)"],
    ),
    (
        "spatial_shift-on-report-block",
        "models.report.spatial_shift",
        0.5,
        ["models.report.spatial_shift=0.5", "a residual block"],
    ),
    ("spatial_shift-above-1", "models.mixer.spatial_shift", 1.5, ["shift=1.5", "[0.0, 1.0]"]),
    (
        "gmlp-token-width",
        "models.mixer.token_mlp",
        [64, 49],
        ["models.mixer.token_mlp[0] = [64, ...]", "use [49, 49]"],
    ),
    (
        "residual-token-width",
        "models.mixer.token_mlp",
        [49, 32],
        ["models.mixer.token_mlp[0] outputs 32 tokens", "a gmlp block must keep", "out=49"],
    ),
    (
        "residual-channel-width",
        "models.mixer.channel_mlp",
        [256, 64],
        ["models.mixer.channel_mlp[0] outputs 64 channels", "stem_width=128"],
    ),
    ("run-bad-name", "runs.bad name", {}, ["'bad name'", "letters, digits"]),
    ("run-reserved-name", "runs.std", {}, ["'std' is taken by results/metrics.json", "diverged"]),
]


@pytest.mark.parametrize(("key", "value", "needles"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_value_is_a_user_error(params, key, value, needles):
    set_key(params, key, value)
    with pytest.raises(UserError) as info:
        config.resolve_all(params)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_unknown_top_level_key_suggests_the_right_one(params):
    params["optimiser"] = "adam"
    with pytest.raises(UserError, match=r"unknown key 'optimiser' in params\.yaml") as info:
        config.resolve_all(params)
    assert "did you mean 'optimizer'?" in str(info.value)
    assert "allowed:" in str(info.value)


def test_unknown_key_in_a_run(params):
    params["runs"]["radam"] = {"optimizer": "radam", "momentun": 0.9}
    with pytest.raises(UserError, match=r"unknown key 'momentun' in runs\.radam") as info:
        config.resolve_all(params)
    assert "did you mean 'momentum'?" in str(info.value)
    assert "allowed: model, blocks, init," in str(info.value)


def test_unknown_key_in_a_model_preset(params):
    params["models"]["report"]["stem_widht"] = 300
    with pytest.raises(UserError, match=r"unknown key 'stem_widht' in models\.report") as info:
        config.resolve_all(params)
    assert "did you mean 'stem_width'?" in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        (
            "model",
            ["report"],
            "model=['report'] is not a preset under models; choose one of: report",
        ),
        ("model", {"name": "report"}, "is not a preset under models"),
        ("models", ["report"], "models=['report'] must map preset names"),
    ],
    ids=["model-list", "model-mapping", "models-list"],
)
def test_unhashable_or_wrong_type_is_a_user_error(params, key, value, needle):
    params[key] = value
    with pytest.raises(UserError) as info:
        config.resolve_all(params)
    assert needle in str(info.value)


@pytest.mark.parametrize("key", [1, True, None])
def test_non_string_key_is_a_user_error(params, key):
    # YAML 1.1 reads `1:`, `on:`/`yes:` and `~:` keys as int, bool and None
    params[key] = "x"
    with pytest.raises(UserError, match=rf"unknown key '{key}' in params\.yaml; allowed: model"):
        config.resolve_all(params)
    del params[key]
    params["models"]["report"][key] = "x"
    with pytest.raises(UserError, match=rf"unknown key '{key}' in models\.report"):
        config.resolve_all(params)
    del params["models"]["report"][key]
    params["runs"]["radam"][key] = "x"
    with pytest.raises(UserError, match=rf"unknown key '{key}' in runs\.radam"):
        config.resolve_all(params)


def test_missing_key(params):
    del params["lr"]
    with pytest.raises(UserError, match=r"missing lr"):
        config.resolve_all(params)


def test_bad_value_in_a_run_names_the_run(params):
    params["runs"]["sgd"] = {"optimizer": "sgd", "momentum": 1.5}
    with pytest.raises(UserError, match=r"run 'sgd': momentum=1\.5 must be in \[0\.0, 1\.0\)"):
        config.resolve_all(params)


def test_run_that_is_not_a_mapping(params):
    params["runs"]["radam"] = "radam"
    with pytest.raises(UserError, match=r"runs\.radam must be a mapping"):
        config.resolve_all(params)


def test_lr_as_yaml_text_is_accepted():
    # YAML 1.1 (PyYAML) reads 1e-3 without a dot as text; the value still counts as a number.
    text = (REPO / "params.yaml").read_text().replace("lr: 0.01 ", "lr: 1e-3 ")
    params = yaml.safe_load(text)
    assert params["lr"] == "1e-3"
    configs = config.resolve_all(params)
    inherit = [name for name, changes in params["runs"].items() if "lr" not in (changes or {})]
    assert inherit
    assert all(configs[n].lr == 0.001 and isinstance(configs[n].lr, float) for n in inherit)


def test_numbers_given_as_ints_become_floats(params):
    params["weight_decay"] = 0
    params["lr"] = 1
    cfg = config.resolve_all(params)["final"]
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.weight_decay == 0.0 and isinstance(cfg.weight_decay, float)


def test_per_block_widths_accepted(params):
    params["blocks"] = 2
    params["models"]["report"]["token_mlp"] = [[32, 20], [16, 10]]
    params["runs"] = {"final": {}, "radam": {"optimizer": "radam"}}
    params["studies"] = {"final": {"final": "final model"}}
    configs = config.resolve_all(params)
    assert configs["final"].model.token_mlp == ((32, 20), (16, 10))
    assert configs["final"].model.channel_mlp == ((200, 60), (200, 60))
    assert configs["radam"].model == configs["final"].model
    # a run with 3 blocks but only 2 token pairs
    params["runs"]["blocks-3"] = {"blocks": 3}
    with pytest.raises(UserError, match=r"token_mlp has 2 \[hidden, out\] pairs but blocks=3"):
        config.resolve_all(params)


# ---------------------------------------------------------------- the stage as a command


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_command_bad_params_exits_2_and_writes_nothing(tmp_path, params):
    params["optimizer"] = "adamax"
    out = tmp_path / "configs"
    proc = configure(write_params(tmp_path / "p.yaml", params), out, own_process=True)
    assert_one_line_error(proc, "optimizer", "adamax")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]  # no temporary folder left


def test_command_bad_params_leaves_existing_output_untouched(tmp_path, params):
    good = configure(write_params(tmp_path / "good.yaml", params), tmp_path / "configs")
    assert good.returncode == 0, good.stderr
    before = {p.name: p.read_bytes() for p in (tmp_path / "configs").iterdir()}
    assert len(before) == len(RUNS)

    params["epochs"] = 0
    proc = configure(write_params(tmp_path / "bad.yaml", params), tmp_path / "configs")
    assert_one_line_error(proc, "epochs=0")
    after = {p.name: p.read_bytes() for p in (tmp_path / "configs").iterdir()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "configs", "good.yaml"]


def test_command_invalid_yaml(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("optimizer: adam\nruns: {final: [\nlr: 0.01\n")
    proc = configure(bad, tmp_path / "configs")
    assert_one_line_error(proc, "not valid YAML")
    assert not (tmp_path / "configs").exists()


def test_command_missing_params_file(tmp_path):
    proc = configure(tmp_path / "nope.yaml", tmp_path / "configs")
    assert_one_line_error(proc, "does not exist")


def test_command_yaml_bool_key(tmp_path):
    text = (REPO / "params.yaml").read_text() + "on: true\n"  # YAML 1.1: key True
    proc = configure(write_text(tmp_path / "p.yaml", text), tmp_path / "configs")
    assert_one_line_error(proc, "unknown key 'True' in params.yaml")
    assert not (tmp_path / "configs").exists()


def test_command_params_not_a_mapping(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("- just\n- a list\n")
    proc = configure(bad, tmp_path / "configs")
    assert_one_line_error(proc, "mapping")

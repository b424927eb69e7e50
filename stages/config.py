"""One typed configuration per training run, built from params.yaml and validated here only.

params.yaml holds a base configuration at its top level (the report's final model), a preset of
architecture widths per model name under `models`, and under `runs` the one-factor changes that
make each run of the report's studies. `resolve_run` merges base, preset and a run's changes
into a `RunConfig`; every check on user input lives in this module.
"""

import difflib
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from stages.errors import UserError

IMAGE_SIZE = 28
NUM_CLASSES = 10
CHOICES = {
    "optimizer": ("adam", "radam", "sgd", "adamw"),
    "init": ("xavier_uniform", "normal", "kaiming_uniform", "default"),
    "scheduler": ("plateau", "cosine", "none"),
    "plateau_metric": ("val_loss", "val_accuracy"),
    "plateau_mode": ("min", "max"),
    "activation": ("relu", "gelu"),
    "block": ("notebook", "mixer", "gmlp"),
    "precision": ("fp32", "bf16"),
    "cpu_kernels": ("auto", "off"),
}
# Normalisations each block design supports: the notebook's block used BatchNorm after each MLP,
# the residual blocks (mixer, gmlp) a LayerNorm before each.
NORMS = {"notebook": ("batch", "none"), "mixer": ("layer", "none"), "gmlp": ("layer", "none")}
RUN_NAME = re.compile(r"^[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*$")
RESERVED_RUN_NAMES = ("std", "diverged")  # keys of results/metrics.json beside the runs


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the Mixer-style model: see stages/model.py."""

    patch_size: int
    stem_width: int
    stem_hidden: int | None  # None: a linear stem; an int: a one-hidden-layer MLP stem
    token_mlp: tuple[tuple[int, int], ...]  # (hidden, out) widths of each block's token MLP
    channel_mlp: tuple[tuple[int, int], ...]  # (hidden, out) widths of each block's channel MLP
    block: str  # notebook: the report's; mixer: MLP-Mixer's; gmlp: gMLP's (stages/model.py)
    activation: str
    norm: str
    dropout: float
    drop_path: float  # stochastic depth of the deepest residual block; earlier ones scale down
    spatial_shift: float  # mixer only: share of channels moved one patch before channel mixing

    @property
    def blocks(self) -> int:
        return len(self.token_mlp)

    @property
    def num_patches(self) -> int:
        return (IMAGE_SIZE // self.patch_size) ** 2


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run depends on, except its seed."""

    model_name: str
    model: ModelConfig
    init: str
    init_std: float
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    scheduler: str
    plateau_metric: str
    plateau_mode: str
    plateau_factor: float
    plateau_patience: int
    warmup_epochs: int  # cosine only: linear warm-up over this many epochs (or the whole run)
    label_smoothing: float
    crop_padding: int  # augmentation: random crop of the image padded by this many pixels (0: off)
    hflip: bool  # augmentation: random horizontal flip
    random_erasing: float  # augmentation: probability of erasing a random rectangle
    mixup_alpha: float  # batch mixing: Beta(alpha, alpha) weight of MixUp (0: off)
    cutmix_alpha: float  # batch mixing: Beta(alpha, alpha) area kept by CutMix (0: off)
    precision: str  # fp32 | bf16: autocast of the forward pass
    cpu_kernels: str  # auto: the CPU fast path where it applies (stages/fast); off: plain torch
    epochs: int
    batch_size: int
    eval_batch_size: int
    val_size: int
    split_seed: int
    train_limit: int | None
    test_limit: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> "RunConfig":
        """Rebuild a config written by `to_dict` (a resolved config file or a checkpoint) read
        from `source`; one written by another version of this code is a clear error."""
        expected = {f.name for f in fields(cls)}
        missing, unknown = sorted(expected - set(data)), sorted(set(data) - expected)
        if missing or unknown:
            raise UserError(
                f"{source} holds a run configuration of another version of this code "
                f"(missing: {', '.join(missing) or '-'}; unknown: {', '.join(unknown) or '-'}): "
                "run `dvc repro` to retrain it"
            )
        data = dict(data)
        model = dict(data.pop("model"))
        for key in ("token_mlp", "channel_mlp"):
            model[key] = tuple(tuple(pair) for pair in model[key])
        return cls(model=ModelConfig(**model), **data)


# Top-level keys of params.yaml that a run may change; `model` names a preset under `models`.
RUN_KEYS = ("model", "blocks") + tuple(
    f.name for f in fields(RunConfig) if f.name not in ("model_name", "model")
)
MODEL_KEYS = tuple(f.name for f in fields(ModelConfig))
OTHER_TOP_KEYS = ("models", "runs", "studies", "seeds", "fetch")


def load_params(path: Path) -> dict:
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} must hold a mapping of keys to values")
    return params


def _unknown(key: str, where: str, allowed: tuple[str, ...]) -> UserError:
    close = difflib.get_close_matches(str(key), allowed, n=1)  # YAML keys may be ints or bools
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown key '{key}' in {where}{hint}; allowed: {', '.join(allowed)}")


def _int(where: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{where}={value!r} must be an integer >= {minimum}")
    return value


def _optional_int(where: str, value: Any) -> int | None:
    return None if value is None else _int(where, value)


def _float(where: str, value: Any, *, low: float, high: float, closed: str = "[)") -> float:
    """A number in an interval; strings like '1e-3' (which YAML 1.1 reads as text) count."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}={value!r} must be a number") from None
    above = number >= low if closed[0] == "[" else number > low
    below = number <= high if closed[1] == "]" else number < high
    if not (above and below) or number != number:
        raise UserError(f"{where}={value!r} must be in {closed[0]}{low}, {high}{closed[1]}")
    return number


def _choice(key: str, where: str, value: Any, allowed: tuple[str, ...] | None = None) -> str:
    allowed = CHOICES[key] if allowed is None else allowed
    if value not in allowed:
        raise UserError(f"{where}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    return value


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{where}={value!r} must be true or false")
    return value


def _widths(where: str, value: Any, blocks: int) -> tuple[tuple[int, int], ...]:
    """[hidden, out] for every block, or one such pair per block."""
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        pairs = [value] * blocks
    elif isinstance(value, list | tuple) and all(isinstance(p, list | tuple) for p in value):
        pairs = list(value)
        if len(pairs) != blocks:
            raise UserError(
                f"{where} has {len(pairs)} [hidden, out] pairs but blocks={blocks}; give one pair "
                "for every block, or a single [hidden, out] pair used by all blocks"
            )
    else:
        raise UserError(f"{where}={value!r} must be [hidden, out] or a list of such pairs")
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise UserError(f"{where}[{i}]={list(pair)!r} must be a [hidden, out] pair")
        for width in pair:
            _int(f"{where}[{i}]", width)
    return tuple((pair[0], pair[1]) for pair in pairs)


def _model_config(name: str, preset: Any, blocks: int) -> ModelConfig:
    where = f"models.{name}"
    if not isinstance(preset, dict):
        raise UserError(f"{where} must be a mapping of architecture settings")
    for key in preset:
        if key not in MODEL_KEYS:
            raise _unknown(key, where, MODEL_KEYS)
    missing = [key for key in MODEL_KEYS if key not in preset]
    if missing:
        raise UserError(f"{where} is missing {', '.join(missing)}")
    patch = _int(f"{where}.patch_size", preset["patch_size"])
    if IMAGE_SIZE % patch:
        raise UserError(
            f"{where}.patch_size={patch} does not divide the {IMAGE_SIZE}-pixel image; "
            "allowed: 1, 2, 4, 7, 14, 28"
        )
    block = _choice("block", f"{where}.block", preset["block"])
    cfg = ModelConfig(
        patch_size=patch,
        stem_width=_int(f"{where}.stem_width", preset["stem_width"]),
        stem_hidden=_optional_int(f"{where}.stem_hidden", preset["stem_hidden"]),
        token_mlp=_widths(f"{where}.token_mlp", preset["token_mlp"], blocks),
        channel_mlp=_widths(f"{where}.channel_mlp", preset["channel_mlp"], blocks),
        block=block,
        activation=_choice("activation", f"{where}.activation", preset["activation"]),
        norm=_choice("norm", f"{where}.norm (block={block})", preset["norm"], NORMS[block]),
        dropout=_float(f"{where}.dropout", preset["dropout"], low=0.0, high=1.0),
        drop_path=_float(f"{where}.drop_path", preset["drop_path"], low=0.0, high=1.0),
        spatial_shift=_float(
            f"{where}.spatial_shift", preset["spatial_shift"], low=0.0, high=1.0, closed="[]"
        ),
    )
    if block == "notebook":
        for key in ("drop_path", "spatial_shift"):
            if value := getattr(cfg, key):
                raise UserError(f"{where}.{key}={value} needs a residual block (mixer or gmlp)")
        return cfg
    if block == "gmlp" and cfg.spatial_shift:
        raise UserError(f"{where}.spatial_shift={cfg.spatial_shift} needs block=mixer")
    # A residual block adds its input to its output, so no block may change the widths; a gMLP
    # block's token layer is tokens -> tokens and its hidden width splits into two halves.
    for i, ((token_hidden, tokens_out), (channel_hidden, channels_out)) in enumerate(
        zip(cfg.token_mlp, cfg.channel_mlp, strict=True)
    ):
        if block == "gmlp" and token_hidden != cfg.num_patches:
            raise UserError(
                f"{where}.token_mlp[{i}] = [{token_hidden}, ...]: a gmlp block mixes the "
                f"tokens with one {cfg.num_patches} -> {cfg.num_patches} layer; use "
                f"[{cfg.num_patches}, {cfg.num_patches}]"
            )
        if block == "gmlp" and channel_hidden % 2:
            raise UserError(
                f"{where}.channel_mlp[{i}] hidden width {channel_hidden} is odd; a gmlp "
                "block splits it into two halves (gate and value)"
            )
        if tokens_out != cfg.num_patches:
            raise UserError(
                f"{where}.token_mlp[{i}] outputs {tokens_out} tokens; a {block} block must keep "
                f"all {cfg.num_patches} patches (out={cfg.num_patches})"
            )
        if channels_out != cfg.stem_width:
            raise UserError(
                f"{where}.channel_mlp[{i}] outputs {channels_out} channels; a {block} block must "
                f"keep stem_width={cfg.stem_width} (out={cfg.stem_width})"
            )
    return cfg


def build_config(values: dict[str, Any], where: str = "params.yaml") -> RunConfig:
    """Validate the merged top-level values of one run and build its typed configuration."""
    missing = [key for key in RUN_KEYS if key not in values]
    if missing:
        raise UserError(f"{where} is missing {', '.join(missing)}")
    v = values
    models = v.get("models") or {}
    if not isinstance(models, dict):
        raise UserError(f"params.yaml: models={models!r} must map preset names to settings")
    if not isinstance(v["model"], str) or v["model"] not in models:
        raise UserError(
            f"{where}: model={v['model']!r} is not a preset under models; "
            f"choose one of: {', '.join(models) or '(none defined)'}"
        )
    blocks = _int(f"{where}: blocks", v["blocks"])
    return RunConfig(
        model_name=v["model"],
        model=_model_config(v["model"], models[v["model"]], blocks),
        init=_choice("init", f"{where}: init", v["init"]),
        init_std=_float(
            f"{where}: init_std", v["init_std"], low=0.0, high=float("inf"), closed="()"
        ),
        optimizer=_choice("optimizer", f"{where}: optimizer", v["optimizer"]),
        lr=_float(f"{where}: lr", v["lr"], low=0.0, high=float("inf"), closed="()"),
        momentum=_float(f"{where}: momentum", v["momentum"], low=0.0, high=1.0),
        weight_decay=_float(
            f"{where}: weight_decay", v["weight_decay"], low=0.0, high=float("inf")
        ),
        scheduler=_choice("scheduler", f"{where}: scheduler", v["scheduler"]),
        plateau_metric=_choice("plateau_metric", f"{where}: plateau_metric", v["plateau_metric"]),
        plateau_mode=_choice("plateau_mode", f"{where}: plateau_mode", v["plateau_mode"]),
        plateau_factor=_float(
            f"{where}: plateau_factor", v["plateau_factor"], low=0.0, high=1.0, closed="()"
        ),
        plateau_patience=_int(f"{where}: plateau_patience", v["plateau_patience"], minimum=0),
        warmup_epochs=_int(f"{where}: warmup_epochs", v["warmup_epochs"], minimum=0),
        label_smoothing=_float(
            f"{where}: label_smoothing", v["label_smoothing"], low=0.0, high=1.0
        ),
        crop_padding=_int(f"{where}: crop_padding", v["crop_padding"], minimum=0),
        hflip=_bool(f"{where}: hflip", v["hflip"]),
        random_erasing=_float(
            f"{where}: random_erasing", v["random_erasing"], low=0.0, high=1.0, closed="[]"
        ),
        mixup_alpha=_float(f"{where}: mixup_alpha", v["mixup_alpha"], low=0.0, high=float("inf")),
        cutmix_alpha=_float(
            f"{where}: cutmix_alpha", v["cutmix_alpha"], low=0.0, high=float("inf")
        ),
        precision=_choice("precision", f"{where}: precision", v["precision"]),
        cpu_kernels=_choice("cpu_kernels", f"{where}: cpu_kernels", v["cpu_kernels"]),
        epochs=_int(f"{where}: epochs", v["epochs"]),
        batch_size=_int(f"{where}: batch_size", v["batch_size"]),
        eval_batch_size=_int(f"{where}: eval_batch_size", v["eval_batch_size"]),
        val_size=_int(f"{where}: val_size", v["val_size"]),
        split_seed=_int(f"{where}: split_seed", v["split_seed"], minimum=0),
        train_limit=_optional_int(f"{where}: train_limit", v["train_limit"]),
        test_limit=_optional_int(f"{where}: test_limit", v["test_limit"]),
    )


def check_top_level(params: dict[str, Any]) -> None:
    allowed = RUN_KEYS + OTHER_TOP_KEYS
    for key in params:
        if key not in allowed:
            raise _unknown(key, "params.yaml", allowed)


def run_names(params: dict[str, Any]) -> list[str]:
    runs = params.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise UserError("params.yaml: runs must be a non-empty mapping of run name -> changes")
    for name in runs:
        if not isinstance(name, str) or not RUN_NAME.match(name):
            raise UserError(
                f"params.yaml: run name {name!r} must be letters, digits, '_' and single '-'"
            )
        if name in RESERVED_RUN_NAMES:
            raise UserError(
                f"params.yaml: run name {name!r} is taken by results/metrics.json; "
                f"choose a name other than {', '.join(RESERVED_RUN_NAMES)}"
            )
    return list(runs)


def resolve_run(params: dict[str, Any], run: str) -> RunConfig:
    """The configuration of run `run`: the base values with that run's changes applied."""
    check_top_level(params)
    if run not in run_names(params):
        raise UserError(f"unknown run '{run}'; params.yaml defines: {', '.join(params['runs'])}")
    changes = params["runs"][run] or {}
    if not isinstance(changes, dict):
        raise UserError(f"runs.{run} must be a mapping of changes to the base configuration")
    for key in changes:
        if key not in RUN_KEYS:
            raise _unknown(key, f"runs.{run}", RUN_KEYS)
    return build_config({**params, **changes}, where=f"run '{run}'")


def seeds(params: dict[str, Any]) -> list[int]:
    value = params.get("seeds")
    if not isinstance(value, list) or not value:
        raise UserError(f"params.yaml: seeds={value!r} must be a non-empty list of integers")
    result = [_int("params.yaml: seeds", s, minimum=0) for s in value]
    if len(set(result)) != len(result):
        raise UserError(f"params.yaml: seeds={value!r} repeats a seed")
    return result


def studies(params: dict[str, Any]) -> dict[str, dict[str, str]]:
    """study name -> {run name: label}, every run checked to exist."""
    value = params.get("studies") or {}
    names = run_names(params)
    if not isinstance(value, dict):
        raise UserError("params.yaml: studies must map a study name to {run: label}")
    for study, members in value.items():
        if not isinstance(members, dict) or not members:
            raise UserError(f"studies.{study} must map run names to labels")
        for run in members:
            if run not in names:
                raise UserError(
                    f"studies.{study} names run '{run}', which is not under runs; "
                    f"defined: {', '.join(names)}"
                )
    return value


def resolve_all(params: dict[str, Any]) -> dict[str, RunConfig]:
    """Every run's configuration; raises on the first bad value anywhere in params.yaml."""
    check_top_level(params)
    seeds(params)
    studies(params)
    return {run: resolve_run(params, run) for run in run_names(params)}

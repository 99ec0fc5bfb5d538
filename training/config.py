"""Training settings: the defaults (the original recipe) and the other recipes live here and only here.

Precedence, lowest first: the defaults (``RECIPES["original"]``); the chosen ``--recipe``'s
values; the quick profile when no ``--data`` is given; a ``--config`` file (JSON or YAML);
command-line flags. A ``TrainConfig`` is checked when it is made and frozen: every rule about
settings is in ``TrainConfig.validate``, and no code changes a setting afterwards.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from common.errors import UserError
from training.models import MODEL_NAMES
from training.synthetic import DEFAULT_DIR as BUILTIN_DATA


PRECISIONS = ("auto", "float32", "bfloat16")  # see training.engine.Precision


class ConfigError(UserError):
    """A bad setting, reported as one line without a traceback."""


# The recipes: every optimisation and regularisation setting a recipe decides. "original" is the
# study's (and the defaults below read it); "improved" is a from-scratch recipe for small datasets
# from the literature (docs/recipe.md says where each value comes from).
ORIGINAL = {
    "lr": 6e-4, "weight_decay": 1e-4, "label_smoothing": 0.05,
    "schedule": "step", "step_size": 5, "gamma": 0.1, "warmup_epochs": 0,
    "epochs": 30, "patience": 10,
    "crop_scale": 0.7, "mix_prob": 0.0, "mixup_alpha": 0.2, "cutmix_alpha": 1.0,
    "ema_decay": 0.0,
}
IMPROVED = {
    "lr": 1e-3, "weight_decay": 0.05, "label_smoothing": 0.1,
    "schedule": "cosine", "step_size": 5, "gamma": 0.1, "warmup_epochs": 5,
    "epochs": 100, "patience": 25,
    "crop_scale": 0.25, "mix_prob": 0.5, "mixup_alpha": 0.2, "cutmix_alpha": 1.0,
    "ema_decay": 0.999,
}
RECIPES = {"original": ORIGINAL, "improved": IMPROVED}
SCHEDULES = ("step", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    data: str = str(BUILTIN_DATA)  # ImageFolder root, or the image folder of a CSV layout
    labels_csv: str | None = None
    models: list[str] = field(default_factory=lambda: list(MODEL_NAMES))
    recipe: str = "original"  # the RECIPES entry the recipe settings start from
    epochs: int = ORIGINAL["epochs"]
    batch_size: int = 50
    image_size: int = 224
    lr: float = ORIGINAL["lr"]
    weight_decay: float = ORIGINAL["weight_decay"]
    label_smoothing: float = ORIGINAL["label_smoothing"]
    schedule: str = ORIGINAL["schedule"]  # step (StepLR) or cosine (to 0 at the last epoch)
    step_size: int = ORIGINAL["step_size"]  # step: multiply the learning rate by gamma every step_size epochs
    gamma: float = ORIGINAL["gamma"]
    warmup_epochs: int = ORIGINAL["warmup_epochs"]  # linear warm-up before the schedule
    patience: int = ORIGINAL["patience"]  # early stopping: epochs without a validation-loss improvement
    min_delta: float = 1e-4  # the smallest decrease of validation loss that counts
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 67
    seeds: int = 1  # train each model this many times, with seeds seed, seed+1, ...
    folds: int = 0  # K-fold cross-validation on the non-test images (0: off)
    device: str = "auto"  # auto = cuda, then mps, then cpu
    workers: int = -1  # data-loader processes; -1 = chosen from the CPU count
    out: str | None = None  # run folder; default runs/<date-time>
    init_weights: str | None = None  # torchvision ResNet-34 state dict to start from
    freeze_epochs: int = 0  # with init_weights: keep the loaded layers frozen this many epochs
    crop_scale: float = ORIGINAL["crop_scale"]  # RandomResizedCrop: the smallest share a crop keeps
    mix_prob: float = ORIGINAL["mix_prob"]  # share of training batches mixed by mixup or CutMix (0: off)
    mixup_alpha: float = ORIGINAL["mixup_alpha"]  # Beta(alpha, alpha) of mixup's weight (0: mixup off)
    cutmix_alpha: float = ORIGINAL["cutmix_alpha"]  # likewise for CutMix's area (0: CutMix off)
    ema_decay: float = ORIGINAL["ema_decay"]  # exponential moving average of the weights (0: off)
    precision: str = "auto"  # auto, float32 or bfloat16 (see training.engine.Precision)
    cache_dir: str | None = None  # decoded-image cache; default: see training.image_cache
    no_cache: bool = False  # keep decoded images in memory only (small data)
    ood_data: str | None = None  # images of none of the classes, for the out-of-distribution check

    def __post_init__(self):
        self.validate()

    @property
    def builtin_data(self) -> bool:
        return Path(self.data) == BUILTIN_DATA

    def validate(self) -> "TrainConfig":
        unknown = [m for m in self.models if m not in MODEL_NAMES]
        if unknown or not self.models:
            raise ConfigError(
                f"unknown model(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(MODEL_NAMES)}"
            )
        positive = ("epochs", "batch_size", "image_size", "step_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size < 32:
            raise ConfigError(f"image_size must be at least 32, got {self.image_size}")
        if not 0 < self.val_fraction < 1 or not 0 <= self.test_fraction < 1 \
                or self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("val_fraction and test_fraction must be in [0, 1) and sum below 1")
        if self.lr <= 0 or self.patience < 1 or self.freeze_epochs < 0:
            raise ConfigError("lr must be positive, patience at least 1, freeze_epochs at least 0")
        if self.labels_csv and self.builtin_data:
            raise ConfigError("--labels-csv needs --data IMAGE_DIR (the folder the filenames are in)")
        if self.seeds < 1 or self.folds < 0 or self.folds == 1:
            raise ConfigError(f"seeds must be at least 1 and folds 0 (off) or at least 2, "
                              f"got seeds {self.seeds}, folds {self.folds}")
        if self.seeds > 1 and self.folds:
            raise ConfigError("choose --seeds or --folds, not both: folds already give repeated runs")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision '{self.precision}'; choose from {', '.join(PRECISIONS)}")
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        if self.freeze_epochs and not self.init_weights:
            raise ConfigError("--freeze-epochs needs --init-weights (a backbone to keep frozen)")
        self._validate_recipe()
        return self

    def _validate_recipe(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe '{self.recipe}'; choose from {', '.join(RECIPES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule '{self.schedule}'; choose from {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup_epochs must be at least 0 and below epochs ({self.epochs}), "
                              f"got {self.warmup_epochs}")
        if self.weight_decay < 0 or self.gamma <= 0 or not 0 <= self.label_smoothing < 1:
            raise ConfigError("weight_decay must be at least 0, gamma positive and label_smoothing in [0, 1)")
        if not 0 <= self.mix_prob <= 1 or self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ConfigError("mix_prob must be in [0, 1] and mixup_alpha, cutmix_alpha at least 0")
        if self.mix_prob and not (self.mixup_alpha or self.cutmix_alpha):
            raise ConfigError("--mix-prob needs mixup_alpha or cutmix_alpha above 0 (a way to mix)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")


# With no --data: the built-in dataset, sized so that the three models train in about 3 minutes
# on 2 CPU cores: the learning rate drops after 4 epochs and 2 more settle it (ResNet-34
# reaches about 0.84 validation accuracy).
QUICK_PROFILE = {"image_size": 48, "batch_size": 32, "epochs": 6, "step_size": 4, "test_fraction": 0.1}
# What the quick profile shortens in a recipe beyond the epochs: 5 warm-up epochs of 6 would
# leave one to train at the full rate.
QUICK_PROFILE_BY_RECIPE = {"original": {}, "improved": {"warmup_epochs": 1}}


def quick_profile(recipe: str) -> dict:
    """The quick profile's settings for a recipe."""
    return {**QUICK_PROFILE, **QUICK_PROFILE_BY_RECIPE.get(recipe, {})}


FLAG_HELP = {
    "data": "ImageFolder root (or the image folder of --labels-csv); default: the built-in "
            "dataset, trained with the quick profile",
    "labels_csv": "CSV with columns filename,label (filenames relative to --data)",
    "models": f"comma-separated model names (default: {','.join(MODEL_NAMES)})",
    "out": "run folder (default: runs/<date-time>)",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "workers": "data-loader worker processes (-1: chosen from the CPU count)",
    "init_weights": "torchvision ResNet-34 state dict (.pth) to initialise matching layers from",
    "freeze_epochs": "with --init-weights: train only the new layers (head, SE) for the first K epochs",
    "seed": "drives the split, initialisation and augmentation",
    "seeds": "train each model N times on the same split, with seeds --seed, --seed + 1, ...",
    "crop_scale": "RandomResizedCrop's smallest crop, as a share of the image's area",
    "recipe": f"the recipe settings start from: {' or '.join(RECIPES)} (see docs/recipe.md); "
              "any setting given still overrides it",
    "schedule": "learning-rate schedule after the warm-up: step (StepLR) or cosine (to 0)",
    "warmup_epochs": "epochs of linear learning-rate warm-up before the schedule",
    "mix_prob": "share of training batches mixed by mixup or CutMix (one of them at random; 0: off)",
    "mixup_alpha": "mixup's Beta(alpha, alpha) weight (0: mixup off)",
    "cutmix_alpha": "CutMix's Beta(alpha, alpha) area (0: CutMix off)",
    "ema_decay": "exponential moving average of the weights (0: off); the average is what is "
                 "validated, saved as best.pt and exported",
    "precision": "auto: bfloat16 autocast on GPUs (float16 where they lack bfloat16) and on CPUs "
                 "with native bfloat16 (AVX-512 BF16, AMX), else float32; or float32, bfloat16",
    "cache_dir": "folder for the decoded-image cache (default: $RESNET_TRIO_CACHE, else "
                 "$XDG_CACHE_HOME/resnet-trio, else ~/.cache/resnet-trio)",
    "no_cache": "keep decoded images in memory only, as small data can afford",
    "ood_data": "folder of images of none of the classes (searched recursively), never trained or "
                "fitted on: the comparison reports how often each model is unsure of them (default: "
                "for the built-in dataset its held-out set of noise, gradients and other patterns)",
    "folds": "K-fold cross-validation on the images outside the test split (0: off; "
             "not with a val/ folder)",
}


def build_parser() -> argparse.ArgumentParser:
    quick = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK_PROFILE.items())
    parser = argparse.ArgumentParser(
        prog="python -m training.run",
        description="Train Plain-34, ResNet-34 and ResNet-34-Modified and compare them.",
        epilog=f"Without --data the built-in dataset is trained with the quick profile ({quick}; "
               f"with --recipe improved also --warmup-epochs "
               f"{QUICK_PROFILE_BY_RECIPE['improved']['warmup_epochs']}); "
               "any flag or config-file setting still overrides it.",
        argument_default=argparse.SUPPRESS,  # only flags the user gave override the config
    )
    parser.add_argument("--config", help="JSON or YAML file of settings (flags override it)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                        help="continue a stopped run (default: the newest under runs/)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "models":
            parser.add_argument(flag, type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                                help=FLAG_HELP["models"])
            continue
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=FLAG_HELP[f.name])
            continue
        kind = type(default) if default is not None else str
        parser.add_argument(flag, type=kind, metavar=f.name.upper(), help=_flag_help(f.name, default))
    return parser


def _flag_help(name: str, default) -> str:
    """The flag's description, then the default that applies (and the quick profile's and
    the other recipes' where they differ)."""
    parts = [FLAG_HELP[name]] if name in FLAG_HELP else []
    if default is not None and name != "data":
        shown = f"default: {default}"
        if name in QUICK_PROFILE:
            shown += f"; quick profile (no --data): {QUICK_PROFILE[name]}"
        for recipe, values in RECIPES.items():
            if values.get(name, default) != default:
                shown += f"; --recipe {recipe}: {values[name]}"
            quick = QUICK_PROFILE_BY_RECIPE.get(recipe, {})
            if name in quick:
                shown += f" (quick profile: {quick[name]})"
        parts.append(shown)
    return "; ".join(parts)


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as exc:  # any parse error is the user's file, not our bug
        raise ConfigError(f"cannot parse config file '{path}': {exc}".splitlines()[0]) from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of setting: value")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    if isinstance(values.get("models"), str):
        values["models"] = [m.strip() for m in values["models"].split(",")]
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in '{path}': {', '.join(unknown)}")
    defaults = TrainConfig()
    return {k: _as_type_of(getattr(defaults, k), k, v, path) for k, v in values.items()}


def _as_type_of(default, name: str, value, path: str):
    """A file's value as its setting's type, as a flag would be: YAML reads ``6e-4`` as a
    string, JSON may give 3.0 for an integer."""
    kind = type(default) if default is not None else str
    if value is None or name == "models" or isinstance(value, kind) and (
            isinstance(value, bool) == (kind is bool)):
        return value
    try:
        if isinstance(value, bool) or kind in (str, bool):
            raise ValueError(value)
        converted = kind(value)
        if kind is int and float(value) != converted:
            raise ValueError(value)  # 2.5 epochs is not a whole number
        return converted
    except (TypeError, ValueError):
        wanted = {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, "a string")
        raise ConfigError(f"setting {name} in '{path}' must be {wanted}, got {value!r}") from None


def make_config(overrides: dict) -> TrainConfig:
    """Defaults, then the chosen recipe's values, then the quick profile if no data is named,
    then the overrides."""
    recipe = overrides.get("recipe") or TrainConfig.recipe
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe '{recipe}'; choose from {', '.join(RECIPES)}")
    values = dict(RECIPES[recipe])
    if not overrides.get("data"):
        values.update(quick_profile(recipe))
    values.update({k: v for k, v in overrides.items() if not (k == "data" and v is None)})
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


# Flags a resumed run still accepts: where to find the run, and how (not what) to compute.
RESUME_FLAGS = {"out", "device", "workers", "precision", "cache_dir", "no_cache"}


def config_from_args(argv: list[str] | None = None) -> tuple[TrainConfig, str | None, set[str]]:
    """Parse the command line: the config, the --resume value (or None), the settings given."""
    args = vars(build_parser().parse_args(argv))
    resume = args.pop("resume", None)
    changed = sorted(set(args) - RESUME_FLAGS)
    if resume and changed:
        raise ConfigError("--resume continues a run with the settings it started with; drop "
                          + ", ".join("--" + k.replace("_", "-") for k in changed))
    overrides = read_config_file(args.pop("config")) if "config" in args else {}
    overrides.update(args)
    return make_config(overrides), resume, set(args)


def to_dict(config: TrainConfig) -> dict:
    return asdict(config)

"""Training settings: the defaults (the original recipe) and the other recipes live here and only here.

Precedence, lowest first: the defaults (``RECIPES["original"]``); the chosen ``--recipe``'s
values; the quick profile when no ``--data`` is given; a ``--config`` file (JSON or YAML);
command-line flags. A ``TrainConfig`` is checked when it is made and frozen: every rule about
settings is in ``TrainConfig.validate``, and no code changes a setting afterwards.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from common.errors import UserError
from training.models import MODEL_NAMES
from training.synthetic import DEFAULT_DIR as BUILTIN_DATA


TRAIN_PRECISIONS = ("auto", "float32", "bfloat16")  # see training.engine.Precision


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


def setting(default, help: str):
    """A setting's default and its help: the one text that ``--help``, config files and the
    settings table of docs/recipe.md show."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    data: str = setting(str(BUILTIN_DATA), "ImageFolder root (or the image folder of --labels-csv); "
                        "default: the built-in dataset, trained with the quick profile")
    labels_csv: str | None = setting(None, "CSV with columns filename,label (filenames relative to --data)")
    models: list[str] = setting(list(MODEL_NAMES), "comma-separated model names")
    recipe: str = setting("original", f"the recipe settings start from: {' or '.join(RECIPES)} "
                          "(see docs/recipe.md); any setting given still overrides it")
    epochs: int = setting(ORIGINAL["epochs"], "the most epochs each model trains")
    batch_size: int = setting(50, "images per batch (per process under torchrun)")
    image_size: int = setting(224, "the square input size in pixels (at least 32)")
    lr: float = setting(ORIGINAL["lr"], "AdamW's learning rate after the warm-up")
    weight_decay: float = setting(ORIGINAL["weight_decay"], "AdamW's decoupled weight decay")
    label_smoothing: float = setting(ORIGINAL["label_smoothing"], "the cross-entropy's label smoothing, in [0, 1)")
    schedule: str = setting(ORIGINAL["schedule"], "learning-rate schedule after the warm-up: "
                            "step (StepLR) or cosine (to 0 at the last epoch)")
    step_size: int = setting(ORIGINAL["step_size"], "step: multiply the learning rate by gamma every "
                             "step_size epochs")
    gamma: float = setting(ORIGINAL["gamma"], "step: the learning rate's factor at each step")
    warmup_epochs: int = setting(ORIGINAL["warmup_epochs"], "epochs of linear learning-rate warm-up "
                                 "before the schedule; when not set, the recipe's scaled to --epochs "
                                 "(rounded up: 5 of 100 is 1 of 6)")
    patience: int = setting(ORIGINAL["patience"], "early stopping: epochs without a validation-loss "
                            "improvement")
    min_delta: float = setting(1e-4, "the smallest decrease of validation loss that counts")
    val_fraction: float = setting(0.2, "share of the images kept for validation (unless the data has a val/ folder)")
    test_fraction: float = setting(0.0, "share of the images kept for testing (unless the data is split into folders)")
    seed: int = setting(67, "drives the split, initialisation and augmentation")
    seeds: int = setting(1, "train each model N times on the same split, with seeds --seed, --seed + 1, ...")
    folds: int = setting(0, "K-fold cross-validation on the images outside the test split (0: off; "
                         "not with a val/ folder)")
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    workers: int = setting(-1, "data-loader worker processes (-1: chosen from the CPU count)")
    out: str | None = setting(None, "run folder (default: runs/<date-time>)")
    init_weights: str | None = setting(None, "torchvision ResNet-34 state dict (.pth) to initialise "
                                       "matching layers from")
    freeze_epochs: int = setting(0, "with --init-weights: train only the new layers (head, SE) for "
                                 "the first K epochs")
    crop_scale: float = setting(ORIGINAL["crop_scale"], "RandomResizedCrop's smallest crop, as a share "
                                "of the image's area")
    mix_prob: float = setting(ORIGINAL["mix_prob"], "share of training batches mixed by mixup or "
                              "CutMix (one of them at random; 0: off)")
    mixup_alpha: float = setting(ORIGINAL["mixup_alpha"], "mixup's Beta(alpha, alpha) weight (0: mixup off)")
    cutmix_alpha: float = setting(ORIGINAL["cutmix_alpha"], "CutMix's Beta(alpha, alpha) area (0: CutMix off)")
    ema_decay: float = setting(ORIGINAL["ema_decay"], "exponential moving average of the weights "
                               "(0: off); the average is what is validated, saved as best.pt and exported")
    precision: str = setting("auto", "auto: bfloat16 autocast on GPUs (float16 where they lack "
                             "bfloat16) and on CPUs with native bfloat16 (AVX-512 BF16, AMX), else "
                             "float32; or float32, bfloat16")
    cache_dir: str | None = setting(None, "folder for the decoded-image cache (default: "
                                    "$RESNET_TRIO_CACHE, else $XDG_CACHE_HOME/resnet-trio, else "
                                    "~/.cache/resnet-trio)")
    no_cache: bool = setting(False, "keep decoded images in memory only, as small data can afford")
    ood_data: str | None = setting(None, "folder of images of none of the classes (searched "
                                   "recursively), never trained or fitted on: the comparison reports "
                                   "how often each model is unsure of them (default: for the built-in "
                                   "dataset its held-out set of noise, gradients and other patterns)")

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
        for name, least in (("epochs", 1), ("batch_size", 1), ("step_size", 1), ("image_size", 32)):
            if getattr(self, name) < least:
                raise ConfigError(f"{name} must be at least {least}, got {getattr(self, name)}")
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
        _one_of("precision", self.precision, TRAIN_PRECISIONS)
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        if self.freeze_epochs and not self.init_weights:
            raise ConfigError("--freeze-epochs needs --init-weights (a backbone to keep frozen)")
        self._validate_recipe()
        return self

    def _validate_recipe(self) -> None:
        _one_of("recipe", self.recipe, RECIPES)
        _one_of("schedule", self.schedule, SCHEDULES)
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


def _one_of(name: str, value: str, choices) -> str:
    if value not in choices:
        raise ConfigError(f"unknown {name} '{value}'; choose from {', '.join(choices)}")
    return value


# With no --data: the built-in dataset, sized so that the three models train in about 3 minutes
# on 2 CPU cores: the learning rate drops after 4 epochs and 2 more settle it (ResNet-34
# reaches about 0.84 validation accuracy).
QUICK_PROFILE = {"image_size": 48, "batch_size": 32, "epochs": 6, "step_size": 4, "test_fraction": 0.1}


def scaled_warmup(recipe: str, epochs: int) -> int:
    """The recipe's warm-up at ``epochs`` epochs: the same share of the run, rounded up so that a
    recipe with a warm-up keeps one, and below ``epochs`` so that one epoch at least follows it."""
    values = RECIPES[recipe]
    return min(math.ceil(values["warmup_epochs"] * epochs / values["epochs"]), epochs - 1)


def build_parser() -> argparse.ArgumentParser:
    quick = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK_PROFILE.items())
    parser = argparse.ArgumentParser(
        prog="python -m training.run",
        description="Train Plain-34, ResNet-34 and ResNet-34-Modified and compare them.",
        epilog=f"Without --data the built-in dataset is trained with the quick profile ({quick}); "
               "any flag or config-file setting still overrides it.",
        argument_default=argparse.SUPPRESS,  # only flags the user gave override the config
    )
    parser.add_argument("--config", help="JSON or YAML file of settings (flags override it)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                        help="continue a stopped run (default: the newest under runs/)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if _kind(f.name) is bool:
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=functools.partial(parse_setting, f.name),
                                metavar=f.name.upper(), help=_flag_help(f.name))
    return parser


def _flag_help(name: str) -> str:
    """The setting's help, then the defaults that apply."""
    return "; ".join(part for part in (_help(name), _defaults_text(name)) if part)


def _help(name: str) -> str:
    return next(f.metadata["help"] for f in fields(TrainConfig) if f.name == name)


def _defaults_text(name: str) -> str:
    """The default, and the quick profile's and the other recipes' values where they differ
    ("" where the help says it: no default value, or the data)."""
    default = getattr(TrainConfig(), name)
    if default is None or name == "data":
        return ""
    shown = f"default: {','.join(default) if isinstance(default, list) else default}"
    if name in QUICK_PROFILE:
        shown += f"; quick profile (no --data): {QUICK_PROFILE[name]}"
    for recipe, values in RECIPES.items():
        if values.get(name, default) != default:
            shown += f"; --recipe {recipe}: {values[name]}"
    return shown


# --- a setting's type: one conversion for flags (strings) and config files ------------------------

def _kind(name: str) -> type:
    """The setting's type from its annotation: ``str | None`` is str, ``list[str]`` is list."""
    hint = _HINTS[name]
    if typing.get_origin(hint) is list:
        return list
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


_HINTS = typing.get_type_hints(TrainConfig)
_WANTED = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
           list: "comma-separated names"}


def parse_setting(name: str, value):
    """``value`` as setting ``name``'s type, from a flag (a string) or a config file (YAML reads
    ``6e-4`` as a string, JSON may give 3.0 for a whole number): one conversion for both, as
    argparse's ``type=int`` would refuse 3.0 and accept no list."""
    kind = _kind(name)
    if value is None and type(None) in typing.get_args(_HINTS[name]):
        return None
    try:
        if kind is list:
            items = value.split(",") if isinstance(value, str) else value
            if isinstance(items, list) and all(isinstance(m, str) for m in items):
                return [m.strip() for m in items if m.strip()]
        elif kind in (str, bool):
            if isinstance(value, kind):
                return value
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            number = float(value)
            if kind is float:
                return number
            if number.is_integer():  # 2.5 epochs is not a whole number
                return value if isinstance(value, int) else int(number)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"must be {_WANTED[kind]}, got {value!r}")


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
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"unknown setting(s) in '{path}': {', '.join(unknown)}")
    converted = {}
    for name, value in values.items():
        try:
            converted[name] = parse_setting(name, value)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"setting {name} in '{path}' {exc}") from None
    return converted


def make_config(overrides: dict, notices: list[str] | None = None) -> TrainConfig:
    """Defaults, then the chosen recipe's values, then the quick profile if no data is named,
    then the overrides. Without an override the warm-up follows the epochs (``scaled_warmup``);
    ``notices`` gets a line saying so where that changes it."""
    recipe = _one_of("recipe", overrides.get("recipe") or TrainConfig.recipe, RECIPES)
    values = dict(RECIPES[recipe])
    if not overrides.get("data"):
        values.update(QUICK_PROFILE)
    values.update({k: v for k, v in overrides.items() if not (k == "data" and v is None)})
    if "warmup_epochs" not in overrides and isinstance(values["epochs"], int) and values["epochs"] >= 1:
        warmup = scaled_warmup(recipe, values["epochs"])
        if warmup != values["warmup_epochs"] and notices is not None:
            notices.append(f"warm-up: {warmup} of {values['epochs']} epochs, the {recipe} recipe's "
                           f"{values['warmup_epochs']} of {RECIPES[recipe]['epochs']} scaled to the "
                           "epochs (--warmup-epochs sets it)")
        values["warmup_epochs"] = warmup
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


# Flags a resumed run still accepts: where to find the run, and how (not what) to compute.
RESUME_FLAGS = {"out", "device", "workers", "precision", "cache_dir", "no_cache"}


def config_from_args(argv: list[str] | None = None) -> tuple[TrainConfig, str | None, set[str], list[str]]:
    """Parse the command line: the config, the --resume value (or None), the settings given, and
    notices of settings that followed others (see ``make_config``)."""
    args = vars(build_parser().parse_args(argv))
    resume = args.pop("resume", None)
    changed = sorted(set(args) - RESUME_FLAGS)
    if resume and changed:
        raise ConfigError("--resume continues a run with the settings it started with; drop "
                          + ", ".join("--" + k.replace("_", "-") for k in changed))
    overrides = read_config_file(args.pop("config")) if "config" in args else {}
    overrides.update(args)
    notices: list[str] = []
    return make_config(overrides, notices), resume, set(args), notices


CHOSEN = "chosen"  # config.json's record of what the run chose where a setting left it open, and why


def to_dict(config: TrainConfig, chosen: dict[str, str] | None = None) -> dict:
    """What a run's config.json holds: every setting, and ``chosen`` under CHOSEN (not a setting)."""
    return {**asdict(config), **({CHOSEN: chosen} if chosen else {})}


def from_dict(saved: dict) -> TrainConfig:
    """The config a run's config.json records."""
    return make_config({k: v for k, v in saved.items() if k != CHOSEN})


# --- the settings table of docs/recipe.md, made from the fields --------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "recipe.md"
TABLE_START = "<!-- settings table: made by `python -m training.config`; do not edit by hand -->"
TABLE_END = "<!-- end of the settings table -->"


def settings_table() -> str:
    """Every setting as a Markdown table: its flag (and config key), its help, its defaults."""
    rows = ["| flag (config key) | what it sets | default |", "|---|---|---|"]
    for f in fields(TrainConfig):
        flag = f"`--{f.name.replace('_', '-')}`" + (f" (`{f.name}`)" if "_" in f.name else "")
        default = _defaults_text(f.name).removeprefix("default: ") or "(see its help)"
        rows.append(f"| {flag} | {f.metadata['help']} | {default} |".replace("$", "\\$"))
    return "\n".join(rows)


def docs_with_table(text: str) -> str:
    """``text`` (docs/recipe.md) with its settings table replaced by the current one."""
    head, rest = text.split(TABLE_START)
    return f"{head}{TABLE_START}\n{settings_table()}\n{TABLE_END}{rest.split(TABLE_END, 1)[1]}"


if __name__ == "__main__":  # python -m training.config: rewrite the table in docs/recipe.md
    DOCS.write_text(docs_with_table(DOCS.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote the settings table of {DOCS}")

"""The recipes (--recipe original | improved): selection and recording, the learning-rate
schedules, batch mixing, and the moving average of the weights (evaluated, saved, resumed)."""
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from conftest import TINY_SIZE
from training import trainer
from training.config import (DOCS, IMPROVED, ORIGINAL, QUICK_PROFILE, RECIPES, ConfigError, TrainConfig,
                             config_from_args, docs_with_table, from_dict, make_config, to_dict)
from training.distributed import World
from training.engine import Precision, evaluate, train_one_epoch
from training.recipe import BatchMix, build_ema, build_mix, build_optimization
from training.transforms import EvalTransform

CPU = torch.device("cpu")


def _config(argv):
    return config_from_args(argv)[0]


def _recipe_values(config: TrainConfig) -> dict:
    return {key: getattr(config, key) for key in ORIGINAL}


# --- selection, precedence, recording ----------------------------------------------------------

def test_each_recipe_decides_the_same_settings_and_the_defaults_are_the_original():
    settings = {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(set(values) == set(ORIGINAL) <= settings for values in RECIPES.values())
    assert _recipe_values(TrainConfig()) == ORIGINAL and TrainConfig().recipe == "original"
    assert _recipe_values(_config(["--data", "x"])) == ORIGINAL


def test_recipe_flag_selects_every_value_of_the_recipe():
    improved = _config(["--data", "x", "--recipe", "improved"])
    assert improved.recipe == "improved" and _recipe_values(improved) == IMPROVED
    assert (improved.image_size, improved.batch_size) == (224, 50)  # not a recipe setting


def test_a_flag_or_file_overrides_the_recipe(tmp_path):
    flagged = _config(["--data", "x", "--recipe", "improved", "--lr", "3e-4", "--mix-prob", "0"])
    assert (flagged.lr, flagged.mix_prob) == (3e-4, 0.0)
    assert _recipe_values(flagged) == {**IMPROVED, "lr": 3e-4, "mix_prob": 0.0}
    # The recipe named in a file, a file's value over the recipe, a flag over the file.
    path = tmp_path / "settings.yaml"
    path.write_text("data: x\nrecipe: improved\nema_decay: 0.99\nepochs: 40\n")
    from_file = _config(["--config", str(path), "--epochs", "50"])
    assert from_file.recipe == "improved"
    assert _recipe_values(from_file) == {**IMPROVED, "ema_decay": 0.99, "epochs": 50,
                                         "warmup_epochs": 3}  # 5 of 100, rounded up
    # A flag may choose another recipe than the file: the file's own settings still apply.
    back = _config(["--config", str(path), "--recipe", "original"])
    assert _recipe_values(back) == {**ORIGINAL, "ema_decay": 0.99, "epochs": 40}


def test_the_quick_profile_sits_between_the_recipe_and_the_user(tmp_path):
    quick = _config(["--recipe", "improved"])  # no --data: the built-in dataset's quick profile
    assert _recipe_values(quick) == {**IMPROVED, **{k: v for k, v in QUICK_PROFILE.items() if k in IMPROVED},
                                     "warmup_epochs": 1}  # 5 of 100 epochs is 1 of 6
    assert quick.image_size == QUICK_PROFILE["image_size"]
    assert _recipe_values(_config([])) == {**ORIGINAL, **{k: v for k, v in QUICK_PROFILE.items()
                                                          if k in ORIGINAL}}
    assert _config(["--recipe", "improved", "--warmup-epochs", "2"]).warmup_epochs == 2


@pytest.mark.parametrize("epochs, warmup", [(100, 5), (200, 10), (30, 2), (10, 1), (6, 1), (2, 1), (1, 0)])
def test_an_unset_warm_up_follows_the_epochs(epochs, warmup):
    config, _, _, notices = config_from_args(["--data", "x", "--recipe", "improved", "--epochs", str(epochs)])
    assert config.warmup_epochs == warmup
    assert notices == ([] if warmup == 5 else [
        f"warm-up: {warmup} of {epochs} epochs, the improved recipe's 5 of 100 scaled to the epochs "
        "(--warmup-epochs sets it)"])
    assert _config(["--data", "x", "--epochs", str(epochs)]).warmup_epochs == 0  # the original has none


def test_a_warm_up_the_user_set_is_kept_or_refused(tmp_path):
    assert _config(["--data", "x", "--recipe", "improved", "--epochs", "10", "--warmup-epochs", "7"]
                   ).warmup_epochs == 7
    path = tmp_path / "c.yaml"
    path.write_text("recipe: improved\nepochs: 10\nwarmup_epochs: 0\n")
    assert _config(["--data", "x", "--config", str(path)]).warmup_epochs == 0  # a file sets it too
    with pytest.raises(ConfigError, match=r"warmup_epochs must be at least 0 and below epochs \(10\), got 10"):
        _config(["--data", "x", "--recipe", "improved", "--epochs", "10", "--warmup-epochs", "10"])


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "fancy"], "unknown recipe 'fancy'; choose from original, improved"),
    (["--schedule", "linear"], "unknown schedule 'linear'"),
    (["--mix-prob", "1.5"], "mix_prob must be in"),
    (["--mix-prob", "0.5", "--mixup-alpha", "0", "--cutmix-alpha", "0"], "needs mixup_alpha or cutmix_alpha"),
    (["--ema-decay", "1"], r"ema_decay must be in \[0, 1\)"),
    (["--data", "x", "--recipe", "improved", "--epochs", "5", "--warmup-epochs", "5"],
     "warmup_epochs must be .* below epochs"),
    (["--label-smoothing", "1"], "label_smoothing"),
])
def test_bad_recipe_settings_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError, match=message) as info:
        _config(argv)
    assert "\n" not in str(info.value)


def test_help_shows_the_improved_recipe_next_to_the_default(capsys):
    with pytest.raises(SystemExit):
        config_from_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for name, value in IMPROVED.items():
        flag = "--" + name.replace("_", "-")
        after = names[names.index(name) + 1].replace("_", "-")
        help_of = text.split(f"{flag} {name.upper()}")[-1].split(f"--{after}")[0]
        assert f"default: {ORIGINAL[name]}" in help_of, flag
        assert (f"--recipe improved: {value}" in help_of) == (value != ORIGINAL[name]), flag


def test_the_settings_table_in_the_docs_is_the_one_the_fields_make():
    text = DOCS.read_text(encoding="utf-8")
    assert docs_with_table(text) == text, "run python -m training.config to rewrite docs/recipe.md"
    for f in dataclasses.fields(TrainConfig):  # each help text reaches the table
        assert f.metadata["help"].replace("$", "\\$") in text, f.name


def test_flags_and_config_files_convert_a_setting_the_same_way(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"epochs": 3.0, "lr": "2e-4", "models": ["resnet34"], "no_cache": true}')
    from_file = _config(["--config", str(path)])
    flagged = _config(["--epochs", "3", "--lr", "2e-4", "--models", "resnet34", "--no-cache"])
    assert from_file == flagged
    path.write_text('{"models": [1, 2]}')
    with pytest.raises(ConfigError, match="models .* must be comma-separated names"):
        _config(["--config", str(path)])


# --- learning-rate schedules ------------------------------------------------------------------------

def _learning_rates(config: TrainConfig) -> list[float]:
    """The learning rate each epoch trains with, stepping the schedule once per epoch."""
    optimization = build_optimization(nn.Linear(2, 2), config)
    rates = []
    for _ in range(config.epochs):
        rates.append(optimization.optimizer.param_groups[0]["lr"])
        optimization.optimizer.step()
        optimization.scheduler.step()
    return rates


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    config = make_config({"data": "x", "schedule": "cosine", "lr": 1e-3, "warmup_epochs": 2, "epochs": 6})
    # Epochs 1, 2 at 1/3 and 2/3 of lr; then lr * (1 + cos(pi * j / 4)) / 2 for j = 0..3.
    expected = [1e-3 / 3, 2e-3 / 3] + [1e-3 * (1 + math.cos(math.pi * j / 4)) / 2 for j in range(4)]
    assert _learning_rates(config) == pytest.approx(expected)
    assert _learning_rates(dataclasses.replace(config, warmup_epochs=0, epochs=4)) == pytest.approx(
        [1e-3 * (1 + math.cos(math.pi * j / 4)) / 2 for j in range(4)])


def test_step_schedule_after_a_warm_up():
    config = make_config({"data": "x", "lr": 1e-3, "warmup_epochs": 1, "step_size": 2, "gamma": 0.1,
                          "epochs": 5})
    assert _learning_rates(config) == pytest.approx([5e-4, 1e-3, 1e-3, 1e-4, 1e-4])


# --- batch mixing ---------------------------------------------------------------------------------

CLASSES = 5


def _batch(n=4):
    """Distinct labels and random pixels: every mixed pixel and label tells where it came from."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 16, 16, generator=g), torch.arange(n) % CLASSES


def _mixer(**settings):
    return build_mix(make_config({"data": "x", "mix_prob": 1.0, **settings}), CLASSES)


def test_mixup_mixes_pixels_and_labels_in_the_same_proportion():
    images, labels = _batch()
    torch.manual_seed(1)
    mixed, soft = _mixer(cutmix_alpha=0.0)(images, labels)
    assert soft.shape == (4, CLASSES) and torch.allclose(soft.sum(1), torch.ones(4)) and (soft >= 0).all()
    share = soft[torch.arange(4), labels]  # each image's own label's share: mixup's weight
    expected = share.view(-1, 1, 1, 1) * images + (1 - share.view(-1, 1, 1, 1)) * images.roll(1, 0)
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert not torch.allclose(mixed, images)


def test_cutmix_pastes_a_box_and_labels_it_by_area():
    images, labels = _batch()
    torch.manual_seed(2)
    mixed, soft = _mixer(mixup_alpha=0.0)(images, labels)
    assert torch.allclose(soft.sum(1), torch.ones(4))
    own = (mixed == images).all(1).float().mean((1, 2))  # share of pixels from the image itself
    assert ((mixed == images) | (mixed == images.roll(1, 0))).all()
    assert torch.allclose(soft[torch.arange(4), labels], own)
    assert (own < 1).any()


def test_mixing_is_off_at_mix_prob_0_and_mixes_that_share_of_batches():
    assert build_mix(make_config({"data": "x"}), CLASSES) is None
    assert build_mix(make_config({"data": "x", "recipe": "improved", "mix_prob": 0.0}), CLASSES) is None
    mix = build_mix(make_config({"data": "x", "recipe": "improved"}), CLASSES)
    images, labels = _batch()
    torch.manual_seed(3)
    mixed = sum(mix(images, labels)[1].dim() == 2 for _ in range(400))
    assert 0.4 < mixed / 400 < 0.6  # mix_prob 0.5
    kept_images, kept_labels = BatchMix(CLASSES, 0.0, 0.2, 1.0)(images, labels)
    assert kept_images is images and kept_labels is labels


class _Recorder(nn.CrossEntropyLoss):
    def __init__(self):
        super().__init__(label_smoothing=0.1)
        self.targets = []

    def forward(self, logits, target):
        self.targets.append(target)
        return super().forward(logits, target)


def test_the_training_loop_mixes_each_batch_and_updates_the_average_each_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, CLASSES))
    config = make_config({"data": "x", "recipe": "improved", "mix_prob": 1.0})
    optimizer = build_optimization(model, config).optimizer
    ema = build_ema(model, config)
    criterion = _Recorder()
    batches = [_batch() for _ in range(3)]
    train_one_epoch(model, batches, criterion, optimizer, Precision(CPU), CPU, World(), desc="",
                    mix=build_mix(config, CLASSES), ema=ema)
    assert len(criterion.targets) == 3
    assert all(t.shape == (4, CLASSES) and torch.allclose(t.sum(1), torch.ones(4)) for t in criterion.targets)
    assert int(ema.n_averaged) == 3
    raw, averaged = model[1].weight, ema.module[1].weight
    assert not torch.allclose(raw, averaged)


# --- the exponential moving average -------------------------------------------------------------

def test_the_average_warms_up_its_decay():
    model = nn.Linear(1, 1, bias=False)
    ema = build_ema(model, make_config({"data": "x", "ema_decay": 0.5}))
    expected = None
    for n, value in enumerate([4.0, 2.0, 8.0, 1.0, 3.0]):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update_parameters(model)
        # The first update copies; update n weights the old average by min(0.5, (1 + n) / (10 + n)).
        decay = min(0.5, (1 + n) / (10 + n))
        expected = value if expected is None else decay * expected + (1 - decay) * value
        assert ema.module.weight.item() == pytest.approx(expected)
    assert build_ema(model, make_config({"data": "x"})) is None  # the original recipe has none


# --- runs with the improved recipe: what is evaluated and saved, and resume -------------------------

EPOCHS = 2
MODEL = "resnet34"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from training.synthetic import generate

    return generate(tmp_path_factory.mktemp("recipe-data") / "data", images_per_class=6, seed=3)


def _args(data, out):
    # One warm-up epoch, so the schedule changes between the two epochs.
    return ["--data", str(data), "--recipe", "improved", "--models", MODEL, "--epochs", str(EPOCHS),
            "--warmup-epochs", "1", "--image-size", str(TINY_SIZE), "--batch-size", "8",
            "--workers", "0", "--out", str(out)]


@pytest.fixture(scope="module")
def ema_runs(small_data, tmp_path_factory):
    """An uninterrupted improved-recipe run; the same run stopped after epoch 1 (its checkpoints
    then) and resumed."""
    from training.run import main

    base = tmp_path_factory.mktemp("ema")
    full, resumed = base / "full", base / "resumed"
    assert main(_args(small_data, full)) == 0
    log_epoch = trainer.log_epoch

    def stop_after_first_epoch(run, improved):
        log_epoch(run, improved)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "log_epoch", stop_after_first_epoch)
        assert main(_args(small_data, resumed)) == 130
    stopped = {name: torch.load(resumed / MODEL / name, weights_only=True) for name in ("best.pt", "last.pt")}
    assert main(["--resume", str(resumed)]) == 0
    return full, resumed, stopped


def test_config_json_records_the_recipe_and_every_value_used(ema_runs):
    full, _, _ = ema_runs
    saved = json.loads((full / "config.json").read_text())
    assert set(saved) == {f.name for f in dataclasses.fields(TrainConfig)} | {"chosen"}
    assert saved["recipe"] == "improved"
    assert {k: saved[k] for k in IMPROVED} == {**IMPROVED, "epochs": EPOCHS, "warmup_epochs": 1}
    assert to_dict(from_dict(saved), saved["chosen"]) == saved  # what --resume continues with


def test_best_checkpoint_holds_the_average_not_the_trained_weights(ema_runs):
    _, _, stopped = ema_runs
    best, last = stopped["best.pt"], stopped["last.pt"]
    assert best["epoch"] == last["epoch"] == 1
    averaged = {k.removeprefix("module."): v for k, v in last["ema_state"].items() if k != "n_averaged"}
    assert best["model_state"].keys() == averaged.keys() == last["model_state"].keys()
    for key, tensor in best["model_state"].items():
        assert torch.equal(tensor, averaged[key]), key
    assert any(not torch.equal(best["model_state"][k], last["model_state"][k]) for k in averaged)


def test_validation_evaluates_the_average(ema_runs, small_data):
    """The epoch's validation loss (early stopping's, best.pt's) is the average's, not the model's."""
    from training.checkpoint import rebuild_model
    from training.run import load_dataset

    full, _, stopped = ema_runs
    config = from_dict(json.loads((full / "config.json").read_text()))
    split = load_dataset(config, World()).splits["val"]
    criterion = build_optimization(nn.Linear(1, 1), config).criterion

    def val_loss(state):
        model = rebuild_model({**stopped["best.pt"], "model_state": state})
        return evaluate(model, split, criterion, EvalTransform(trainer.preprocessing_for(config)),
                        Precision(CPU), CPU, World()).loss

    recorded = stopped["last.pt"]["history"][0]["val_loss"]
    assert stopped["best.pt"]["val_loss"] == recorded
    assert val_loss(stopped["best.pt"]["model_state"]) == pytest.approx(recorded, abs=1e-5)
    assert val_loss(stopped["last.pt"]["model_state"]) != pytest.approx(recorded, abs=1e-3)


def test_resumed_average_run_matches_an_uninterrupted_run(ema_runs):
    full, resumed, _ = ema_runs
    a = torch.load(full / MODEL / "last.pt", weights_only=True)
    b = torch.load(resumed / MODEL / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == EPOCHS and a["finished"] and b["finished"]
    for key in ("model_state", "ema_state"):
        assert a[key].keys() == b[key].keys()
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}: {name} differs"
    strip = lambda history: [{k: v for k, v in row.items() if k != "seconds"} for row in history]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert [row["lr"] for row in a["history"]] == pytest.approx([IMPROVED["lr"] / 2, IMPROVED["lr"]])
    assert a["scheduler_state"] == b["scheduler_state"]
    best_a = torch.load(full / MODEL / "best.pt", weights_only=True)
    best_b = torch.load(resumed / MODEL / "best.pt", weights_only=True)
    assert best_a["epoch"] == best_b["epoch"]
    assert all(torch.equal(t, best_b["model_state"][k]) for k, t in best_a["model_state"].items())

"""--init-weights and --freeze-epochs, with a state dict saved from torchvision's resnet34().

No pretrained weights exist here: torchvision's randomly initialised ResNet-34 has the same
names and shapes as the ImageNet file, and values that differ from our own initialisation.
"""
from __future__ import annotations

import re

import pytest
import torch
import torchvision

from conftest import TINY_SIZE, run_python
from training import checkpoint
from training.config import TrainConfig
from training.engine import Precision, train_one_epoch
from training.distributed import World
from training.models import MODEL_NAMES, create_model
from training.recipe import build_optimization
from training.transfer import BackboneFreezer, load_init_weights, pretrained_parameter_names


@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory):
    torch.manual_seed(1)
    state = torchvision.models.resnet34().state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet34-torchvision.pth"
    torch.save(state, path)
    return path, state


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loads_exactly_the_matching_tensors(name, torchvision_weights, capsys):
    path, source = torchvision_weights
    model = create_model(name, 5)
    before = snapshot(model)

    loaded = load_init_weights(model, path)

    expected = {k for k in source if not k.startswith("fc.")}  # every torchvision tensor but the head
    assert set(loaded) == expected
    after = model.state_dict()
    for key in expected:
        assert torch.equal(after[key], source[key]), key
    untouched = set(after) - expected
    # What has no torchvision counterpart: the head, and in the modified model the SE blocks.
    fresh = {k for k in after if k.startswith("fc.") or ".se." in k}
    assert untouched == fresh
    if name == "resnet34_modified":
        assert sum(".se." in k for k in untouched) == 2 * 16  # two Linear layers in 16 blocks
    for key in untouched:
        assert torch.equal(after[key], before[key]), key
    # The values really changed (torchvision's init is not ours), so the checks above bite.
    assert not torch.equal(before["layer3.2.conv1.weight"], after["layer3.2.conv1.weight"])

    out = capsys.readouterr().out
    assert f"loaded {len(expected)} of {len(after)} tensors" in out
    assert "fc.weight" in out  # the file's head is reported as not used


def test_cli_refuses_unrelated_file(tiny_dataset, tmp_path):
    junk = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(8, 8), "conv1.weight": torch.zeros(64, 3, 7, 7)}, junk)
    run_dir = tmp_path / "run"
    result = run_python(["-m", "training.run", "--data", str(tiny_dataset), "--epochs", "1",
                         "--image-size", str(TINY_SIZE), "--workers", "0", "--models", "resnet34",
                         "--init-weights", str(junk), "--out", str(run_dir)])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "matches only 1 of" in lines[0] and "ResNet-34" in lines[0]
    assert not run_dir.exists()  # refused before a run folder is made


def test_cli_refuses_freeze_without_weights(tiny_dataset, tmp_path, capsys):
    from training.run import main

    code = main(["--data", str(tiny_dataset), "--freeze-epochs", "1", "--out", str(tmp_path / "run")])
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: --freeze-epochs needs --init-weights (a backbone to keep frozen)"


@pytest.mark.parametrize("name", ["plain34", "resnet34_modified"])
def test_freeze_trains_only_new_layers_then_everything(name, torchvision_weights):
    path, _ = torchvision_weights
    torch.manual_seed(0)
    model = create_model(name, 5)
    load_init_weights(model, path, verbose=False)
    pretrained = pretrained_parameter_names(model)
    params = dict(model.named_parameters())
    # Plain-34's projections are never used and never train, frozen or not.
    unused = {n for n, p in params.items() if not p.requires_grad}
    assert (name == "plain34") == bool(unused)
    new = set(params) - pretrained
    assert new == {n for n in params if n.startswith("fc.") or ".se." in n}

    recipe = build_optimization(model, TrainConfig())  # the trainer's optimizer and loss
    optimizer, criterion = recipe.optimizer, recipe.criterion
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, TINY_SIZE, TINY_SIZE, generator=generator),
                torch.randint(0, 5, (8,), generator=generator)) for _ in range(2)]
    cpu = torch.device("cpu")
    freezer = BackboneFreezer(model, epochs=1)

    def epoch(number: int) -> set[str]:
        freezer.apply(number)
        start = {n: p.detach().clone() for n, p in params.items()}
        train_one_epoch(model, batches, criterion, optimizer, Precision(cpu), cpu, World(), desc="")
        return {n for n, p in params.items() if not torch.equal(p, start[n])}

    changed = epoch(1)  # frozen
    assert changed == new
    changed = epoch(2)  # unfrozen: everything that trains
    assert changed == set(params) - unused
    assert unused <= {n for n in params if re.search(r"\.downsample\.", n)}


@pytest.mark.slow  # trains a model
def test_cli_init_weights_and_frozen_epoch(tiny_dataset, torchvision_weights, tmp_path):
    path, source = torchvision_weights
    run_dir = tmp_path / "run"
    result = run_python(["-m", "training.run", "--data", str(tiny_dataset), "--epochs", "1",
                         "--image-size", str(TINY_SIZE), "--batch-size", "8", "--workers", "0",
                         "--models", "resnet34", "--init-weights", str(path), "--freeze-epochs", "1",
                         "--out", str(run_dir)])
    assert result.returncode == 0, result.stderr
    assert "Init weights: loaded 216 of 218 tensors" in result.stdout
    last = checkpoint.load(run_dir / "resnet34" / "last.pt")
    state = last["model_state"]
    model = checkpoint.rebuild_model(last)
    for name in pretrained_parameter_names(model):  # the whole backbone came through unchanged
        assert torch.equal(state[name], source[name]), name
    assert last["config"]["init_weights"] == str(path) and last["config"]["freeze_epochs"] == 1

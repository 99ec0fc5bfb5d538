"""The three architectures: exact sizes, shapes, and behavioural proofs of what differs."""
import copy

import pytest
import torch
from torch import nn

from training.layers import ExpMish, PooledMish, SqueezeExcite
from training.models import (
    ARCHITECTURES, MODEL_NAMES, Architecture, count_mult_adds, count_parameters, create_model,
)

EXPECTED_PARAMETERS = {"plain34": 21_287_237, "resnet34": 21_287_237, "resnet34_modified": 21_708_101}
SIZE = 32


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: create_model(name, 5).eval() for name in MODEL_NAMES}


def _blocks(model):
    return [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]


def test_model_names_are_the_three_variants():
    assert MODEL_NAMES == ("plain34", "resnet34", "resnet34_modified")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count_is_exact(models, name):
    assert count_parameters(models[name]) == EXPECTED_PARAMETERS[name]


def test_modified_adds_exactly_the_se_blocks_and_the_head(models):
    # SE: Linear(C, C/16) + Linear(C/16, C) without bias = C^2/8 per block; head: Linear(512, 512)
    # + BatchNorm1d(512) on top of the shared Linear(512, classes).
    se = sum(blocks * channels * channels // 8
             for channels, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)))
    head = 512 * 512 + 512 + 2 * 512
    assert EXPECTED_PARAMETERS["resnet34_modified"] - EXPECTED_PARAMETERS["resnet34"] == se + head
    modified = models["resnet34_modified"]
    assert sum(count_parameters(b.se) for b in _blocks(modified)) == se


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(models, name, batch):
    with torch.no_grad():
        out = models[name](torch.randn(batch, 3, SIZE, SIZE))
    assert out.shape == (batch, 5)
    assert torch.isfinite(out).all()


def test_output_shape_follows_num_classes():
    model = create_model("resnet34", 11).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 11)


def _with_residual_branch_silenced(models, name):
    """The model with every block's bn2 weight and bias zeroed: the conv branch outputs 0."""
    model = copy.deepcopy(models[name])
    with torch.no_grad():
        for block in _blocks(model):
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
    return model


def test_plain34_has_no_skip_connection(models):
    model = _with_residual_branch_silenced(models, "plain34")
    x1, x2 = torch.randn(2, 1, 3, SIZE, SIZE)
    with torch.no_grad():
        # With the conv branch silenced nothing reaches the head: the input no longer matters.
        assert torch.equal(model(x1), model(x2))
        block = model.layer1[0]
        assert torch.equal(block(torch.randn(1, 64, 8, 8)), torch.zeros(1, 64, 8, 8))


@pytest.mark.parametrize("name", ["resnet34", "resnet34_modified"])
def test_resnets_add_the_shortcut(models, name):
    model = _with_residual_branch_silenced(models, name)
    x1, x2 = torch.randn(2, 1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert not torch.allclose(model(x1), model(x2))
        # An identity block with a silent branch passes its input through the activation.
        block = model.layer1[0]
        assert block.downsample is None
        h = torch.randn(1, 64, 8, 8)
        torch.testing.assert_close(block(h), block.act2(h.clone()))
        # A projection block adds downsample(x).
        block = model.layer2[0]
        h = torch.randn(1, 64, 8, 8)
        torch.testing.assert_close(block(h), block.act2(block.downsample(h)))


def test_unsilenced_plain34_depends_on_its_input(models):
    x1, x2 = torch.randn(2, 1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert not torch.allclose(models["plain34"](x1), models["plain34"](x2))


def test_plain34_projection_exists_but_is_frozen(models):
    block = models["plain34"].layer2[0]
    assert block.downsample is not None
    assert not any(p.requires_grad for p in block.downsample.parameters())
    assert all(p.requires_grad for p in models["resnet34"].layer2[0].downsample.parameters())


def test_squeeze_excite_only_in_modified(models):
    for name in ("plain34", "resnet34"):
        assert not any(isinstance(m, SqueezeExcite) for m in models[name].modules())
    blocks = _blocks(models["resnet34_modified"])
    assert len(blocks) == 16 and all(isinstance(b.se, SqueezeExcite) for b in blocks)


def test_squeeze_excite_gate_scales_channels():
    se = SqueezeExcite(64)
    x = torch.randn(2, 64, 5, 5)
    with torch.no_grad():
        se.fc2.weight.zero_()  # gate = sigmoid(0) = 0.5 for every channel
        torch.testing.assert_close(se(x), 0.5 * x)
        se.fc2.weight.fill_(1.0)
        gate = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean((2, 3))))))
        torch.testing.assert_close(se(x), x * gate[:, :, None, None])


def _features(model, x):
    """The pooled 512-d features the head sees (the head's small init hides changes in logits)."""
    seen = []
    handle = model.avgpool.register_forward_hook(lambda _m, _i, out: seen.append(out.flatten(1)))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def test_changing_se_weights_changes_the_modified_output(models):
    model = copy.deepcopy(models["resnet34_modified"])
    x = torch.randn(2, 3, SIZE, SIZE)
    before = _features(model, x)
    with torch.no_grad():
        se = model.layer3[1].se  # from gates of about 0.5 everywhere to gates spread over (0, 1)
        se.fc1.weight.normal_(0.0, 1.0)
        se.fc2.weight.normal_(0.0, 1.0)
    after = _features(model, x)
    assert (after - before).abs().max() > 1e-2 * before.abs().max()


def test_mish_only_in_modified(models):
    def kinds(model):
        return {type(m) for m in model.modules()}

    assert nn.Mish in kinds(models["resnet34_modified"])
    modified = models["resnet34_modified"]
    assert isinstance(modified.act, nn.Mish)
    assert all(isinstance(b.act1, nn.Mish) and isinstance(b.act2, nn.Mish) for b in _blocks(modified))
    for name in ("plain34", "resnet34"):
        assert nn.Mish not in kinds(models[name])
        assert isinstance(models[name].act, nn.ReLU)


def test_head_bn_dropout_only_in_modified(models):
    head = models["resnet34_modified"].fc
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Dropout, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[4].out_features) == (512, 512, 5)
    assert head[2].negative_slope == pytest.approx(0.1) and head[3].p == pytest.approx(0.4)
    for name in ("plain34", "resnet34"):
        fc = models[name].fc
        assert isinstance(fc, nn.Linear) and (fc.in_features, fc.out_features) == (512, 5)


def test_dropout_makes_only_the_modified_model_random_in_training(models):
    x = torch.randn(2, 3, SIZE, SIZE)
    for name, random_in_training in (("resnet34", False), ("resnet34_modified", True)):
        model = copy.deepcopy(models[name]).train()
        with torch.no_grad():
            a, b = model(x), model(x)
        assert torch.equal(a, b) != random_in_training, name
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x), model(x))


def test_same_seed_same_initial_weights():
    torch.manual_seed(5)
    a = create_model("resnet34_modified", 5).state_dict()
    torch.manual_seed(5)
    b = create_model("resnet34_modified", 5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_create_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        create_model("resnet50", 5)
    with pytest.raises(ValueError, match="at least 2"):
        create_model("resnet34", 1)


def test_mult_adds_at_224(models):
    resnet = count_mult_adds(models["resnet34"], (224, 224))
    assert resnet / 1e9 == pytest.approx(3.66, abs=0.01)
    # Plain-34 never computes its three 1x1 projections (it would discard their output).
    projections = sum(c_in * c_out * side * side for c_in, c_out, side in
                      ((64, 128, 28), (128, 256, 14), (256, 512, 7)))
    assert count_mult_adds(models["plain34"], (224, 224)) == resnet - projections
    # The modified model adds the SE linears (C^2 / 8 per block) and the 512 x 512 head layer.
    se = sum(blocks * channels * channels // 8
             for channels, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)))
    assert count_mult_adds(models["resnet34_modified"], (224, 224)) == resnet + se + 512 * 512


def test_registry_specs_round_trip_and_reject_unknown_fields():
    for arch in ARCHITECTURES.values():
        assert Architecture.from_dict(arch.to_dict()) == arch
    with pytest.raises(ValueError, match="unknown architecture field"):
        Architecture.from_dict({**ARCHITECTURES["resnet34"].to_dict(), "width": 2})
    with pytest.raises(ValueError, match="unknown activation"):
        Architecture(display_name="x", activation="gelu")


def test_a_spec_builds_what_it_says():
    narrow = Architecture(display_name="SE-8", squeeze_excite=True, se_reduction=8, head_width=64,
                          dropout=0.2, negative_slope=0.3, activation="mish")
    model = create_model(narrow, 3)
    assert model.layer1[0].se.fc1.out_features == 64 // 8
    assert [type(m) for m in model.fc] == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Dropout, nn.Linear]
    assert model.fc[0].out_features == 64 and model.fc[2].negative_slope == 0.3 and model.fc[3].p == 0.2
    assert isinstance(model.act, nn.Mish)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_export_form_computes_the_same_function_and_leaves_the_model_alone(models, name):
    model = models[name]
    fast = model.export_form()
    torch.manual_seed(1)
    x = torch.randn(3, 3, SIZE, SIZE) * 2
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-4)
    mish = ARCHITECTURES[name].activation == "mish"
    assert any(isinstance(m, nn.Mish) for m in model.modules()) == mish  # the original is untouched
    assert not any(isinstance(m, nn.Mish) for m in fast.modules())
    assert any(isinstance(m, ExpMish) for m in fast.modules()) == mish
    assert isinstance(fast.maxpool, PooledMish) == mish

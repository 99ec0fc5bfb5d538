"""The three ResNet-34 variants: one network class, built from an architecture spec.

- ``plain34``: ResNet-34 with every skip connection removed (He et al., 2016, "plain" baseline);
- ``resnet34``: the standard BasicBlock ResNet-34;
- ``resnet34_modified``: ResNet-34 with Squeeze-and-Excitation in every block, Mish
  activations and a Linear-BatchNorm-LeakyReLU-Dropout-Linear head.

Module names follow torchvision's ResNet (conv1, bn1, layer1..4, downsample, fc), so a
torchvision state dict maps onto these models by name. The blocks are in ``training.layers``.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from training.layers import (ACTIVATIONS, BasicBlock, GradCam, PooledMish, make_activation, mlp_head,
                             swap_mish)

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (channels, blocks, first stride)
HEATMAP_LAYER = "layer4"  # where Grad-CAM looks: the last stage's output


@dataclass(frozen=True)
class Architecture:
    """Everything that tells the variants apart. Checkpoints store it, so a model rebuilds as
    it was trained even if the registry below changes later."""

    display_name: str
    residual: bool = True  # add the shortcut to each block's output
    squeeze_excite: bool = False
    se_reduction: int = 16  # SE bottleneck: channels // se_reduction units
    activation: str = "relu"  # a name in training.layers.ACTIVATIONS
    head_width: int | None = None  # None: one Linear; else Linear(512, w)-BN-LeakyReLU-Dropout-Linear
    dropout: float = 0.0  # in the wide head, before its last Linear
    negative_slope: float = 0.1  # of the wide head's LeakyReLU

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose from {', '.join(ACTIVATIONS)}")
        if self.se_reduction < 1 or (self.head_width is not None and self.head_width < 1):
            raise ValueError("se_reduction and head_width must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Architecture":
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown architecture field(s): {', '.join(unknown)}")
        return cls(**values)


ARCHITECTURES: dict[str, Architecture] = {
    "plain34": Architecture(display_name="Plain-34", residual=False),
    "resnet34": Architecture(display_name="ResNet-34"),
    "resnet34_modified": Architecture(
        display_name="ResNet-34-Modified", squeeze_excite=True, se_reduction=16,
        activation="mish", head_width=512, dropout=0.4, negative_slope=0.1),
}
MODEL_NAMES = tuple(ARCHITECTURES)


class ResNet34Variant(nn.Module):
    def __init__(self, arch: Architecture, num_classes: int):
        super().__init__()
        self.arch = arch
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act = make_activation(arch.activation)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = 64
        se_reduction = arch.se_reduction if arch.squeeze_excite else None
        for index, (channels, blocks, stride) in enumerate(STAGES, start=1):
            layer = []
            for b in range(blocks):
                layer.append(BasicBlock(in_ch, channels, stride if b == 0 else 1, residual=arch.residual,
                                        activation=arch.activation, se_reduction=se_reduction))
                in_ch = channels
            self.add_module(f"layer{index}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if arch.head_width:
            self.fc = mlp_head(in_ch, arch.head_width, num_classes, dropout=arch.dropout,
                               negative_slope=arch.negative_slope)
        else:
            self.fc = nn.Linear(in_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def head_parameter_names(self) -> set[str]:
        return {f"fc.{name}" for name, _ in self.fc.named_parameters()}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output (``HEATMAP_LAYER``): N x 512 x h x w."""
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))

    def classify_and_explain(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, Grad-CAM heatmaps of every class: N x classes x h x w), in eval mode."""
        features = self.features(x)
        pooled = torch.flatten(self.avgpool(features), 1)
        return self.fc(pooled), GradCam(self.fc)(features, pooled)

    def export_form(self) -> "ResNet34Variant":
        """An eval-mode copy computing the same function with the operators it is exported in:
        Mish as ExpMish, and the stem's max-pool-of-Mish as PooledMish."""
        model = copy.deepcopy(self).eval()
        if model.arch.activation == "mish":
            model.maxpool, model.act = PooledMish(model.maxpool), nn.Identity()
            swap_mish(model)
        return model


def create_model(arch: str | Architecture, num_classes: int) -> ResNet34Variant:
    """A fresh model from a registry name or an architecture spec."""
    if isinstance(arch, str):
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown model {arch!r}; choose from {', '.join(MODEL_NAMES)}")
        arch = ARCHITECTURES[arch]
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return ResNet34Variant(arch, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_mult_adds(model: nn.Module, image_size: tuple[int, int]) -> int:
    """Multiply-accumulates of one forward pass (convolutions and linear layers)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        per_output = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        total += output[0].numel() * per_output

    def linear_hook(m: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    hooks = [
        m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, 3, *image_size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total

"""The three ResNet-34 variants: one network class, one block with three switches.

- ``plain34``: ResNet-34 with every skip connection removed (He et al., 2016, "plain" baseline);
- ``resnet34``: the standard BasicBlock ResNet-34;
- ``resnet34_modified``: ResNet-34 with Squeeze-and-Excitation (Hu et al., 2018) in every block,
  Mish activations (Misra, 2019) and a Linear-BatchNorm-LeakyReLU-Dropout-Linear head.

Module names follow torchvision's ResNet (conv1, bn1, layer1..4, downsample, fc), so a
torchvision state dict maps onto these models by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (channels, blocks, first stride)


@dataclass(frozen=True)
class Architecture:
    display_name: str
    residual: bool  # add the shortcut to the block output
    squeeze_excite: bool
    act_layer: Callable[[], nn.Module]
    mlp_head: bool  # Linear-BN-LeakyReLU-Dropout-Linear instead of one Linear


ARCHITECTURES: dict[str, Architecture] = {
    "plain34": Architecture("Plain-34", False, False, nn.ReLU, False),
    "resnet34": Architecture("ResNet-34", True, False, nn.ReLU, False),
    "resnet34_modified": Architecture("ResNet-34-Modified", True, True, nn.Mish, True),
}
MODEL_NAMES = tuple(ARCHITECTURES)


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation: rescale channels by a gate computed from their global average."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(channels // reduction, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(self.act(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; optionally SE before the (optional) shortcut addition."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, arch: Architecture):
        super().__init__()
        self.residual = arch.residual
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1 = arch.act_layer()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch) if arch.squeeze_excite else nn.Identity()
        self.act2 = arch.act_layer()
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )
            if not self.residual:
                # Plain-34 keeps the projection so its parameter count equals ResNet-34's, but
                # never uses it; frozen, so optimizers and DDP don't expect gradients for it.
                self.downsample.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.act2(out)


class ResNet34Variant(nn.Module):
    def __init__(self, arch: Architecture, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act = arch.act_layer()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = 64
        for index, (channels, blocks, stride) in enumerate(STAGES, start=1):
            layer = []
            for b in range(blocks):
                layer.append(BasicBlock(in_ch, channels, stride if b == 0 else 1, arch))
                in_ch = channels
            self.add_module(f"layer{index}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if arch.mlp_head:
            self.fc = nn.Sequential(
                nn.Linear(in_ch, 512),
                nn.BatchNorm1d(512),
                nn.LeakyReLU(0.1),
                nn.Dropout(0.4),
                nn.Linear(512, num_classes),
            )
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def create_model(name: str, num_classes: int) -> ResNet34Variant:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return ResNet34Variant(ARCHITECTURES[name], num_classes)


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

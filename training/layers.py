"""The building blocks of the three networks, one concept each, variants made by arguments.

Each training-time layer has the form it is exported in beside it (``export_form``): the same
function written with operators ONNX Runtime runs fast.
"""
from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "mish": nn.Mish}


def make_activation(name: str) -> nn.Module:
    """ReLU (Nair and Hinton, 2010) or Mish (Misra, 2019, "Mish: A Self Regularized
    Non-Monotonic Activation Function"), by name."""
    return ACTIVATIONS[name]()


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al., 2018, "Squeeze-and-Excitation Networks"): rescale
    channels by a sigmoid gate computed from their global average through a bottleneck of
    ``channels // reduction`` units."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(channels // reduction, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(self.act(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm (He et al., 2016, "Deep Residual Learning for Image
    Recognition"); optionally Squeeze-and-Excitation after the second BatchNorm, and optionally
    without the shortcut addition (the paper's "plain" network)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, residual: bool,
                 activation: str, se_reduction: int | None):
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch, se_reduction) if se_reduction else nn.Identity()
        self.act2 = make_activation(activation)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )
            if not residual:
                # The plain network keeps the projection so its parameter count equals
                # ResNet-34's, but never uses it; frozen, so optimizers and DDP expect no
                # gradients for it.
                self.downsample.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.act2(out)


def mlp_head(in_features: int, width: int, num_classes: int, *, dropout: float,
             negative_slope: float) -> nn.Sequential:
    """Linear -> BatchNorm1d (Ioffe and Szegedy, 2015) -> LeakyReLU -> Dropout (Srivastava et
    al., 2014) -> Linear: the modified model's classifier head."""
    return nn.Sequential(
        nn.Linear(in_features, width),
        nn.BatchNorm1d(width),
        nn.LeakyReLU(negative_slope),
        nn.Dropout(dropout),
        nn.Linear(width, num_classes),
    )


class GradCam(nn.Module):
    """Grad-CAM (Selvaraju et al., 2017, "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization") of every class on a feature map A (N x K x h x w), in closed
    form, so an exported graph computes it without autograd: ReLU(sum_k alpha_ck A_k) with
    alpha_ck the spatial mean of d logit_c / d A_k.

    After global average pooling, d logit_c / d A_k(i, j) = G_ck / (h w), where G = d logits /
    d pooled is W for a Linear head and W2 diag(LeakyReLU'(z)) diag(gamma / sqrt(var + eps)) W1
    for the modified head in eval mode (BatchNorm1d with running statistics, Dropout as the
    identity), with z = BatchNorm1d(W1 pooled + b1) from the same forward pass.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def logit_gradients(self, pooled: torch.Tensor) -> torch.Tensor:
        """d logits / d pooled features: N x classes x K."""
        if isinstance(self.head, nn.Linear):
            return self.head.weight.expand(pooled.shape[0], -1, -1)
        first, norm, act, _dropout, last = self.head
        z = norm(first(pooled))
        slope = torch.where(z > 0, torch.ones_like(z), torch.full_like(z, act.negative_slope))
        scale = slope * (norm.weight / torch.sqrt(norm.running_var + norm.eps))  # N x J
        return torch.matmul(last.weight[None] * scale[:, None, :], first.weight)

    def forward(self, features: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        n, k, h, w = features.shape
        weights = self.logit_gradients(pooled) / (h * w)  # alpha: N x classes x K
        cam = torch.matmul(weights, features.reshape(n, k, h * w))
        return torch.relu(cam).reshape(n, -1, h, w)


# --- the exported forms ---------------------------------------------------------------------------

class ExpMish(nn.Module):
    """Mish written as x * n / (n + 2) with n = e^x (e^x + 2), the same function as
    x * tanh(softplus(x)). ONNX Runtime runs this form about 4x faster than its own Mish op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.exp(torch.clamp(x, max=20.0))  # beyond 20, n / (n + 2) == 1 in float32
        n = e * (e + 2.0)
        return x * n / (n + 2.0)


class PooledMish(nn.Module):
    """max_pool(mish(x)) computed on pooled tensors a quarter of the size, exactly: Mish falls,
    then rises (one minimum, near x = -1.19), so a window's largest Mish value is the Mish of the
    window's largest or of its smallest element. Saves most of the stem's Mish work."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.pool = pool
        self.mish = ExpMish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(self.mish(self.pool(x)), self.mish(-self.pool(-x)))


def swap_mish(module: nn.Module) -> None:
    """Replace every nn.Mish below ``module`` with ExpMish, in place."""
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Mish):
                setattr(parent, name, ExpMish())

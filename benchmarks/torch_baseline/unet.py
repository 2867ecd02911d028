"""PyTorch reference of the baseline U-Net (brain-segmentation-pytorch's architecture).

Written for this project from the baseline architecture's published description. Module names
follow the baseline so that ``state_dict()`` keys are the baseline's own
(``encoder1.enc1conv1.weight``, ``encoder1.enc1norm1.running_mean``, ``upconv4.weight``,
``conv.bias``...), which is what :func:`unet_jax.convert.unet_from_torch` imports.

Unlike the baseline, :meth:`UNet.forward` returns logits; ``torch.sigmoid`` gives the
baseline's output (kept apart so losses can be computed stably).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def _block(in_channels: int, features: int, name: str) -> nn.Sequential:
    """Two (3x3 conv without bias -> BatchNorm -> ReLU) layers, named as the baseline names them."""
    layers = OrderedDict()
    for i, cin in ((1, in_channels), (2, features)):
        layers[f"{name}conv{i}"] = nn.Conv2d(cin, features, kernel_size=3, padding=1, bias=False)
        layers[f"{name}norm{i}"] = nn.BatchNorm2d(features)
        layers[f"{name}relu{i}"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


class UNet(nn.Module):
    """4-level U-Net: 32-64-128-256 features, bottleneck 512 (for ``init_features=32``)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, init_features: int = 32):
        super().__init__()
        f = init_features
        self.encoder1 = _block(in_channels, f, "enc1")
        self.pool1 = nn.MaxPool2d(2, 2)
        self.encoder2 = _block(f, 2 * f, "enc2")
        self.pool2 = nn.MaxPool2d(2, 2)
        self.encoder3 = _block(2 * f, 4 * f, "enc3")
        self.pool3 = nn.MaxPool2d(2, 2)
        self.encoder4 = _block(4 * f, 8 * f, "enc4")
        self.pool4 = nn.MaxPool2d(2, 2)
        self.bottleneck = _block(8 * f, 16 * f, "bottleneck")
        self.upconv4 = nn.ConvTranspose2d(16 * f, 8 * f, kernel_size=2, stride=2)
        self.decoder4 = _block(16 * f, 8 * f, "dec4")
        self.upconv3 = nn.ConvTranspose2d(8 * f, 4 * f, kernel_size=2, stride=2)
        self.decoder3 = _block(8 * f, 4 * f, "dec3")
        self.upconv2 = nn.ConvTranspose2d(4 * f, 2 * f, kernel_size=2, stride=2)
        self.decoder2 = _block(4 * f, 2 * f, "dec2")
        self.upconv1 = nn.ConvTranspose2d(2 * f, f, kernel_size=2, stride=2)
        self.decoder1 = _block(2 * f, f, "dec1")
        self.conv = nn.Conv2d(f, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW input -> NCHW logits."""
        e1 = self.encoder1(x)
        e2 = self.encoder2(self.pool1(e1))
        e3 = self.encoder3(self.pool2(e2))
        e4 = self.encoder4(self.pool3(e3))
        b = self.bottleneck(self.pool4(e4))
        d4 = self.decoder4(torch.cat((self.upconv4(b), e4), dim=1))
        d3 = self.decoder3(torch.cat((self.upconv3(d4), e3), dim=1))
        d2 = self.decoder2(torch.cat((self.upconv2(d3), e2), dim=1))
        d1 = self.decoder1(torch.cat((self.upconv1(d2), e1), dim=1))
        return self.conv(d1)


def randomize_batchnorm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (for parity
    tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model

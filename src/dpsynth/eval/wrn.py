"""Wide residual networks, WRN-d-k (Zagoruyko & Komodakis 2016, "Wide Residual
Networks"): the downstream classifier of Ghalebikesabi et al. (2023, Sec. 5.2,
WRN-40-4 on CIFAR-10). Trained on synthetic data only, so BatchNorm is fine
here (unlike the DP-trained denoiser, nothing here sees private data under DP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 (WRN paper,
    Fig. 1(b) with dropout between the convolutions, Sec. 2.4)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes and stride == 1
        # a 1x1 projection where the shape changes (the reference code's convShortcut)
        self.shortcut = (None if self.equal_in_out else
                         nn.Conv2d(in_planes, out_planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # as in the reference implementation: when the shape changes, the
        # projection shortcut also takes the pre-activated input
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return shortcut + self.conv2(out)


class WideResNet(nn.Module):
    """WRN-`depth`-`widen`: a 3x3 stem with 16 channels, then three groups of
    n = (depth - 4) / 6 blocks with 16k, 32k, 64k channels at strides 1, 2, 2,
    BN-ReLU, global average pooling and a linear layer (WRN paper, Table 1).

    Any input of at least 8x8 pixels works: 32x32 CIFAR ends at 8x8 before
    pooling, 8x8 digits at 2x2.
    """

    def __init__(self, depth: int, widen: int, num_classes: int, channels: int = 3,
                 dropout: float = 0.0) -> None:
        """
        Args:
            depth: total depth d, 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...).
            widen: widening factor k.
            num_classes: outputs of the last layer.
            channels: input channels, 1 (grey) or 3 (RGB).
            dropout: dropout rate between the two convolutions of a block.
        """
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"{depth=}: WRN depth must be 6n+4 with n >= 1")
        if widen < 1 or num_classes < 1 or channels not in (1, 3):
            raise ValueError(f"{widen=}, {num_classes=}, {channels=}: need widen >= 1, "
                             "num_classes >= 1, channels in (1, 3)")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(channels, widths[0], 3, 1, padding=1, bias=False)
        blocks: list[nn.Module] = []
        for group, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                blocks.append(BasicBlock(widths[group] if i == 0 else widths[group + 1],
                                         widths[group + 1], stride if i == 0 else 1, dropout))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        # the reference implementation's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] (H, W >= 8) -> logits [N, num_classes]."""
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))

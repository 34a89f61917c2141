"""MobileFaceNet (Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification
on Mobile Devices", 2018), in the layout of insightface arcface_torch's ``mbf``.

At ``scale=1`` the trunk is the paper's Table 1: conv3x3(64, s2) - depthwise conv3x3(64) - bottlenecks
(t=2, 64, x5, first s2) - (t=4, 128, s2) - (t=2, 128, x6) - (t=4, 128, s2) - (t=2, 128, x2) - conv1x1(512)
- linear global depthwise conv 7x7 (GDC). The paper then ends in a linear 1x1 convolution to 128;
arcface_torch (and this module) end in FC(512 -> embedding) - BN1d instead. arcface_torch's ``mbf`` is
``scale=2`` (twice the trunk width, "mobilefacenet-0.45G" in its model table); ``mbf_large`` is
``scale=4`` with twice the blocks.

Each bottleneck is conv1x1 expand - BN - PReLU - depthwise conv3x3 - BN - PReLU - conv1x1 project - BN,
with a residual connection when the shape is unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from distrib_face.models.layers import run_head_in_fp32, stage_output_size
from distrib_face.models.registry import register_backbone


class ConvBlock(nn.Sequential):
    """Conv - BN - PReLU."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1):
        """Build the block (arguments as for ``nn.Conv2d``; the convolution has no bias)."""
        super().__init__(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )


class LinearBlock(nn.Sequential):
    """Conv - BN, no activation (the "linear" bottleneck projection)."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1):
        """Build the block (arguments as for ``nn.Conv2d``; the convolution has no bias)."""
        super().__init__(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )


class Bottleneck(nn.Module):
    """Inverted residual: expand 1x1 - depthwise 3x3(stride) - project 1x1, residual when shapes match."""

    def __init__(self, in_c: int, out_c: int, hidden: int, stride: int, residual: bool):
        """Build the bottleneck.

        Args:
            in_c: input channels.
            out_c: output channels.
            hidden: expanded channels (``t * in_c`` in the paper's notation).
            stride: stride of the depthwise convolution.
            residual: add the input to the output (requires ``stride == 1`` and ``in_c == out_c``).
        """
        super().__init__()
        if residual and (stride != 1 or in_c != out_c):
            raise ValueError(f"residual bottleneck needs stride 1 and in_c == out_c, got {stride}, {in_c}, {out_c}")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, hidden),
            ConvBlock(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden),
            LinearBlock(hidden, out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck forward."""
        out = self.layers(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet (see the module docstring); ``scale`` multiplies the trunk width."""

    def __init__(
        self,
        *,
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: int = 112,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 1,
        conv_sep_channels: int = 512,
    ):
        """Build the network.

        Args:
            embedding_size: output embedding size.
            dropout: dropout probability before the FC (0 in the paper).
            input_size: side of the square input; sets the global depthwise kernel (112 -> 7).
            blocks: repeats of the four residual groups: the stem's depthwise stage (1 means a single
                depthwise conv, as in the paper), then the 64-, first 128- and second 128-channel groups.
            scale: width multiplier of the trunk (1 = paper, 2 = arcface_torch ``mbf``).
            conv_sep_channels: channels of the final 1x1 convolution before the GDC (512 in the paper).

        Raises:
            ValueError: on bad sizes.
        """
        super().__init__()
        if len(blocks) != 4 or any(int(b) < 1 for b in blocks):
            raise ValueError(f"mobilefacenet blocks must be four positive counts, got {list(blocks)}")
        if scale < 1:
            raise ValueError(f"mobilefacenet scale must be >= 1, got {scale}")
        if input_size < 16:
            raise ValueError(f"mobilefacenet input_size must be at least 16, got {input_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.input_size = int(input_size)
        c64, c128 = 64 * scale, 128 * scale
        stem: list[nn.Module] = [ConvBlock(3, c64, kernel=3, stride=2, padding=1)]
        if blocks[0] == 1:
            # arcface_torch uses 64 groups here whatever the scale (depthwise only at scale 1).
            stem.append(ConvBlock(c64, c64, kernel=3, stride=1, padding=1, groups=64))
        else:
            stem.append(self._residual_group(c64, blocks[0], hidden=128))
        # Hidden widths are arcface_torch's (128 / 256 / 512 / 256 groups): they do not grow with scale.
        self.layers = nn.Sequential(
            *stem,
            Bottleneck(c64, c64, hidden=128, stride=2, residual=False),
            self._residual_group(c64, blocks[1], hidden=128),
            Bottleneck(c64, c128, hidden=256, stride=2, residual=False),
            self._residual_group(c128, blocks[2], hidden=256),
            Bottleneck(c128, c128, hidden=512, stride=2, residual=False),
            self._residual_group(c128, blocks[3], hidden=256),
        )
        self.conv_sep = ConvBlock(c128, conv_sep_channels)
        side = stage_output_size(self.input_size)
        # GDC: a linear depthwise conv covering the whole final map replaces global average pooling.
        self.gdc = LinearBlock(conv_sep_channels, conv_sep_channels, kernel=side, groups=conv_sep_channels)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(conv_sep_channels, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        self._init_weights()

    @staticmethod
    def _residual_group(channels: int, num_blocks: int, hidden: int) -> nn.Sequential:
        return nn.Sequential(
            *[Bottleneck(channels, channels, hidden=hidden, stride=1, residual=True) for _ in range(num_blocks)]
        )

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``[N, 3, S, S]`` to embeddings ``[N, embedding_size]``."""
        x = self.gdc(self.conv_sep(self.layers(x)))  # [N, C, 1, 1]
        x = self.dropout(torch.flatten(x, 1))
        return run_head_in_fp32(lambda h: self.features(self.fc(h)), x)


@register_backbone
def mobilefacenet(embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> MobileFaceNet:
    """MobileFaceNet as in the paper (scale 1): about 1.2M parameters and 0.22 GMACs at 112 x 112
    with a 512-d embedding (the paper's 128-d version: 0.99M, 221M MAdds)."""
    return MobileFaceNet(embedding_size=embedding_size, dropout=dropout, **kwargs)  # type: ignore[arg-type]


@register_backbone
def mbf(embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> MobileFaceNet:
    """arcface_torch's ``mbf``: MobileFaceNet at twice the trunk width ("mobilefacenet-0.45G")."""
    kwargs.setdefault("scale", 2)
    return MobileFaceNet(embedding_size=embedding_size, dropout=dropout, **kwargs)  # type: ignore[arg-type]


@register_backbone
def mbf_large(embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> MobileFaceNet:
    """arcface_torch's ``mbf_large``: four times the trunk width and twice the blocks (2, 8, 12, 4)."""
    kwargs.setdefault("scale", 4)
    kwargs.setdefault("blocks", (2, 8, 12, 4))
    return MobileFaceNet(embedding_size=embedding_size, dropout=dropout, **kwargs)  # type: ignore[arg-type]


@register_backbone
def mobilefacenet_tiny(embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> MobileFaceNet:
    """A shallow MobileFaceNet (one block per group, 128-channel GDC) for CPU tests and the CPU demo."""
    kwargs.setdefault("blocks", (1, 1, 1, 1))
    kwargs.setdefault("conv_sep_channels", 128)
    return MobileFaceNet(embedding_size=embedding_size, dropout=dropout, **kwargs)  # type: ignore[arg-type]

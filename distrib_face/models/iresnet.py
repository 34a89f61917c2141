"""The improved ResNet (iresnet) of the ArcFace paper, as in insightface's arcface_torch.

Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition" (CVPR 2019), and
Duta et al., "Improved Residual Networks" for the block layout. The layer and parameter layout matches
arcface_torch's ``backbones/iresnet.py`` (same module names, so its state dicts load here):

- stem: conv3x3(3 -> 64, stride 1) - BN - PReLU;
- four stages of ``IBasicBlock`` (BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the
  shortcut), each stage halving the resolution: 112 -> 56 -> 28 -> 14 -> 7;
- output: BN2d - flatten - Dropout - FC(512 * 7 * 7 -> embedding) - BN1d (its scale frozen at 1).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from distrib_face.models.layers import run_head_in_fp32, stage_output_size
from distrib_face.models.registry import register_backbone

DEFAULT_WIDTHS: tuple[int, int, int, int] = (64, 128, 256, 512)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, added to the (optionally projected) input."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None):
        """Build the block.

        Args:
            in_channels: input channels.
            channels: output channels.
            stride: stride of the second convolution (2 at the start of a stage).
            downsample: the shortcut projection (conv1x1(stride) - BN) when shape changes, else None.
        """
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """The iresnet backbone (see the module docstring for the layout).

    Under ``torch.autocast`` the convolutional trunk runs in the autocast dtype and the embedding head
    (FC and BN1d) in fp32, as arcface_torch does: the 25088 -> 512 FC is where low precision hurts.
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: int = 112,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        gradient_checkpointing: bool = False,
    ):
        """Build the network.

        Args:
            layers: number of blocks in each of the four stages, e.g. ``[3, 4, 14, 3]`` for iresnet50.
            embedding_size: output embedding size.
            dropout: dropout probability before the FC.
            input_size: side of the square input image; sets the FC's input size (112 -> 7 x 7).
            widths: channels of the four stages (64, 128, 256, 512 in the paper; smaller for tests).
            gradient_checkpointing: recompute each residual block in the backward pass instead of
                storing its activations (training mode only); saves most activation memory for about
                one extra forward pass of compute.

        Raises:
            ValueError: on a layer list that is not four positive counts, or a bad size.
        """
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"iresnet layers must be four positive block counts, got {list(layers)}")
        if len(widths) != 4 or any(int(w) < 1 for w in widths):
            raise ValueError(f"iresnet widths must be four positive channel counts, got {list(widths)}")
        if input_size < 16:
            raise ValueError(f"iresnet input_size must be at least 16, got {input_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.input_size = int(input_size)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        stem_width = int(widths[0])
        self.conv1 = nn.Conv2d(3, stem_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width, eps=1e-5)
        self.prelu = nn.PReLU(stem_width)
        in_channels = stem_width
        stages = []
        for num_blocks, width in zip(layers, widths):
            stages.append(self._make_stage(in_channels, int(width), int(num_blocks)))
            in_channels = int(width)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        final_side = stage_output_size(self.input_size)
        self.fc = nn.Linear(in_channels * final_side * final_side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    @staticmethod
    def _make_stage(in_channels: int, channels: int, num_blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, stride=2, bias=False),
            nn.BatchNorm2d(channels, eps=1e-5),
        )
        blocks = [IBasicBlock(in_channels, channels, stride=2, downsample=downsample)]
        blocks += [IBasicBlock(channels, channels) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        # arcface_torch's initialisation: N(0, 0.1) convolutions, unit BN, and a frozen unit scale on the
        # final BN1d (the embedding's scale is left to the margin loss's normalisation).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            for block in stage:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return stage(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``[N, 3, S, S]`` to embeddings ``[N, embedding_size]``."""
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._run_stage(stage, x)
        x = self.dropout(torch.flatten(self.bn2(x), 1))  # [N, C * s * s]
        return run_head_in_fp32(lambda h: self.features(self.fc(h)), x)


def _iresnet(layers: Sequence[int], embedding_size: int, dropout: float, **kwargs: object) -> IResNet:
    return IResNet(layers, embedding_size=embedding_size, dropout=dropout, **kwargs)  # type: ignore[arg-type]


@register_backbone
def iresnet18(embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> IResNet:
    """iresnet18: stages [2, 2, 2, 2]; 24.0M parameters, 2.6 GMACs at 112 x 112."""
    return _iresnet([2, 2, 2, 2], embedding_size, dropout, **kwargs)


@register_backbone
def iresnet34(embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> IResNet:
    """iresnet34: stages [3, 4, 6, 3]; 34.1M parameters, 4.5 GMACs at 112 x 112."""
    return _iresnet([3, 4, 6, 3], embedding_size, dropout, **kwargs)


@register_backbone
def iresnet50(embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> IResNet:
    """iresnet50: stages [3, 4, 14, 3]; 43.6M parameters, 6.3 GMACs at 112 x 112."""
    return _iresnet([3, 4, 14, 3], embedding_size, dropout, **kwargs)


@register_backbone
def iresnet100(embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> IResNet:
    """iresnet100: stages [3, 13, 30, 3]; 65.2M parameters, 12.1 GMACs at 112 x 112."""
    return _iresnet([3, 13, 30, 3], embedding_size, dropout, **kwargs)


@register_backbone
def iresnet200(embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> IResNet:
    """iresnet200: stages [6, 26, 60, 6]; 23.5 GMACs at 112 x 112."""
    return _iresnet([6, 26, 60, 6], embedding_size, dropout, **kwargs)


@register_backbone
def iresnet_tiny(embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> IResNet:
    """A narrow iresnet (one block per stage, widths 16-32-64-128) for CPU tests and the CPU demo.

    Not a published model: the same block and head layout at a size that trains at hundreds of
    images per second on two CPU cores (use ``input_size=64`` or smaller there).
    """
    kwargs.setdefault("widths", (16, 32, 64, 128))
    return _iresnet([1, 1, 1, 1], embedding_size, dropout, **kwargs)

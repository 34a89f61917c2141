"""A Vision Transformer for 112 x 112 faces, in the layout of insightface arcface_torch's ``vit_t`` / ``vit_s``.

- patch embedding: a 9 x 9 convolution with stride 9 (112 -> 12 x 12 = 144 tokens), no class token,
  learned position embeddings;
- pre-norm transformer blocks (LayerNorm - multi-head attention, LayerNorm - MLP with ReLU6), stochastic
  depth;
- head: final LayerNorm, then all tokens flattened (not pooled: the face's layout matters) into
  FC(144 * D -> D) - BN1d - FC(D -> embedding) - BN1d.
- in training, a random ``mask_ratio`` of the tokens is dropped before the blocks and replaced by a learned
  mask token after them (arcface_torch's regulariser); evaluation uses every token.

Attention uses ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on
GPU, autocast-friendly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from distrib_face.models.layers import run_head_in_fp32
from distrib_face.models.registry import register_backbone


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0):
        """Args: p: drop probability in [0, 1)."""
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop (and rescale) per sample."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention without qkv bias."""

    def __init__(self, dim: int, num_heads: int):
        """Args: dim: token width; num_heads: heads (must divide ``dim``)."""
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViT dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over the token axis of ``x`` ``[B, T, D]``."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, D/H]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        """Args: dim: token width; num_heads: heads; mlp_ratio: MLP hidden / dim; drop_path: stochastic depth."""
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU6(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block forward on ``[B, T, D]``."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT for faces (see the module docstring)."""

    def __init__(
        self,
        *,
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: int = 112,
        patch_size: int = 9,
        dim: int = 256,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        mask_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
    ):
        """Build the network.

        Args:
            embedding_size: output embedding size.
            dropout: dropout probability before the head.
            input_size: side of the square input; ``(input_size // patch_size) ** 2`` tokens.
            patch_size: patch side (9 for 112 x 112 faces).
            dim: token width (256 for vit_t, 512 for vit_s / vit_b).
            depth: number of blocks.
            num_heads: attention heads.
            mlp_ratio: MLP hidden width over ``dim``.
            drop_path_rate: stochastic depth of the last block (linearly increasing from 0).
            mask_ratio: fraction of tokens dropped in training (0 disables).
            gradient_checkpointing: recompute each block in the backward pass (training only).

        Raises:
            ValueError: on bad sizes or ratios.
        """
        super().__init__()
        if input_size < patch_size:
            raise ValueError(f"ViT input_size {input_size} is smaller than patch_size {patch_size}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"ViT mask_ratio must be in [0, 1), got {mask_ratio}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.input_size = int(input_size)
        self.num_patches = (input_size // patch_size) ** 2
        self.mask_ratio = float(mask_ratio)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # 0 -> drop_path_rate
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(p=dropout)
        self.feature = nn.Sequential(
            nn.Linear(dim * self.num_patches, dim, bias=False),
            nn.BatchNorm1d(dim, eps=2e-5),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _mask_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens per sample; returns the kept tokens and the restore order."""
        batch, tokens, dim = x.shape
        num_keep = int(tokens * (1.0 - self.mask_ratio))
        order = torch.rand(batch, tokens, device=x.device).argsort(dim=1)  # [B, T]
        restore = order.argsort(dim=1)
        kept = torch.gather(x, 1, order[:, :num_keep, None].expand(-1, -1, dim))  # [B, T_keep, D]
        return kept, restore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``[N, 3, S, S]`` to embeddings ``[N, embedding_size]``."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [N, T, D]
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = self._mask_tokens(x)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        if masking:
            fill = self.mask_token.to(x.dtype).expand(x.shape[0], self.num_patches - x.shape[1], -1)
            x = torch.cat([x, fill], dim=1)
            x = torch.gather(x, 1, restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = self.dropout(x.flatten(1))  # [N, T * D]
        return run_head_in_fp32(self.feature, x)


@register_backbone
def vit_t(embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> VisionTransformer:
    """arcface_torch's ViT-T: dim 256, depth 12, 8 heads, patch 9 (about 1.5 GMACs at 112 x 112)."""
    kwargs = {"dim": 256, "depth": 12, "num_heads": 8, **kwargs}
    return VisionTransformer(embedding_size=embedding_size, dropout=dropout, **kwargs)  # type: ignore[arg-type]


@register_backbone
def vit_s(embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> VisionTransformer:
    """arcface_torch's ViT-S: dim 512, depth 12, 8 heads, patch 9 (about 5.7 GMACs at 112 x 112)."""
    kwargs = {"dim": 512, "depth": 12, "num_heads": 8, **kwargs}
    return VisionTransformer(embedding_size=embedding_size, dropout=dropout, **kwargs)  # type: ignore[arg-type]


@register_backbone
def vit_b(embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> VisionTransformer:
    """arcface_torch's ViT-B: dim 512, depth 24, 8 heads, patch 9 (about 11.4 GMACs at 112 x 112)."""
    kwargs = {"dim": 512, "depth": 24, "num_heads": 8, **kwargs}
    return VisionTransformer(embedding_size=embedding_size, dropout=dropout, **kwargs)  # type: ignore[arg-type]


@register_backbone
def vit_tiny(embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> VisionTransformer:
    """A two-block ViT (dim 64, 4 heads) for CPU tests; not a published model."""
    kwargs = {"dim": 64, "depth": 2, "num_heads": 4, **kwargs}
    return VisionTransformer(embedding_size=embedding_size, dropout=dropout, **kwargs)  # type: ignore[arg-type]

"""What gradient filtering does to the classifier's gradient: ``python -m distrib_face.parallel.kernels.filter_study``.

The fused backward can skip a ``tile_b x tile_c`` tile of (samples x classes) when every softmax
probability in it is below ``eps`` (Cut Cross-Entropy's filter; ``eps = 2^-12`` for bf16). This module
computes, in plain torch on the whole ``[B, C]`` matrix, which tiles the kernel would skip and what they
carried (:func:`dropped_gradients`, checked against the kernel in tests/unit/test_triton_kernels.py), and
reports the skipped fraction and the relative error of the embedding and weight gradients of the whole
loss (target terms included) for synthetic distributions: a classifier at initialisation, then
embeddings at cosine ``U(lo, hi)`` to their own class centre (the rest of the direction random), which
sets the loss:

- ``init``: random unit embeddings and class centres;
- ``cos 0.5-0.6``, ``cos 0.6-0.7``, ``cos 0.7-0.8``: random class centres (negatives near cosine 0);
- ``look-alikes``: cosine ``U(0.7, 0.8)``, classes in groups of 16 whose centres are at cosine ~0.5 to
  each other (hard negatives for every sample).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _tile_max(probs: Tensor, tile_b: int, tile_c: int) -> Tensor:
    rows, cols = probs.shape
    padded = F.pad(probs, (0, (-cols) % tile_c, 0, (-rows) % tile_b))
    return F.max_pool2d(padded[None], (tile_b, tile_c))[0]  # [ceil(B / tile_b), ceil(C / tile_c)]


def dropped_gradients(
    embeddings: Tensor, weight: Tensor, target_col: Tensor, lse: Tensor, grad_lse: Tensor, scale: float,
    eps: float, tile_b: int, tile_c: int,
) -> tuple[Tensor, Tensor, float]:
    """What the filtered backward leaves out: ``(d embeddings, d weight, fraction of tiles skipped)``.

    ``lse`` is the forward's log-sum-exp ``[B]`` (target included); tiles start at multiples of the
    tile sizes, as the kernels' do.
    """
    x_norm = embeddings.norm(dim=1, keepdim=True)
    x_unit = embeddings / x_norm
    inv = 1.0 / weight.norm(dim=1)
    raw = x_unit @ weight.t()  # [B, C]
    logits = raw * inv * scale
    rows = torch.arange(len(target_col))
    here = target_col >= 0
    logits[rows[here], target_col[here]] = float("-inf")
    probs = torch.exp(logits - lse[:, None])
    skip_tiles = _tile_max(probs, tile_b, tile_c) < eps
    skip = skip_tiles.repeat_interleave(tile_b, 0).repeat_interleave(tile_c, 1)[: probs.shape[0], : probs.shape[1]]
    grad_raw = torch.where(skip, probs, torch.zeros_like(probs)) * grad_lse[:, None] * inv * scale
    grad_unit = grad_raw @ weight
    grad_emb = (grad_unit - x_unit * (grad_unit * x_unit).sum(dim=1, keepdim=True)) / x_norm
    grad_w = grad_raw.t() @ x_unit - (inv**2 * (grad_raw * raw).sum(dim=0))[:, None] * weight
    return grad_emb, grad_w, float(skip_tiles.float().mean())


DISTRIBUTIONS = {"init": None, "cos 0.5-0.6": (0.5, 0.6), "cos 0.6-0.7": (0.6, 0.7), "cos 0.7-0.8": (0.7, 0.8),
                 "look-alikes": (0.7, 0.8)}


def _distribution(kind: str, num_rows: int, num_classes: int, dim: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    weight = torch.randn(num_classes, dim, generator=gen)
    if kind == "look-alikes":  # groups of 16: centre + an equal random part, so cosine ~0.5 within a group
        centres = F.normalize(torch.randn(num_classes // 16 + 1, dim, generator=gen), dim=1)
        weight = centres.repeat_interleave(16, 0)[:num_classes] + F.normalize(weight, dim=1)
    weight = F.normalize(weight, dim=1) * 0.05  # the norm does not matter (normalised weights)
    labels = torch.randint(0, num_classes, (num_rows,), generator=gen)
    noise = F.normalize(torch.randn(num_rows, dim, generator=gen), dim=1)
    if DISTRIBUTIONS[kind] is None:
        return noise * 10.0, weight, labels
    lo, hi = DISTRIBUTIONS[kind]
    cos_t = lo + (hi - lo) * torch.rand(num_rows, 1, generator=gen)
    centre = F.normalize(weight[labels], dim=1)
    perp = F.normalize(noise - (noise * centre).sum(1, keepdim=True) * centre, dim=1)
    return (cos_t * centre + torch.sqrt(1 - cos_t**2) * perp) * 10.0, weight, labels


def study(kind: str, num_rows: int = 256, num_classes: int = 100_000, dim: int = 512, scale: float = 64.0,
          margin: float = 0.5, eps: tuple[float, ...] = (2.0**-12,),
          tiles: tuple[tuple[int, int], ...] = ((32, 32), (64, 64)), seed: int = 0) -> list[dict]:
    """Skipped fraction and relative gradient errors of the filter on one distribution (ArcFace loss)."""
    gen = torch.Generator().manual_seed(seed)
    emb, weight, labels = _distribution(kind, num_rows, num_classes, dim, gen)
    emb, weight = emb.double().requires_grad_(True), weight.double().requires_grad_(True)
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).t()  # [B, C]
    rows = torch.arange(num_rows)
    theta = torch.acos(cos[rows, labels].clamp(-1 + 1e-7, 1 - 1e-7))
    logits = (scale * cos).index_put((rows, labels), scale * torch.cos(theta + margin))
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    loss = float(loss.detach())
    lse = torch.logsumexp(logits.detach(), dim=1)
    out = []
    for threshold in eps:
        for tile_b, tile_c in tiles:
            drop_emb, drop_w, skipped = dropped_gradients(
                emb.detach(), weight.detach(), labels, lse,
                torch.full((num_rows,), 1.0 / num_rows, dtype=torch.float64), scale, threshold, tile_b, tile_c,
            )
            out.append(dict(
                distribution=kind, eps=threshold, tile=f"{tile_b}x{tile_c}", loss=loss, skipped=skipped,
                emb_rel=float(drop_emb.norm() / emb.grad.norm()), weight_rel=float(drop_w.norm() / weight.grad.norm()),
                emb_rel_max_row=float((drop_emb.norm(dim=1) / emb.grad.norm(dim=1)).max()),
            ))
    return out


def format_study(rows: int = 256, classes: int = 100_000, dim: int = 512,
                 eps: tuple[float, ...] = (2.0**-12, 2.0**-8)) -> str:
    """The study of every distribution as a Markdown table (``distrib-face bench grad-filter`` prints it)."""
    lines = [f"ArcFace s=64 m=0.5, B={rows}, C={classes}, D={dim}; errors relative to the exact "
             "gradient of the whole loss (Frobenius; worst row for the embeddings)",
             "| distribution | loss | eps | tile | tiles skipped | d emb rel. error | worst row | d W rel. error |",
             "|---|---|---|---|---|---|---|---|"]
    for kind in DISTRIBUTIONS:
        for r in study(kind, rows, classes, dim, eps=eps):
            lines.append(f"| {r['distribution']} | {r['loss']:.2f} | 2^{math.log2(r['eps']):.0f} | {r['tile']} | "
                         f"{r['skipped']:.1%} | {r['emb_rel']:.1e} | {r['emb_rel_max_row']:.1e} | {r['weight_rel']:.1e} |")
    return "\n".join(lines)

"""A toy that shows what each margin does: 8 identities, a tiny network, 2-D (or 3-D) embeddings.

The data are synthetic "MNIST-like" images: each identity is a 16x16 prototype made of a few Gaussian blobs,
and a sample is its prototype shifted by up to one pixel, rescaled in brightness and noised. No files are
needed. The embeddings are trained with the real :class:`~distrib_face.parallel.ShardedMarginClassifier` (a
world of one) and drawn with the class centres (the classifier's weight rows). It lives in ``train/`` because
it trains with the classifier; the margins' own curves are :func:`distrib_face.losses.plots.plot_margin_curves`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distrib_face.losses.margins import create_margin
from distrib_face.parallel import ShardedMarginClassifier

logger = logging.getLogger(__name__)

NUM_IDENTITIES = 8
IMAGE_SIZE = 16

#: Per-loss settings for the toy: scale 16 suits 8 classes in 2-D (64 would saturate at once); the margins
#: keep their paper values unless they cannot be met on a circle shared by 8 classes.
TOY_OVERRIDES: dict[str, dict[str, Any]] = {
    "softmax": {},
    "l2softmax": {"scale": 8.0},
    "lsoftmax": {"multiplicative_margin": 2.0},
    "sphereface": {"multiplicative_margin": 2.0},
    "adacos": {},
    "heated_up": {"options": {"total_steps": 400, "heat_start": 0.6, "scale_end": 4.0}},
    "magface": {"options": {"lower_norm": 1.0, "upper_norm": 20.0, "lower_margin": 0.2, "upper_margin": 0.5}},
    "combined": {"multiplicative_margin": 1.0, "angular_margin": 0.2, "additive_margin": 0.1},
}


def toy_margin_kwargs(name: str) -> dict[str, Any]:
    """The margin overrides the toy uses for ``name``."""
    if name in TOY_OVERRIDES:
        return dict(TOY_OVERRIDES[name])
    return {"scale": 16.0}


def make_blob_data(
    num_per_class: int = 60, seed: int = 0, sample_seed: int | None = None, noise: float = 0.35
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 256]`` (flattened 16x16) and labels ``[N]`` of 8 synthetic identities.

    ``seed`` fixes the identities (prototypes); ``sample_seed`` (default ``seed``) the images drawn from them,
    so a different ``sample_seed`` gives held-out images of the same identities.
    """
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(IMAGE_SIZE + 2.0), torch.arange(IMAGE_SIZE + 2.0), indexing="ij")
    prototypes = []
    for _ in range(NUM_IDENTITIES):
        img = torch.zeros(IMAGE_SIZE + 2, IMAGE_SIZE + 2)
        for _ in range(4):
            cy, cx = torch.rand(2, generator=gen) * (IMAGE_SIZE - 4) + 3
            width = 1.0 + 2.0 * float(torch.rand(1, generator=gen))
            img += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2))
        prototypes.append(img / img.max())
    gen = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed)
    images, labels = [], []
    for label, proto in enumerate(prototypes):
        for _ in range(num_per_class):
            dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
            img = proto[dy: dy + IMAGE_SIZE, dx: dx + IMAGE_SIZE]
            img = img * (0.7 + 0.6 * torch.rand(1, generator=gen)) + noise * torch.randn(img.shape, generator=gen)
            images.append(img.reshape(-1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def spread_directions(num: int, dim: int) -> torch.Tensor:
    """``[num, dim]`` unit vectors spread evenly: a regular polygon in 2-D, a Fibonacci sphere in 3-D."""
    k = torch.arange(num, dtype=torch.float32)
    if dim == 2:
        angle = 2 * math.pi * k / num
        return torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    if dim == 3:
        z = 1 - 2 * (k + 0.5) / num
        phi = math.pi * (3 - math.sqrt(5)) * k
        r = torch.sqrt(1 - z * z)
        return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=1)
    raise ValueError(f"toy embedding dim must be 2 or 3, got {dim}")


@dataclass
class ToyResult:
    """What a toy run produced.

    Attributes:
        loss: the margin name.
        embeddings: ``[N, d]`` embeddings of held-out images of the 8 identities (not trained on).
        labels: ``[N]``.
        centers: ``[8, d]`` class weight rows (first sub-centre; bias column dropped).
        accuracy: held-out samples whose best-scoring centre (cosine; dot product when unnormalised) is their class.
        final_loss: the last training loss.
        seconds: training wall time.
    """

    loss: str
    embeddings: np.ndarray
    labels: np.ndarray
    centers: np.ndarray
    accuracy: float
    final_loss: float
    seconds: float


def train_toy(loss: str, steps: int = 400, dim: int = 2, seed: int = 0, lr: float = 0.01) -> ToyResult:
    """Train a 256-64-64-``dim`` MLP with margin ``loss`` on the blob identities (full batch, Adam).

    Args:
        loss: a registered margin name.
        steps: optimisation steps.
        dim: embedding dimension (2 or 3 for pictures).
        seed: seeds the data, the network and the classifier.
        lr: Adam learning rate.
    """
    torch.manual_seed(seed)
    images, labels = make_blob_data(num_per_class=150, seed=seed)
    net = nn.Sequential(nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 64), nn.PReLU(), nn.Linear(64, 64), nn.PReLU(),
                        nn.Linear(64, dim))
    margin = create_margin(loss, **toy_margin_kwargs(loss))
    clf = ShardedMarginClassifier(NUM_IDENTITIES, dim, margin=margin, seed=seed)
    with torch.no_grad():
        # Centres start spread out (evenly on the circle / a Fibonacci sphere) rather than N(0, 0.01): with 2
        # dimensions, two random centres often start nearly parallel and the picture shows that accident.
        rows = clf.weight.view(NUM_IDENTITIES, clf.num_subcenters, -1)
        rows[..., :dim] = spread_directions(NUM_IDENTITIES, dim)[:, None, :]
        rows[..., :dim] += 0.05 * torch.randn(rows[..., :dim].shape, generator=torch.Generator().manual_seed(seed))
        if clf.bias_columns:
            rows[..., -1] = 0.0
    opt = torch.optim.Adam([*net.parameters(), clf.weight], lr=lr)
    start = time.perf_counter()
    value = float("nan")
    for _ in range(steps):
        opt.zero_grad()
        loss_value = clf(net(images), labels)
        loss_value.backward()
        opt.step()
        value = float(loss_value.detach())
    seconds = time.perf_counter() - start
    net.eval()
    clf.eval()
    with torch.no_grad():
        held_images, labels = make_blob_data(num_per_class=40, seed=seed, sample_seed=seed + 1000)
        emb = net(held_images)
        rows = clf.weight.detach().view(NUM_IDENTITIES, clf.num_subcenters, -1)  # [8, K, dim (+1)]
        if margin.normalize_features and margin.normalize_weights:
            unit_rows = nn.functional.normalize(rows, dim=2)
            scores = torch.einsum("nd,ckd->nck", nn.functional.normalize(emb, dim=1), unit_rows).amax(2)
        else:  # what the unnormalised logits rank by: the plain dot product (with the bias column if any)
            x = torch.cat([emb, torch.ones(len(emb), 1)], 1) if clf.bias_columns else emb
            scores = torch.einsum("nd,ckd->nck", x, rows).amax(2)
        accuracy = float((scores.argmax(dim=1) == labels).float().mean())
    logger.info("toy %s: %d steps in %.1f s, loss %.3f, accuracy %.3f", loss, steps, seconds, value, accuracy)
    return ToyResult(loss, emb.numpy(), labels.numpy(), rows[:, 0, :dim].numpy(), accuracy, value, seconds)


def angular_gap_degrees(result: ToyResult, quantile: float = 0.95) -> float:
    """Angular gap between the clusters of the two classes whose mean directions are closest.

    With ``d`` the angle between the two mean directions, a sample of class ``a`` intrudes towards ``b`` by
    ``d - angle(x, mu_b)``; the gap is ``d`` minus both classes' ``quantile`` intrusions (negative when the
    clusters overlap). Robust to a few stray samples.
    """
    x = result.embeddings / np.linalg.norm(result.embeddings, axis=1, keepdims=True).clip(1e-12)
    means = np.stack([x[result.labels == c].mean(axis=0) for c in range(NUM_IDENTITIES)])
    means /= np.linalg.norm(means, axis=1, keepdims=True).clip(1e-12)
    angle = np.degrees(np.arccos(np.clip(means @ means.T, -1.0, 1.0)))
    np.fill_diagonal(angle, np.inf)
    a, b = np.unravel_index(np.argmin(angle), angle.shape)
    d = angle[a, b]

    def intrusion(own: int, other: int) -> float:
        to_other = np.degrees(np.arccos(np.clip(x[result.labels == own] @ means[other], -1.0, 1.0)))
        return float(np.quantile(d - to_other, quantile))

    return float(d - intrusion(a, b) - intrusion(b, a))


def plot_toy(result: ToyResult, path: str | Path) -> Path:
    """Draw the embeddings (raw, and on the unit circle / sphere) with the class centres; write a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    colors = plt.get_cmap("tab10")(np.arange(NUM_IDENTITIES))
    emb, labels, centers = result.embeddings, result.labels, result.centers
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    c_unit = centers / np.linalg.norm(centers, axis=1, keepdims=True).clip(1e-12)
    title = (f"{result.loss}: accuracy {result.accuracy:.2f}, closest-cluster gap "
             f"{angular_gap_degrees(result):.1f} deg")
    if emb.shape[1] == 3:
        fig = plt.figure(figsize=(6.5, 6))
        ax = fig.add_subplot(projection="3d")
        for c in range(NUM_IDENTITIES):
            pts = unit[labels == c]
            ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=6, color=colors[c])
            ax.plot([0, 1.2 * c_unit[c, 0]], [0, 1.2 * c_unit[c, 1]], [0, 1.2 * c_unit[c, 2]], color=colors[c], lw=2)
        ax.set_title(title, fontsize=9)
    else:
        fig, (ax_raw, ax_unit) = plt.subplots(1, 2, figsize=(11, 5.3))
        lim = float(np.abs(emb).max()) * 1.1
        for c in range(NUM_IDENTITIES):
            pts = emb[labels == c]
            ax_raw.scatter(pts[:, 0], pts[:, 1], s=5, color=colors[c], label=f"id {c}")
            ax_raw.plot([0, c_unit[c, 0] * lim], [0, c_unit[c, 1] * lim], color=colors[c], lw=1, ls="--")
            # On the circle, spread each class over a small radial band so overlapping points stay visible.
            radius = 1.0 + 0.04 * (c % 4)
            ax_unit.scatter(unit[labels == c, 0] * radius, unit[labels == c, 1] * radius, s=6, color=colors[c])
            ax_unit.annotate("", xy=(1.35 * c_unit[c, 0], 1.35 * c_unit[c, 1]), xytext=(0, 0),
                             arrowprops=dict(arrowstyle="->", color=colors[c], lw=1.5))
        ax_unit.add_patch(plt.Circle((0, 0), 1.0, fill=False, color="0.7", lw=0.8))
        ax_raw.set_xlim(-lim, lim)
        ax_raw.set_ylim(-lim, lim)
        ax_raw.set_title("raw 2-D embeddings (dashed: class centre directions)", fontsize=9)
        ax_unit.set_xlim(-1.45, 1.45)
        ax_unit.set_ylim(-1.45, 1.45)
        ax_unit.set_title("normalised, on the unit circle (arrows: class centres)", fontsize=9)
        for ax in (ax_raw, ax_unit):
            ax.set_aspect("equal")
            ax.grid(alpha=0.3)
        ax_raw.legend(fontsize=7, loc="upper right", markerscale=2)
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

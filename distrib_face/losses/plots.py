"""Pictures of the margins themselves: the target logit against the angle, for every margin (no training).

``distrib-face plot margins`` draws :func:`plot_margin_curves`, the ArcFace paper's figure for the whole family.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrib_face.losses.margins import MarginContext, create_margin


def plot_margin_curves(path: str | Path, num_points: int = 721) -> Path:
    """The target logit divided by the scale against theta for every margin (the ArcFace paper's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    theta = torch.linspace(0.0, math.pi, num_points, dtype=torch.float64)
    cos = torch.cos(theta)
    n = num_points

    def margin_context(norm: float = 1.0, w_norm: float = 1.0) -> MarginContext:
        return MarginContext(feature_norms=torch.full((n, 1), norm, dtype=torch.float64),
                             weight_norms=torch.full((n,), w_norm, dtype=torch.float64))

    def curve(name: str, norm: float = 1.0, **kw: Any) -> np.ndarray:
        margin = create_margin(name, **kw)
        margin.set_num_classes(1000)
        scale = margin.multiplier(margin_context(norm))
        scale = float(scale if not isinstance(scale, torch.Tensor) else scale.reshape(-1)[0])
        return (margin.target_logit(cos, margin_context(norm)) / scale).numpy()

    no_anneal = {"lambda_base": 0.0, "lambda_min": 0.0}
    curves: list[tuple[str, np.ndarray, dict[str, Any]]] = [
        ("softmax / l2softmax / normface / adacos / heated_up: cos(theta)", curve("normface"), dict(color="k", lw=2)),
        ("sphereface / lsoftmax psi, m=4 (no annealing)", curve("sphereface", options=no_anneal), dict(color="C0")),
        ("sphereface m=4 annealed, lambda=5", curve("sphereface", options={"lambda_base": 5.0, "lambda_min": 5.0}),
         dict(color="C0", ls=":")),
        ("cosface m=0.35", curve("cosface", additive_margin=0.35), dict(color="C1")),
        ("arcface / subcenter / curricularface m=0.5", curve("arcface"), dict(color="C3", lw=2)),
        ("combined (1, 0.3, 0.2)", curve("combined"), dict(color="C4")),
        ("airface / li_arcface m=0.45", curve("airface"), dict(color="C2")),
    ]
    for norm, style in ((10.0, ":"), (110.0, "--")):
        curves.append((f"magface, ||x||={norm:g}", curve("magface", norm=norm), dict(color="C5", ls=style)))
    ada = create_margin("adaface")
    ada.batch_std.fill_(1.0)
    for mean, label, style in ((60.0, "z=-1 (low quality)", ":"), (40.0, "z=+1 (high quality)", "--")):
        ada.batch_mean.fill_(mean)  # a norm of 50 against a batch mean of 60 / 40: z clipped to -1 / +1
        values = (ada.target_logit(cos, margin_context(50.0)) / ada.scale).numpy()
        curves.append((f"adaface m=0.4, {label}", values, dict(color="C6", ls=style)))
    for m, style in ((0.4, ":"), (0.6, "--")):
        curves.append((f"elasticface: one draw, m={m}", curve("arcface", angular_margin=m), dict(color="C7", ls=style)))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(13, 6.5))
    degrees = np.degrees(theta.numpy())
    for label, values, style in curves:
        ax.plot(degrees, values, label=label, **style)
    ax.axhline(-1.0, color="0.6", lw=0.6)
    ax.set_xlim(0, 180)
    ax.set_ylim(-3.2, 1.1)
    ax.set_xlabel("angle theta between feature and target centre (degrees)")
    ax.set_ylabel("target logit / scale")
    ax.set_title("Target logit / scale against the angle to the target centre (lower = harder to satisfy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Bytes one classifier step moves through GPU memory, per path, and the floor that sets at a bandwidth.

``python -m distrib_face.parallel.kernels.traffic`` prints the table of docs/bench/classifier.md. These are
counts from the code, not measurements: every tensor a step reads or writes in global memory, with the
assumption that a tile re-read by the next program hits the L2 cache (the fused kernels order their grids
so that programs sharing class rows run together) and that nothing else does. Terms (per step, one rank,
``C`` classes in use, ``B`` rows, ``D`` dims, ``w`` bytes per weight element, bf16 matmuls):

torch path (``LinearMarginLogSumExp``), per weight element: forward norm (w), bf16 cast (w + 2), matmul
read (2); backward bf16 cast (w + 2), three matmul reads of the cast chunk or output (2 + 2 + 2), the
weight-gradient matmul's bf16 output widened to fp32 (2 + 4), copied into the gradient (4 + w) and its
``addcmul_`` radial correction (3w): ``7w + 22`` bytes. Per logit (row x class): forward 40 bytes
(bf16 matmul output 2, widened 2 + 4, scaled 8, max 4, shift 8, exp 8, sum 4); backward 80 (recomputed
logits 2 + 2 + 4, softmax 32, target mask and scale 8, two bf16 casts of it 6 + 6, two matmul reads 2 + 2,
radial term 16).

fused kernels: the weights read by the forward, by the embedding-gradient kernel and by the
weight-gradient kernel, and the gradient written once: ``4w`` bytes per element; ``1 / ||w_c||`` written
and read twice (12 bytes a class); the ``[splits, B, D]`` float32 partials of the embedding gradient
written and read (8 x splits x B x D).

both: SGD with momentum and weight decay (``ShardOptimizer``: three in-place passes, each reading two
tensors and writing one) ``9w``; with Partial FC the sampled rows are gathered into a leaf (``2w``) and the
optimizer gathers and scatters rows, weights and momentum (``8w`` more), on the sampled rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

H200_BANDWIDTH = 4.8e12  # bytes/s, the H200's HBM3e (the H100 SXM's is 3.35e12)
FLOOR_BANDWIDTH = 3.3e12  # the figure the docs quote (an H100's), for comparisons across the two


@dataclass(frozen=True)
class Step:
    """One step's shape: classes in the matrix, the sample rate, rows, dims, bytes per weight element."""

    classes: int
    sample_rate: float = 1.0
    batch: int = 256
    dim: int = 512
    weight_bytes: int = 4
    chunk: int = 65536
    splits: int = 132  # the fused kernels' class splits per B block (4 programs per SM on 132 SMs, 4 B blocks)

    @property
    def active(self) -> int:
        return round(self.classes * self.sample_rate)


def classifier_bytes(step: Step, path: str) -> float:
    """Bytes the margin softmax's forward and backward move (``path``: ``"torch"`` or ``"fused"``)."""
    c, b, d, w = step.active, step.batch, step.dim, step.weight_bytes
    if path == "torch":
        return (7 * w + 22) * c * d + (40 + 80) * b * c
    if path == "fused":
        return 4 * w * c * d + 12 * c + 8 * step.splits * b * d
    raise ValueError(f"path must be 'torch' or 'fused', got {path!r}")


def optimizer_bytes(step: Step) -> float:
    """Bytes of the sampled-rows copy and the SGD update (momentum, weight decay)."""
    c, d, w = step.active, step.dim, step.weight_bytes
    sampled = step.sample_rate < 1.0
    return (9 * w + (10 * w if sampled else 0)) * c * d


def flops(step: Step, path: str) -> float:
    """Matmul FLOPs: the torch path does 4 products of ``2 B C D``, the fused kernels 5 (one more recompute)."""
    return (5 if path == "fused" else 4) * 2 * step.batch * step.active * step.dim


def table(bandwidth: float = FLOOR_BANDWIDTH) -> str:
    rows = [Step(n) for n in (1_000_000, 2_000_000, 4_000_000)]
    rows += [Step(n, 0.1, weight_bytes=2) for n in (8_000_000, 16_000_000, 32_000_000)]
    lines = [
        f"| classes | rate | weights | torch path GB (clf + update) | fused GB (clf + update) | "
        f"floor at {bandwidth / 1e12:.1f} TB/s: torch / fused | matmul TFLOP torch / fused |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        opt = optimizer_bytes(s)
        t, f = classifier_bytes(s, "torch"), classifier_bytes(s, "fused")
        lines.append(
            f"| {s.classes / 1e6:g}M | {s.sample_rate:g} | {'fp32' if s.weight_bytes == 4 else 'bf16'} | "
            f"{(t + opt) / 1e9:.1f} ({t / 1e9:.1f} + {opt / 1e9:.1f}) | {(f + opt) / 1e9:.1f} ({f / 1e9:.1f} + "
            f"{opt / 1e9:.1f}) | {(t + opt) / bandwidth * 1e3:.1f} ms / {(f + opt) / bandwidth * 1e3:.1f} ms | "
            f"{flops(s, 'torch') / 1e12:.2f} / {flops(s, 'fused') / 1e12:.2f} |"
        )
    return "\n".join(lines)

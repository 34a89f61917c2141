"""Bytes one classifier step moves through GPU memory, per path, and the floor that sets at a bandwidth.

``distrib-face bench traffic`` prints the table of docs/bench/classifier.md. These are counts from the code,
not measurements: every tensor a step reads or writes in global memory, each eager torch op reading its
inputs once and writing its outputs once, with the assumption that a tile re-read by the next program hits
the L2 cache (the fused kernels order their grids so that programs sharing class rows run together) and
that nothing else does. Per step, one rank, ``C`` classes in use, ``B`` rows, ``D`` dims, ``w`` bytes per
weight element (4: fp32, 2: bf16), bf16 matmuls, float32 statistics; terms of ``O(B x D)`` and ``O(C)``
(the embeddings, the target rows, per-class vectors) are left out except the fused kernels' below.

torch path (:class:`~distrib_face.parallel.linear_lse.LinearNegativeLogSumExp`), per weight element
(:func:`torch_weight_bytes`): forward: the row norms (``w``), the bf16 cast of fp32 rows (``w + 2``; bf16
rows are used as they are), the matmul's read (2). Backward: the cast again, the two matmuls that read the
cast chunk (2 + 2), the weight-gradient matmul's bf16 output (2) widened to fp32 (2 + 4), bf16 rows widened
to fp32 for the radial correction (``w + 4``; fp32 rows are used as they are), the correction ``addcmul_``
(4 + 4 + 4) and the copy into the gradient (``4 + w``). fp32: 50 bytes, bf16: 40.

Per logit, forward 40 bytes (:data:`TORCH_LOGIT_FORWARD`: the bf16 matmul output 2, widened 2 + 4, scaled
8, max 4, shift 8, exp 8, sum 4); backward 64 (:data:`TORCH_LOGIT_BACKWARD`: the recomputed logits 2 + 2 +
4, the three element-wise passes over the block, ``addcmul`` into a second block 8, ``exp_`` 8, the column
scale 8, two bf16 casts of the block 6 + 6 and the two matmuls' reads of them 2 + 2, the radial term's
product with the raw block 12 and its matrix-vector read 4). The target mask is an ``O(B)`` scatter.

fused kernels (:mod:`~distrib_face.parallel.kernels.triton_lse`), per weight element
(:func:`fused_weight_bytes`): the weights read by the forward, by the embedding-gradient kernel and by the
weight-gradient kernel, and the gradient written once (``4w``). The target rows' gradient (the classifier's
target cosines, echoed by ``TritonLinearNegativeLogSumExp`` as on the torch path) is a ``[B, D]`` block
accumulated into the kernel's gradient, ``O(B x D)``, left out; before it was, autograd's ``weight[rows_t]``
zero-filled a dense ``[C, D]`` gradient and summed it with the kernel's, ``4w`` more. Per class ``1 / ||w_c||`` written once and read twice (12 bytes); the ``[splits, B, D]`` float32 partials
of the embedding gradient written and read (``8 x splits x B x D``).

both: the update of the rows (:func:`update_bytes`, :class:`~distrib_face.parallel.optim.ShardOptimizer`,
SGD with momentum and weight decay): fp32 rows one fused pass (``torch._fused_sgd_``) reading the weights,
the gradient and the momentum and writing the weights and the momentum: ``5w`` = 20 bytes. bf16 rows go
through float32: widen the weights, momentum and gradient (3 x (2 + 4)), the fused pass on float32 (20),
and each of the two results back to bf16, by stochastic rounding (the default: the noise written 4, added
4 + 4 + 4, masked 4 + 4, copied 4 + 2: 30) or rounding to nearest (4 + 2): 98 or 50 bytes. With Partial FC
(:func:`sampled_copy_bytes`) the sampled rows are gathered into the row buffer (``2w``), the momentum rows
gathered beside them (``2w``), and both scattered back (``4w``): ``8w``, on the sampled rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

H200_BANDWIDTH = 4.8e12  # bytes/s, the H200's HBM3e (the H100 SXM's is 3.35e12)
FLOOR_BANDWIDTH = 3.3e12  # the figure the docs quote (an H100's), for comparisons across the two
#: Bytes per (row, class) logit of the torch path's forward and backward (see the module docstring).
TORCH_LOGIT_FORWARD = 2 + (2 + 4) + 8 + 4 + 8 + 8 + 4
TORCH_LOGIT_BACKWARD = (2 + 2 + 4) + 8 + 8 + 8 + (6 + 6) + (2 + 2) + 12 + 4
#: Bytes per class of the fused kernels: ``1 / ||w_c||`` written once and read by both backward kernels.
FUSED_CLASS_BYTES = 4 + 4 + 4


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
    rounding: str = "stochastic"  # how bf16 rows are written back by the update ("stochastic" / "nearest")

    @property
    def active(self) -> int:
        return round(self.classes * self.sample_rate)


def torch_weight_bytes(w: int) -> int:
    """Bytes per weight element of the torch path's forward and backward (``w`` bytes per stored element)."""
    cast = 0 if w == 2 else w + 2  # bf16 matmul operands: fp32 rows are cast, bf16 rows used as they are
    widen = 0 if w == 4 else w + 4  # the radial correction reads float32 rows
    forward = w + cast + 2
    backward = cast + 2 + 2 + (2 + 2 + 4) + widen + (4 + 4 + 4) + (4 + w)
    return forward + backward


def fused_weight_bytes(w: int) -> int:
    """Bytes per weight element of the fused kernels: three reads of the rows, one write of the gradient."""
    return 4 * w


def update_bytes(w: int, rounding: str = "stochastic") -> int:
    """Bytes per updated element of the SGD step (momentum, weight decay) on rows of ``w`` bytes."""
    if w != 2:
        return 5 * w  # one fused pass: read weights, gradient, momentum; write weights, momentum
    back = 4 + (4 + 4 + 4) + (4 + 4) + (4 + 2) if rounding == "stochastic" else 4 + 2
    return 3 * (w + 4) + 5 * 4 + 2 * back


def sampled_copy_bytes(w: int) -> int:
    """Bytes per sampled element of Partial FC's row copies: weights and momentum gathered, then scattered."""
    return 2 * w + 2 * w + 2 * (2 * w)


def classifier_bytes(step: Step, path: str) -> float:
    """Bytes the margin softmax's forward and backward move (``path``: ``"torch"`` or ``"fused"``)."""
    c, b, d, w = step.active, step.batch, step.dim, step.weight_bytes
    if path == "torch":
        return torch_weight_bytes(w) * c * d + (TORCH_LOGIT_FORWARD + TORCH_LOGIT_BACKWARD) * b * c
    if path == "fused":
        return fused_weight_bytes(w) * c * d + FUSED_CLASS_BYTES * c + 8 * step.splits * b * d
    raise ValueError(f"path must be 'torch' or 'fused', got {path!r}")


def optimizer_bytes(step: Step) -> float:
    """Bytes of the sampled-rows copies (Partial FC) and the SGD update (momentum, weight decay)."""
    c, d, w = step.active, step.dim, step.weight_bytes
    sampled = step.sample_rate < 1.0
    return (update_bytes(w, step.rounding) + (sampled_copy_bytes(w) if sampled else 0)) * c * d


def flops(step: Step, path: str) -> float:
    """Matmul FLOPs: the torch path does 4 products of ``2 B C D``, the fused kernels 5 (one more recompute)."""
    return (5 if path == "fused" else 4) * 2 * step.batch * step.active * step.dim


def table(bandwidth: float = FLOOR_BANDWIDTH) -> str:
    rows = [Step(n) for n in (1_000_000, 2_000_000, 4_000_000)]
    rows += [Step(n, 0.1, weight_bytes=2) for n in (8_000_000, 16_000_000, 32_000_000)]
    lines = [
        (f"| classes | rate | weights | torch path GB (clf + update) | fused GB (clf + update) | "
         f"floor at {bandwidth / 1e12:.1f} TB/s: torch / fused | matmul TFLOP torch / fused |"),
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

"""The fused Triton classifier kernels compiled for a GPU: against float64 CPU references (whole matrix,
autograd), the torch path on the same GPU, and bf16-rounded operands. Skipped without CUDA.

tests/gpu/check.py runs this file with DISTRIB_FACE_TRITON_AUTOTUNE=0 (one tile configuration, fewer
compilations); every configuration's tile shape is checked below, and the classifier benchmark checks
the autotuned choice at 1M classes against the torch path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda"
SCALE = 32.0


def _inputs(num_rows: int, num_classes: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(num_rows, dim, generator=gen, dtype=torch.float64) * 2.0
    weight = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64) * 0.01
    target_col = torch.randint(0, num_classes, (num_rows,), generator=gen)
    target_col[::7] = -1
    for i in range(3):  # theta near pi
        emb[i] = -weight[target_col[i]] * 300.0 + 1e-3 * emb[i]
    target_logits = torch.randn(num_rows, generator=gen, dtype=torch.float64) * 5.0
    grad_out = torch.rand(num_rows, generator=gen, dtype=torch.float64) + 0.5
    valid = torch.rand(num_classes, generator=gen) > 0.2
    return emb, weight, target_logits, target_col, grad_out, valid


def _reference(emb, weight, target_logits, target_col, grad_out, valid=None, operands=None):
    """float64 on the CPU, whole matrix; ``operands``: round the matmul operands to that dtype first."""
    emb, weight, target_logits = (t.detach().double().requires_grad_(True) for t in (emb, weight, target_logits))
    u, w = F.normalize(emb, dim=1), F.normalize(weight, dim=1)
    if operands is not None:  # the fused kernel rounds u and the raw rows, then scales by 1 / ||w|| in fp32
        raw = (u.detach().float().to(operands).double() @ weight.detach().float().to(operands).double().t())
        logits = SCALE * raw / weight.detach().norm(dim=1)
        logits = logits + (SCALE * u @ w.t() - (SCALE * u @ w.t()).detach())  # value rounded, gradient exact
    else:
        logits = SCALE * u @ w.t()
    rows = torch.arange(len(target_col))
    mask = torch.zeros_like(logits, dtype=torch.bool)
    here = target_col >= 0
    mask[rows[here], target_col[here]] = True
    if valid is not None:
        mask |= ~valid[None, :]
    logits = logits.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(torch.cat([logits, target_logits[:, None]], dim=1), dim=1)
    (lse * grad_out).sum().backward()
    return lse.detach(), emb.grad, weight.grad, target_logits.grad


def _fused(emb, weight, target_logits, target_col, grad_out, valid=None, options=None, compute_dtype=None,
           weight_dtype=torch.float32):
    from distrib_face.parallel.kernels.triton_lse import TritonLinearMarginLogSumExp
    from distrib_face.parallel.linear_lse import ChunkSpec

    emb = emb.to(DEVICE, torch.float32).requires_grad_(True)
    weight = weight.to(DEVICE, weight_dtype).requires_grad_(True)
    target_logits = target_logits.to(DEVICE, torch.float32).requires_grad_(True)
    lse = TritonLinearMarginLogSumExp.apply(
        emb, weight, target_logits, target_col.to(DEVICE), SCALE, ChunkSpec(64, compute_dtype),
        None if valid is None else valid.to(DEVICE), options,
    )
    (lse * grad_out.to(DEVICE, torch.float32)).sum().backward()
    return tuple(t.double().cpu() for t in (lse.detach(), emb.grad, weight.grad, target_logits.grad))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _frob(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", [(300, 5003, 512), (37, 301, 100)])
def test_fp32_equals_float64_whole_matrix(shape):
    """B > 256 (several row blocks in the weight-gradient kernel), C and D off every tile size."""
    emb, weight, target_logits, target_col, grad_out, valid = _inputs(*shape)
    for mask in (None, valid):
        got = _fused(emb, weight, target_logits, target_col, grad_out, mask)
        want = _reference(emb, weight, target_logits, target_col, grad_out, mask)
        for name, g, w in zip(("lse", "d emb", "d weight", "d target"), got, want):
            assert _rel(g, w) < 1e-4, (shape, mask is not None, name, _rel(g, w))
        if mask is not None:
            assert torch.count_nonzero(got[2][~mask]) == 0


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_bf16_is_bf16_operands_with_fp32_accumulation(weight_dtype):
    emb, weight, target_logits, target_col, grad_out, _ = _inputs(300, 5003, 512, seed=1)
    if weight_dtype == torch.bfloat16:
        weight = weight.to(torch.bfloat16).double()  # what the stored rows are
    got = _fused(emb, weight, target_logits, target_col, grad_out, compute_dtype=torch.bfloat16,
                 weight_dtype=weight_dtype)
    want = _reference(emb, weight, target_logits, target_col, grad_out, operands=torch.bfloat16)
    assert _rel(got[0], want[0]) < 1e-5  # the lse: fp32 accumulation of exact bf16 products
    # gradients: G, u and w rounded to bf16 (relative u = 2^-8 each), and d W stored in bf16 for bf16 rows:
    # at most 4u + O(u^2) per element, so 5u in norm bounds it
    assert _frob(got[1], want[1]) < 5 * 2**-8, _frob(got[1], want[1])
    assert _frob(got[2], want[2]) < 5 * 2**-8, _frob(got[2], want[2])


def test_tile_shapes_of_the_autotuner_are_correct():
    """A few of the autotuner's tile shapes, forced on all three kernels (each shape is a compilation: the
    smallest, a tall and a wide one; the benchmark stage checks the tuned choice at 1M classes)."""
    from distrib_face.parallel.kernels import triton_lse

    emb, weight, target_logits, target_col, grad_out, valid = _inputs(300, 5003, 512, seed=2)
    want = _reference(emb, weight, target_logits, target_col, grad_out, valid, operands=torch.bfloat16)
    shapes = {(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_C"])
              for c in triton_lse._FWD_CONFIGS + triton_lse._BWD_E_CONFIGS + triton_lse._BWD_W_CONFIGS}
    for block_b, block_c in [(16, 64), (128, 32), (64, 64)]:
        assert (block_b, block_c) in shapes
        options = triton_lse.KernelOptions(block_b=block_b, block_c=block_c)
        got = _fused(emb, weight, target_logits, target_col, grad_out, valid, options, compute_dtype=torch.bfloat16)
        assert _rel(got[0], want[0]) < 1e-5, (block_b, block_c)
        assert _frob(got[1], want[1]) < 5 * 2**-8 and _frob(got[2], want[2]) < 5 * 2**-8, (block_b, block_c)


def test_gradient_filter_bounds():
    from distrib_face.parallel.kernels.triton_lse import KernelOptions

    emb, weight, target_logits, target_col, grad_out, _ = _inputs(256, 5003, 512, seed=3)
    exact = _fused(emb, weight, target_logits, target_col, grad_out, compute_dtype=torch.bfloat16)
    zero = _fused(emb, weight, target_logits, target_col, grad_out, compute_dtype=torch.bfloat16,
                  options=KernelOptions(filter_eps=0.0))
    for a, b in zip(zero, exact):
        assert torch.equal(a, b)
    everything = _fused(emb, weight, target_logits, target_col, grad_out, compute_dtype=torch.bfloat16,
                        options=KernelOptions(filter_eps=1.0))
    assert torch.count_nonzero(everything[1]) == 0 and torch.count_nonzero(everything[2]) == 0


@pytest.mark.parametrize("margin", ["cosface", "arcface"])
def test_classifier_auto_is_triton_and_matches(margin):
    from distrib_face.parallel import ShardedMarginClassifier
    from distrib_face.parallel.kernels import resolve_kernel

    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 20011, (300,), generator=gen)
    emb = torch.randn(300, 512, generator=gen, dtype=torch.float64)
    ref = ShardedMarginClassifier(20011, 512, margin=margin, dtype=torch.float64, seed=3, kernel="torch")
    e_ref = emb.clone().requires_grad_(True)
    ref(e_ref, labels).backward()
    loss_ref = ref(emb, labels).detach()
    results = {}
    for rate in (1.0, 0.3):
        for kernel in ("auto", "torch"):
            clf = ShardedMarginClassifier(20011, 512, margin=margin, device=DEVICE, seed=3, sample_rate=rate,
                                          kernel=kernel)
            with torch.no_grad():
                clf.weight.copy_(ref.weight.float())  # CUDA's generator draws other numbers than the CPU's
            e = emb.float().to(DEVICE).requires_grad_(True)
            loss = clf(e, labels.to(DEVICE))
            loss.backward()
            index, rows = clf.active_rows()
            results[(rate, kernel)] = (loss.detach().cpu().double(), e.grad.cpu().double(), rows.grad.cpu().double(),
                                       index)
        assert resolve_kernel("auto", e, clf.weight, None) == "triton"
    dense = results[(1.0, "auto")]
    assert _rel(dense[0], loss_ref) < 1e-4
    assert _rel(dense[1], e_ref.grad) < 1e-4
    assert _rel(dense[2], ref.weight.grad) < 1e-4
    for rate in (1.0, 0.3):  # the same sampling on the same device: fused against torch
        fused, plain = results[(rate, "auto")], results[(rate, "torch")]
        if rate < 1:
            assert torch.equal(fused[3].cpu(), plain[3].cpu())
        for a, b in zip(fused[:3], plain[:3]):
            assert _rel(a, b) < 1e-4

"""The classifier's new paths at world sizes 1-3 (gloo): equal-batch gathers, host offload, bf16 storage.

- ``equal_batches=True`` skips the size exchange; it must give what the variable-size path and the
  one-process float64 reference give.
- ``offload="host"`` on a CPU device (host == device) must give the in-device losses, weights and momentum
  bit for bit, dense and with Partial FC.
- bf16 storage (statistics in fp32) against the fp64 reference: on the same (bf16-representable) weights
  within fp32 rounding; against the unrounded fp32 weights within the bound the rounding implies
  (``2 s max |cos_bf16 - cos_fp32|``); after an SGD step within one bf16 ulp of the exact update, with
  unsampled rows and their momentum untouched.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distrib_face.losses import create_margin
from distrib_face.parallel.shard import class_range, init_class_rows
from tests.distributed.test_classifier import reference_loss
from tests.spawn import run_world

NUM_CLASSES, DIM, SEED, SCALE = 61, 8, 5, 16.0
LOCAL_BATCH = 4  # equal on every rank


def _batch(world: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    total = LOCAL_BATCH * world
    return (torch.randn(total, DIM, generator=gen, dtype=torch.float64) * 3.0,
            torch.randint(0, NUM_CLASSES, (total,), generator=gen))


def _local(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * LOCAL_BATCH: (rank + 1) * LOCAL_BATCH]


def _make(dtype=torch.float64, **kwargs):
    from distrib_face.parallel import ShardedMarginClassifier
    from distrib_face.parallel.optim import ShardOptimizer

    clf = ShardedMarginClassifier(NUM_CLASSES, DIM, margin=create_margin("cosface", scale=SCALE), dtype=dtype,
                                  seed=SEED, **kwargs)
    return clf, ShardOptimizer(clf, "sgd", lr=0.5, momentum=0.9, weight_decay=0.01)


def _train(clf, opt, rank: int, world: int, steps: int = 3) -> list[dict]:
    out = []
    for step in range(steps):
        emb, labels = _batch(world, step)
        x = _local(emb, rank).to(clf.weight.dtype if clf.weight.dtype == torch.float64 else torch.float32)
        x.requires_grad_(True)
        w_before = clf.weight.detach().clone()
        loss = clf(x, _local(labels, rank))
        loss.backward()
        index, rows = clf.active_rows()
        record = dict(loss=loss.detach().double(), x_grad=x.grad.double(), row_grad=rows.grad.double().clone(),
                      index=None if index is None else index.clone(), w_before=w_before)
        opt.step()
        opt.zero_grad()
        record.update(w_after=clf.weight.detach().clone(),
                      momentum=opt.buffers["momentum_buffer"].detach().clone(), class_range=clf.class_range)
        out.append(record)
    return out


def _worker(rank: int, world: int) -> dict:
    results = {}
    for equal in (False, True):
        clf, opt = _make(equal_batches=equal)
        results[("equal", equal)] = _train(clf, opt, rank, world, steps=1)
    for rate in (1.0, 0.3):
        for offload in ("none", "host"):
            clf, opt = _make(dtype=torch.float32, sample_rate=rate, offload=offload, equal_batches=True)
            results[("offload", rate, offload)] = _train(clf, opt, rank, world)
    for rate in (1.0, 0.3):
        clf, opt = _make(dtype=torch.bfloat16, sample_rate=rate, equal_batches=True)
        results[("bf16", rate)] = _train(clf, opt, rank, world, steps=2)
    return results


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_equal_batches_offload_and_bf16_storage(world, tmp_path):
    results = run_world(_worker, world, tmp_path)
    emb0, labels0 = _batch(world, 0)
    weight64 = init_class_rows(0, NUM_CLASSES, (1, DIM), seed=SEED, dtype=torch.float64)
    ranges = [class_range(NUM_CLASSES, r, world) for r in range(world)]

    # equal_batches: the same numbers as the size-exchanging path, and as one process.
    ref_loss, ref_emb_grad, ref_w_grad = reference_loss(emb0, labels0, weight64, "cosface",
                                                        margin_kwargs={"scale": SCALE})
    for equal in (False, True):
        for r, (start, stop) in zip(results, ranges):
            step = r[("equal", equal)][0]
            assert _rel(step["loss"], ref_loss) < 1e-10
            assert _rel(step["row_grad"].view(stop - start, 1, DIM), ref_w_grad[start:stop]) < 1e-10
        emb_grad = torch.cat([r[("equal", equal)][0]["x_grad"] for r in results])
        assert _rel(emb_grad, ref_emb_grad) < 1e-10
    for r in results:
        assert torch.equal(r[("equal", True)][0]["loss"], r[("equal", False)][0]["loss"])

    # Host offload on a CPU device: bit-identical to the in-device path, dense and sampled.
    for rate in (1.0, 0.3):
        for r in results:
            for dev, host in zip(r[("offload", rate, "none")], r[("offload", rate, "host")]):
                for key in ("loss", "x_grad", "row_grad", "w_after", "momentum"):
                    assert torch.equal(dev[key], host[key]), (rate, key)
                if rate < 1:
                    assert torch.equal(dev["index"], host["index"])

    # bf16 storage.
    for rate in (1.0, 0.3):
        for step in range(2):
            emb, labels = _batch(world, step)
            w_bf16 = torch.cat([r[("bf16", rate)][step]["w_before"] for r in results]).double().view(-1, 1, DIM)
            classes = None
            if rate < 1:
                parts = [r[("bf16", rate)][step]["index"] + s for r, (s, _) in zip(results, ranges)]
                classes = torch.cat(parts).sort().values
            # On the same weights: fp32 statistics against fp64, relative 1e-5.
            exact, _, _ = reference_loss(emb.float().double(), labels, w_bf16, "cosface", classes=classes,
                                              margin_kwargs={"scale": SCALE})
            for r in results:
                assert _rel(r[("bf16", rate)][step]["loss"], exact) < 1e-5, (rate, step)
            if step == 0:
                # Against the unrounded fp32 weights: every logit moves by at most s |d cos|, the loss by twice that.
                w32 = weight64.float().double()
                cols = w32 if classes is None else w32[classes]
                rounded = w_bf16 if classes is None else w_bf16[classes]
                unit_diff = (F.normalize(rounded, dim=2) - F.normalize(cols, dim=2))[:, 0]  # [C, D]
                cos_diff = (F.normalize(emb, dim=1) @ unit_diff.t()).abs().max()
                fp32_loss, _, _ = reference_loss(emb, labels, w32, "cosface", classes=classes,
                                                 margin_kwargs={"scale": SCALE})
                bound = 2 * SCALE * float(cos_diff) + 1e-5 * float(fp32_loss)
                for r in results:
                    assert abs(float(r[("bf16", rate)][0]["loss"]) - float(fp32_loss)) <= bound
            # The update: within one bf16 ulp of exact SGD (momentum 0.9, wd 0.01, lr 0.5) from the same start.
            for r, (start, stop) in zip(results, ranges):
                s = r[("bf16", rate)][step]
                w0 = s["w_before"].double()
                index = torch.arange(stop - start) if s["index"] is None else s["index"]
                g = torch.zeros_like(w0)
                g[index] = s["row_grad"].view(-1, DIM)
                m_prev = torch.zeros_like(w0) if step == 0 else r[("bf16", rate)][0]["momentum"].double()
                d_p = g + 0.01 * w0
                m_new = 0.9 * m_prev + d_p
                w_exact = w0 - 0.5 * m_new
                w_new = s["w_after"].double()
                ulp = 2.0**-7 * w_exact.abs() + 0.5 * 2.0**-7 * m_new.abs() + 1e-30
                assert bool(((w_new - w_exact).abs()[index] <= ulp[index]).all()), (rate, step)
                if rate < 1:  # unsampled rows and their momentum are untouched, bit for bit
                    untouched = torch.ones(stop - start, dtype=torch.bool)
                    untouched[index] = False
                    assert untouched.any()
                    assert torch.equal(s["w_after"][untouched], s["w_before"][untouched])
                    if step == 1:
                        m0 = r[("bf16", rate)][0]["momentum"]
                        assert torch.equal(s["momentum"][untouched], m0[untouched])
                assert s["w_after"].dtype == torch.bfloat16 and s["momentum"].dtype == torch.bfloat16

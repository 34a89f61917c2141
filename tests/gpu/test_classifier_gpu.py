"""The classifier on CUDA: NCCL world of 1, and agreement with the float64 CPU computation."""

from __future__ import annotations

import os

import pytest
import torch

from distrib_face.parallel import ShardedMarginClassifier


@pytest.mark.parametrize("compute_dtype,rtol", [(None, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_loss_and_grads_match_cpu_float64(compute_dtype, rtol):
    torch.manual_seed(0)
    emb = torch.randn(64, 128, dtype=torch.float64)
    labels = torch.randint(0, 5000, (64,))
    ref = ShardedMarginClassifier(5000, 128, margin="arcface", dtype=torch.float64, seed=3)
    e_ref = emb.clone().requires_grad_(True)
    loss_ref = ref(e_ref, labels)
    loss_ref.backward()
    gpu = ShardedMarginClassifier(5000, 128, margin="arcface", device="cuda", seed=3, chunk_size=1024,
                                  compute_dtype=compute_dtype)
    with torch.no_grad():
        gpu.weight.copy_(ref.weight.float())  # CUDA's generator draws other numbers than the CPU's
    e_gpu = emb.float().to("cuda").requires_grad_(True)
    loss = gpu(e_gpu, labels.to("cuda"))
    loss.backward()
    assert float(loss) == pytest.approx(float(loss_ref), rel=rtol)
    torch.testing.assert_close(e_gpu.grad.double().cpu(), e_ref.grad, rtol=rtol * 10, atol=rtol * 1e-2)


def test_nccl_world_of_one(tmp_path):
    import torch.distributed as dist

    from distrib_face.parallel import init_distributed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ctx = init_distributed(device="cuda")  # reuses the group
        clf = ShardedMarginClassifier(1000, 64, device=ctx.device, group=dist.group.WORLD)
        loss = clf(torch.randn(8, 64, device=ctx.device), torch.randint(0, 1000, (8,), device=ctx.device))
        loss.backward()
        assert torch.isfinite(loss)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_never_synchronises_with_the_host(dtype):
    """Forward, backward and the shard optimizer's step under CUDA's sync detector (errors on any sync)."""
    from distrib_face.parallel.optim import ShardOptimizer

    clf = ShardedMarginClassifier(100_000, 128, margin="arcface", sample_rate=0.1, device="cuda", dtype=dtype,
                                  equal_batches=True)
    opt = ShardOptimizer(clf, "sgd", lr=0.1)
    emb = torch.randn(64, 128, device="cuda", requires_grad=True)
    labels = torch.randint(0, 100_000, (64,), device="cuda")
    for step in range(3):  # the first step allocates; every step must be sync-free
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = clf(emb, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    clf.check_step_errors()  # the one sync, where the trainer logs
    assert torch.isfinite(loss)


def test_host_offload_gives_the_in_device_losses_on_cuda():
    from distrib_face.parallel.optim import ShardOptimizer

    def build(offload: str) -> ShardedMarginClassifier:
        return ShardedMarginClassifier(50_000, 128, margin="cosface", sample_rate=0.1, device="cuda", seed=2,
                                       offload=offload, equal_batches=True)

    in_device, offloaded = build("none"), build("host")
    assert offloaded.weight.is_pinned() and offloaded.weight.device.type == "cpu"
    with torch.no_grad():  # CUDA's generator draws other numbers than the CPU's: start from the same rows
        offloaded.weight.copy_(in_device.weight.detach().cpu())
    losses = {}
    for name, clf in (("none", in_device), ("host", offloaded)):
        opt = ShardOptimizer(clf, "sgd", lr=0.5)
        gen = torch.Generator().manual_seed(0)
        out = []
        for _ in range(4):
            emb = torch.randn(64, 128, generator=gen).cuda().requires_grad_(True)
            labels = torch.randint(0, 50_000, (64,), generator=gen).cuda()
            clf.prefetch(labels)  # starts the rows' copy before the "backbone" runs
            loss = clf(emb, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(float(loss))
        clf.flush()
        losses[name] = (out, clf.weight.detach().cpu())
    assert losses["host"][0] == pytest.approx(losses["none"][0], rel=1e-6)
    torch.testing.assert_close(losses["host"][1], losses["none"][1], rtol=1e-6, atol=1e-7)

"""Backbones on CUDA: fp16 / bf16 autocast with channels_last agree with fp32, activation checkpointing
saves memory with the same gradients, and a CUDA-trained backbone exports with ONNX parity (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distrib_face.models import create_backbone

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda"


def _calibrated(name: str, images: torch.Tensor, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = create_backbone(name, **kwargs).to(DEVICE)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


@pytest.mark.parametrize("name", ["iresnet50", "mobilefacenet", "vit_t"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_channels_last_matches_fp32(name, dtype):
    torch.manual_seed(0)
    images = torch.randn(64, 3, 112, 112, device=DEVICE)
    model = _calibrated(name, images)
    with torch.no_grad():
        ref = model(images)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=dtype):
            out = model(images.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.float32  # the head runs in fp32 under autocast
    cosine = nn.functional.cosine_similarity(out, ref, dim=1)
    assert cosine.min() > 0.99, f"{name} {dtype}: min cosine {cosine.min().item()}"
    model.train()
    with torch.autocast("cuda", dtype=dtype):
        loss = model(images.contiguous(memory_format=torch.channels_last)).float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradient_checkpointing_saves_memory_same_gradients():
    torch.manual_seed(0)
    images = torch.randn(64, 3, 112, 112, device=DEVICE)
    plain = create_backbone("iresnet50").to(DEVICE)
    ckpt = create_backbone("iresnet50", gradient_checkpointing=True).to(DEVICE)
    ckpt.load_state_dict(plain.state_dict())
    peaks, grads = [], []
    for model in (plain, ckpt):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(images).float().square().mean()
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        grads.append(model.layer2[0].conv1.weight.grad.float().clone())
    assert peaks[1] < 0.6 * peaks[0], f"peak activation memory {peaks[1] / 2**20:.0f} MiB vs {peaks[0] / 2**20:.0f} MiB"
    cosine = nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0)
    assert cosine > 0.999


def test_cuda_backbone_exports_with_parity(tmp_path):
    from distrib_face.export import check_parity, export_onnx

    images = torch.randn(16, 3, 112, 112, device=DEVICE)
    model = _calibrated("iresnet50", images)
    path = export_onnx(model, tmp_path / "r50.onnx")  # exported from a CPU fp32 copy
    assert next(model.parameters()).device.type == "cuda"  # the original is left where it was
    assert check_parity(model, path, images.cpu()) <= 1e-4

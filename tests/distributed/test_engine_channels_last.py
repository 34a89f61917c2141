"""``model.channels_last`` under DeepSpeed: the engine initialises (DeepSpeed 0.19.8 broadcasts parameters
through ``view(torch.uint8)``, which channels_last weights cannot take) and trains exactly like the
contiguous model on channels_last images."""

from __future__ import annotations

import logging

import torch

from tests.spawn import run_world


def _step_worker(rank: int, world: int) -> dict:
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from distrib_face.config import Config
    from distrib_face.train.engine import build_backbone, build_engine

    out = {}
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    for channels_last in (False, True):
        cfg = Config.from_dict({
            "data": {"source": "random", "image_size": 32, "batch_size": 4},
            "model": {"backbone": "iresnet_tiny", "embedding_size": 16, "channels_last": channels_last},
            "deepspeed": {"zero_stage": 1, "precision": "fp32"},
            "train": {"total_steps": 1}, "tracking": {"enabled": False}, "device": "cpu",
        })
        torch.manual_seed(0)
        bundle = build_engine(cfg, build_backbone(cfg), 0.1, torch.device("cpu"), world)
        batch = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        loss = bundle.engine(batch).square().mean()
        bundle.engine.backward(loss)
        bundle.engine.step()
        out[channels_last] = (float(loss), [p.detach().clone() for p in bundle.engine.module.parameters()])
    return out


def test_channels_last_backbone_trains_like_the_contiguous_one(tmp_path):
    for result in run_world(_step_worker, 1, tmp_path):  # DeepSpeed broadcasts even in a world of 1
        plain, cl = result[False], result[True]
        assert abs(cl[0] - plain[0]) <= 1e-5 * abs(plain[0])
        for a, b in zip(cl[1], plain[1]):  # after one optimiser step (ZeRO-1 keeps the gradients itself)
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
        assert len(cl[1]) == len(plain[1]) > 0

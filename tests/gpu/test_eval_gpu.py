"""embed_images on a CUDA device gives the CPU result (skipped without CUDA)."""

import numpy as np
import pytest
import torch

from distrib_face.eval import embed_images

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_embed_images_cuda_matches_cpu():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(32, 16),
    ).eval()
    images = np.random.default_rng(0).integers(0, 256, (10, 112, 112, 3), dtype=np.uint8)
    on_cpu = embed_images(net, images, batch_size=4)
    on_gpu = embed_images(net.to("cuda"), images, batch_size=4)  # device taken from the module
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)

"""DALI ``mixed`` decoding on a GPU: same images as the CPU pipeline within JPEG tolerance, tensors on the GPU."""

from __future__ import annotations

import pytest
import torch

from distrib_face.data import build_loader
from distrib_face.data.testing import write_indexed_shards

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_dali_mixed_matches_cpu(tmp_path):
    write_indexed_shards(tmp_path, [40, 40], image_size=32)
    kwargs = dict(batch_size=20, rank=0, world_size=1, num_workers=0, augment=False, shuffle=False, seed=0)
    cpu = {int(l): x for images, labels in build_loader(tmp_path, decoder="dali", device="cpu", **kwargs)
           for x, l in zip(images, labels)}
    seen = 0
    for images, labels in build_loader(tmp_path, decoder="dali", device="cuda:0", dtype="bfloat16", **kwargs):
        assert images.device.type == "cuda" and labels.device.type == "cuda" and images.dtype == torch.bfloat16
        for x, l in zip(images.float().cpu(), labels.cpu()):
            # nvJPEG and libjpeg-turbo differ by a few levels at most
            assert (x - cpu[int(l)]).abs().mean() < 3 / 127.5
            seen += 1
    assert seen == 80


@pytest.fixture(scope="module")
def augment_sets(tmp_path_factory):
    from tests.integration import test_data_augment as checks

    root = tmp_path_factory.mktemp("augment")
    return {"ramps": checks._write(root / "ramps", checks._ramps()),
            "flat": checks._write(root / "flat", checks.np.tile(checks.np.array([100, 150, 100], "uint8"),
                                                                (checks.SIZE, checks.SIZE, 1))),
            "bands": checks._write(root / "bands", checks._bands()),
            "checker": checks._write(root / "checker", checks._checkerboard())}


@pytest.mark.parametrize("name", ["crop", "color_jitter", "grey", "blur", "flip", "all_together"])
def test_dali_mixed_augmentation_matches_pil(augment_sets, name):
    """The CPU checks of tests/integration/test_data_augment.py, with DALI decoding on ``mixed`` and every
    augmentation running on the GPU (the same graph: the device comes from the decoder's output)."""
    from tests.integration import test_data_augment as checks

    getattr(checks, f"check_{name}")(augment_sets, "cuda:0")

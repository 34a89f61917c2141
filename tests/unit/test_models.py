"""Backbones: published sizes, the arcface_torch layout, a sweep over every registered backbone, and the
switches (channels_last, mixed precision, activation checkpointing, input size)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distrib_face.models import UnknownBackboneError, create_backbone, list_backbones
from distrib_face.models.profile import count_macs, count_parameters

# Published figures. iresnet: arcface_torch README ("FLOPs" column, GMACs at 112x112: r18 2.6, r50 6.3,
# r100 12.1, r200 23.5) and its model zoo parameter counts (r50 43.6M, r100 65.2M). ViT: the same table
# (ViT-T 1.5, ViT-S 5.7, ViT-B 11.4). MobileFaceNet: Chen et al. 2018, Table 2 (0.99M parameters,
# 221M MAdds, 128-d embedding); arcface_torch's mbf is "mobilefacenet-0.45G".
PUBLISHED = [
    # name, kwargs, params (M) or None, GMACs, relative tolerance
    ("iresnet18", {}, None, 2.6, 0.02),
    ("iresnet50", {}, 43.6, 6.3, 0.01),
    ("iresnet100", {}, 65.2, 12.1, 0.01),
    ("iresnet200", {}, None, 23.5, 0.01),
    ("mobilefacenet", {"embedding_size": 128}, 0.99, 0.221, 0.02),
    ("mbf", {}, None, 0.45, 0.03),
    ("vit_t", {}, None, 1.5, 0.02),
    ("vit_s", {}, None, 5.7, 0.02),
    ("vit_b", {}, None, 11.4, 0.01),
]

# The sweep runs every registered factory at full depth but narrow width and a 48 x 48 input, so that it
# stays fast on two cores (full-width weight traffic dominates a small-input CPU step); the full-width
# sizes are checked on the meta device above, and iresnet50 / mobilefacenet / vit_t run at full size in
# the export parity tests.
SWEEP_INPUT_SIZE = 48


def _sweep_kwargs(name: str) -> dict:
    if name.startswith("iresnet") and name != "iresnet_tiny":
        return {"widths": (16, 32, 64, 128)}
    if name.startswith("vit") and name != "vit_tiny":
        return {"dim": 64}
    if name in ("mbf", "mbf_large"):
        return {"scale": 1}
    return {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These are small tensors: one intra-op thread is faster, and far faster when other processes share
    # the two cores (two OpenMP threads then wait on each other at every op).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_backbone(name, **kwargs)


def _calibrate(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Set BatchNorm running statistics from ``images`` (as training would), then switch to eval.

    A freshly initialised deep network has running stats (0, 1) that do not fit its activations, so its
    eval-mode outputs explode or vanish; calibrated, it behaves like a trained one numerically.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


def test_registry_lists_every_family():
    names = list_backbones()
    for name in ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "iresnet_tiny",
                 "mobilefacenet", "mbf", "mobilefacenet_tiny", "vit_t", "vit_s", "vit_tiny"):
        assert name in names
    assert names == sorted(names)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(UnknownBackboneError, match="'resnet9000'.*iresnet50"):
        create_backbone("resnet9000")


@pytest.mark.parametrize("name,kwargs,params_m,gmacs,rel", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_size_matches_published_figures(name, kwargs, params_m, gmacs, rel):
    model = _meta(name, **kwargs)
    macs = count_macs(model, input_size=112)
    assert macs / 1e9 == pytest.approx(gmacs, rel=rel)
    if params_m is not None:
        assert count_parameters(model) / 1e6 == pytest.approx(params_m, rel=rel)


def test_count_macs_matches_closed_form_for_a_tiny_net():
    # conv 3->4, 3x3, same padding, on 8x8: 8*8*4*3*9 MACs; then linear 256->5: 256*5 MACs.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    assert count_macs(model, input_size=8) == 8 * 8 * 4 * 3 * 9 + 256 * 5


def test_iresnet50_has_the_arcface_torch_layout():
    model = _meta("iresnet50")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # stem conv3x3 3->64 stride 1; block = bn1, conv1, bn2, prelu, conv2(stride), bn3; 1x1 projection shortcut
    assert shapes["conv1.weight"] == (64, 3, 3, 3) and model.conv1.stride == (1, 1)
    assert shapes["layer1.0.prelu.weight"] == (64,)
    assert shapes["layer1.0.downsample.0.weight"] == (64, 64, 1, 1)
    assert model.layer1[0].conv2.stride == (2, 2) and model.layer1[0].conv1.stride == (1, 1)
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [3, 4, 14, 3]
    assert shapes["layer3.13.conv2.weight"] == (256, 256, 3, 3)
    # head: BN2d(512) - dropout - FC(512*7*7 -> 512) - BN1d(512) with a frozen unit scale
    assert shapes["bn2.weight"] == (512,)
    assert shapes["fc.weight"] == (512, 512 * 7 * 7) and shapes["fc.bias"] == (512,)
    assert shapes["features.running_var"] == (512,) and not model.features.weight.requires_grad


@pytest.mark.parametrize("layers,name", [([2, 2, 2, 2], "iresnet18"), ([3, 4, 6, 3], "iresnet34"),
                                         ([3, 13, 30, 3], "iresnet100"), ([6, 26, 60, 6], "iresnet200")])
def test_iresnet_depths(layers, name):
    model = _meta(name)
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == layers


@pytest.mark.parametrize("input_size,side", [(112, 7), (64, 4), (56, 4), (48, 3)])
def test_input_size_sets_the_fc(input_size, side):
    model = create_backbone("iresnet_tiny", input_size=input_size)
    assert model.fc.in_features == 128 * side * side  # ceil(s / 2) four times
    out = model.eval()(torch.zeros(2, 3, input_size, input_size))
    assert out.shape == (2, 512)
    mbf = create_backbone("mobilefacenet_tiny", input_size=input_size)
    assert mbf.gdc[0].kernel_size == (side, side)
    assert mbf.eval()(torch.zeros(1, 3, input_size, input_size)).shape == (1, 512)


@pytest.mark.parametrize("name", list_backbones())
def test_sweep_forward_backward_eval_determinism(name):
    torch.manual_seed(0)
    size = SWEEP_INPUT_SIZE
    model = create_backbone(name, embedding_size=64, input_size=size, **_sweep_kwargs(name))
    images = torch.randn(3, 3, size, size)

    out = model.train()(images)
    assert out.shape == (3, 64) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    _calibrate(model, images)  # sane running statistics, or a deep untrained net overflows in eval mode
    with torch.no_grad():
        first, second = model(images), model(images)
        alone = model(images[:1])
    assert torch.equal(first, second)
    # eval mode: an image's embedding does not depend on the rest of the batch
    torch.testing.assert_close(alone, first[:1], rtol=1e-4, atol=1e-4 * first.abs().max().item())


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = create_backbone("iresnet_tiny", dropout=0.5, input_size=32)
    images = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(images), model(images))
    model.eval()
    assert torch.equal(model(images), model(images))


@pytest.mark.parametrize("name", ["iresnet_tiny", "vit_tiny"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    kwargs = {"input_size": 48}
    if name.startswith("vit"):
        kwargs.update(mask_ratio=0.0, drop_path_rate=0.0)  # no randomness between the two runs
    plain = create_backbone(name, **kwargs)
    ckpt = create_backbone(name, gradient_checkpointing=True, **kwargs)
    ckpt.load_state_dict(plain.state_dict())
    images = torch.randn(4, 3, 48, 48)
    out_plain, out_ckpt = plain(images), ckpt(images)
    torch.testing.assert_close(out_ckpt, out_plain)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", ["iresnet_tiny", "mobilefacenet_tiny", "vit_tiny"])
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(0)
    model = _calibrate(create_backbone(name, input_size=48), torch.randn(16, 3, 48, 48))
    cl = create_backbone(name, input_size=48, channels_last=True)
    cl.load_state_dict(model.state_dict())
    cl.eval()
    conv = next(m for m in cl.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        ref = model(images)
        out = cl(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["iresnet_tiny", "mobilefacenet_tiny", "vit_tiny"])
def test_bf16_autocast_keeps_the_head_in_fp32(name):
    torch.manual_seed(0)
    model = _calibrate(create_backbone(name, input_size=48), torch.randn(32, 3, 48, 48))
    images = torch.randn(8, 3, 48, 48)
    with torch.no_grad():
        ref = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
    assert out.dtype == torch.float32  # the FC / BN1d head ran outside autocast
    cosine = nn.functional.cosine_similarity(out, ref, dim=1)
    assert cosine.min() > 0.98, cosine  # bf16 has ~3 significant digits
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(images).square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_fp16_autocast_and_a_bf16_cast_model_run():
    torch.manual_seed(0)
    model = _calibrate(create_backbone("iresnet_tiny", input_size=32), torch.randn(16, 3, 32, 32))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert model(images).dtype == torch.float32
    # DeepSpeed's bf16 mode casts the whole module (buffers included) and feeds bf16 inputs.
    cast = model.to(torch.bfloat16)
    with torch.no_grad():
        out = cast(images.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_tiny_backbones_are_small():
    # The CPU demo and tests rely on these staying cheap (see docs/models.md for img/s).
    for name, max_gmacs in (("iresnet_tiny", 0.05), ("mobilefacenet_tiny", 0.05), ("vit_tiny", 0.01)):
        assert count_macs(_meta(name, input_size=64), input_size=64) / 1e9 < max_gmacs


def test_compiles_without_graph_breaks():
    # The trainer's torch.compile switch: one graph, also under autocast (the fp32 head is a Python branch).
    import torch._dynamo

    model = create_backbone("iresnet_tiny", input_size=32, gradient_checkpointing=True)
    images = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(images)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
